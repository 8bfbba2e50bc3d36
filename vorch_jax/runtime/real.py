"""The real backend: a spec's jitted ops on this machine's device, timed by the wall clock.

`run` dispatches a position's op asynchronously (transfers the movement engine runs on its threads overlap with
it); a router's decision comes to the host with `jax.device_get` (one small sync per routed layer, as in every MoE
offloading runtime); speculation runs the next layer's router on this layer's MoE input. A position handed over as
`InPlace` runs where its weights live (the family's `run_in_place`: the op under `compute_on('device_host')` on the
pinned_host home), timed from its input being ready to its result being back, which the engine records as an
`in_place` event; `compile(..., in_place_ops=...)` also times each such op per batch size (`in_place_s`: what the
ledger prices computing in place with).
"""

from __future__ import annotations

import contextlib
import time

import jax
import numpy as np

from vorch_jax.runtime.driver import argmax_token


class RealBackend:
    settles_ticks = False  # a tick's result is adopted when the device has it (ScoredPolicy.tick)

    def __init__(self, spec, dtype, collectives=None):
        """`collectives`: on a real mesh, this device's (`runtime/collectives.py`), which its shard's ops join the
        other devices' with."""
        self.spec, self.dtype = spec, dtype
        self.compute = spec.compute(dtype) if collectives is None else spec.compute(dtype, collectives)
        # a mesh device's arrays are committed to it: a jitted op whose inputs are all uncommitted may run on
        # another thread's default device
        self.device = getattr(collectives, "device", None)
        self.carry = None
        self.in_place_s: dict = {}  # (op, tokens) -> median seconds of the op computed in place (`compile`)

    def now(self) -> float:
        return time.perf_counter()

    def host(self):
        return contextlib.nullcontext()

    def new_cache(self, max_len: int, dtype):
        return self._put(self.spec.new_cache(1, max_len, dtype))

    def _put(self, tree):
        return tree if self.device is None else jax.device_put(tree, self.device)

    def begin_pass(self, ids_BxT, cache, pos: int, index: int) -> None:
        self.carry = self.compute.start(self._put(np.asarray(ids_BxT, np.int32)), self._put(cache), pos)

    def run(self, position, w):
        from vorch_jax.runtime.in_place import InPlace

        if isinstance(w, InPlace):
            w.record(*self._run_in_place(position, w.leaves, self.carry))
            return None
        return self.compute.run(position, w, self.carry)

    def _run_in_place(self, position, leaves, carry) -> tuple[float, float, dict]:
        """(start, end, activation bytes per link) of `position` computed in place: timed from its input being
        ready (the device's work before it is not its time) to its result being back."""
        jax.block_until_ready(carry.x_BxTxD)
        t0 = time.perf_counter()
        moved = self.compute.run_in_place(position, leaves, carry)
        jax.block_until_ready(carry.x_BxTxD)
        return t0, time.perf_counter(), moved

    def layer_done(self, layer: int) -> None:
        """A layer's end: a mesh device's ops may join the others' here (`models/shard_compute.py`)."""
        if hasattr(self.compute, "layer_done"):
            self.compute.layer_done(self.carry, layer)

    def routing(self, position, out) -> tuple[np.ndarray, np.ndarray]:
        sel, probs = jax.device_get(out)  # the router's decision: the one host sync per layer
        return np.asarray(sel), np.asarray(probs)

    def speculate(self, gate_position, gate_w, top_k: int):
        """Start the next layer's router on this layer's MoE input; `speculation` reads it (device arrays until
        then, so that the router's decision and this prediction come back in one wait)."""
        return self.compute.speculate(gate_w, self.carry, top_k)

    def speculation(self, started) -> tuple[np.ndarray, np.ndarray]:
        pred, probs = jax.device_get(started)
        return np.asarray(pred), np.asarray(probs, np.float64)

    def end_pass(self):
        out, self.carry = self.compute.finish(self.carry), None
        return out

    def next_token(self, logits) -> int:
        return argmax_token(logits)

    def compile(self, seq_lens, max_len: int, states=(), quant=None, in_place_ops=()) -> None:
        """Compile every op for each sequence length before anything is timed: one pass of the spec's
        `compile_positions` (every op at least once, each routed layer with one expert) on zero weights, each op
        reading the zeros of the first block it is given, so variants that depend on the layer (a window) compile
        too; and the next layer's router's speculation where the spec speculates. `states`: the on-device states the
        run may hold blocks in (S0 always); each lossy one's representation (int8, int4, low-rank of the zeros, by
        `quant`'s group size and rank) runs every op once more, so a lossy run compiles nothing while timed.
        `in_place_ops`: ops the run may compute in place: compiled there too, and timed (median of 3 after the
        compiling call) per sequence length into `in_place_s`."""
        import jax.numpy as jnp

        from vorch_jax.tiers.full_precision import FullPrecisionBlock
        from vorch_jax.tiers.packed_home import convert_on_device
        from vorch_jax.tiers.state import LOSSY

        spec, compute = self.spec, self.compute
        positions = spec.compile_positions()
        firsts = {}
        for p in positions:
            firsts.setdefault(p.op, p.block)
        zeros = {b: FullPrecisionBlock(self._put({k: jnp.zeros(s.shape, s.dtype)
                                                  for k, s in spec.block_shapes(b).items()}))
                 for b in set(firsts.values())}
        reps = [zeros] + [{b: convert_on_device(z, s, int4_group_size=quant.int4_group_size,
                                                lowrank_rank=quant.lowrank_rank) for b, z in zeros.items()}
                          for s in sorted(set(states) & LOSSY)]
        for T in seq_lens:
            for rep in reps:
                c = compute.start(self._put(jnp.zeros((1, T), jnp.int32)), self.new_cache(max_len, self.dtype), 0)
                for p in positions:
                    w = rep[firsts[p.op]].materialize()
                    compute.run(p, w, c)
                    if p.op in in_place_ops and rep is zeros and (p.op, T) not in self.in_place_s:
                        self.in_place_s[(p.op, T)] = self._time_in_place(p, c)
                    if p.op == "route" and hasattr(compute, "speculate"):
                        compute.speculate(w, c, spec.top_k)
                jax.block_until_ready(compute.finish(c))
        for rep in reps:
            for block in rep.values():
                block.free()

    def _time_in_place(self, position, carry) -> float:
        """Median seconds of `position`'s op computed in place on zero weights in pinned host memory (the first
        call compiles and is not counted)."""
        import statistics

        from vorch_jax.tiers.pinned_host import PinnedHostBlock

        shapes = self.spec.block_shapes(position.block)
        host = PinnedHostBlock.from_numpy({k: np.zeros(s.shape, s.dtype) for k, s in shapes.items()}, jax.devices()[0])
        times = []
        for _ in range(4):
            t0, t1, _moved = self._run_in_place(position, host.leaves, carry)
            times.append(t1 - t0)
        host.free()
        return statistics.median(times[1:])
