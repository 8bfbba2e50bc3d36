"""The jitted compute of one schedule position: what the executor runs once a block has landed.

One jitted function per block kind, over `llama_layers`; each takes the block's weight dict, whatever
representation it is in (plain arrays, int8, int4, low-rank), so jit specialises per representation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vorch_jax.models import llama_layers as L
from vorch_jax.models.weights import matmul


@functools.partial(jax.jit, static_argnames=("dtype",))
def embed_lookup(w, ids_BxT, dtype):
    return L.embed_tokens(w, ids_BxT, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("k_cache", "v_cache"))
def attention(cfg, w, x_BxTxD, k_cache, v_cache, pos):
    return L.attention_block(cfg, w, x_BxTxD, k_cache, v_cache, pos)


@functools.partial(jax.jit, static_argnames=("cfg",))
def mlp(cfg, w, x_BxTxD):
    return L.mlp_block(cfg, w, x_BxTxD)


@functools.partial(jax.jit, static_argnames=("cfg",))
def final_norm(cfg, w, x_BxTxD):
    return L.rms_norm(x_BxTxD, w["norm"], cfg.norm_eps)


@jax.jit
def tied_head(w, h_BxTxD):
    """Logits [B, T, V] float32 from the normed hidden state and the embedding in head layout [D, V]."""
    return matmul(h_BxTxD, w["embedding"]).astype(jnp.float32)
