"""Pure functions for one Gemma 3 layer block, over a block's weight dict (plain arrays or low-bit weights).

What differs from Llama (`llama_layers`), each from the Gemma 3 architecture:
  * the embedding is scaled by sqrt(d_model) (in the compute dtype), and the tied head reads it unscaled;
  * attention: q and k are RMS-normed per head before RoPE, RoPE rotates halves (GGUF keeps Gemma's Q/K rows as
    they are), scores are scaled by head_dim^-1/2, and a layer is either local (a sliding window of
    `sliding_window` positions, RoPE base 1e4) or global (full causal, RoPE base from the GGUF: 1e6);
  * RMS norms before *and after* attention and the MLP (four per layer); GGUF's norm weights already hold
    Gemma's (1 + w), so the norm is the plain RMS norm;
  * the MLP is GeGLU with tanh-approximated GELU.

Shapes: B batch, T new tokens, S cache length, D model width, H query heads, KV key/value heads, G = H // KV,
Dh head width, F MLP width, V vocabulary.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .llama_layers import rms_norm
from .weights import matmul, take_columns

GLOBAL_EVERY = 6  # every sixth layer (0-based 5, 11, 17, ...) attends globally; the others use the sliding window
LOCAL_ROPE_BASE = 10000.0


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """Hyper-parameters of a Gemma 3 decoder, read from GGUF metadata (`gemma3.*`)."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    rope_base: float  # global layers
    norm_eps: float
    context_length: int
    sliding_window: int
    local_rope_base: float = LOCAL_ROPE_BASE

    def is_global(self, layer: int) -> bool:
        return (layer + 1) % GLOBAL_EVERY == 0

    def layer_rope_base(self, layer: int) -> float:
        return self.rope_base if self.is_global(layer) else self.local_rope_base

    def layer_window(self, layer: int) -> int:
        """Keys a query of this layer may see (itself included): the window, or the whole context."""
        return self.context_length if self.is_global(layer) else self.sliding_window


def rope_rotate_half(x_BxTxHxDh, positions_T, base: float):
    """Rotary embedding on the halves (x[:Dh/2], x[Dh/2:]) of each head: Gemma's layout."""
    dh = x_BxTxHxDh.shape[-1]
    inv_freq = base ** (-jnp.arange(0, dh, 2, dtype=jnp.float32) / dh)  # [Dh/2]
    angle = positions_T.astype(jnp.float32)[:, None, None] * inv_freq  # [T, 1, Dh/2]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    x = x_BxTxHxDh.astype(jnp.float32)
    x1, x2 = x[..., : dh // 2], x[..., dh // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BxTxHxDh.dtype)


def attention_block(cfg: GemmaConfig, window: int, base: float, w: dict, x_BxTxD, k_BxSxKVxDh, v_BxSxKVxDh, pos):
    """x + post_norm(attention(pre_norm(x))) with a KV cache; `pos` is the index of x's first token.

    `window` and `base` are the layer's (`GemmaConfig.layer_window`, `layer_rope_base`): static, so the local layers
    share one compiled function and the global ones another. Returns (x, updated k cache, updated v cache)."""
    B, T, _ = x_BxTxD.shape
    H, KV, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    S = k_BxSxKVxDh.shape[1]
    h = rms_norm(x_BxTxD, w["attn_norm"], cfg.norm_eps)
    positions_T = pos + jnp.arange(T)
    q = rms_norm(matmul(h, w["wq"]).reshape(B, T, H, Dh), w["q_norm"], cfg.norm_eps)
    k = rms_norm(matmul(h, w["wk"]).reshape(B, T, KV, Dh), w["k_norm"], cfg.norm_eps)
    v = matmul(h, w["wv"]).reshape(B, T, KV, Dh)
    q, k = rope_rotate_half(q, positions_T, base), rope_rotate_half(k, positions_T, base)
    k_cache = jax.lax.dynamic_update_slice(k_BxSxKVxDh, k.astype(k_BxSxKVxDh.dtype), (0, pos, 0, 0))
    v_cache = jax.lax.dynamic_update_slice(v_BxSxKVxDh, v.astype(v_BxSxKVxDh.dtype), (0, pos, 0, 0))
    q_BxTxKVxGxDh = q.reshape(B, T, KV, H // KV, Dh).astype(jnp.float32)
    scores = jnp.einsum("btkgd,bskd->bkgts", q_BxTxKVxGxDh, k_cache.astype(jnp.float32)) * (Dh ** -0.5)
    key_S = jnp.arange(S)[None, :]
    visible_TxS = (key_S <= positions_T[:, None]) & (key_S > positions_T[:, None] - window)
    probs = jax.nn.softmax(jnp.where(visible_TxS, scores, -jnp.inf), axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v_cache.astype(jnp.float32)).reshape(B, T, H * Dh)
    o = rms_norm(matmul(out.astype(x_BxTxD.dtype), w["wo"]), w["post_attn_norm"], cfg.norm_eps)
    return x_BxTxD + o, k_cache, v_cache


def mlp_block(cfg: GemmaConfig, w: dict, x_BxTxD):
    """x + post_norm(W_down(gelu_tanh(W_gate h) * W_up h)), h = pre_norm(x)."""
    h = rms_norm(x_BxTxD, w["ffn_norm"], cfg.norm_eps)
    gated_BxTxF = jax.nn.gelu(matmul(h, w["w_gate"]), approximate=True) * matmul(h, w["w_up"])
    return x_BxTxD + rms_norm(matmul(gated_BxTxF, w["w_down"]), w["post_ffn_norm"], cfg.norm_eps)


def embed_tokens(cfg: GemmaConfig, w: dict, ids_BxT, dtype):
    """Embedding rows scaled by sqrt(d_model), the scale rounded to the compute dtype as Gemma does."""
    x = take_columns(w["embedding"], ids_BxT).astype(dtype)
    return x * jnp.asarray(cfg.d_model ** 0.5, dtype)


def embed_shard_tokens(cfg: GemmaConfig, w: dict, ids_BxT, lo, dtype):
    """`embed_tokens` from one vocabulary shard (columns of ids lo .. lo + width - 1): the scaled rows of the tokens
    it holds, zeros for the others, so the shards' results sum to the whole lookup exactly."""
    local_BxT = ids_BxT - lo
    held_BxT = (local_BxT >= 0) & (local_BxT < w["embedding"].shape[-1])
    x = embed_tokens(cfg, w, jnp.where(held_BxT, local_BxT, 0), dtype)
    return jnp.where(held_BxT[..., None], x, jnp.zeros((), dtype))


def embed_shard_tokens_in_place(cfg: GemmaConfig, w: dict, ids_BxT, lo, dtype):
    """`embed_shard_tokens` from a shard's float arrays in host memory, as it runs under `compute_on('device_host')`
    (`host_ops.on_host`): there (jax 0.10) an op may not mix a host array with an array the trace makes on the
    device (a `where`'s zeros, `take`'s index clamps), so the masked indices are promised in bounds and the mask
    multiplies instead of selecting. The same values: a held token's scaled row, zeros for the others."""
    local_BxT = ids_BxT - lo
    held_BxT = (local_BxT >= 0) & (local_BxT < w["embedding"].shape[-1])
    rows = w["embedding"].T.at[local_BxT * held_BxT.astype(local_BxT.dtype)].get(mode="promise_in_bounds")
    x = rows.astype(dtype) * jnp.asarray(cfg.d_model ** 0.5, dtype)
    return x * held_BxT[..., None].astype(dtype)
