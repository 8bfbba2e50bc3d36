"""The run-level quality budget: which lossy states each block may take, so that a lossy run keeps its KL bounded.

A lossy run trades quality for bytes. What it may trade is decided before it starts, from measurement only: each
block's calibrated ΔKL per lossy state (`vorch calibrate`: the mean KL to the full model when that block alone is
held in that state). Whatever the controller then chooses at run time, a block is held in one state at a time, so
the run's KL is bounded (to first order, ΔKL adding up over blocks) by

    Σ_b  max over the lossy states allowed to b of ΔKL(b, s)   <=   max_kl · share

The allocation is a knapsack over that bound: allowing block b its states up to s saves `S0 bytes - bytes(s)` of
device memory (the controller's room to trade) and costs ΔKL(b, s) of the budget; blocks are given states greedily
by bytes saved per nat, cheapest first, while the bound fits. A state whose ΔKL alone exceeds the budget is never
allowed, so S6 (low-rank, relative error about 0.9 on SmolLM2's MLPs) never becomes a block's steady state where
it destroys the model. `share` (default 0.5) keeps half the budget for what the additive estimate misses: the
blocks' errors interact, and the calibration text is not the evaluation text.

The run then measures its own KL against the resident model on the evaluation text; the summary says whether it
stayed within `max_kl` (`quality.within_budget`), and the suite fails if a lossy run does not.
"""

from __future__ import annotations

import dataclasses

from vorch_jax.tiers.state import State

LOSSY = (State.S1, State.S2, State.S6)


@dataclasses.dataclass(frozen=True)
class LossyAllowance:
    """The outcome: per block the lossy states it may take (best quality first) and the budget it spends."""

    states: dict  # block -> tuple[State, ...] (empty: lossless only)
    bound_kl: float  # Σ over blocks of the worst allowed state's ΔKL
    max_kl: float
    share: float
    bytes_saved: int  # Σ over blocks of S0 bytes - the smallest allowed state's bytes

    def summary(self) -> dict:
        per_state = {s.name: sum(s in v for v in self.states.values()) for s in LOSSY}
        return {"max_kl": self.max_kl, "share": self.share, "bound_kl": self.bound_kl,
                "blocks_with_lossy_states": sum(bool(v) for v in self.states.values()),
                "blocks_allowed_per_state": per_state, "bytes_saved_at_most": self.bytes_saved}


def allocate(kl: dict, state_bytes: dict, max_kl: float, *, share: float = 0.5, blocks=None,
             states=LOSSY) -> LossyAllowance:
    """Lossy states per block under the quality budget (see the module docstring).

    `kl`: block -> {state name: ΔKL nats}; `state_bytes`: block -> {State: device bytes}; `blocks`: the blocks to
    allocate over (default: those in `kl`). A block missing from `kl` gets no lossy state (nothing measured).
    """
    budget = max_kl * share
    blocks = list(kl) if blocks is None else list(blocks)
    # Per block, its options: allow the lossy states whose ΔKL is at most c, for each distinct c (a ladder).
    options: dict[str, list[tuple[float, int, tuple]]] = {}
    for b in blocks:
        if b not in kl:
            continue
        s0 = state_bytes[b][State.S0]
        meas = sorted((kl[b][s.name], s) for s in states if s.name in kl[b] and kl[b][s.name] >= 0)
        ladder, allowed = [], []
        for cost, s in meas:
            allowed.append(s)
            saved = s0 - min(state_bytes[b][x] for x in allowed)
            if saved > 0 and cost <= budget:
                ladder.append((cost, saved, tuple(sorted(allowed))))
        if ladder:
            options[b] = ladder
    chosen: dict[str, int] = {}  # block -> index into its ladder
    spent = 0.0
    while True:
        best = None
        for b, ladder in options.items():
            i = chosen.get(b, -1) + 1
            if i >= len(ladder):
                continue
            cost0, saved0 = (ladder[i - 1][0], ladder[i - 1][1]) if i else (0.0, 0)
            dc, ds = ladder[i][0] - cost0, ladder[i][1] - saved0
            if spent + dc > budget or ds <= 0:
                continue
            ratio = ds / max(dc, 1e-30)
            if best is None or ratio > best[0]:
                best = (ratio, b, i, dc)
        if best is None:
            break
        _, b, i, dc = best
        chosen[b] = i
        spent += dc
    out = {b: () for b in blocks}
    saved = 0
    for b, i in chosen.items():
        out[b] = options[b][i][2]
        saved += options[b][i][1]
    bound = sum(options[b][i][0] for b, i in chosen.items())
    return LossyAllowance(out, bound, max_kl, share, saved)


def compressed_home_states(states: dict) -> dict:
    """block -> the state its compressed home keeps (what the block streams in): the best-quality lossy state the
    allowance gives it. Not the smallest: every block that streams is then held in that state at once, and the
    additive estimate is weakest there. Measured (SmolLM2 at hbm_budget 0.3, this CPU): streaming the smallest allowed
    state (int8 for 58 blocks, int4 for layers.4.mlp and layers.5.mlp, calibrated at 0.0085 nats together; 0.0069
    measured jointly on the calibration text) reached 0.038 nats on the evaluation text, over max_kl 0.02; int8 for
    all 60 reached 0.0094."""
    from vorch_jax.controller.state_ids import QUALITY_RANK

    return {b: max(allowed, key=lambda s: QUALITY_RANK[s]) for b, allowed in states.items() if allowed}


def forced_lossy_kl(kl: dict, forced: dict) -> float:
    """Σ ΔKL of the lossy states placement rules fix (what a run spends before the controller decides anything)."""
    return sum(kl.get(b, {}).get(State(s).name, 0.0) for b, s in forced.items() if State(s) in LOSSY)
