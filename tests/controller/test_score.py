"""Score sanity and bad-input errors: monotone in each term, no term dominates, NaN-free, clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vorch_jax.controller import score as score_lib
from vorch_jax.controller import state_ids as sid
from vorch_jax.controller import state_update as su
from vorch_jax.controller.block_table import BlockTable

W = score_lib.ScoreWeights.make()
score_jit = jax.jit(score_lib.score)
TERMS = ("rho", "lam", "kappa", "psi")


def table(n=3, **kw):
    args = dict(state=["S0"] * n, bytes_per_state=[1e6 * (i + 1) for i in range(n)], kind=["attn"] * n,
                layer=list(range(n)), rho=[1.0] * n, lam=[0.5] * n, kappa=[0.5] * n, psi=[0.5] * n,
                delta=np.tile([0, 1e-5, 2e-5, 0, 0, 0, 3e-5], (n, 1)), h2d_bytes_per_s=1e9, nvme_bytes_per_s=2e8)
    args.update(kw)
    return BlockTable.from_rows(**args)


def bump(t, name, i, x):
    arr = getattr(t, name)
    return t.replace(**{name: arr.at[i].set(x)})


@pytest.mark.parametrize("term", TERMS)
def test_score_is_monotone_in_each_numerator_term(term):
    t = table(n=3, **{term: [0.2, 1.0, 0.6]})
    last = np.asarray(score_jit(t, W))[0]
    for x in (0.3, 0.5, 0.9, 1.5, 4.0):  # block 0 below, then above, the max of the term
        t = bump(t, term, 0, x)
        now = np.asarray(score_jit(t, W))[0]
        assert np.all(now >= last)
        if x <= 1.0:  # strictly while block 0 is not the max (its normalised term grows)
            assert np.all(now > last)
        last = now


@pytest.mark.parametrize("name,state", [("delta", sid.S1), ("delta", sid.S2), ("tau", sid.S3), ("tau", sid.S4)])
def test_score_decreases_in_delta_and_tau(name, state):
    t = table()
    scale = float(jnp.max(jnp.maximum(t.delta, t.tau)))
    t = t.replace(**{name: getattr(t, name).at[0, state].set(0.0)})
    last = float(score_jit(t, W)[0, state])
    for frac in (0.1, 0.3, 0.6, 0.9):  # stays below the shared scale: strictly decreasing
        t = t.replace(**{name: getattr(t, name).at[0, state].set(frac * scale)})
        now = float(score_jit(t, W)[0, state])
        assert now < last
        last = now


@pytest.mark.parametrize("term", TERMS[1:] + ("delta", "tau"))
def test_no_term_dominates_at_default_weights_each_can_flip_the_ranking(term):
    """Block 0 leads on ρ (twice block 1's); moving any one other term (or the costs) in block 1's favour flips it."""
    base = dict(rho=[1.0, 0.5], lam=[0.3, 0.3], kappa=[0.3, 0.3], psi=[0.3, 0.3])
    t = table(n=2, **base)
    s = np.asarray(score_jit(t, W))
    assert s[0, sid.S3] > s[1, sid.S3]
    if term in TERMS:
        t = table(n=2, **{**base, term: [0.0, 1.0]})
        s = np.asarray(score_jit(t, W))
        assert s[1, sid.S3] > s[0, sid.S3], term
    else:  # block 0's cost in S3 goes to the top of the shared scale, block 1's to 0
        m = float(jnp.max(jnp.maximum(t.delta, t.tau)))
        arr = getattr(t, term).at[0, sid.S3].set(m).at[1, sid.S3].set(0.0)
        s = np.asarray(score_jit(t.replace(**{term: arr}), W))
        assert s[1, sid.S3] > s[0, sid.S3], term


def test_cost_terms_do_not_vanish_beside_s0():
    """The original's eps made S0 ~1/eps; here a typical transfer (τ = the mean τ) halves the value at α = β = 1,
    a transfer k times the typical one divides it by 1 + k, and δ, τ visibly matter."""
    t = table()
    s = np.asarray(score_jit(t, W))
    tau = np.asarray(t.tau, np.float64)
    allowed = np.asarray(t.allowed)
    mean_tau = tau[(tau > 0) & allowed].mean()
    np.testing.assert_allclose(s[:, sid.S0] / s[:, sid.S3], 1 + tau[:, sid.S3] / mean_tau, rtol=1e-5)
    assert np.all(s[:, sid.S0] > s[:, sid.S2]) and np.all(s[:, sid.S3] > s[:, sid.S4])


def test_streaming_a_small_block_still_costs_beside_a_huge_one():
    """One block 10x the others (SmolLM2's embedding beside its MLPs) must not make the others' transfers vanish."""
    t = table(n=4)
    tau = np.asarray(t.tau).copy()
    tau[:, sid.S3] = [10.0, 1.0, 1.0, 1.0]
    s = np.asarray(score_jit(t.replace(tau=jnp.asarray(tau, jnp.float32)), W))
    assert np.all(s[1:, sid.S3] < 0.8 * s[1:, sid.S0])


def test_score_and_tick_never_produce_nan_even_from_poisoned_arrays():
    t = table(n=4)
    poison = dict(rho=t.rho.at[0].set(jnp.nan), lam=t.lam.at[1].set(jnp.inf), kappa=t.kappa.at[2].set(-jnp.inf),
                  psi=t.psi.at[3].set(jnp.nan), delta=t.delta.at[0, 1].set(jnp.nan), tau=t.tau.at[1, 3].set(jnp.inf),
                  bytes_per_state=t.bytes_per_state.at[2, 0].set(jnp.nan))
    t = t.replace(**poison)  # bypasses from_rows on purpose
    assert np.all(np.isfinite(np.asarray(score_jit(t, W))))
    assert np.all(np.isfinite(np.asarray(score_lib.value(t, W))))
    target, reason, stats = su.tick(t, jnp.float32(3e6), W)
    assert np.all(np.asarray(t.allowed)[np.arange(4), np.asarray(target)])
    assert np.isfinite(float(stats.total_value)) and np.isfinite(float(stats.device_bytes))
    zero = t.replace(rho=jnp.zeros(4), lam=jnp.zeros(4), kappa=jnp.zeros(4), psi=jnp.zeros(4),
                     delta=jnp.zeros((4, 7)), tau=jnp.zeros((4, 7)))
    assert np.all(np.isfinite(np.asarray(score_jit(zero, W))))  # all-zero terms: 0/0 guarded


@pytest.mark.parametrize("kw,msg", [
    (dict(alpha=0.0, beta=0.0), "alpha = beta = 0"),
    (dict(w1=-1.0), r"w1 is negative"),
    (dict(beta=float("nan")), r"beta is nan"),
    (dict(alpha=float("inf")), r"alpha is inf"),
    (dict(c0=0.0), r"c0 is 0.0"),
    (dict(w1=0, w2=0, w3=0, w4=0), "all 0"),
    (dict(w2="heavy"), "must be a number"),
])
def test_bad_weights_raise_naming_the_problem(kw, msg):
    with pytest.raises(ValueError, match=msg):
        score_lib.ScoreWeights.make(**kw)


@pytest.mark.parametrize("kw,msg", [
    (dict(rho=[1.0, float("nan"), 1.0]), r"rho: block 1 .*NaN"),
    (dict(delta=np.where(np.eye(3, 7, 2) > 0, np.nan, 0.0)), r"delta: block 0 state S2 is nan"),
    (dict(psi=[0.1, 0.1, -2.0]), r"psi: block 2 is negative"),
    (dict(bytes_per_state=[1e6, -5.0, 1e6]), r"bytes_per_state: block 1 state S0 is negative"),
    (dict(kind=["attn", "conv", "mlp"]), r"kind of block 1: unknown kind 'conv'"),
    (dict(state=["S0", "S9", "S0"]), r"state of block 1: unknown state 'S9'"),
    (dict(state=["S0", "S1", "S0"], lossy=False), r"block 1 is S1, which is not on its ladder"),
    (dict(protected=[True, False, False], allowed=[[0, 0, 0, 1, 1, 0, 0]] * 3, state=["S3"] * 3),
     r"protected block 0 has no allowed on-device state"),
    (dict(layer=[0, -4, 1]), r"layer of block 1 is -4"),
    (dict(rho=[1.0, 2.0]), r"rho: expected 3 rows"),
])
def test_bad_table_rows_raise_naming_the_block(kw, msg):
    with pytest.raises(ValueError, match=msg):
        table(n=3, **kw)


def test_errors_use_block_names_when_given():
    with pytest.raises(ValueError, match=r"block 2 \('layers.1.mlp'\)"):
        table(n=3, names=["embed", "layers.0.attn", "layers.1.mlp"], kappa=[0, 0, float("nan")])


def test_state_codes_and_kinds_stay_in_sync_by_value_with_engine_and_model():
    """The controller speaks ints; tiers/ owns the State enum and models/ the kinds. Same values, no import coupling."""
    from vorch_jax.controller.block_table import KINDS
    from vorch_jax.models.blocks import BLOCK_KINDS
    from vorch_jax.tiers.state import State

    assert {s.name: int(s) for s in State} == {n: i for i, n in enumerate(sid.STATE_NAMES)}
    assert tuple(KINDS) == tuple(BLOCK_KINDS)
