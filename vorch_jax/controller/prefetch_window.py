"""How far back a prefetch may reach for its victims, chosen by replaying a dense pass before the run.

The scored policy evicts the block whose next read lies furthest ahead, and a prefetch may evict only blocks read in
the last W positions (`Ledger._make_room`): on a pass those are read furthest ahead, the blocks a miss would evict
too, so the load moves earlier without costing a reload. W trades bytes against misses, and the best W depends on
the sizes of the blocks and the budget: W = 1 moves the fewest bytes, but where a prefetched block is larger than
the one just read it waits for a miss; a larger W lets the prefetch free room from several recent blocks and
sometimes a block the next pass then reloads. A dense model's passes are known before the run, so the choice is
measured rather than guessed: `choose_window` replays the ledger's rules (bookkeeping, no weights) on the run's
passes for each candidate W, and takes the quickest under a clock (`Timing`: loads one at a time over the measured
host->device rate, each read computing its block's share of the resident pass) among those moving at most
`BYTES_TOLERANCE` more than the fewest-bytes candidate, or `BYTES_OVER_BOUND` times the LP bound where that is more;
modelled ties go to the fewest misses (without a clock: the fewest misses). A miss makes the compute wait for its
load; a prefetched load runs beside the compute, but only from when room is made for it: with W = 1 a load starts
one position before its read. On SmolLM2 at 0.3 (this CPU, 2026-12-07) W = 1 moved 1.008x the LP bound at 10.2
tok/s, the timed choice W = 3 1.018x at 12.6 (static-prefetch 1.061x at 12.3).

A window may count positions, or only the reads of blocks a prefetch may evict (`LET_GO_READS`: the protected
blocks and those the plan keeps do not count). Counted as positions, the protected blocks between a pass's last
layer and the next pass's first leave W = 1 no victim there, so the first layer waits for a miss; counted as reads,
the prefetch there may evict the last layer's block, but a window that reaches across a run of kept blocks can also
ping-pong two blocks where the position count rotates through all of them (four blocks in three slots between two
protected ones: 2 loads a pass against 4/3). Neither is better everywhere, so both are candidates.

The same replay chooses how block sizes weigh in the victim order (`size_power` p: the victim is the block whose
distance to its next read times its size^p is largest; p = 0 is furthest-next-use). Furthest-next-use is blind to
sizes, and where blocks differ by 25x (Gemma 3 as it was split until 2026-12-07: four 168 MB embedding shards
beside 6.6 MB attention blocks) which rule moves least depends on the budget: simulated, 16 passes, bytes over
the LP bound at budgets 0.3 / 0.5 / 0.8: p = 0 1.302 / 1.384 / 1.070, p = 1 1.204 / 1.843 / 2.906, p = -1 1.302 /
1.384 / 1.045 (the exact optimum at 0.3 is 1.194). So p is measured per run like W, from the candidates
`CANDIDATE_SIZE_POWERS`.

More candidates follow the optimum itself (`PassPlan`): a dense run's passes repeat, so the integral optimum of a
stream that repeats a cycle of passes for ever (`lower_bound.cyclic_keeps`, its constraints taken modulo the cycle)
says, for each read, whether the block stays until its next read or leaves after this one, in every repetition.
Replayed as a victim order, the blocks the plan lets go leave first (furthest next read first among them), and a
prefetch may evict only those: their reload is paid anyway, so the load moves earlier at no cost in bytes.

  * A cycle of one pass (HiGHS, 0.02-0.15 s here) is the steady state of a fixed resident set. The 16-pass optimum
    does better where blocks differ in size: on Gemma 3 at 0.8 (four shards) it keeps the embedding shards and streams a
    run of layer blocks that moves back a layer every pass or two (measured: `experiments/offline_optimum.py`'s
    problem solved for 60 s), a rotation no one-pass cycle can express. So one more candidate keeps the plan's
    decisions for the large blocks and lets every block under half the largest go, furthest next read first
    among them: Belady's rule, optimal where sizes are equal, rotates the streamed run by itself. Replayed, 16
    passes, bytes over the LP bound at 0.8: the one-pass plan 1.040, this one 1.021 (the optimum 1.013).
  * A cycle of three passes is solved only where the best candidate so far moves more than `PLAN_MORE_OVER_BOUND`
    times the LP bound (up to a few seconds on SmolLM2's 63-position pass, where it gains nothing): on Gemma 3 at
    0.5, where the four embedding shards take turns leaving, it moves 1.075x the bound (the proven optimum of 16
    passes: 1.074x) against the one-pass plan's 1.146x.
  * Where the best is still more than `PLAN_MORE_OVER_BOUND` over the bound and the run's passes are few enough to
    replay, the optimum of the run's own passes to their end (`pass_plan.horizon_plan`, "N-pass to the end"): a
    steady state keeps, in the last passes too, what a next pass would need, and the LP bound of a finite run does
    not. HiGHS's first solution (one node: deterministic, 2-4 s on this CPU for 16 passes of Gemma 3 or SmolLM2);
    each block's last read lets it go, so the last pass's prefetches find victims (kept, they missed 9-16 times).
    Replayed with the probed prices of real runs (2026-12-07, this CPU): Gemma 3 at 0.8 1.026x the bytes' bound
    and 1.029x the seconds' (the three-pass plan by time: 1.055x, 1.042x), SmolLM2 at 0.8 1.021x and 1.040x (the
    size rule chosen before: 1.064x, 1.068x). Forced in real runs (3 rounds, last reads still kept): Gemma 3 at
    0.8 10.75 tok/s and 1.035x the run's bound against 10.74 and 1.055x; SmolLM2 at 0.8 17.76 and 1.021x against
    18.25 and 1.064x, static-prefetch 17.94.

Loads are priced in seconds, not bytes, where the run measured them. Every real run probes what a load of each
block shape takes alone (`link_probe.probe_block_loads`; a simulated run takes latency + bytes / bandwidth from its
profile), and the candidates are compared first by their loads' link seconds (`cost`), then by the clock.
Bytes alone mislead where a block of many small leaves lands slower per byte than one large array: on this CPU a
6.6 MB Gemma 3 attention block (eight leaves) took 0.73 ms, 9.0 GB/s, a 42 MB embedding shard 2.02 ms, 20.8 GB/s
(`experiments/results/block_load_costs.txt`). So each plan is also solved priced in those seconds (`pass_plans`,
"by time"): on Gemma 3 at 0.5 the byte optimum rotates layer blocks (three-pass plan, 1.034x the LP bound of bytes)
and decoded at 0.865-0.894x static-prefetch's tok/s; the plan priced in seconds streams embedding shards as a fixed
resident set does (1.068x the bytes' bound, 1.03x the bound of link seconds) and decodes at static-prefetch's rate
(bench_policies, 2026-12-07, this CPU). Where the run holds dropped memory (CPU backends, `tiers/device_pool.py`), a
load is priced as landing there only after a block of its size was dropped, and otherwise at what a landing in new
memory was probed to take (`landing_held`): a plan that mixes sizes pays for it. With that, SmolLM2 at 0.8 went
back from a plan priced in seconds (1.064x the bytes' bound) to one at 1.015x.
"""

from __future__ import annotations

import bisect
import dataclasses

from vorch_jax.controller.pass_plan import PassPlan, horizon_plan, kept_by_plan, pass_plans
from vorch_jax.policies.baselines import LET_GO_READS, POSITIONS

CANDIDATE_WINDOWS = (1, 2, 3, 4)
CANDIDATE_SIZE_POWERS = (0.0, 1.0, -1.0)  # 0 first: on a tie the size-blind rule stays
BYTES_TOLERANCE = 0.01  # a window may move this much more than the fewest-bytes one if it is quicker
BYTES_OVER_BOUND = 1.02  # ... or up to this many times the LP bound of the replayed passes, where that is more
TIME_TOLERANCE = 0.02  # modelled times this close to the quickest are ties (the inputs are measured, and noisy)
MAX_REPLAY_PASSES = 64  # a run's passes, up to this many (a replay of 16 SmolLM2 passes takes ~10 ms a window)


@dataclasses.dataclass(frozen=True)
class Timing:
    """What a replay prices time with: the seconds each block's load takes over the host->device link (one load at
    a time; measured per block shape where the run probed them, `link_probe.probe_block_loads`) and each block's
    compute seconds per read."""

    load_s: dict  # block -> seconds (landing in the memory of a dropped block of its size, where the run holds it)
    compute_s: dict  # block -> seconds
    fresh_load_s: dict | None = None  # block -> seconds landing in new memory (None: the run holds no dropped memory)
    byte_price_s: float = 0.0  # seconds each byte a load moves adds to its price (`with_bytes_weight`; 0: a load
    # is priced by its link seconds alone)

    def __post_init__(self):
        """A landing in new memory is never quicker than one in held memory (it allocates, then copies as much); a
        probe that says so is noise (SmolLM2's MLP block, 2026-12-07: 0.86 ms fresh against 1.19 held), and
        believed, it would price a plan that mixes sizes below what it costs and below the bound in seconds."""
        if self.fresh_load_s is not None:
            object.__setattr__(self, "fresh_load_s", {b: max(s, self.load_s.get(b, s))
                                                      for b, s in self.fresh_load_s.items()})

    @classmethod
    def at_rate(cls, bytes_per_s: float, device_bytes: dict, compute_s: dict) -> "Timing":
        """Every load priced by its bytes alone, over one link rate."""
        return cls({b: n / bytes_per_s for b, n in device_bytes.items()}, compute_s)

    def with_bytes_weight(self, weight: float, device_bytes: dict) -> "Timing":
        """Loads priced at their link seconds plus `weight` times their bytes at the mean link seconds per byte of
        the blocks in `load_s` (`score.bytes_weight`): 0 is link time alone, 1 weighs a byte moved as much as a
        second on the link at the mean rate, and a large weight ranks schedules by their bytes first. The clock
        (`Replay.modelled_s`) stays in seconds; only the price that plans minimise and candidates are compared by
        (`cost`) changes."""
        common = [b for b in self.load_s if b in device_bytes]
        total = sum(device_bytes[b] for b in common)
        per_byte = sum(self.load_s[b] for b in common) / total if total else 0.0
        return dataclasses.replace(self, byte_price_s=weight * per_byte)

    def price(self, seconds: float, nbytes: float) -> float:
        """What loads taking `seconds` on the link and moving `nbytes` cost."""
        return seconds + self.byte_price_s * nbytes

    def load_prices(self, device_bytes: dict) -> dict:
        """{block: what a load of it costs}, landing in held memory (what plans and the bound of prices take)."""
        return {b: self.price(s, device_bytes[b]) for b, s in self.load_s.items()}


@dataclasses.dataclass(frozen=True)
class Replay:
    window: int
    bytes_moved: int
    misses: int
    size_power: float = 0.0
    plan: str = ""  # the `PassPlan` whose let-go blocks are victims first ('': none)
    counts: str = POSITIONS  # what the window counts: positions, or LET_GO_READS (`Policy.reads_ago`)
    modelled_s: float | None = None  # the replayed passes' time under a `Timing` (None: not timed)
    load_s: float | None = None  # the link seconds of its loads under a `Timing` (None: not timed)


PLAN_WINDOWS = (0, 1)  # a plan's candidates: prefetches evict what it lets go, read at any time or just before
PLAN_MORE_OVER_BOUND = 1.02  # above this many times the LP bound, the three-pass cycle is solved too
TO_END_MIN_SAVING = 0.01  # the plan to the run's end is followed only where it saves this share of the bytes:
# on SmolLM2 at 0.5 (this CPU, 2026-12-07) its replay saved 0.2% against a size rule's, and it decoded at 0.983x
# static-prefetch's tok/s where the size rule had run at 1.04-1.11x: its loads mix block sizes, and the fresh
# landings that costs are priced from a probe of one landing alone, lower than they run


def replay(pass_blocks: list[str], device_bytes: dict, budget: int, protected, initial: list[str], depth: int,
           window: int, passes: int, size_power: float = 0.0, plan: PassPlan | None = None,
           counts: str = POSITIONS, timing: Timing | None = None) -> Replay:
    """The ledger's rules on `passes` repetitions of `pass_blocks`: a miss evicts the unprotected blocks whose next
    read is furthest ahead, weighed by size^`size_power` (`victim_key`; keeping the prefetch window's if it can),
    those `plan` lets go first; a prefetch of one of the next `depth` positions evicts only blocks needed after it
    and read in the last `window` positions, or with `counts` = LET_GO_READS among the last `window` reads of
    blocks a prefetch may evict (0: any; `Policy.reads_ago`), with a plan only blocks it lets go, else stops. The
    prefetch runs before each position computes and again after (`Ledger.done`), when the block just read may go
    too. With a `timing`, the replay also keeps a clock from the end of the initial placement: a load starts when
    it is issued and the link is free, a read waits for its block to land, then computes."""
    stream = list(pass_blocks) * passes
    known = stream + list(pass_blocks)  # a dense cursor knows the next pass: the ledger orders victims by their
    # reads there, and prefetches into it except after the run's last pass (`PassCursor.ahead`)
    reads: dict[str, list[int]] = {}
    for t, b in enumerate(known):
        reads.setdefault(b, []).append(t)

    def next_read(b, t):
        r = reads[b]
        i = bisect.bisect_right(r, t)
        return r[i] if i < len(r) else len(known) + 1 + len(r)  # not read again: beyond the replay

    on: dict[str, int] = {}
    last: dict[str, int] = {}
    let_go: dict[str, int] = {}  # block -> the reads a prefetch may evict that ran before its last read
    n_let_go = 0
    moved = misses = 0
    now = link_free = link_s = 0.0
    landed_at: dict[str, float] = {}

    held: list[str] = []  # blocks dropped whose memory is held for a load of their size, oldest first (`DevicePool`)

    def issue(u):
        nonlocal link_free, moved, link_s
        on[u] = device_bytes[u]
        moved += device_bytes[u]
        if timing is not None:
            took = landing_held(held, u, device_bytes, budget - sum(on.values()), timing)
            load = timing.load_s[u] if took or timing.fresh_load_s is None else timing.fresh_load_s[u]
            link_free = max(now, link_free) + load
            link_s += load
            landed_at[u] = link_free

    for b in initial:  # the ledger's initial placement: in order, skipping what does not fit
        if b not in on and sum(on.values()) + device_bytes[b] <= budget:
            on[b] = device_bytes[b]
            moved += device_bytes[b]
            link_s += timing.load_s[b] if timing is not None else 0.0

    def reads_ago(v, position, recent):  # position: the ledger's position count (t + 1 once t computed); recent:
        # the reads a prefetch may evict run by then
        return recent - let_go.get(v, -1) if counts == LET_GO_READS else position - last.get(v, -1)

    def make_room(block, t, keep, strict, position=0, recent=0):
        used = sum(on.values())
        need = device_bytes[block]
        if used + need <= budget:
            return True
        order = sorted((v for v in on if v != block and v not in keep and v not in protected),
                       key=lambda v: (kept_by_plan(plan, v, last.get(v), device_bytes[v]),
                                      -victim_key(next_read(v, t) - t, device_bytes[v], size_power)))
        if not strict:
            nb = next_read(block, t)
            order = [v for v in order if next_read(v, t) > nb
                     and (plan is None or not kept_by_plan(plan, v, last.get(v), device_bytes[v]))]
        victims, freed = [], 0
        for v in order:
            if used - freed + need <= budget:
                break
            victims.append(v)
            freed += on[v]
        if not strict and window and any(reads_ago(v, position, recent) > window for v in victims):
            return False
        if used - freed + need > budget:
            if strict and keep:
                return make_room(block, t, frozenset(), True)
            return False
        for v in victims:
            del on[v]
            held.append(v)
        return True

    for t, b in enumerate(stream):
        if b not in on:
            if not make_room(b, t, frozenset(stream[t:t + depth + 1]), True):
                raise ValueError(f"block '{b}' does not fit in the budget beside the protected blocks")
            issue(b)
            misses += 1
        if timing is not None:
            now = max(now, landed_at.get(b, 0.0))
        last[b] = t
        before = n_let_go
        if b not in protected and (plan is None or not kept_by_plan(plan, b, t, device_bytes[b])):
            let_go[b] = n_let_go
            n_let_go += 1
        for computed in (False, True):  # before the position computes, and again once its block may leave
            if computed and timing is not None:
                now += timing.compute_s[b]
            for j in range(1, min(depth, len(stream) - 1 - t) + 1):
                u = stream[t + j]
                if u in on:
                    continue
                keep = frozenset(stream[t + 1:t + j + 1] if computed else stream[t:t + j + 1])
                if not make_room(u, t, keep, False, position=t + computed,
                                 recent=n_let_go if computed else before):
                    break
                issue(u)
    return Replay(window, moved, misses, size_power, plan.name if plan else "", counts,
                  now if timing is not None else None, link_s if timing is not None else None)


def landing_held(held: list[str], block: str, device_bytes: dict, room: int, timing: Timing) -> bool:
    """Whether a load of `block` lands in held memory: the oldest dropped block of its size in `held` (taken), as
    the engine's pool of dropped memory matches a load to arrays of its shapes (blocks of one size have one set
    of shapes in the models here: a coarser match would only misprice). Then `held` keeps only what `room` (the
    budget less the blocks on the device) leaves, newest last. Without fresh prices nothing is held."""
    if timing.fresh_load_s is None:
        held.clear()
        return False
    i = next((i for i, v in enumerate(held) if device_bytes[v] == device_bytes[block]), None)
    if i is not None:
        del held[i]
    while held and sum(device_bytes[v] for v in held) > room:
        del held[0]
    return i is not None


def victim_key(distance: float, nbytes: int, size_power: float) -> float:
    """How strongly a block is a victim: its distance to its next read times its size^p (the larger, the sooner)."""
    return distance * float(nbytes) ** size_power if size_power else distance


def choose_window(pass_blocks, device_bytes, budget, protected, initial, depth, passes,
                  plans: list[PassPlan] = (), replays: list[Replay] | None = None, timing: Timing | None = None,
                  bounds: tuple[float, float] = (0.0, 0.0)) -> tuple[Replay, list[Replay]]:
    """The (window, size power, plan) replay that is quickest under `timing` (without one: misses least) among
    those whose loads cost near the least (`near_least`, `cost`: link seconds under `timing`, else bytes; `bounds`:
    the LP bounds of the replayed passes in bytes and in link seconds, `lower_bounds`), replaying the run's
    `passes` (up to MAX_REPLAY_PASSES); and every candidate's replay (for the run's summary). Without prefetch
    (depth 0) the window does not matter: only the size power is chosen. Each of `plans` adds the candidates that
    follow it (`PLAN_WINDOWS`: its prefetches evict only what it lets go); `replays`: candidates already replayed
    (the size rules are then not replayed again)."""
    n = max(1, min(passes, MAX_REPLAY_PASSES))
    windows = CANDIDATE_WINDOWS if depth > 0 else CANDIDATE_WINDOWS[:1]
    if replays is None:
        replays = [replay(pass_blocks, device_bytes, budget, protected, initial, depth, w, n, p, counts=c,
                          timing=timing)
                   for p in CANDIDATE_SIZE_POWERS for w in windows for c in _counts(w)]
    replays = list(replays)
    for plan in plans:
        replays += [replay(pass_blocks, device_bytes, budget, protected, initial, depth, w, n, plan=plan, counts=c,
                           timing=timing)
                    for w in (PLAN_WINDOWS if depth > 0 else PLAN_WINDOWS[:1]) for c in _counts(w)]
    close = near_least(replays, cost(timing), bounds[timing is not None])
    if timing is not None:  # modelled ties (TIME_TOLERANCE) go to the fewest misses: those the model prices least well
        quickest = min(r.modelled_s for r in close)
        close = [r for r in close if r.modelled_s <= (1 + TIME_TOLERANCE) * quickest]
    best = min(close, key=lambda r: (r.misses, r.bytes_moved, r.plan != "",
                                     CANDIDATE_SIZE_POWERS.index(r.size_power), r.window, r.counts != POSITIONS))
    return best, replays


def cost(timing: Timing | None):
    """What candidates are compared by first: their loads' price where the run priced them (`Timing.price`: link
    seconds, plus bytes where `score.bytes_weight` says so), else their bytes. Not the clock: it takes a load
    beside compute as free, and on this project's 2-core CPU it is not (Gemma 3 at 0.5, 2026-12-07: near the least
    in bytes or in seconds, the clock chose the byte optimum, 1.42x the bound of link seconds, 7.4 tok/s; first by
    seconds, 1.03x and 8.5 tok/s). Why: a CPU backend's compiled copies wait for the compute dispatched before them
    (`experiments/copy_overlap.py`), so there a step costs about its compute plus its loads' link seconds."""
    return (lambda r: r.bytes_moved) if timing is None else (lambda r: timing.price(r.load_s, r.bytes_moved))


def near_least(replays: list[Replay], measure, bound: float) -> list[Replay]:
    """The replays whose `measure` is at most BYTES_TOLERANCE over the least, or BYTES_OVER_BOUND times `bound`
    where that is more."""
    least = min(measure(r) for r in replays)
    allowed = max((1 + BYTES_TOLERANCE) * least, BYTES_OVER_BOUND * bound)
    return [r for r in replays if measure(r) <= allowed]


def lower_bounds(stream, device_bytes, budget, protected, timing: Timing | None = None) -> tuple[float, float]:
    """The LP lower bounds on the bytes the loads of `stream` move and, under `timing`, on their price (link
    seconds, plus bytes at `Timing.byte_price_s`; each 0 where the LP found none), each load priced at its
    held-memory probe, the cheaper of the two (`Timing`)."""
    from vorch_jax.policies.lower_bound import lower_bound, lower_bound_seconds

    bound = lower_bound(stream, device_bytes, budget, pinned=protected)
    seconds = 0.0 if timing is None else lower_bound_seconds(stream, device_bytes, budget,
                                                             timing.load_prices(device_bytes), pinned=protected)
    return (bound.bytes if bound.status == "optimal" else 0.0), seconds or 0.0


def _counts(window: int) -> tuple[str, ...]:
    """What a window may count: no window (0) counts nothing."""
    return (POSITIONS, LET_GO_READS) if window else (POSITIONS,)


def choose_eviction_rule(pass_blocks, device_bytes, budget, protected, initial, depth, passes,
                         timing: Timing | None = None) -> tuple[Replay, list[Replay], PassPlan | None]:
    """`choose_window` over the size rules and the one-pass plans, and where the candidates' least `cost` exceeds
    PLAN_MORE_OVER_BOUND times its LP bound on the replayed passes, over the three-pass plans too, and then the
    optimum of the run's own passes to their end (where they are at most MAX_REPLAY_PASSES): the best replay,
    every replay, and the plan the best follows (None: a size rule). Under a `timing` the plans include the optimum
    priced in link seconds (`pass_plan.pass_plans`). The tolerance trades cost for time: on Gemma 3 at 0.3 (four
    shards), counting misses, it took the one-pass plan (1.202x the bound, no miss) over a candidate at 1.194x with
    misses."""
    stream = list(pass_blocks) * max(1, min(passes, MAX_REPLAY_PASSES))
    bounds = lower_bounds(stream, device_bytes, budget, protected, timing)
    load_cost = None if timing is None else timing.load_prices(device_bytes)
    with_bytes = timing is not None and timing.byte_price_s > 0
    plans = pass_plans(pass_blocks, device_bytes, budget, protected, load_cost=load_cost, with_bytes=with_bytes)
    best, replays = choose_window(pass_blocks, device_bytes, budget, protected, initial, depth, passes, plans,
                                  timing=timing, bounds=bounds)
    bound = bounds[timing is not None]
    if min(map(cost(timing), replays)) > PLAN_MORE_OVER_BOUND * bound > 0:
        longer = pass_plans(pass_blocks, device_bytes, budget, protected, passes=3, load_cost=load_cost,
                            with_bytes=with_bytes)
        plans += longer
        best, replays = choose_window(pass_blocks, device_bytes, budget, protected, initial, depth, passes, longer,
                                      replays, timing=timing, bounds=bounds)
    if min(map(cost(timing), replays)) > PLAN_MORE_OVER_BOUND * bound > 0 and passes <= MAX_REPLAY_PASSES:
        to_end = horizon_plan(pass_blocks, device_bytes, budget, protected, passes, load_cost, with_bytes)
        if to_end is not None:
            chosen, replays = choose_window(pass_blocks, device_bytes, budget, protected, initial, depth, passes,
                                            [to_end], replays, timing=timing, bounds=bounds)
            if chosen.plan != to_end.name or chosen.bytes_moved <= (1 - TO_END_MIN_SAVING) * best.bytes_moved:
                best = chosen
                plans.append(to_end)
    return best, replays, {p.name: p for p in plans}.get(best.plan)
