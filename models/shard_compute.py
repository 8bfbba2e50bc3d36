"""The ops of one device of a real mesh (`shard_spec.ShardSpec`): the family's ops on the device's shard, joined to
the other devices' by collectives.

`ShardCompute(spec, dtype, collectives)` wraps the base family's compute (`spec.base.compute(dtype)`), whose carry
it keeps; `collectives` is the runtime's (`all_reduce(x)`: the sum over the mesh's devices; `all_gather(x)`: the
devices' parts concatenated along the last axis; each returns this device's copy of the result, the devices of the
mesh calling them in the same order). Where the device holds all of a block (norms, replicated attention, an
expert-parallel device's attention and routers) the base op runs as on one device. Otherwise:
  * tensor parallel: the embedding looks up the tokens of the device's vocabulary slice (zeros for the rest) and
    the devices sum; split attention and the MLP compute their part of what they add to the residual stream
    (`llama_layers.attention_delta`, `mlp_delta`) and the devices sum it before it is added; the head's logits over
    the device's vocabulary slice are gathered;
  * expert parallel: the layer's chosen experts the device holds add into an accumulator of its own (the base's
    `expert_add`), and at the layer's end (`layer_done`, which the driver reaches on every device) the devices sum
    their accumulators into the residual stream.
The sums run in another order than on one device (float32 rounding); the tests compare greedy tokens.

Shapes: B batch, T tokens, D model width, Vd the device's share of the vocabulary.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import llama_layers as L
from .llama_compute import Carry, head


@functools.partial(jax.jit, static_argnames=("dtype",))
def embed_slice(w, ids_BxT, first_id, dtype):
    """[B, T, D]: the embedding of each token whose id falls in this device's slice [first_id, first_id + Vd),
    zeros for the others (another device holds their rows)."""
    Vd = w["embedding"].shape[-1]
    local_BxT = ids_BxT - first_id
    inside_BxT = (local_BxT >= 0) & (local_BxT < Vd)
    x_BxTxD = L.embed_tokens(w, jnp.clip(local_BxT, 0, Vd - 1), jnp.dtype(dtype))
    return jnp.where(inside_BxT[..., None], x_BxTxD, jnp.zeros((), x_BxTxD.dtype))


@functools.partial(jax.jit, static_argnames=("heads",), donate_argnames=("k_cache", "v_cache"))
def attention_part(heads, w, x_BxTxD, k_cache, v_cache, pos):
    """(this device's heads' part of what attention adds, its k cache, its v cache)."""
    return L.attention_delta(heads, w, x_BxTxD, k_cache, v_cache, pos)


@functools.partial(jax.jit, static_argnames=("cfg",))
def mlp_part(cfg, w, x_BxTxD):
    """This device's hidden units' part of what the MLP adds."""
    return L.mlp_delta(cfg, w, x_BxTxD)


@jax.jit
def residual_add(x_BxTxD, delta_BxTxD):
    return x_BxTxD + delta_BxTxD


class ShardCompute:
    """One device's ops of a mesh run (see the module docstring)."""

    def __init__(self, spec, dtype, collectives):
        self.spec, self.collectives = spec, collectives
        self.base = spec.base.compute(dtype)
        self.cfg, self.dtype = self.base.cfg, self.base.dtype
        self.heads = spec.head_shard()  # None: attention replicated
        self.first_id = spec.device * (spec.config.vocab_size // spec.tp)

    def start(self, ids_BxT, cache, pos: int) -> Carry:
        return self.base.start(ids_BxT, cache, pos)

    def finish(self, c: Carry):
        return self.base.finish(c)

    def speculate(self, gate_next_w, c: Carry, top_k: int):
        return self.base.speculate(gate_next_w, c, top_k)

    def run(self, position, w, c: Carry):
        op, coll = position.op, self.collectives
        if self.spec.tp > 1:
            if op == "embed":
                c.x_BxTxD = coll.all_reduce(embed_slice(w, c.ids_BxT, jnp.int32(self.first_id), self.dtype.name))
                return None
            if op == "attn" and self.heads is not None:
                i = position.layer
                delta, c.k[i], c.v[i] = attention_part(self.heads, w, c.x_BxTxD, c.k[i], c.v[i], c.pos)
                c.x_BxTxD = residual_add(c.x_BxTxD, coll.all_reduce(delta))
                return None
            if op == "mlp":
                c.x_BxTxD = residual_add(c.x_BxTxD, coll.all_reduce(mlp_part(self.cfg, w, c.x_BxTxD)))
                return None
            if op == "head":
                c.logits_BxTxV = coll.all_gather(head(w, c.h_BxTxD))
                return None
        if self.spec.ep > 1 and op == "route":
            out = self.base.run(position, w, c)
            c.extra["expert_sum"] = jnp.zeros_like(c.x_BxTxD)
            return out
        if self.spec.ep > 1 and op == "expert":
            from .moe_compute import expert_add

            c.extra["expert_sum"] = expert_add(w, c.extra["h"], c.extra["expert_sum"], c.extra["mask"],
                                               self.base._expert_index[position.expert])
            return None
        return self.base.run(position, w, c)

    def layer_done(self, c: Carry, layer: int) -> None:
        """A layer's end: an expert-parallel device adds the devices' summed experts to the residual stream."""
        if "expert_sum" in c.extra:
            c.x_BxTxD = residual_add(c.x_BxTxD, self.collectives.all_reduce(c.extra.pop("expert_sum")))
