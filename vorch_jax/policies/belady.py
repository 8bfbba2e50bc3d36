"""Belady's oracle: evict the block whose next use lies furthest in the recorded future.

Two uses of the same rule:
  * `BeladyPolicy`, a policy like any other, fed the recorded access stream, so the executor really runs it;
  * `belady_bytes(stream, ...)`, a replay of a recorded stream that counts the bytes the oracle would load for that
    stream and budget: the `belady_bytes` of every run summary, computed from the events, never from a formula.

For blocks of equal size furthest-next-use is optimal (Belady 1966). With unequal sizes the exact minimum is
NP-hard; furthest-next-use is the standard near-optimal stand-in, and it is what we report. Blocks whose next use
is never are evicted first.
"""

from __future__ import annotations

import bisect

from vorch_jax.policies.baselines import Policy


class NextUse:
    """Positions of each block in the stream, to answer "when is `block` next used after `t`?" in O(log n)."""

    def __init__(self, stream):
        self.positions: dict[str, list[int]] = {}
        for t, b in enumerate(stream):
            self.positions.setdefault(b, []).append(t)

    def after(self, block: str, t: int) -> float:
        pos = self.positions.get(block, [])
        i = bisect.bisect_right(pos, t)
        return pos[i] if i < len(pos) else float("inf")


class BeladyPolicy(Policy):
    name = "belady"

    def __init__(self, ctx, prefetch_depth: int = 0):
        super().__init__(ctx)
        if not ctx.future:
            raise ValueError("the belady policy needs the recorded access stream (PolicyContext.future)")
        self.prefetch_depth = prefetch_depth
        self.next_use = NextUse(ctx.future)

    def victim_order(self, t, candidates):
        free = [b for b in candidates if b not in self.pinned]
        return sorted(free, key=lambda b: -self.next_use.after(b, t))


def belady_bytes(stream, device_bytes: dict, budget_bytes: int, initial: list[str], pinned=frozenset(),
                 load_bytes: dict | None = None) -> int:
    """Bytes loaded onto the device by furthest-next-use eviction replaying `stream` under `budget_bytes`.

    `device_bytes`: what each block occupies on device (capacity); `load_bytes`: what loading it moves over the link
    (default the same; a block held int8 on device and converted there was carried in full precision, one loaded
    from its compressed home in int8).

    `initial`: the blocks on device before the first access (the run's initial placement, in order, kept while they
    fit). A block loaded on a miss costs its device bytes; a block that cannot fit even with everything else evicted
    is a configuration error of the run, not of the oracle.
    """
    next_use = NextUse(stream)
    resident: set[str] = set()
    used = 0
    for b in initial:
        if b not in resident and used + device_bytes[b] <= budget_bytes:
            resident.add(b)
            used += device_bytes[b]
    loaded = 0
    for t, b in enumerate(stream):
        if b in resident:
            continue
        need = device_bytes[b]
        victims = sorted((v for v in resident if v not in pinned), key=lambda v: -next_use.after(v, t))
        for v in victims:
            if used + need <= budget_bytes:
                break
            resident.remove(v)
            used -= device_bytes[v]
        if used + need > budget_bytes:
            raise ValueError(f"block '{b}' ({need} bytes) cannot fit under the budget of {budget_bytes} bytes")
        resident.add(b)
        used += need
        loaded += need if load_bytes is None else load_bytes[b]
    return loaded
