"""Pure functions for one Llama layer block: what the executor jits per block kind.

Each function takes a block's weights as a flat dict (leaf name -> array or low-bit weight, see `weights.py`), so
the same code runs on a full-precision block, an int8/int4 block or a low-rank fallback.

Shapes: B batch, T new tokens, S cache length, D model width, H query heads, KV key/value heads, G = H // KV,
Dh head width, F MLP width, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .gguf_source import LlamaConfig
from .weights import matmul, take_columns


def rms_norm(x_BxTxD, w_D, eps: float):
    x32 = x_BxTxD.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * w_D.astype(jnp.float32)).astype(x_BxTxD.dtype)


def rope_adjacent_pairs(x_BxTxHxDh, positions_T, base: float):
    """Rotary embedding on adjacent pairs (x[2i], x[2i+1]): the layout GGUF stores Q/K rows in."""
    dh = x_BxTxHxDh.shape[-1]
    inv_freq = base ** (-jnp.arange(0, dh, 2, dtype=jnp.float32) / dh)  # [Dh/2]
    angle_Tx1xDh2 = positions_T.astype(jnp.float32)[:, None, None] * inv_freq
    cos, sin = jnp.cos(angle_Tx1xDh2), jnp.sin(angle_Tx1xDh2)
    x = x_BxTxHxDh.astype(jnp.float32).reshape(*x_BxTxHxDh.shape[:-1], dh // 2, 2)
    x0, x1 = x[..., 0], x[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(x_BxTxHxDh.shape).astype(x_BxTxHxDh.dtype)


def attention_block(cfg: LlamaConfig, w: dict, x_BxTxD, k_BxSxKVxDh, v_BxSxKVxDh, pos):
    """Pre-norm grouped-query attention with a KV cache; `pos` is the index of x's first token.

    Returns (x + attention, updated k cache, updated v cache).
    """
    delta_BxTxD, k_cache, v_cache = attention_delta(cfg, w, x_BxTxD, k_BxSxKVxDh, v_BxSxKVxDh, pos)
    return x_BxTxD + delta_BxTxD, k_cache, v_cache


def attention_delta(cfg: LlamaConfig, w: dict, x_BxTxD, k_BxSxKVxDh, v_BxSxKVxDh, pos):
    """What attention adds to the residual stream (and the updated caches): over `cfg.n_heads` heads, so on a
    tensor-parallel shard (its heads, `wo`'s rows for them) a partial sum the devices add up."""
    B, T, _ = x_BxTxD.shape
    H, KV, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    S = k_BxSxKVxDh.shape[1]
    h = rms_norm(x_BxTxD, w["attn_norm"], cfg.norm_eps)
    positions_T = pos + jnp.arange(T)
    q = rope_adjacent_pairs(matmul(h, w["wq"]).reshape(B, T, H, Dh), positions_T, cfg.rope_base)
    k = rope_adjacent_pairs(matmul(h, w["wk"]).reshape(B, T, KV, Dh), positions_T, cfg.rope_base)
    v = matmul(h, w["wv"]).reshape(B, T, KV, Dh)
    k_cache = jax.lax.dynamic_update_slice(k_BxSxKVxDh, k.astype(k_BxSxKVxDh.dtype), (0, pos, 0, 0))
    v_cache = jax.lax.dynamic_update_slice(v_BxSxKVxDh, v.astype(v_BxSxKVxDh.dtype), (0, pos, 0, 0))
    q_BxTxKVxGxDh = q.reshape(B, T, KV, H // KV, Dh).astype(jnp.float32)
    logits_BxKVxGxTxS = jnp.einsum("btkgd,bskd->bkgts", q_BxTxKVxGxDh, k_cache.astype(jnp.float32)) / jnp.sqrt(Dh)
    causal_TxS = jnp.arange(S)[None, :] <= positions_T[:, None]
    logits_BxKVxGxTxS = jnp.where(causal_TxS, logits_BxKVxGxTxS, -jnp.inf)
    probs = jax.nn.softmax(logits_BxKVxGxTxS, axis=-1)
    out_BxTxKVxGxDh = jnp.einsum("bkgts,bskd->btkgd", probs, v_cache.astype(jnp.float32))
    out = out_BxTxKVxGxDh.reshape(B, T, H * Dh).astype(x_BxTxD.dtype)
    return matmul(out, w["wo"]), k_cache, v_cache


def mlp_block(cfg: LlamaConfig, w: dict, x_BxTxD):
    """Pre-norm SwiGLU: x + W_down(silu(W_gate h) * W_up h)."""
    return x_BxTxD + mlp_delta(cfg, w, x_BxTxD)


def mlp_delta(cfg: LlamaConfig, w: dict, x_BxTxD):
    """What the MLP adds to the residual stream; on a tensor-parallel shard (its hidden units) a partial sum."""
    h = rms_norm(x_BxTxD, w["ffn_norm"], cfg.norm_eps)
    gated_BxTxF = jax.nn.silu(matmul(h, w["w_gate"])) * matmul(h, w["w_up"])
    return matmul(gated_BxTxF, w["w_down"])


def embed_tokens(w: dict, ids_BxT, dtype):
    return take_columns(w["embedding"], ids_BxT).astype(dtype)


def lm_head(cfg: LlamaConfig, norm_w: dict, embed_w: dict, x_BxTxD):
    """Final norm and the tied head: logits = norm(x) @ embedding_DxV, in float32."""
    h = rms_norm(x_BxTxD, norm_w["norm"], cfg.norm_eps)
    return matmul(h, embed_w["embedding"]).astype(jnp.float32)
