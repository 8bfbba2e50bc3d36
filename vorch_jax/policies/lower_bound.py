"""A true lower bound on the bytes any policy must load: the LP relaxation of offline caching with block sizes.

Belady's furthest-next-use (`belady.py`) is optimal only when blocks are of one size; with SmolLM2's (attention
3.5 MB, MLP 10.6 MB, embedding 113 MB) runs can beat it. Exact offline caching with sizes is NP-hard, but its
linear-programming relaxation is a bound no policy can beat, and small enough to solve for a run's stream.

The relaxation over a stream a_0 .. a_{n-1}: x(b, t) in [0, 1] is the fraction of block b on the device after access
t; x(a_t, t) = 1; at every t the resident bytes fit the budget; cost = sum size(b) * max(0, x(b, t) - x(b, t-1)), the
first load of every block included. Only the gaps between two accesses of a block matter: an optimal x keeps one
level y(b, i) through the i-th gap of b (any dip would only add cost), so the LP solved here has one variable per
gap that spans at least one other access,

    minimise   sum_b load(b) * (1 + sum_i (1 - y(b, i)))
    subject to dev(a_t) + sum_{gaps (b, i) spanning t} dev(b) * y(b, i) + pinned bytes at t  <=  budget   (every t)
               0 <= y <= 1,

where `dev` is what a block occupies on the device and `load` what loading it moves. Pinned (protected) blocks are
never evicted: each holds its bytes from its first access on, as in `belady_bytes`. With blocks of one size the
constraint matrix has consecutive ones (interval scheduling), the LP is integral and its optimum is Belady's bytes;
the tests check both that and a case solved by hand.

Solved with scipy's HiGHS (`scipy.optimize.linprog`), in units of the largest block. Loads are whole bytes, so any
schedule loads at least the LP optimum rounded up: the bound is that, less 1e-9 of itself for the solver's rounding. A stream whose matrix would exceed `max_nonzeros` is bounded
on its longest prefix that fits (loads are non-negative, so a prefix's bound bounds the whole) and says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import threading
import time

import numpy as np

DEFAULT_MAX_NONZEROS = 4_000_000  # about a second or two of HiGHS on this project's 2-core CPU


@dataclasses.dataclass(frozen=True)
class LowerBound:
    """The bound and how it was obtained."""

    bytes: int | None  # None: the solver did not reach an optimum (`status` says why); never a guess
    accesses: int  # accesses of the stream bounded (all of them unless `status` is 'prefix')
    of: int  # accesses in the stream
    solver_s: float
    status: str  # 'optimal', 'prefix' (optimal on the first `accesses`), or the solver's message

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _gaps(stream, pinned) -> tuple[list, list]:
    """(gaps, first uses): gaps (block, start, end) between consecutive accesses of an unpinned block that span at
    least one other access; first use of every block."""
    last: dict[str, int] = {}
    first: dict[str, int] = {}
    gaps = []
    for t, b in enumerate(stream):
        if b in last and b not in pinned and t - last[b] > 1:
            gaps.append((b, last[b], t))
        first.setdefault(b, t)
        last[b] = t
    return gaps, first


def _nonzeros(gaps) -> int:
    return sum(end - start - 1 for _, start, end in gaps)


def _longest_prefix(stream, pinned, max_nonzeros: int) -> int:
    lo, hi = 1, len(stream)
    while lo < hi:  # largest n whose matrix fits
        mid = (lo + hi + 1) // 2
        if _nonzeros(_gaps(stream[:mid], pinned)[0]) <= max_nonzeros:
            lo = mid
        else:
            hi = mid - 1
    return lo


def lower_bound(stream, device_bytes: dict, budget_bytes: int, *, pinned=frozenset(), load_bytes: dict | None = None,
                access_bytes=None, max_nonzeros: int = DEFAULT_MAX_NONZEROS) -> LowerBound:
    """The LP bound on bytes loaded for `stream` under `budget_bytes` (the module docstring); `device_bytes` what each
    block occupies, `load_bytes` what a load moves (default: the same), `access_bytes` (optional, one per access)
    what the accessed block occupies from that access to its next, where its state changes during a run (a lossy
    one); pinned blocks occupy `device_bytes`. ValueError if an access cannot fit."""
    from scipy.optimize import linprog

    t0 = time.perf_counter()
    stream = list(stream)
    load = device_bytes if load_bytes is None else load_bytes
    total = n = len(stream)
    status = "optimal"
    if n and _nonzeros(_gaps(stream, pinned)[0]) > max_nonzeros:
        n, status = _longest_prefix(stream, pinned, max_nonzeros), "prefix"
    stream = stream[:n]
    gaps, first = _gaps(stream, pinned)
    cold = sum(load[b] for b in first)
    if not stream:
        return LowerBound(0, 0, 0, time.perf_counter() - t0, status)

    problem = _problem(stream, gaps, first, device_bytes, budget_bytes, pinned, load,
                       None if access_bytes is None else list(access_bytes)[:n])
    if problem is None:
        return LowerBound(math.floor(cold), n, total, time.perf_counter() - t0, status)
    A, b_ub, reload, scale = problem
    res = linprog(-reload / scale, A_ub=A, b_ub=b_ub, bounds=(0.0, 1.0), method="highs")
    solver_s = time.perf_counter() - t0
    if res.status != 0:
        return LowerBound(None, n, total, solver_s, f"solver: {res.message}")
    lp = cold + reload.sum() + res.fun * scale
    return LowerBound(math.ceil(lp - 1e-9 * max(1.0, lp) - 1e-6), n, total, solver_s, status)


NS_PER_S = 1e9


def lower_bound_seconds(stream, device_bytes: dict, budget_bytes: int, load_s: dict, **kwargs) -> float | None:
    """The same LP with each load priced in seconds (`load_s`: {block: seconds}, measured) instead of bytes: the
    least link time any schedule of `stream` spends loading. Solved in nanoseconds (`lower_bound` rounds up to a
    whole unit); None where the LP reached no optimum or solved only a prefix."""
    bound = lower_bound(stream, device_bytes, budget_bytes, load_bytes={b: s * NS_PER_S for b, s in load_s.items()},
                        **kwargs)
    return bound.bytes / NS_PER_S if bound.status == "optimal" and bound.bytes is not None else None


@dataclasses.dataclass(frozen=True)
class IntegralOptimum:
    """The exact offline optimum (the same problem with y in {0, 1}), as far as the solver got in its time."""

    bytes: int | None  # the best schedule found (an upper bound on the optimum), None if none was found
    proven_bytes: int | None  # the solver's proven lower bound on the optimum (equal to `bytes` when optimal)
    solver_s: float
    status: str  # 'optimal', or the solver's message (a time limit: the optimum lies in [proven_bytes, bytes])


def integral_optimum(stream, device_bytes: dict, budget_bytes: int, *, pinned=frozenset(),
                     load_bytes: dict | None = None, time_limit_s: float = 60.0) -> IntegralOptimum:
    """The fewest bytes any schedule loads for `stream` (evictions and loads at any time, the future known), by
    HiGHS's branch and bound over the LP above with integral y; `load_bytes` as in `lower_bound` (what a load
    costs: its bytes by default). Exponential in the worst case: an offline measure of how far the LP bound lies
    below what is achievable (experiments/offline_optimum.py), not for every run."""
    t0 = time.perf_counter()
    stream = list(stream)
    load = device_bytes if load_bytes is None else load_bytes
    gaps, first = _gaps(stream, pinned)
    cold = sum(load[b] for b in first)
    problem = _problem(stream, gaps, first, device_bytes, budget_bytes, pinned, load)
    if problem is None:
        return IntegralOptimum(cold, cold, time.perf_counter() - t0, "optimal")
    A, b_ub, reload, scale = problem
    res = _integral(A, b_ub, reload, scale, time_limit=time_limit_s)
    solver_s = time.perf_counter() - t0
    to_bytes = lambda f: round(cold + reload.sum() + f * scale)  # noqa: E731
    found = to_bytes(res.fun) if res.x is not None else None
    dual = getattr(res, "mip_dual_bound", None)
    proven = math.ceil(cold + reload.sum() + dual * scale - 1e-6 * scale) if dual is not None else None
    return IntegralOptimum(found, found if res.status == 0 else proven, solver_s,
                           "optimal" if res.status == 0 else res.message)


def _integral(A, b_ub, reload, scale, **options):
    """HiGHS's branch and bound over the problem of `_problem` with integral y (keep a gap or not): maximise the
    reloads saved. HiGHS's C++ prints a debugging line to the process's stdout on some problems whatever `disp`
    says ("HighsMipSolverData::transformNewIntegerFeasibleSolution", 18 of them in a Gemma 3 bench's results,
    2026-12-07), so the solve runs with file descriptor 1 pointed at /dev/null (`_stdout_silenced`)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    with _stdout_silenced():
        return milp(-reload / scale, constraints=LinearConstraint(A, -np.inf, b_ub),
                    integrality=np.ones(len(reload)), bounds=Bounds(0, 1), options={**options, "mip_rel_gap": 1e-6})


_SILENCE_LOCK = threading.Lock()
_silence = {"depth": 0, "saved": None}  # solves silencing at once (a mesh's device threads) and fd 1 as it was


@contextlib.contextmanager
def _stdout_silenced():
    """File descriptor 1 points at /dev/null within (Python's own stdout flushed first); where the process has no
    such descriptor (an embedding host), nothing changes. Safe across threads: the first solve in saves the
    descriptor and the last one out restores it. (Each saving and restoring its own, two device threads of a mesh
    run that overlapped left fd 1 at /dev/null for good: `experiments/mesh_real.py` then printed nothing.)"""
    with _SILENCE_LOCK:
        if _silence["depth"] == 0:
            sys.stdout.flush()
            try:
                _silence["saved"] = os.dup(1)
            except OSError:
                _silence["saved"] = None
            if _silence["saved"] is not None:
                with open(os.devnull, "w") as null:
                    os.dup2(null.fileno(), 1)
        _silence["depth"] += 1
    try:
        yield
    finally:
        with _SILENCE_LOCK:
            _silence["depth"] -= 1
            if _silence["depth"] == 0 and _silence["saved"] is not None:
                os.dup2(_silence["saved"], 1)
                os.close(_silence["saved"])
                _silence["saved"] = None


def _problem(stream, gaps, first, device_bytes, budget_bytes, pinned, load, access_bytes=None):
    """(A, b, reload, scale) of the LP in units of the largest reload (well-conditioned for HiGHS): one row per
    access some gap spans, one column per gap; None when no gap exists. ValueError if an access cannot fit.
    `access_bytes[t]`: what the block of access t occupies until its next access (default: its device bytes). A gap
    may end past the stream's last access (`cyclic_keeps`: it wraps into the next repetition): its rows are taken
    modulo the stream's length."""
    from scipy.sparse import csr_array

    n = len(stream)
    occupies_t = [device_bytes[b] for b in stream] if access_bytes is None else access_bytes
    pinned_at_t = np.zeros(n)
    for b, t in first.items():
        if b in pinned:
            pinned_at_t[t:] += device_bytes[b]
    accessed_t = np.array([0.0 if b in pinned else float(occupies_t[t]) for t, b in enumerate(stream)])
    rhs_t = budget_bytes - accessed_t - pinned_at_t
    worst = int(np.argmin(rhs_t))
    if rhs_t[worst] < 0:
        b = stream[worst]
        raise ValueError(f"block '{b}' ({occupies_t[worst]} bytes) cannot fit under the budget of {budget_bytes} bytes")
    if not gaps:
        return None

    rows, cols, vals = [], [], []
    for j, (b, start, end) in enumerate(gaps):
        span = np.arange(start + 1, end) % n
        rows.append(span)
        cols.append(np.full(span.size, j))
        # what it holds through the gap: the smaller of its states at the two accesses (a conversion in between)
        vals.append(np.full(span.size, float(min(occupies_t[start], occupies_t[end % n]))))
    rows, cols, vals = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
    used_rows = np.unique(rows)  # a step no gap spans constrains nothing
    A = csr_array((vals, (np.searchsorted(used_rows, rows), cols)), shape=(used_rows.size, len(gaps)))
    reload = np.array([float(load[b]) for b, _, _ in gaps])
    scale = max(1.0, float(reload.max()))  # bytes to units of the largest block: well-conditioned for HiGHS
    return A / scale, rhs_t[used_rows] / scale, reload, scale


def cyclic_keeps(cycle, device_bytes: dict, budget_bytes: int, *, pinned=frozenset(), load_cost: dict | None = None,
                 node_limit: int = 100, time_limit_s: float = 30.0) -> dict | None:
    """The integral optimum of a stream that repeats `cycle` for ever, per repetition: {(block, i): keep} for every
    read i of the cycle whose gap to the block's next read (wrapping into the next repetition) spans another read;
    keep = the block stays on the device through that gap. The same problem as `integral_optimum`, each gap's
    constraint rows taken modulo the cycle, so a decision holds in every repetition: the steady state of a dense
    run, with no first or last pass. Pinned blocks hold their bytes throughout. The best schedule HiGHS finds within
    `node_limit` nodes: deterministic, the same plan on any machine (0.02-2.6 s on this project's CPU for SmolLM2's
    and Gemma 3's passes, one or three of them); `time_limit_s` only a safeguard. `load_cost`: what a load of each
    block costs (default: its bytes; `pass_plan` also prices loads in measured seconds). None if it found none;
    ValueError if a read cannot fit."""
    cycle = list(cycle)
    n = len(cycle)
    reads: dict[str, list[int]] = {}
    for i, b in enumerate(cycle):
        reads.setdefault(b, []).append(i)
    gaps = [(b, s, r[(k + 1) % len(r)] + (n if k + 1 == len(r) else 0))
            for b, r in reads.items() if b not in pinned for k, s in enumerate(r)]
    gaps = [(b, s, e) for b, s, e in gaps if e - s > 1]
    first = {b: 0 for b in reads}  # in the steady state a pinned block holds its bytes from the cycle's start
    problem = _problem(cycle, gaps, first, device_bytes, budget_bytes, pinned,
                       device_bytes if load_cost is None else load_cost)
    if problem is None:
        return {}
    return _keeps(gaps, problem, node_limit, time_limit_s)


def horizon_keeps(stream, device_bytes: dict, budget_bytes: int, *, pinned=frozenset(),
                  load_cost: dict | None = None, node_limit: int = 1, time_limit_s: float = 30.0) -> dict | None:
    """The integral optimum of `stream` itself, to its end: {(block, t): keep} for every read t whose gap to the
    block's next read spans another read (a block's last read has none: nothing after it needs it). Unlike
    `cyclic_keeps`, the decisions of the last passes may differ from the steady state: nothing is kept for a
    pass that never comes, which lets the passes before the end keep more. The best schedule HiGHS finds within
    `node_limit` nodes (deterministic); `load_cost` and the result as in `cyclic_keeps`."""
    stream = list(stream)
    gaps, first = _gaps(stream, pinned)
    problem = _problem(stream, gaps, first, device_bytes, budget_bytes, pinned,
                       device_bytes if load_cost is None else load_cost)
    if problem is None:
        return {}
    return _keeps(gaps, problem, node_limit, time_limit_s)


def _keeps(gaps, problem, node_limit: int, time_limit_s: float) -> dict | None:
    """{(block, start of the gap): keep} of the best integral schedule HiGHS finds for `problem` (`_problem`'s)."""
    res = _integral(*problem, node_limit=node_limit, time_limit=time_limit_s)
    if res.x is None:
        return None
    return {(b, s): bool(y > 0.5) for (b, s, _), y in zip(gaps, res.x)}
