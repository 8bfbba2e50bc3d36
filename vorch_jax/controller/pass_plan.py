"""The steady-state optimum of a dense run's repeating passes, as decisions the scored policy's victim order follows.

A dense run reads the same pass again and again, so the integral optimum of a stream that repeats a cycle of passes
for ever (`lower_bound.cyclic_keeps`) says, for each read, whether the block stays until its next read or leaves after
this one, in every repetition. `prefetch_window` replays these plans beside its size rules and the run follows the
one that moves least (its module docstring has the measurements). A run's passes are also finite: `horizon_plan`
is the optimum of the run's own passes to their end, indexed by position in the whole run.
"""

from __future__ import annotations

import dataclasses

STREAMED_FRACTION = 0.5  # the streaming candidate lets go every block under this fraction of the largest


@dataclasses.dataclass(frozen=True)
class PassPlan:
    """The steady-state optimum's decision at each read of a cycle of `passes` passes (`lower_bound.cyclic_keeps`):
    {(block, position in the cycle): keep}; a read absent from it (followed at once by the block's next read) keeps.
    Blocks under `streamed_below` bytes are let go at every read whatever the plan says (the module docstring)."""

    keeps: dict
    cycle: int  # positions in a cycle: `passes` times a pass's
    passes: int
    streamed_below: int = 0
    by_time: bool = False  # the optimum of the loads' link seconds (measured per block), not of their bytes
    with_bytes: bool = False  # ... plus their bytes (`score.bytes_weight` > 0: `Timing.with_bytes_weight`)
    to_end: bool = False  # the optimum of the run's own passes, to its last (`horizon_plan`), not a steady state

    @property
    def name(self) -> str:
        priced = " by time and bytes" if self.with_bytes else " by time"
        return (f"{self.passes}-pass" + (" to the end" if self.to_end else "") + (priced if self.by_time else "")
                + (f", streams < {self.streamed_below} B" if self.streamed_below else ""))

    def kept(self, block: str, last_read: int | None, nbytes: int) -> bool:
        """Whether the plan keeps `block` through the gap after its last read, `last_read` its position in a cycle of
        the plan's passes (`PassCursor.cycle_position`; None: not read yet, or read by a lookup outside the pass
        order: kept)."""
        if last_read is None:
            return True
        if nbytes < self.streamed_below:
            return False
        return self.keeps.get((block, last_read % self.cycle), True)


def pass_plans(pass_blocks: list[str], device_bytes: dict, budget: int, protected, passes: int = 1,
               load_cost: dict | None = None, with_bytes: bool = False) -> list[PassPlan]:
    """The plans of a cycle of `passes` passes: the optimum's, and with one pass also the one that streams the
    blocks under STREAMED_FRACTION of the largest unprotected one; none where the solver found no schedule. With
    `load_cost` ({block: link seconds of a load}), also the optimum of the loads' seconds where it keeps other
    blocks: where a small block's load takes more per byte than a large one's, it streams the large blocks.
    `with_bytes`: `load_cost` prices the bytes too (the plans' names say so)."""
    from vorch_jax.policies.lower_bound import cyclic_keeps

    cycle = list(pass_blocks) * passes
    keeps = cyclic_keeps(cycle, device_bytes, budget, pinned=protected)
    if keeps is None:
        return []
    n = len(cycle)
    plans = [PassPlan(keeps, n, passes)]
    if load_cost is not None:
        timed = cyclic_keeps(cycle, device_bytes, budget, pinned=protected, load_cost=load_cost)
        if timed is not None and timed != keeps:
            plans.append(PassPlan(timed, n, passes, by_time=True, with_bytes=with_bytes))
    sizes = {device_bytes[b] for b in pass_blocks if b not in protected}
    below = int(STREAMED_FRACTION * max(sizes, default=0))
    if passes == 1 and any(x < below for x in sizes):
        plans.append(PassPlan(keeps, n, passes, below))
    return plans


def horizon_plan(pass_blocks: list[str], device_bytes: dict, budget: int, protected, passes: int,
                 load_cost: dict | None = None, with_bytes: bool = False) -> PassPlan | None:
    """The plan of the run's own `passes` passes to their end (`lower_bound.horizon_keeps`), priced by `load_cost`
    where given (then named "by time"), else by bytes; None where the solver found no schedule. A steady-state
    plan keeps, in the last passes too, what a next pass would need; this one does not, so the passes before the
    end keep more (the module docstring of `prefetch_window` has the measurements)."""
    from vorch_jax.policies.lower_bound import horizon_keeps

    stream = list(pass_blocks) * passes
    keeps = horizon_keeps(stream, device_bytes, budget, pinned=protected, load_cost=load_cost)
    if keeps is None:
        return None
    last_read = {b: t for t, b in enumerate(stream) if b not in protected}
    keeps.update({(b, t): False for b, t in last_read.items()})  # nothing after the run needs it: let go, so that a
    # prefetch in the last pass may evict it (kept by default, the blocks read early in the last pass left the
    # later ones no victim: 9-16 misses, all in the last pass, replayed on Gemma 3 and SmolLM2; let go: none)
    return PassPlan(keeps, len(stream), passes, by_time=load_cost is not None, to_end=True,
                    with_bytes=with_bytes and load_cost is not None)


def kept_by_plan(plan: PassPlan | None, block: str, last_read: int | None, nbytes: int) -> bool:
    """Whether `plan` keeps `block` through the gap after its last read (no plan: kept)."""
    return plan is None or plan.kept(block, last_read, nbytes)
