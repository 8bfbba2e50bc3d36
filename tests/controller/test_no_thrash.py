"""No thrashing: the hysteresis bound on state changes, and the original project's S3<->S4 pathology replayed.

Bound (state_update docstring): commit sets dwell = 1 on a change, a block with dwell < min_dwell is locked, so two
changes of one block are >= min_dwell ticks apart and over T ticks a block changes at most ceil(T / min_dwell) times,
unless the budget shrinks (then locks may be released, reason BUDGET).
"""

import math

import jax.numpy as jnp
import numpy as np

from vorch_jax.controller import access_stats as access_stats
from vorch_jax.controller import score as score_lib
from vorch_jax.controller import state_ids as sid
from vorch_jax.controller import state_update as su
from vorch_jax.controller.block_table import BlockTable

MiB = 2**20
W = score_lib.ScoreWeights.make()
PARAMS = su.TickParams()  # min_dwell 4, margin 10%


def run(table, budget, steps, params=PARAMS, dram=jnp.inf, observe=None):
    """The engine applies every plan at once; returns states int[steps+1, B] and device bytes per tick."""
    states, dev = [np.asarray(table.state)], []
    for t in range(steps):
        if observe is not None:
            table = observe(table, t)
        target, _, stats = su.tick(table, jnp.float32(budget), W, params, jnp.float32(dram))
        dev.append(float(np.sum(np.asarray(table.bytes_per_state, np.float64)[np.arange(len(target)), target])))
        table = su.commit(table, target)
        states.append(np.asarray(target))
    return np.stack(states), np.asarray(dev)


def changes_per_block(states):
    return np.sum(states[1:] != states[:-1], axis=0)


def min_gap_between_changes(states):
    gaps = []
    for b in range(states.shape[1]):
        ticks = np.nonzero(states[1:, b] != states[:-1, b])[0]
        gaps += list(np.diff(ticks))
    return min(gaps) if gaps else math.inf


def test_steady_stream_respects_the_bound():
    rng = np.random.default_rng(7)
    B, T = 32, 40
    full = rng.uniform(1, 16, B) * MiB
    table = BlockTable.from_rows(
        state=rng.choice([0, 1, 2, 3, 4, 6], B), bytes_per_state=full, kind=["attn", "mlp", "expert", "norm"] * 8,
        layer=np.arange(B) % 8, protected=np.arange(B) == 0, rho=rng.exponential(1, B), kappa=rng.random(B),
        psi=rng.random(B), h2d_bytes_per_s=2e10, nvme_bytes_per_s=3e9, dwell=np.zeros(B, int))
    stream = access_stats.pad_accesses(rng.integers(0, B, 24), 24)  # the same accesses every step

    def observe(t, step):
        return t.replace(rho=access_stats.update_rho(t.rho, stream, 0.9),
                         lam=access_stats.lookahead_lambda(t.layer, 3, 8, 3, 0.5))

    budget = 0.35 * float(np.sum(full))
    states, dev = run(table, budget, T, observe=observe)
    per_block = changes_per_block(states)
    bound = math.ceil(T / PARAMS.min_dwell)
    assert np.all(dev <= budget)
    assert per_block.max() <= bound, (per_block, bound)
    assert min_gap_between_changes(states) >= PARAMS.min_dwell
    print(f"steady stream: {per_block.sum()} changes over {T} ticks x {B} blocks (bound {bound}/block); "
          f"max per block {per_block.max()}")


def test_shrinking_budget_releases_locks_for_the_budget_only():
    full = np.array([8, 7, 9, 6]) * MiB
    table = BlockTable.from_rows(state=["S0"] * 4, bytes_per_state=full, kind=["attn"] * 4, layer=[0, 0, 1, 1],
                                 rho=[4, 3, 2, 1], h2d_bytes_per_s=1e10, dwell=[0] * 4)  # all locked
    target, reason, stats = su.tick_checked(table, 40 * MiB, W)
    assert np.array_equal(np.asarray(target), np.zeros(4)) and int(stats.n_locked) == 4
    target, reason, stats = su.tick_checked(table, 16 * MiB, W)
    assert float(np.sum(np.asarray(table.bytes_per_state)[np.arange(4), np.asarray(target)])) <= 16 * MiB
    moved = np.asarray(target) != 0
    assert moved.any() and int(stats.n_released) >= moved.sum()
    assert all(su.REASON_NAMES[r] == "BUDGET" for r in np.asarray(reason)[moved])
    assert not moved[0], "the most valuable locked block keeps its lock"


def regression_table():
    """The original scenario: embedding, attention, MLP, hot expert, cold expert; 8, 7, 9, 6, 10 MiB."""
    return BlockTable.from_rows(
        state=["S0", "S1", "S3", "S3", "S4"], bytes_per_state=np.array([8, 7, 9, 6, 10]) * MiB,
        kind=["embed", "attn", "mlp", "expert", "expert"], layer=[-1, 0, 0, 0, 0], kappa=[1, 1, 1, 0.5, 0.5],
        psi=[0.8, 0.5, 0.3, 0.3, 0.3], h2d_bytes_per_s=2.5e10, nvme_bytes_per_s=3e9,
        names=["embed", "layers.0.attn", "layers.0.mlp", "layers.0.expert.hot", "layers.0.expert.cold"])


def regression_observe(t, step):
    """Dense blocks and the hot expert every step, the cold expert every 10th; the router's λ for experts."""
    used = [0, 1, 2, 3] + ([4] if step % 10 == 9 else [])
    rho = access_stats.update_rho(t.rho, access_stats.pad_accesses(used, 8), 0.9)
    cold_next = 1.0 if step % 10 == 9 else 0.0
    lam = access_stats.lookahead_lambda(t.layer, -1, 1, 3, 0.5, jnp.array([0, 0, 0, 1.0, cold_next]),
                                        jnp.array([False, False, False, True, True]))
    return t.replace(rho=rho, lam=lam)


def test_original_scenario_never_flips_s3_s4_and_stays_under_the_bound():
    steps, budget, dram = 50, 10 * MiB, 20 * MiB  # DRAM holds only two of the three off-device blocks
    states, dev = run(regression_table(), budget, steps, dram=dram, observe=regression_observe)
    assert np.all(dev <= budget), dev.max() / MiB
    for b in range(5):  # the pathology: S3 -> S4 and back S4 -> S3 on consecutive ticks (or the reverse)
        s = states[:, b]
        for t in range(1, steps):
            assert not (s[t - 1] == sid.S3 and s[t] == sid.S4 and s[t + 1] == sid.S3), (b, t)
            assert not (s[t - 1] == sid.S4 and s[t] == sid.S3 and s[t + 1] == sid.S4), (b, t)
    per_block = changes_per_block(states)
    bound = math.ceil(steps / PARAMS.min_dwell)
    assert per_block.max() <= bound and per_block.sum() <= 5 * bound
    assert min_gap_between_changes(states) >= PARAMS.min_dwell
    final = [sid.STATE_NAMES[s] for s in states[-1]]
    assert not np.any(states[:, 3] == sid.S4), f"the hot expert, used every step, was spilled to NVMe: {final}"
    assert per_block.sum() <= 5, per_block  # observed: one change (the embedding S0 -> S1 to fit the budget)
    print(f"original scenario: {per_block.sum()} changes in {steps} ticks (bound {bound}/block, {5 * bound} total); "
          f"per block {per_block.tolist()}; final {final}")
