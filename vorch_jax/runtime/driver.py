"""The driver: one loop over a spec's plan, whatever the model, the residency and the backend.

The loop is the schedule (FlexGen's shape):

    for position in the pass:              (a router's position reveals the experts that follow it)
        w = residency.fetch(block)         ensure (hit, or load and wait: a timed stall), then prefetch ahead; or an
                                           `InPlace`: the op runs where the weights live (runtime/in_place.py)
        backend.run(position, w)           async dispatch on the real backend; a modelled span on the simulated one
        if position routes: the router's choice comes to the host; the next layer's router may speculate
        residency.done(); at a layer's end: residency.after_layer (the policy's tick), backend.layer_done

Residency is the `Ledger` (a budget, an engine, a policy) or `ResidentWeights` (everything on device: the reference
run). The backend is `RealBackend` (the spec's jitted ops) or `SimBackend` (the simulator's clock and cost model):
real and simulated runs differ only there, dense and MoE runs only in the plan.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Generation:
    """Greedy tokens and the clock at each step boundary: `marks[0]` prefill starts, `marks[1]` it ends (the first
    decode step starts), `marks[k + 1]` decode step k ends. Steps follow each other without gaps. The simulated
    backend has no tokens (all 0) and its clock is the modelled one."""

    tokens: list
    marks: tuple

    @property
    def prefill_s(self) -> float:
        return self.marks[1] - self.marks[0]

    @property
    def step_s(self) -> list:
        """Seconds of each decode step."""
        return [b - a for a, b in zip(self.marks[1:-1], self.marks[2:])]

    def measured_window(self) -> tuple[float, float, int]:
        """(start, end, steps) of the decode steps a summary times: all but the first (its warm-up), unless that is
        the only one."""
        first = 2 if len(self.marks) > 3 else 1
        return self.marks[first], self.marks[-1], len(self.marks) - 1 - first


class Driver:
    def __init__(self, spec, residency, backend):
        self.spec, self.residency, self.backend = spec, residency, backend
        self.cursor = residency.cursor
        self.passes = 0
        self.routing: list[list] = []  # [pass][layer] -> expert ids its router chose (routed plans)

    def forward(self, ids_BxT, cache, pos: int, last: bool = False):
        """One pass; returns (logits [B, T, V] float32, cache) on the real backend, (None, None) simulated. `last`:
        the run has no pass after this one, so nothing is prefetched for one (`PassCursor.ahead`)."""
        cursor, res, be = self.cursor, self.residency, self.backend
        be.begin_pass(ids_BxT, cache, pos, self.passes)
        cursor.begin_pass(ids_BxT, last)
        res.begin_pass(np.shape(ids_BxT)[1])
        chosen = [[] for _ in cursor.route_of_layer] if cursor.routed else None
        while (p := cursor.next()) is not None:
            with be.host():
                w = res.fetch(p.block)
            out = be.run(p, w)
            if p.op == "route":
                with be.host():
                    gate = res.speculation_gate(p.layer)
                # the next layer's router is started before this one's decision is read: one wait for both
                guess = None if gate is None else be.speculate(cursor.route_of_layer[p.layer + 1],
                                                               res.weights_of(gate), self.spec.top_k)
                selected, probs = be.routing(p, out)
                cursor.resolve(p.layer, selected)
                chosen[p.layer] = np.flatnonzero(selected).tolist()
                with be.host():
                    res.observe_routing(p.layer, selected)
                if guess is not None and (guess := be.speculation(guess)) is not None:
                    with be.host():
                        res.observe_speculation(p.layer + 1, *guess)
            ends_layer = cursor.ends_layer(p)
            with be.host():
                res.done()
                if ends_layer:
                    res.after_layer(p.layer)
            if ends_layer:
                be.layer_done(p.layer)  # a mesh's devices meet here (the simulator's; nothing on one device)
        with be.host():
            res.end_pass()
        if chosen is not None:
            self.routing.append(chosen)
        self.passes += 1
        return be.end_pass()


def greedy_generate(driver: Driver, prompt_ids: list[int], new_tokens: int, dtype, on_step=None) -> Generation:
    """Prefill then greedy decode through the driver; the clock is the backend's. The pass of the last token is the
    run's last: nothing is prefetched past it."""
    be = driver.backend
    cache = be.new_cache(len(prompt_ids) + new_tokens, dtype)
    marks = [be.now()]
    logits, cache = driver.forward(np.asarray([prompt_ids]), cache, 0, last=new_tokens == 1)
    nxt = be.next_token(logits)
    marks.append(be.now())
    tokens = [nxt]
    pos = len(prompt_ids)
    for k in range(new_tokens - 1):
        logits, cache = driver.forward(np.asarray([[nxt]]), cache, pos, last=k == new_tokens - 2)
        nxt = be.next_token(logits)
        marks.append(be.now())
        tokens.append(nxt)
        pos += 1
        if on_step:
            on_step(len(tokens))
    return Generation(tokens, tuple(marks))


def argmax_token(logits) -> int:
    return int(jnp.argmax(logits[0, -1]))
