"""A block's sensitivity to its lossy states, by the model's forward and hand-written backward (Llama's ops): the
calibration text's ids, the forward from any position with each position's input recorded, the exact mean KL to
the full-precision logits, a block's lossy representations, and a diagonal Fisher estimate ½ Σ F̂ ΔW² of each state's
ΔKL. `calibrate.py` measures with these and stores what they give.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vorch_jax.models import llama_compute as C
from vorch_jax.models.llama import block_kind_layer

CALIBRATION_OFFSET_CHARS = 200_000  # about 50k tokens into the KJV: no run's prompt or evaluation reaches it



def calibration_ids(source, tokens: int) -> np.ndarray:
    """int32[tokens + 1]: BOS then `tokens` tokens of the KJV text from its `CALIBRATION_OFFSET_CHARS`-th character
    on (the start of the next verse): text that a run's prompt and evaluation (the KJV from its start) never read."""
    from vorch_jax.models.corpus import kjv_text
    from vorch_jax.models.smollm2 import bos_id
    from vorch_jax.models.tokenizer import tokenizer_from_gguf_metadata

    if tokens < 2:
        raise ValueError(f"calibration needs at least 2 tokens, got {tokens}")
    tok = tokenizer_from_gguf_metadata(source.tokenizer_metadata())
    text = kjv_text(max_chars=CALIBRATION_OFFSET_CHARS + 8 * tokens + 1000)
    text = text[text.index("\n", CALIBRATION_OFFSET_CHARS) + 1:]
    body = tok.encode(text).ids[:tokens]
    if len(body) < tokens:
        raise ValueError(f"the calibration text has only {len(body)} tokens, fewer than {tokens}")
    return np.asarray([bos_id(tok)] + body, np.int32)


def run_from(cfg, W: dict, order: list, ids_1xT, start: int = 0, x_1xTxD=None, record: list | None = None):
    """Logits [1, T, V] from schedule position `start` on (x_1xTxD: the activation entering it; None at 0).

    `record`, if given, receives the activation entering each position from `start` (the embed position: None).
    """
    T = ids_1xT.shape[1]
    x = x_1xTxD
    for i in range(start, len(order) - 1):
        b = order[i]
        if record is not None:
            record.append(x)
        kind, _ = block_kind_layer(cfg, b)
        if kind == "embed":
            x = C.embed_lookup(W[b], ids_1xT, "float32")
        elif kind == "attn":
            kv = jnp.zeros((1, T, cfg.n_kv_heads, cfg.head_dim), jnp.float32)
            x, _, _ = C.attention(cfg, W[b], x, kv, jnp.zeros_like(kv), jnp.int32(0))
        else:
            x = C.mlp(cfg, W[b], x)
    if record is not None:
        record.append(x)
    return C.head(W["embed"], C.final_norm(cfg, W[order[-1]], x))


@jax.jit
def kl_mean(ref_TxV, logits_TxV):
    """Mean over T of KL(p ‖ q), p = softmax(ref), q = softmax(logits), from the logit difference d = logits − ref:

        KL_t = log E_p[exp(d − m)],  m = E_p[d]      (E_p with p renormalised, so E_p[d − m] = 0 exactly)

    evaluated as log1p(E_p[expm1(d − m)]): accurate for tiny KL in float32, and exactly 0 when q's logits are p's
    (a log-prob formulation leaves ~1e-6 nats of rounding, the size of S1's smallest effects)."""
    p = jnp.exp(ref_TxV - jnp.max(ref_TxV, axis=-1, keepdims=True))
    p = p / jnp.sum(p, axis=-1, keepdims=True)
    psum = jnp.sum(p, axis=-1, keepdims=True)
    d = logits_TxV - ref_TxV
    m = jnp.sum(p * d, axis=-1, keepdims=True) / psum
    kl_T = jnp.log1p(jnp.sum(p * jnp.expm1(d - m), axis=-1) / psum[:, 0])
    return jnp.mean(jnp.maximum(kl_T, 0.0))


def convert(w: dict, state: str, *, int4_group_size: int, lowrank_rank: int) -> dict:
    """A block's weight dict in `state` (2-D leaves converted by the tiers' formats; 1-D leaves unchanged)."""
    from vorch_jax.tiers.low_rank import factorize
    from vorch_jax.tiers.quant_int4 import quantize_int4
    from vorch_jax.tiers.quant_int8 import quantize_int8

    fn = {"S0": lambda a: a, "S1": quantize_int8, "S2": lambda a: quantize_int4(a, int4_group_size),
          "S6": lambda a: factorize(a, lowrank_rank)}[state]
    return {k: fn(v) if v.ndim == 2 else v for k, v in w.items()}


def dequantized(leaf):
    return leaf.dequantize() if hasattr(leaf, "dequantize") else leaf


@jax.jit
def fisher_term(f, w, deq):
    return 0.5 * jnp.sum(f * jnp.square(w - deq))


def _block_apply(cfg, kind: str, w, x_1xTxD):
    """One layer block's output for input x (the executor's jitted functions; inlined when traced)."""
    if kind == "attn":
        kv = jnp.zeros((1, x_1xTxD.shape[1], cfg.n_kv_heads, cfg.head_dim), jnp.float32)
        return C.attention(cfg, w, x_1xTxD, kv, jnp.zeros_like(kv), jnp.int32(0))[0]
    return C.mlp(cfg, w, x_1xTxD)


def _fisher(g_Kx, n_K):
    """Σ_k n_k g_k² / K over the leading chunk axis: the diagonal empirical Fisher from chunk gradients."""
    return jnp.tensordot(n_K, jnp.square(g_Kx), axes=1) / n_K.shape[0]


@functools.partial(jax.jit, static_argnames=("cfg", "kind", "want_w"))
def _block_vjp(cfg, kind, want_w, w, x_1xTxD, ct_Kx1xTxD, n_K):
    """Backward through one layer block for K cotangents at once: (F̂ of its leaves or None, input cotangents)."""
    _, vjp = jax.vjp(lambda w_, x_: _block_apply(cfg, kind, w_, x_), w, x_1xTxD)
    gw_K, gx_K = jax.vmap(vjp)(ct_Kx1xTxD)
    return (jax.tree.map(lambda g: _fisher(g, n_K), gw_K) if want_w else None), gx_K


@functools.partial(jax.jit, static_argnames=("cfg",))
def _head_vjp(cfg, w_embed, w_norm, x_1xTxD, tgt_T, weights_KxT):
    """Backward of Σ_t weights[k, t]·NLL_t through the final norm and tied head, for each k: per-chunk gradients
    of the embedding [K, D, V] (kept: the lookup adds to them), F̂ of the norm, input cotangents [K, 1, T, D]."""
    def token_nll(we, wn, x):
        logits_TxV = C.head(we, C.final_norm(cfg, wn, x))[0]
        return -jnp.take_along_axis(jax.nn.log_softmax(logits_TxV, axis=-1), tgt_T[:, None], axis=-1)[:, 0]

    _, vjp = jax.vjp(token_nll, w_embed, w_norm, x_1xTxD)
    return jax.vmap(vjp)(weights_KxT)


@jax.jit
def _embed_fisher(g_head_K, ids_T, ct_Kx1xTxD, n_K):
    """F̂ of the embedding [D, V]: per chunk, head gradient + the lookup's (cotangents scattered to their columns)."""
    g_K = g_head_K["embedding"].at[:, :, ids_T].add(jnp.swapaxes(ct_Kx1xTxD[:, 0], 1, 2))
    return {"embedding": _fisher(g_K, n_K)}


def fisher_diag(cfg, W: dict, order: list, record: list, ids, blocks: list, chunks: int) -> dict:
    """{block: {leaf: F̂}} for `blocks`: F̂ = n_c · mean_c g_c², g_c the gradient of chunk c's mean NLL.

    A hand-written backward over the schedule, from the recorded activations: one jitted vjp per kind (the block's
    forward is recomputed inside it), all chunks at once (vmap over the cotangents); it stops at the earliest block
    asked for."""
    tgt = jnp.asarray(ids[1:])
    T = tgt.shape[0]
    parts = np.array_split(np.arange(T), max(1, min(chunks, T)))
    weights_KxT = np.zeros((len(parts), T), np.float32)
    for k, c in enumerate(parts):
        weights_KxT[k, c] = 1.0 / len(c)
    n_K = jnp.asarray([len(c) for c in parts], jnp.float32)
    g_embed_K, g_norm_K, ct = _head_vjp(cfg, W["embed"], W[order[-1]], record[-1], tgt, jnp.asarray(weights_KxT))
    F = {}
    if order[-1] in blocks:
        F[order[-1]] = jax.tree.map(lambda g: _fisher(g, n_K), g_norm_K)
    del g_norm_K
    first = min(order.index(b) for b in blocks)
    for i in range(len(order) - 2, max(first, 1) - 1, -1):
        b = order[i]
        kind, _ = block_kind_layer(cfg, b)
        F_b, ct = _block_vjp(cfg, kind, b in blocks, W[b], record[i], ct, n_K)
        if F_b is not None:
            F[b] = F_b
    if "embed" in blocks:
        F["embed"] = _embed_fisher(g_embed_K, jnp.asarray(ids[:-1]), ct, n_K)
    return F
