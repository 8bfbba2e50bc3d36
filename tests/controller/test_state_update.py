"""Property tests of the jitted tick over random block tables, budgets and access streams (hypothesis).

Every table is padded to PAD rows (inert rows, see block_table.pad_to) so that the tick compiles once; the real
blocks number 1..64. Invariants, checked in float64 on the host from the returned targets:
budget (device bytes <= HBM budget whenever check_budget passes), guardrails (protected blocks on device at or above
their floor; no on-device block below its floor), ladder (every target allowed, never S5), determinism.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vorch_jax.controller import access_stats as access_stats
from vorch_jax.controller import score as score_lib
from vorch_jax.controller import state_ids as sid
from vorch_jax.controller import state_update as su
from vorch_jax.controller.block_table import KINDS, BlockTable, pad_to

PAD = 64
W = score_lib.ScoreWeights.make()
PARAMS = su.TickParams()
SETTINGS = settings(max_examples=60, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
RANK = np.asarray(sid.QUALITY_RANK)
ON = np.asarray(sid.IS_ON_DEVICE)


@st.composite
def tables(draw):
    """(BlockTable, numpy view of its rows) with B in 1..64, random ladders, protected sets and score inputs."""
    b = draw(st.integers(1, 64))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    full = rng.choice([1.0, 3.0, 1e3, 7e5, 2**20 * 9.0, 1.5e9], b) * rng.uniform(0.5, 1.5, b)
    bps = np.zeros((b, 7))
    for s in sid.ON_DEVICE:  # random, not necessarily monotone, sizes per representation
        bps[:, s] = full * rng.choice([1.0, 0.5, 0.27, 0.125, 0.6], b)
    allowed = rng.random((b, 7)) < 0.7
    allowed[:, sid.S5] = False
    protected = rng.random(b) < 0.2
    floor = rng.choice(list(sid.ON_DEVICE), b)
    floor = np.where(protected | (rng.random(b) < 0.3), floor, sid.S6)
    for i in range(b):
        dev_ok = [s for s in sid.ON_DEVICE if allowed[i, s] and RANK[s] >= RANK[floor[i]]]
        off_ok = allowed[i, sid.S3] or allowed[i, sid.S4]
        if (protected[i] or not off_ok) and not dev_ok:
            allowed[i, floor[i]] = True
        if not allowed[i].any():
            allowed[i, sid.S4] = True
    state = np.array([rng.choice(np.nonzero(allowed[i])[0]) for i in range(b)])
    state = np.where(rng.random(b) < 0.05, sid.S5, state)  # a few in flight
    terms = {k: rng.choice([0.0, 1.0], b) * rng.exponential(rng.choice([1e-3, 1.0, 1e3]), b)
             for k in ("rho", "lam", "kappa", "psi")}
    table = BlockTable.from_rows(
        state=state, bytes_per_state=bps, kind=rng.integers(0, len(KINDS), b), layer=rng.integers(0, 8, b),
        protected=protected, floor_state=floor, allowed=allowed, delta=rng.random((b, 7)) * 1e-4,
        h2d_bytes_per_s=2e10, nvme_bytes_per_s=3e9, dwell=rng.integers(0, 8, b), **terms)
    bps32 = np.asarray(table.bytes_per_state, np.float64)  # what the tick sees: float32 bytes
    return table, dict(b=b, bps=bps32, allowed=allowed, protected=protected, floor=floor)


def need_bytes(rows):
    must_on = rows["protected"] | ~(rows["allowed"][:, sid.S3] | rows["allowed"][:, sid.S4])
    dev_ok = rows["allowed"] & ON[None, :] & (RANK[None, :] >= RANK[rows["floor"]][:, None])
    return float(np.sum(np.where(must_on, np.min(np.where(dev_ok, rows["bps"], np.inf), axis=1), 0.0)))


def float32_at_least(x):
    """The smallest float32 >= x: budgets are float32 on device."""
    f = np.float32(x)
    return float(f if float(f) >= x else np.nextafter(f, np.float32(np.inf)))


def assert_invariants(rows, target, budget):
    b = rows["b"]
    target = np.asarray(target)[:b]
    dev_bytes = float(np.sum(rows["bps"][np.arange(b), target]))
    assert dev_bytes <= budget, f"device bytes {dev_bytes} exceed budget {budget}"
    assert np.all(target != sid.S5)
    assert np.all(rows["allowed"][np.arange(b), target]), "target off the block's ladder"
    on = ON[target]
    assert np.all(on[rows["protected"]]), "protected block placed off device"
    assert np.all(RANK[target][on] >= RANK[rows["floor"]][on]), "on-device block below its floor"


@given(tables(), st.floats(0.0, 1.3), st.lists(st.integers(0, 63), max_size=32), st.integers(0, 7))
@SETTINGS
def test_tick_invariants_over_random_tables_budgets_and_streams(tb, frac, stream, cur_layer):
    table, rows = tb
    total = float(np.sum(rows["bps"].max(axis=1)))
    need = need_bytes(rows)
    budget = float32_at_least(max(need + frac * max(total - need, 1.0), 1.0))
    assert su.check_budget(table, budget) == pytest.approx(need, rel=1e-6)
    rho = access_stats.update_rho(table.rho, access_stats.pad_accesses([i % rows["b"] for i in stream], 32), 0.9)
    lam = access_stats.lookahead_lambda(table.layer, cur_layer, 8, 3, 0.5)  # layers 0..7
    table = pad_to(table.replace(rho=rho, lam=lam), PAD)
    for _ in range(3):  # a few ticks with the engine applying each plan: the invariants hold after every one
        target, reason, stats = su.tick(table, jnp.float32(budget), W, PARAMS)
        assert_invariants(rows, target, budget)
        assert not bool(stats.over_budget)
        assert np.all((np.asarray(reason) >= 0) & (np.asarray(reason) < len(su.REASON_NAMES)))
        again = su.tick(table, jnp.float32(budget), W, PARAMS)
        assert np.array_equal(np.asarray(target), np.asarray(again[0])), "tick is not deterministic"
        assert np.array_equal(np.asarray(reason), np.asarray(again[1]))
        table = su.commit(table, target)


@given(tables(), st.floats(0.0, 1.0))
@settings(SETTINGS, max_examples=25)
def test_budget_below_protected_set_is_an_error_never_a_silent_overrun(tb, frac):
    table, rows = tb
    need = need_bytes(rows)
    if need <= 0:
        return
    budget = frac * need * 0.999
    with pytest.raises(ValueError, match=r"protected set|must be a finite number > 0"):
        su.tick_checked(table, budget, W)
    if budget > 0:  # inside jit the same case is flagged, not hidden
        assert bool(su.tick(pad_to(table, PAD), jnp.float32(budget), W, PARAMS)[2].over_budget)


def small_table(**kw):
    MiB = 2**20
    args = dict(state=["S0", "S1", "S3"], bytes_per_state=[8 * MiB, 7 * MiB, 9 * MiB], kind=["embed", "attn", "mlp"],
                layer=[0, 1, 1], protected=[True, False, False], floor_state=["S1", "S6", "S6"], rho=[1, 2, 3])
    args.update(kw)
    return BlockTable.from_rows(**args)


@pytest.mark.parametrize("budget", [0, -1, float("nan"), float("inf"), "lots"])
def test_bad_budget_raises_naming_the_problem(budget):
    with pytest.raises(ValueError, match="budget_bytes must be"):
        su.tick_checked(small_table(), budget, W)


def test_budget_below_protected_set_names_the_bytes_needed():
    with pytest.raises(ValueError) as e:
        su.tick_checked(small_table(), 3 * 2**20, W)  # the protected embedding needs 4 MiB at its floor S1
    assert "protected set" in str(e.value) and str(4 * 2**20) in str(e.value)


def test_protected_block_is_pinned_first_and_reports_the_guardrail():
    t = small_table(rho=[0, 5, 5])  # the embedding has no value, yet stays on device at its floor
    target, reason, _ = su.tick_checked(t, 5 * 2**20, W)
    assert int(target[0]) == sid.S1 and su.REASON_NAMES[int(reason[0])] == "GUARDRAIL_VETO"


def test_sort_and_bisect_selection_agree_on_small_tables():
    t = small_table(rho=[1, 2, 3], psi=[0.1, 0.5, 0.9])
    for budget in (5e6, 9e6, 1.3e7, 2e7, 4e7):
        a = su.tick_checked(t, budget, W, su.TickParams(method="sort"))[0]
        b = su.tick_checked(t, budget, W, su.TickParams(method="bisect"))[0]
        assert np.array_equal(np.asarray(a), np.asarray(b)), budget


def test_unbounded_budget_puts_every_valued_block_in_its_best_state():
    # margin 0: with the default 10% margin a block staged in fast DRAM may rightly stay there (S3 costs only τ)
    t = small_table(rho=[1, 2, 3], state=["S0", "S3", "S3"], h2d_bytes_per_s=1e9)
    target = np.asarray(su.tick_checked(t, 1e12, W, su.TickParams(margin=0.0))[0])
    assert target.tolist() == [sid.S0, sid.S0, sid.S0]


def test_dram_budget_spills_lowest_value_blocks_to_nvme():
    MiB = 2**20
    t = BlockTable.from_rows(state=["S3"] * 4, bytes_per_state=[MiB] * 4, kind=["expert"] * 4, layer=[1] * 4,
                             allowed=[[0, 0, 0, 1, 1, 0, 0]] * 4, rho=[4, 3, 2, 1], h2d_bytes_per_s=1e9,
                             nvme_bytes_per_s=1e8)
    target, reason, stats = su.tick_checked(t, 1.0, W, dram_budget_bytes=2.5 * MiB)
    assert np.asarray(target).tolist() == [sid.S3, sid.S3, sid.S4, sid.S4]
    assert [su.REASON_NAMES[r] for r in np.asarray(reason)[2:]] == ["BUDGET", "BUDGET"]
    assert float(stats.dram_bytes) <= 2.5 * MiB


def test_access_stats_rho_and_wrapping_lambda():
    rho = access_stats.update_rho(jnp.ones(4), jnp.array([1, 1, 3, -1, 7]), 0.5)
    assert np.allclose(rho, [0.5, 2.5, 0.5, 1.5])
    layers = jnp.array([-1, 0, 1, 2, 3, 4])  # embedding, 4 decoder layers, final norm
    lam = access_stats.lookahead_lambda(layers, 3, 4, 3, 0.5)
    assert np.allclose(lam, [0.25, 0.0, 0.0, 0.0, 1.0, 0.5])  # wraps: norm, then the next step's embedding
    lam = access_stats.lookahead_lambda(layers, 3, 4, 3, 0.5, jnp.array([9.0, 0.2, 0, 0, 0, 0]),
                                        jnp.array([False, True, False, False, False, False]))
    assert np.allclose(lam, [0.25, 0.2, 0.0, 0.0, 1.0, 0.5])


def test_tick_without_jit_matches_jit():
    t = small_table(rho=[1, 2, 3], psi=[0.1, 0.5, 0.9])
    a = su.tick(t, jnp.float32(9e6), W, PARAMS)
    with jax.disable_jit():
        b = su.tick(t, jnp.float32(9e6), W, PARAMS)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0])) and np.array_equal(np.asarray(a[1]), np.asarray(b[1]))
    assert math.isclose(float(a[2].device_bytes), float(b[2].device_bytes), rel_tol=1e-6)


@given(st.integers(1, 5), st.integers(0, 2**32 - 1), st.floats(0.05, 1.0))
@settings(SETTINGS, max_examples=40)
def test_knapsack_is_within_one_step_of_the_brute_force_optimum(b, seed, frac):
    """Greedy + refill >= OPT - (largest single gain): the LP-greedy bound, against enumeration of all placements.

    margin 0 and settled dwell, so the tick maximises plain Σ V; unlimited DRAM. OPT is taken at a budget lowered by
    one quantum per block, the tick's conservative rounding.
    """
    import itertools

    rng = np.random.default_rng(seed)
    bps = np.zeros((b, 7))
    full = rng.uniform(1, 100, b) * 2**20
    for s in sid.ON_DEVICE:
        bps[:, s] = full * rng.choice([1.0, 0.5, 0.25, 0.3, 0.7], b)
    allowed = rng.random((b, 7)) < 0.8
    allowed[:, sid.S5] = False
    allowed[:, sid.S3] = True  # every block may leave the device: no pinned set
    table = BlockTable.from_rows(state=[sid.S3] * b, bytes_per_state=bps, kind=[1] * b, layer=[0] * b,
                                 allowed=allowed, rho=rng.exponential(1, b), kappa=rng.random(b), psi=rng.random(b),
                                 delta=rng.random((b, 7)) * 1e-4, h2d_bytes_per_s=1e9, nvme_bytes_per_s=2e8)
    bps = np.asarray(table.bytes_per_state, np.float64)
    V = np.asarray(score_lib.value(table, W), np.float64)
    total = float(np.sum(bps.max(axis=1)))
    budget = float32_at_least(frac * total)
    params = su.TickParams(margin=0.0)
    target = np.asarray(su.tick(pad_to(table, PAD), jnp.float32(budget), W, params)[0])[:b]
    got = float(np.sum(V[np.arange(b), target]))
    opts = [[s for s in range(7) if allowed[i, s] and s not in (sid.S4, sid.S5)] for i in range(b)]
    slack = b * total / 2**PARAMS.quantum_bits * 2
    best = max(sum(V[i, s] for i, s in enumerate(c)) for c in itertools.product(*opts)
               if sum(bps[i, s] for i, s in enumerate(c)) <= budget - slack)
    max_gain = float(np.max(np.where(allowed, V, 0).max(axis=1) - V[:, sid.S3]))
    assert got >= best - max_gain - 1e-6, (got, best, max_gain)
