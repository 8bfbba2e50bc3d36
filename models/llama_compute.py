"""The jitted ops of a Llama pass, over a carry: what the runtime calls once a position's block is on the device.

One jitted function per op over `llama_layers`; each takes the block's weight dict whatever representation it is
in (plain arrays, int8, int4, low-rank), so jit specialises per representation. The carry holds the residual
stream, the per-layer KV caches, the position and the final logits; `run(position, weights, carry)` updates it in
place and returns nothing (a routed family's `route` op returns its decision, see `moe_compute`).

Shapes: B batch, T new tokens, S cache length, D model width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from . import llama_layers as L
from .llama import KVCache
from .host_ops import moved_bytes, on_host
from .weights import matmul


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
def head(w, h_BxTxD):
    """Logits [B, T, V] float32 from the normed hidden state and a head-layout [D, V] embedding (tied or not)."""
    return matmul(h_BxTxD, w["embedding"]).astype(jnp.float32)


@dataclasses.dataclass
class Carry:
    """What flows between the positions of one pass."""

    ids_BxT: jax.Array
    pos: jax.Array  # int32 scalar: index of the first new token
    k: list  # per layer [B, S, KV, Dh]
    v: list
    x_BxTxD: jax.Array | None = None
    h_BxTxD: jax.Array | None = None  # after the final norm
    logits_BxTxV: jax.Array | None = None
    extra: dict = dataclasses.field(default_factory=dict)  # a family's own (the MoE's routing of the layer)


class LlamaCompute:
    """The ops of a Llama pass: embed, attn, mlp, norm, head."""

    def __init__(self, cfg, dtype):
        self.cfg, self.dtype = cfg, jnp.dtype(dtype)

    def start(self, ids_BxT, cache: KVCache, pos: int) -> Carry:
        return Carry(jnp.asarray(ids_BxT, jnp.int32), jnp.int32(pos), list(cache.k), list(cache.v))

    def run(self, position, w, c: Carry):
        op = position.op
        if op == "embed":
            c.x_BxTxD = embed_lookup(w, c.ids_BxT, self.dtype.name)
        elif op == "attn":
            i = position.layer
            c.x_BxTxD, c.k[i], c.v[i] = attention(self.cfg, w, c.x_BxTxD, c.k[i], c.v[i], c.pos)
        elif op == "mlp":
            c.x_BxTxD = mlp(self.cfg, w, c.x_BxTxD)
        elif op == "norm":
            c.h_BxTxD = final_norm(self.cfg, w, c.x_BxTxD)
        elif op == "head":
            c.logits_BxTxV = head(w, c.h_BxTxD)
        else:
            raise ValueError(f"op '{op}' is not a Llama op")
        return None

    def run_in_place(self, position, w_host, c: Carry) -> dict[str, int]:
        """Compute `position` where its weights live (`w_host`: the block's leaves in host memory, `host_ops`);
        returns the activation bytes moved per link. Only the MLP: attention reads its KV cache on the device."""
        if position.op != "mlp":
            raise ValueError(f"op '{position.op}' cannot run in place (ops that can: mlp)")
        x = c.x_BxTxD
        c.x_BxTxD = on_host(self.mlp_fn, self.cfg)(w_host, x)
        return moved_bytes(x, c.x_BxTxD)

    mlp_fn = staticmethod(mlp)  # the family's MLP (cfg, w, x) -> x: what runs in place

    def finish(self, c: Carry):
        """(logits [B, T, V] float32, the updated cache)."""
        return c.logits_BxTxV, KVCache(c.k, c.v)
