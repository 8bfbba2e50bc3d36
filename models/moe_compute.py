"""The jitted ops of a routed (MoE) Llama pass: the Llama ops plus `route` and `expert`, and speculation.

A routed layer runs its router (`route`): the normed input h, each token's top_k experts (mask [B, T, E]), and what
the runtime needs on the host, the experts any token chose (bool [E]) and the mean router probabilities [E]; a
shared part, where the gate block holds one, adds its output there; then each chosen expert adds its contribution
(`expert`). `speculate` applies the next layer's router to this layer's
MoE input (the Mixtral-offloading trick, `moe.speculative_expert_probs`): the runtime's speculative prefetch.

Shapes: B batch, T tokens, D model width, E experts per layer.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import moe
from .host_ops import moved_bytes, on_host
from .llama_compute import Carry, LlamaCompute


@functools.partial(jax.jit, static_argnames=("cfg", "top_k"))
def route(cfg, gate_w, x_BxTxD, top_k):
    """(x + shared(h) [B,T,D], h [B,T,D], mask [B,T,E], selected bool[E], mean probs float32[E]) of one layer's
    router (x unchanged without a shared part)."""
    h, mask, probs = moe.moe_route(cfg, gate_w, x_BxTxD, top_k)
    return moe.add_shared(gate_w, x_BxTxD, h), h, mask, mask.any((0, 1)), probs.mean((0, 1))


@functools.partial(jax.jit, static_argnames=("cfg", "top_k"))
def speculate(cfg, gate_next_w, x_BxTxD, top_k):
    """(predicted bool[E], mean probs float32[E]): layer l+1's router on layer l's MoE input, each token's top_k."""
    probs = moe.speculative_expert_probs(gate_next_w, x_BxTxD, cfg.norm_eps)
    return moe.topk_mask(probs, top_k).any((0, 1)), probs.mean((0, 1))


@jax.jit
def expert_add(w, h_BxTxD, x_BxTxD, mask_BxTxE, e):
    """x + [token chose e]·expert_e(h): one expert's contribution (`moe.moe_combine`, one expert at a time)."""
    y = moe.expert_mlp(w, h_BxTxD)
    chose = jax.lax.dynamic_slice_in_dim(mask_BxTxE, e, 1, axis=-1)
    return x_BxTxD + y * chose.astype(y.dtype)  # no constant array: on the host every operand must live there


class MoECompute(LlamaCompute):
    """Llama's ops with a router and experts in place of each MLP. `run` of a `route` position returns the device
    arrays (selected bool[E], mean probs float32[E]) the runtime brings to the host."""

    def __init__(self, cfg, dtype, n_experts: int, top_k: int):
        super().__init__(cfg, dtype)
        self.n_experts, self.top_k = n_experts, top_k
        # int32 device scalars made once: `jnp.int32(e)` per expert call was an eager host->device put each time
        # (508 calls, 0.2 s of 6 profiled passes of the MoE at top-2).
        self._expert_index = tuple(jnp.int32(e) for e in range(n_experts))

    def run(self, position, w, c: Carry):
        if position.op == "route":
            c.extra["moe_in"] = c.x_BxTxD
            c.x_BxTxD, c.extra["h"], c.extra["mask"], sel, probs = route(self.cfg, w, c.x_BxTxD, self.top_k)
            return sel, probs
        if position.op == "expert":
            c.x_BxTxD = expert_add(w, c.extra["h"], c.x_BxTxD, c.extra["mask"], self._expert_index[position.expert])
            return None
        return super().run(position, w, c)

    def run_in_place(self, position, w_host, c: Carry) -> dict[str, int]:
        """An expert computed where its weights live (host memory): h, x and the routing mask go to it, x comes
        back; returns the activation bytes per link."""
        if position.op != "expert":
            return super().run_in_place(position, w_host, c)
        acts = (c.extra["h"], c.x_BxTxD, c.extra["mask"], self._expert_index[position.expert])
        c.x_BxTxD = on_host(expert_add)(w_host, *acts)
        return moved_bytes(acts, c.x_BxTxD)

    def speculate(self, gate_next_w, c: Carry, top_k: int):
        """(predicted bool[E], mean probs [E]) device arrays of the next layer's router on this layer's MoE input."""
        return speculate(self.cfg, gate_next_w, c.extra["moe_in"], top_k)
