"""The jitted state update: per block, the state on its ladder that maximises total value under the HBM budget.

    target_state_B, reason_B, stats = tick(table, budget_bytes, weights, params, dram_budget_bytes)

Order of decisions (one vectorised pass each, no Python loop over blocks):
1. Guardrail. A block *must stay on device* if it is protected or its ladder has no off-device state. Its cheapest
   allowed on-device state at or above `floor_state` is its *floor anchor*; all floor anchors are pinned first.
   `check_budget` (host side) raises if they alone exceed the budget: never a silent over-budget result.
2. Hysteresis lock. A block with `dwell < min_dwell` whose current state is still legal keeps it. If the locked
   on-device blocks do not fit beside the floor anchors (the budget shrank), locks are released lowest value per
   byte first: the only way a locked block moves is "for the budget".
3. Knapsack over HBM (multiple-choice: each block picks one state). Every free block starts at its anchor (off device,
   or its floor anchor) and may climb to any allowed on-device state. Per block we keep only the upper concave hull
   of its (bytes, value) points above the anchor, so the steps along the hull have strictly decreasing value per byte
   (gains are concave per block). Then ONE global order by value/byte over all (block, step) increments, and the
   longest prefix of that order whose bytes fit the remaining budget. method="sort": `jnp.argsort` + `jnp.cumsum`
   (exact; but XLA:CPU sorts 40k keys in ~8 ms). method="bisect" (default): the same prefix found as a threshold on
   the ratio, by BISECT_STEPS halvings of the ratio's float bits, each a masked sum of bytes (no sort; ~10x faster;
   steps inside the last band of ratios wait for the refill pass).
   Why steps of one block are taken in order: on the hull a block's k-th step has a strictly higher ratio than its
   (k+1)-th, so it sorts earlier / clears any threshold first, and any prefix of the global order holds a prefix of
   each block's steps. (Float ties are cut explicitly: a step counts only if all cheaper hull steps were taken.)
   Why the budget holds: bytes are counted in int32 quanta of (total bytes / 2**quantum_bits), each block's bytes
   rounded UP and the budget DOWN, so an integer sum <= budget implies true bytes <= budget with no float32
   accumulation error (at 10k blocks of GBs a float32 cumsum is off by ~1e5 bytes). Floor anchors are chosen by
   true bytes, which is what check_budget promises. A step whose bytes alone exceed the remaining budget is pruned
   before the hull.
   Optimality: a single pass is the classic greedy for the LP relaxation of the multiple-choice knapsack, optimal up
   to the first step that did not fit. That step can block smaller later ones, and a point under a block's hull
   (S1 under the chord to an S0 that no longer fits) never gets a chance. So passes 2.. (default passes=2) refill
   the leftover: each block offers one step, to its best value-per-byte point among those that still fit (the
   first vertex of its hull recomputed over the fitting points), and one more global prefix takes the best.
4. DRAM. Blocks left off device go to S3 (staged in DRAM) or S4 (NVMe): a one-step knapsack of host bytes under
   `dram_budget_bytes`, gain V(S3) - V(S4) per byte; the lowest-value blocks spill to S4. Blocks whose ladder has
   only one of S3/S4 get that one (the DRAM budget is then best effort; `stats.dram_bytes` tells).
Margin: the value of a block's *current* state is multiplied by (1 + margin), so a switch must beat staying put by
that margin in the global objective. Blocks in S5 (in flight) are planned like free blocks (no lock, no bonus).

Reasons (int32 per block, names in REASON_NAMES), first match wins:
GUARDRAIL_VETO  a protected block held at its floor anchor while its ladder has cheaper states (or off device),
                or a block whose current state breaks its guardrail and must move;
BUDGET          a demotion (lower quality rank, incl. S3 -> S4 spills), or a hysteresis lock released for the budget;
PREFETCH        a promotion of a block with λ > 0 from off device to device, or S4 -> S3;
SCORE           any other change; KEEP: target == current state.

Thrash bound (tested): `commit` sets dwell = 1 on a change and dwell + 1 otherwise, and a block with
dwell < min_dwell is locked. So two changes of one block are >= min_dwell ticks apart, and over T ticks a block
changes state at most ceil(T / min_dwell) times — on any input, as long as no lock is released for a budget. With
constant budgets that only happens in one corner: DRAM claimed by a block leaving HBM whose ladder allows S3 but
not S4. (An HBM lock set always fits: it is a subset of the previous placement, which fitted the same budget.)
A round trip S3 -> S4 -> S3 therefore spans >= min_dwell ticks: with min_dwell >= 2, never on consecutive ticks.
(The bound assumes the runtime commits the states it applies; a block reported in S5 is unlocked.)
On a steady input the margin usually freezes the plan after the first tick (the tests report the observed count).

Shapes: B blocks, 7 states, K = 4 on-device ladder states (S6, S2, S1, S0).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vorch_jax.controller import score as score_lib
from vorch_jax.controller import state_ids as sid
from vorch_jax.controller.block_table import SETTLED_DWELL, BlockTable

# Reason codes, one per block per tick.
KEEP, SCORE, BUDGET, GUARDRAIL_VETO, PREFETCH = range(5)
REASON_NAMES = ("KEEP", "SCORE", "BUDGET", "GUARDRAIL_VETO", "PREFETCH")

_LADDER = np.array(sid.DEVICE_LADDER)  # K=4 on-device states, worst to best
_BIG_Q = 1 << 30  # "everything fits" budget in quanta
BISECT_STEPS = 12  # threshold band: (ratio bit range) >> 12 ulps (~0.4% relative); the refill pass takes it


@dataclasses.dataclass(frozen=True)
class TickParams:
    """Static knobs of the tick (hashable: a jit static argument; changing them recompiles).

    min_dwell: ticks a block stays in a state before it may move again (>= 1; 1 disables the lock).
    margin: bonus fraction on the current state's value; a switch must beat it (>= 0).
    passes: knapsack passes (>= 1). method: "sort" (argsort + cumsum) or "bisect" (threshold on ratio bits).
    lossy_loss: ((state, loss), ...) value fraction lost by lossy states, scaled by sensitivity ψ.
    quantum_bits: bytes are counted in integer quanta of total_device_bytes / 2**quantum_bits.
    """

    min_dwell: int = 4
    margin: float = 0.10
    passes: int = 2
    method: str = "bisect"
    lossy_loss: tuple = tuple(sorted(score_lib.DEFAULT_LOSSY_LOSS.items()))
    quantum_bits: int = 22

    def __post_init__(self):
        if not (isinstance(self.min_dwell, int) and self.min_dwell >= 1):
            raise ValueError(f"TickParams.min_dwell must be an int >= 1, got {self.min_dwell!r}")
        if not (math.isfinite(self.margin) and self.margin >= 0):
            raise ValueError(f"TickParams.margin must be finite and >= 0, got {self.margin!r}")
        if not (isinstance(self.passes, int) and self.passes >= 1):
            raise ValueError(f"TickParams.passes must be an int >= 1, got {self.passes!r}")
        if self.method not in ("sort", "bisect"):
            raise ValueError(f"TickParams.method must be 'sort' or 'bisect', got {self.method!r}")
        for s, loss in self.lossy_loss:
            if s not in sid.LOSSY or not (0 <= loss < 1):
                raise ValueError(f"TickParams.lossy_loss: ({s!r}, {loss!r}) needs a lossy state and 0 <= loss < 1")
        if not (isinstance(self.quantum_bits, int) and 8 <= self.quantum_bits <= 22):
            raise ValueError("TickParams.quantum_bits must be an int in [8, 22] (float32 exactness of the quanta)")


@flax.struct.dataclass
class TickStats:
    device_bytes: jax.Array  # float32[] HBM bytes of the targets
    dram_bytes: jax.Array  # float32[] host bytes of targets in S3
    pinned_bytes: jax.Array  # float32[] bytes of the floor anchors (protected set)
    over_budget: jax.Array  # bool[] the pinned set alone exceeds the budget beyond float32 rounding
    #                           (check_budget would have raised)
    n_changed: jax.Array  # int32[]
    n_locked: jax.Array  # int32[] blocks held by hysteresis
    n_released: jax.Array  # int32[] locks released for the budget
    total_value: jax.Array  # float32[] Σ V(b, target)


# ----------------------------------------------------------------------------------------------- selection
def _select(ratio_N, cost_N, budget, method):
    """bool[N]: the items of highest ratio whose costs (int32) sum to <= budget. ratio <= 0 marks invalid items."""
    valid = ratio_N > 0
    cost = jnp.where(valid, cost_N, 0)
    # common case (budget not binding): take every valid item without searching
    return jax.lax.cond(jnp.sum(cost) <= budget, lambda: valid, lambda: _search(ratio_N, valid, cost, budget, method))


def _search(ratio_N, valid, cost, budget, method):
    if method == "sort":
        order = jnp.argsort(-ratio_N, stable=True)
        cum = jnp.cumsum(cost[order])
        take_sorted = valid[order] & (cum <= budget)
        return jnp.zeros_like(valid).at[order].set(take_sorted)
    # bisect: smallest threshold t on the (monotone, for positive floats) int32 bits of the ratio that fits.
    # Invariant: items with bits >= hi fit. hi starts above every ratio (takes nothing); BISECT_STEPS halvings of
    # [min bits, max bits + 1] leave a threshold band of (range >> steps) ulps: items inside it wait for the next
    # pass. Any threshold keeps the budget, so fewer steps only under-fill.
    bits = jnp.where(valid, jax.lax.bitcast_convert_type(ratio_N.astype(jnp.float32), jnp.int32), -1)
    lo0 = jnp.min(jnp.where(valid, bits, jnp.int32(0x7F800000)), initial=jnp.int32(0x7F800000)) - 1
    hi0 = jnp.max(bits, initial=jnp.int32(0)) + 1

    def body(_, lohi):
        lo, hi = lohi
        mid = lo + (hi - lo) // 2
        fits = jnp.sum(jnp.where(bits >= mid, cost, 0)) <= budget
        return jnp.where(fits, lo, mid), jnp.where(fits, mid, hi)

    _, hi = jax.lax.fori_loop(0, BISECT_STEPS, body, (lo0, hi0))
    return valid & (bits >= hi) & (budget >= 0)


def _quanta(bytes_x, q):
    """int32 quanta, rounded up (floor + 1) so that sums of quanta over-count true bytes."""
    return jnp.where(bytes_x > 0, jnp.floor(bytes_x / q).astype(jnp.int32) + 1, 0)


def _budget_quanta(budget, total, q):
    """int32 budget in quanta, rounded down; 'everything fits' when the budget covers the total."""
    b = jnp.where(jnp.isfinite(budget) | (budget > 0), budget, 0.0)
    b = jnp.where(jnp.isnan(budget), 0.0, b)
    fits_all = b >= total * (1 + 1e-5)
    return jnp.where(fits_all, _BIG_Q, jnp.maximum(jnp.floor(jnp.minimum(b, total) / q).astype(jnp.int32) - 1, -1))


def _scale(total, bits):
    return jnp.where(total > 0, total, 1.0) / (1 << bits)


# ----------------------------------------------------------------------------------------------- knapsack
def _hull_steps(a_b, a_v, X, Y, ok):
    """Upper concave hull of each block's points above its anchor (a_b, a_v), in O(K^2) per block.

    X, Y, ok: lists of K columns (int32[B], float32[B], bool[B]); columns, not [B,K] arrays, so that XLA fuses the
    whole hull into elementwise loops over B instead of tiny reductions over K.
    Returns lists on_hull bool[B], prev_b int32[B], prev_v float32[B]: each hull point's predecessor on the hull.
    First dominance: a candidate dies if another has <= bytes and >= value (exact ties: the lower k survives); the
    survivors have distinct bytes and values increasing with bytes. Then a survivor k is on the hull iff
    min over survivors/anchor i left of k of slope(i, k)  >  max over survivors j right of k of slope(k, j),
    which is "k lies strictly above every chord i–j around it" (k below chord(i, j) <=> slope(i,k) <= slope(k,j)).
    """
    K = len(X)
    Xf = [x.astype(jnp.float32) for x in X]
    af = a_b.astype(jnp.float32)
    alive = []
    for k in range(K):
        dead = jnp.zeros_like(ok[k])
        for j in range(K):
            if j != k:
                tie_wins = (Xf[j] < Xf[k]) | (Y[j] > Y[k]) | (j < k)
                dead = dead | (ok[j] & (Xf[j] <= Xf[k]) & (Y[j] >= Y[k]) & tie_wins)
        alive.append(ok[k] & ~dead)
    left = [[alive[j] & alive[k] & (Xf[j] < Xf[k]) for k in range(K)] for j in range(K)]  # left[j][k]: j left of k
    slope = [[None] * K for _ in range(K)]  # symmetric: slope(j, k) = slope(k, j); computed once per pair
    for j in range(K):
        for k in range(j + 1, K):
            dx = Xf[k] - Xf[j]
            slope[j][k] = slope[k][j] = (Y[k] - Y[j]) / jnp.where(dx != 0, dx, 1.0)
    on_hull, prev_b, prev_v = [], [], []
    for k in range(K):
        s_in = (Y[k] - a_v) / jnp.maximum(Xf[k] - af, 1.0)
        s_out = jnp.full_like(s_in, -jnp.inf)
        for j in range(K):
            if j != k:
                s_in = jnp.minimum(s_in, jnp.where(left[j][k], slope[j][k], jnp.inf))
                s_out = jnp.maximum(s_out, jnp.where(left[k][j], slope[k][j], -jnp.inf))
        on_hull.append(alive[k] & (s_in > s_out))
    for k in range(K):  # predecessor: the hull point with the most bytes below X_k, else the anchor
        pb, pv = a_b, a_v
        for j in range(K):
            better = on_hull[j] & (X[j] < X[k]) & (X[j] > pb)
            pb, pv = jnp.where(better, X[j], pb), jnp.where(better, Y[j], pv)
        prev_b.append(pb)
        prev_v.append(pv)
    return on_hull, prev_b, prev_v


def _hull_increments(a_b, a_v, X, Y, ok, rem):
    """Per block, the steps along its hull above the anchor: lists on_hull bool[B], d_b int32[B], ratio f32[B]."""
    K = len(X)
    ok = [ok[k] & (X[k] > a_b) & (Y[k] > a_v) & (X[k] - a_b <= rem) for k in range(K)]
    on_hull, prev_b, prev_v = _hull_steps(a_b, a_v, X, Y, ok)
    d_b = [X[k] - prev_b[k] for k in range(K)]
    ratio = [jnp.where(on_hull[k], (Y[k] - prev_v[k]) / jnp.maximum(d_b[k], 1).astype(jnp.float32), -1.0)
             for k in range(K)]
    return on_hull, d_b, ratio


def _take_prefix(s_b, s_v, s_state, X, Y, on_hull, d_b, ratio, rem, method):
    """Pass 1: take the globally best hull steps that fit `rem` (a per-block prefix, by concavity).

    Returns the new (bytes, value, state) per block and the bytes used.
    """
    K = len(X)
    r = jnp.stack([jnp.where(on_hull[k], ratio[k], -1.0) for k in range(K)]).reshape(-1)
    taken_KB = _select(r, jnp.stack(d_b).reshape(-1), rem, method).reshape(K, -1)
    taken = [taken_KB[k] for k in range(K)]
    # a step counts only if every cheaper hull step of its block was taken too (cuts float ties)
    new_b, new_v, new_s = s_b, s_v, s_state
    for k in range(K):
        gap = jnp.zeros_like(taken[k])
        for j in range(K):
            if j != k:
                gap = gap | (on_hull[j] & ~taken[j] & (X[j] < X[k]))
        t = taken[k] & ~gap & (X[k] > new_b)
        new_b, new_v = jnp.where(t, X[k], new_b), jnp.where(t, Y[k], new_v)
        new_s = jnp.where(t, jnp.int32(_LADDER[k]), new_s)
    return new_b, new_v, new_s, jnp.sum(new_b - s_b)


def _refill(s_b, s_v, s_state, X, Y, ok, rem, method):
    """Pass 2+: each block offers ONE step, to its best-slope point among those that still fit `rem` (the first
    vertex of the hull recomputed over the points that fit: so a point under the pass-1 hull, e.g. S1 under the
    chord to an S0 that no longer fits, gets its chance). B items instead of K·B; no pairwise hull needed.
    """
    K = len(X)
    best_r = jnp.full_like(s_v, -1.0)
    nxt_b, nxt_v, nxt_s = s_b, s_v, s_state
    for k in range(K):
        d = X[k] - s_b
        live = ok[k] & (d > 0) & (d <= rem) & (Y[k] > s_v)
        r = (Y[k] - s_v) / jnp.maximum(d, 1).astype(jnp.float32)
        better = live & ((r > best_r) | ((r == best_r) & (X[k] > nxt_b)))  # collinear: the farther point
        best_r = jnp.where(better, r, best_r)
        nxt_b, nxt_v = jnp.where(better, X[k], nxt_b), jnp.where(better, Y[k], nxt_v)
        nxt_s = jnp.where(better, jnp.int32(_LADDER[k]), nxt_s)
    t = _select(best_r, nxt_b - s_b, rem, method)
    new_b = jnp.where(t, nxt_b, s_b)
    return new_b, jnp.where(t, nxt_v, s_v), jnp.where(t, nxt_s, s_state), jnp.sum(new_b - s_b)


def _pick(cols, idx_B):
    """cols[idx_B[b]][b] for a list of per-state columns, as an elementwise select chain (fuses; no gather)."""
    out = cols[0]
    for s in range(1, len(cols)):
        out = jnp.where(idx_B == s, cols[s], out)
    return out


def _lookup(consts, idx_B):
    """consts[idx_B[b]] for a tuple of Python constants, as a select chain."""
    return _pick([jnp.asarray(c) for c in consts], idx_B)


@functools.partial(jax.jit, static_argnames=("params",))
def tick(table: BlockTable, budget_bytes, weights: score_lib.ScoreWeights, params: TickParams = TickParams(),
         dram_budget_bytes=jnp.inf):
    """Decide a target state per block. Pure and deterministic; see the module docstring for the algorithm.

    Returns (target_state int32[B], reason int32[B] (REASON_NAMES), TickStats). Call `check_budget` first (or use
    `tick_checked`): inside jit an infeasible budget cannot raise, it sets `stats.over_budget` instead.
    Internally per-state columns (lists of 7 [B] arrays): XLA:CPU fuses them into a few loops over B.
    """
    B = table.state.shape[0]
    S = sid.NUM_STATES
    R = sid.QUALITY_RANK
    cur = table.state
    in_flight = cur == sid.S5
    cur_c = jnp.where(in_flight, sid.S3, cur)  # index-safe stand-in for S5
    false_B = jnp.zeros((B,), bool)
    allowed = [table.allowed[:, s] if s != sid.S5 else false_B for s in range(S)]

    # --- 1. guardrail: effective ladder and floor anchors
    floor_rank = _lookup(R, table.floor_state)
    off_ok_any = allowed[sid.S3] | allowed[sid.S4]
    must_on = table.protected | ~off_ok_any
    dev_ok = [allowed[s] & (R[s] >= floor_rank) if sid.IS_ON_DEVICE[s] else false_B for s in range(S)]
    offs_ok = [allowed[s] & ~must_on if s in sid.OFF_DEVICE else false_B for s in range(S)]
    cur_ok = _pick([d | o for d, o in zip(dev_ok, offs_ok)], cur_c) & ~in_flight
    cur_on = _lookup(sid.IS_ON_DEVICE, cur_c) & ~in_flight

    bytes_ = [jnp.where(jnp.isfinite(c), jnp.maximum(c, 0.0), 0.0) if sid.IS_ON_DEVICE[s] else jnp.zeros((B,))
              for s, c in enumerate(table.bytes_per_state.T)]
    row_max = jnp.zeros((B,))
    for s in sid.ON_DEVICE:
        row_max = jnp.maximum(row_max, jnp.where(dev_ok[s], bytes_[s], 0.0))
    total = jnp.sum(row_max)
    q = _scale(total, params.quantum_bits)
    bq = [_quanta(c, q) for c in bytes_]  # int32[B] per state, 0 off device
    budget_q = _budget_quanta(jnp.asarray(budget_bytes, jnp.float32), total, q)

    # cheapest allowed on-device state at/above the floor, in TRUE bytes (quanta may tie two sizes; check_budget
    # promises the pinned set in true bytes), ties to the better state
    floor_anchor = jnp.full((B,), sid.S0, jnp.int32)
    floor_best = jnp.full((B,), jnp.inf)
    for s in sid.ON_DEVICE:
        better = dev_ok[s] & (bytes_[s] < floor_best)
        floor_anchor, floor_best = jnp.where(better, s, floor_anchor), jnp.where(better, bytes_[s], floor_best)
    floor_bq = jnp.where(must_on, _pick(bq, floor_anchor), 0)
    pinned_q = jnp.sum(floor_bq)

    # --- values, with the incumbent bonus
    V = score_lib.value_columns(table, weights, dict(params.lossy_loss))
    Vb = [V[s] * jnp.where(cur == s, 1.0 + params.margin, 1.0) for s in range(S)]

    # --- 2. hysteresis locks; release lowest value per byte if they no longer fit
    locked = (table.dwell < params.min_dwell) & cur_ok
    lock_on = locked & cur_on
    cur_bq = _pick(bq, cur_c)
    lock_cost = jnp.where(lock_on, cur_bq - floor_bq, 0)
    lock_fits = pinned_q + jnp.sum(lock_cost) <= budget_q
    Vb_cur = _pick(Vb, cur_c)
    keep_ratio = jnp.where(lock_on, Vb_cur / jnp.maximum(lock_cost, 1).astype(jnp.float32) + 1e-30, -1.0)
    kept_on = jax.lax.cond(lock_fits, lambda: lock_on,
                           lambda: _select(keep_ratio, lock_cost, budget_q - pinned_q, params.method))
    released_on = lock_on & ~kept_on
    fixed = (locked & ~cur_on) | kept_on  # no candidates this tick

    # --- 3. knapsack over HBM
    v_off = jnp.where(~cur_on & cur_ok, Vb_cur, -jnp.inf)
    for s in sid.OFF_DEVICE:
        v_off = jnp.maximum(v_off, jnp.where(offs_ok[s], V[s], -jnp.inf))
    a_on = (fixed & cur_on) | (~fixed & must_on)
    a_state = jnp.where(fixed, cur_c, jnp.where(must_on, floor_anchor, sid.S3)).astype(jnp.int32)
    a_b = jnp.where(fixed, jnp.where(cur_on, cur_bq, 0), floor_bq)
    a_v = jnp.where(a_on, jnp.where(fixed, Vb_cur, _pick(Vb, floor_anchor)),
                    jnp.where(jnp.isfinite(v_off), v_off, 0.0))
    rem = budget_q - jnp.sum(a_b)
    X = [bq[s] for s in _LADDER]
    Y = [Vb[s] for s in _LADDER]
    ok = [dev_ok[s] & ~fixed for s in _LADDER]
    on_hull, d_b, ratio = _hull_increments(a_b, a_v, X, Y, ok, rem)
    s_b, s_v, s_state = a_b, a_v, a_state
    s_b, s_v, s_state, used = _take_prefix(s_b, s_v, s_state, X, Y, on_hull, d_b, ratio, rem, params.method)
    rem = rem - used
    for _ in range(params.passes - 1):  # refill the leftover: each block's best step that still fits
        s_b, s_v, s_state, used = _refill(s_b, s_v, s_state, X, Y, ok, rem, params.method)
        rem = rem - used
    dev_final = a_on | (s_b > 0)

    # --- 4. DRAM: S3 or S4 for blocks left off device
    off = ~dev_final
    can3, can4 = offs_ok[sid.S3], offs_ok[sid.S4]
    hb = jnp.where(jnp.isfinite(table.host_bytes), jnp.maximum(table.host_bytes, 0.0), 0.0)
    h_total = jnp.sum(jnp.where(off_ok_any, hb, 0.0))
    hq_scale = _scale(h_total, params.quantum_bits)
    hq = _quanta(hb, hq_scale)
    dram_q = _budget_quanta(jnp.asarray(dram_budget_bytes, jnp.float32), h_total, hq_scale)
    forced3 = off & can3 & ~can4
    choice = off & can3 & can4
    fixed_off = locked & ~cur_on
    lock3 = choice & fixed_off & (cur == sid.S3)
    lock4 = choice & fixed_off & (cur == sid.S4)
    gain = Vb[sid.S3] - Vb[sid.S4]
    r3 = jnp.where(gain > 0, gain / jnp.maximum(hq, 1).astype(jnp.float32), jnp.where(cur != sid.S4, 1e-30, -1.0))
    r3 = jnp.where(lock3, jnp.inf, r3)
    r3 = jnp.where(choice & ~lock4, r3, -1.0)
    taken3 = _select(r3, hq, dram_q - jnp.sum(jnp.where(forced3, hq, 0)), params.method)
    off_state = jnp.where(forced3 | taken3, sid.S3, sid.S4)
    target = jnp.where(dev_final, s_state, off_state).astype(jnp.int32)

    # --- reasons
    changed = target != cur
    released = released_on | (lock3 & ~taken3)
    demoted = _lookup(R, target) < _lookup(R, cur_c)
    target_on = _lookup(sid.IS_ON_DEVICE, target)
    prefetch = (table.lam > 0) & ((~cur_on & target_on) | ((cur == sid.S4) & (target == sid.S3)))
    cheaper_raw = off_ok_any
    for s_ in sid.ON_DEVICE:
        cheaper_raw = cheaper_raw | (allowed[s_] & (bq[s_] < floor_bq))
    veto = table.protected & (target == floor_anchor) & cheaper_raw
    reason = jnp.full((B,), KEEP, jnp.int32)
    reason = jnp.where(changed, jnp.where(prefetch, PREFETCH, SCORE), reason)
    reason = jnp.where(changed & (demoted | released), BUDGET, reason)
    reason = jnp.where(veto | (changed & ~cur_ok & ~in_flight), GUARDRAIL_VETO, reason)

    pinned_bytes = jnp.sum(jnp.where(must_on, _pick(bytes_, floor_anchor), 0.0))
    stats = TickStats(
        device_bytes=jnp.sum(_pick(bytes_, target)),
        dram_bytes=jnp.sum(jnp.where(target == sid.S3, hb, 0.0)),
        pinned_bytes=pinned_bytes,
        over_budget=pinned_bytes > jnp.asarray(budget_bytes, jnp.float32) * (1 + 1e-5),
        n_changed=jnp.sum(changed).astype(jnp.int32),
        n_locked=jnp.sum(locked).astype(jnp.int32),
        n_released=jnp.sum(released).astype(jnp.int32),
        total_value=jnp.sum(_pick(V, target)),
    )
    return target, reason, stats


@jax.jit
def commit(table: BlockTable, new_state) -> BlockTable:
    """The engine applied `new_state` (int32[B]): record it and advance the dwell counters (1 on change, else +1)."""
    new_state = jnp.asarray(new_state, jnp.int32)
    changed = new_state != table.state
    dwell = jnp.where(changed, 1, jnp.minimum(table.dwell + 1, SETTLED_DWELL)).astype(jnp.int32)
    return table.replace(state=new_state, dwell=dwell)


# ----------------------------------------------------------------------------------------------- host side
def check_budget(table: BlockTable, budget_bytes: float, dram_budget_bytes: float | None = None) -> float:
    """Host-side config check; returns the bytes the pinned (protected / must-stay-on-device) set needs.

    Raises ValueError if the budget is not a finite number > 0, or is below what the pinned set needs at its floor
    anchors (cheapest allowed on-device state at or above each block's floor).
    """
    for name, b in (("budget_bytes", budget_bytes), ("dram_budget_bytes", dram_budget_bytes)):
        if b is None and name == "dram_budget_bytes":
            continue
        try:
            f = float(b)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number, got {b!r}") from None
        if math.isnan(f) or f <= 0 or (math.isinf(f) and name == "budget_bytes"):
            raise ValueError(f"{name} must be a finite number > 0, got {f}")
    allowed = np.asarray(table.allowed).copy()
    allowed[:, sid.S5] = False
    bps = np.asarray(table.bytes_per_state, np.float64)
    rank = np.asarray(sid.QUALITY_RANK)
    floor = np.asarray(table.floor_state)
    on = np.asarray(sid.IS_ON_DEVICE)
    must_on = np.asarray(table.protected) | ~(allowed[:, sid.S3] | allowed[:, sid.S4])
    dev_ok = allowed & on[None, :] & (rank[None, :] >= rank[floor][:, None])
    bad = np.nonzero(must_on & ~dev_ok.any(axis=1))[0]
    if bad.size:
        raise ValueError(f"block {bad[0]} must stay on device but has no allowed on-device state at or above its "
                         f"floor {sid.STATE_NAMES[floor[bad[0]]]}")
    need = float(np.sum(np.where(must_on, np.min(np.where(dev_ok, bps, np.inf), axis=1, initial=np.inf), 0.0)))
    if need > float(budget_bytes):
        raise ValueError(f"HBM budget {float(budget_bytes):.0f} bytes is below the protected set: its "
                         f"{int(must_on.sum())} pinned blocks need {need:.0f} bytes at their floor states "
                         f"({need / 2**20:.2f} MiB); raise the budget or relax protected/floor_state")
    return need


def tick_checked(table, budget_bytes, weights, params: TickParams = TickParams(), dram_budget_bytes=None):
    """`check_budget` then `tick`: the entry point for callers that want errors instead of stats flags."""
    check_budget(table, budget_bytes, dram_budget_bytes)
    dram = jnp.inf if dram_budget_bytes is None else dram_budget_bytes
    return tick(table, jnp.float32(budget_bytes), weights, params, jnp.float32(dram))


def reason_names(reason) -> list[str]:
    return [REASON_NAMES[int(r)] for r in np.asarray(reason)]
