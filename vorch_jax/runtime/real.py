"""The real backend: a spec's jitted ops on this machine's device, timed by the wall clock.

`run` dispatches a position's op asynchronously (transfers the movement engine runs on its threads overlap with
it); a router's decision comes to the host with `jax.device_get` (one small sync per routed layer, as in every MoE
offloading runtime); speculation runs the next layer's router on this layer's MoE input.
"""

from __future__ import annotations

import contextlib
import time

import jax
import numpy as np

from vorch_jax.runtime.driver import argmax_token


class RealBackend:
    settles_ticks = False  # a tick's result is adopted when the device has it (ScoredPolicy.tick)

    def __init__(self, spec, dtype):
        self.spec, self.dtype = spec, dtype
        self.compute = spec.compute(dtype)
        self.carry = None

    def now(self) -> float:
        return time.perf_counter()

    def host(self):
        return contextlib.nullcontext()

    def new_cache(self, max_len: int, dtype):
        return self.spec.new_cache(1, max_len, dtype)

    def begin_pass(self, ids_BxT, cache, pos: int, index: int) -> None:
        self.carry = self.compute.start(ids_BxT, cache, pos)

    def run(self, position, w):
        return self.compute.run(position, w, self.carry)

    def routing(self, position, out) -> tuple[np.ndarray, np.ndarray]:
        sel, probs = jax.device_get(out)  # the router's decision: the one host sync per layer
        return np.asarray(sel), np.asarray(probs)

    def speculate(self, gate_position, gate_w, top_k: int):
        pred, probs = jax.device_get(self.compute.speculate(gate_w, self.carry, top_k))
        return np.asarray(pred), np.asarray(probs, np.float64)

    def end_pass(self):
        out, self.carry = self.compute.finish(self.carry), None
        return out

    def next_token(self, logits) -> int:
        return argmax_token(logits)

    def compile(self, seq_lens, max_len: int, states=(), quant=None) -> None:
        """Compile every op for each sequence length before anything is timed: one pass of the spec's
        `compile_positions` (every op at least once, each routed layer with one expert) on zero weights, each op
        reading the zeros of the first block it is given, so variants that depend on the layer (a window) compile
        too; and the next layer's router's speculation where the spec speculates. `states`: the on-device states the
        run may hold blocks in (S0 always); each lossy one's representation (int8, int4, low-rank of the zeros, by
        `quant`'s group size and rank) runs every op once more, so a lossy run compiles nothing while timed."""
        import jax.numpy as jnp

        from vorch_jax.tiers.full_precision import FullPrecisionBlock
        from vorch_jax.tiers.packed_home import convert_on_device
        from vorch_jax.tiers.state import LOSSY

        spec, compute = self.spec, self.compute
        positions = spec.compile_positions()
        firsts = {}
        for p in positions:
            firsts.setdefault(p.op, p.block)
        zeros = {b: FullPrecisionBlock({k: jnp.zeros(s.shape, s.dtype) for k, s in spec.block_shapes(b).items()})
                 for b in set(firsts.values())}
        reps = [zeros] + [{b: convert_on_device(z, s, int4_group_size=quant.int4_group_size,
                                                lowrank_rank=quant.lowrank_rank) for b, z in zeros.items()}
                          for s in sorted(set(states) & LOSSY)]
        for T in seq_lens:
            for rep in reps:
                c = compute.start(jnp.zeros((1, T), jnp.int32), spec.new_cache(1, max_len, self.dtype), 0)
                for p in positions:
                    w = rep[firsts[p.op]].materialize()
                    compute.run(p, w, c)
                    if p.op == "route" and hasattr(compute, "speculate"):
                        compute.speculate(w, c, spec.top_k)
                jax.block_until_ready(compute.finish(c))
        for rep in reps:
            for block in rep.values():
                block.free()
