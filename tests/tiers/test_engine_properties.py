"""Property: any sequence of transitions (batches in flight together) over a small synthetic model keeps every
block's content recoverable (lossless states bitwise, lossy states within their format's bound) and the byte
accounting exact against the live arrays and the store's files."""

import gc
import tempfile

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vorch_jax.tiers.engine import MovementEngine
from vorch_jax.tiers.nvme_store import CHECKSUM_FILE
from vorch_jax.tiers.state import TARGETS, State

RANK, GROUP = 8, 32
_rng = np.random.default_rng(7)
BLOCKS = {  # 4 blocks: two shapes, a tall leaf (K > N), a 1-D norm
    "b0": {"norm": _rng.standard_normal(64).astype(np.float32), "w": _rng.standard_normal((64, 48)).astype(np.float32)},
    "b1": {"w_up": _rng.standard_normal((32, 96)).astype(np.float32),
           "w_down": _rng.standard_normal((96, 32)).astype(np.float32)},
    "b2": {"norm": _rng.standard_normal(64).astype(np.float32), "w": _rng.standard_normal((64, 48)).astype(np.float32)},
    "b3": {"w": (_rng.standard_normal((64, 4)) @ _rng.standard_normal((4, 48))).astype(np.float32)},  # rank 4
}
OPT_LOWRANK = {  # Eckart–Young optimum of the rank-RANK error per leaf, float64
    (b, k): float(np.sqrt((np.linalg.svd(v.astype(np.float64), compute_uv=False)[RANK:] ** 2).sum()))
    for b, leaves in BLOCKS.items() for k, v in leaves.items() if v.ndim == 2
}


class Source:
    block_ids = list(BLOCKS)

    def __call__(self, block_id):
        return {k: v.copy() for k, v in BLOCKS[block_id].items()}


def check_content(block_id, state, got):
    for k, ref in BLOCKS[block_id].items():
        g = got[k]
        assert g.shape == ref.shape and g.dtype == np.float32
        if state.lossless or ref.ndim == 1:  # 1-D leaves are kept exactly in every state
            assert g.tobytes() == ref.tobytes(), (block_id, state, k)
            continue
        err = np.abs(g.astype(np.float64) - ref)
        col_absmax = np.abs(ref).max(axis=0, keepdims=True).astype(np.float64)
        if state == State.S1:  # |err| <= scale / 2, scale = absmax_col / 127
            assert (err <= col_absmax / 254 * (1 + 1e-5) + 1e-7).all(), (block_id, k)
        elif state == State.S2:  # |err| <= scale / 2, scale = group span / 15 <= 2 absmax_col / 15
            assert (err <= col_absmax / 15 * (1 + 1e-5) + 1e-7).all(), (block_id, k)
        else:  # S6: the optimal rank-RANK error (up to float32)
            assert np.sqrt((err**2).sum()) <= OPT_LOWRANK[(block_id, k)] * (1 + 1e-3) + 1e-3 * np.linalg.norm(ref)


def buffers(arrays) -> dict[int, int]:
    """{device buffer address: bytes} of distinct buffers (aliases of one buffer count once)."""
    return {a.unsafe_buffer_pointer(): int(a.nbytes) for a in arrays}


def check_accounting(engine, other_ids):
    gc.collect()
    live = [a for a in jax.live_arrays() if id(a) not in other_ids]
    owned = engine.live_arrays()
    for kind, where in (("device", "device"), ("pinned_host", "host")):
        # compare BUFFERS, not Python wrappers: on GPU (jax 0.11) np.asarray(x) leaves a second ArrayImpl
        # aliasing x's buffer alive until x is deleted (no extra bytes: checked with memory_stats).
        live_k = buffers([a for a in live if a.sharding.memory_kind == kind])
        owned_k = buffers([a for a in owned if a.sharding.memory_kind == kind])
        assert live_k == owned_k, f"{kind} buffers alive that no block owns: {set(live_k) - set(owned_k)}"
        assert engine.bytes_in(where) == sum(live_k.values())
    chunks = [p for p in engine.store_dir.rglob("*") if p.is_file() and p.name not in ("zarr.json", CHECKSUM_FILE)]
    assert engine.bytes_in("disk") == sum(p.stat().st_size for p in chunks)
    assert engine.bytes_in("device") + engine.bytes_in("host") + engine.bytes_in("disk") == sum(
        engine.representation(b).nbytes for b in engine.block_ids)


_warm = []


@pytest.fixture(scope="module", autouse=True)
def _young_garbage_only():
    """The accounting check collects garbage before it lists live arrays. In the full suite's process (hundreds of
    runs before this module) a full collection scans millions of old objects: 110 s for this test's ~100 checks,
    against 7 s alone. Freezing what exists before the module leaves each collection only the objects made since,
    which is where any garbage array of this test lives."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


def warm_up():
    """Run every conversion once per process, so arrays that jit caches keep (compiled constants) exist before
    the test takes its baseline of foreign arrays."""
    if _warm:
        return
    with tempfile.TemporaryDirectory() as store, \
            MovementEngine(Source(), store, int4_group_size=GROUP, lowrank_rank=RANK) as eng:
        for b in BLOCKS:
            eng.register(b, State.S0)
            for s in (State.S1, State.S2, State.S6, State.S3, State.S4, State.S0):
                eng.request(b, s).result()
                eng.inspect(b)
            eng.drop(b)
    _warm.append(True)


states = st.sampled_from(TARGETS)
step = st.tuples(st.sampled_from(sorted(BLOCKS)), states)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(initial=st.lists(states, min_size=4, max_size=4),
       batches=st.lists(st.lists(step, min_size=1, max_size=4), min_size=1, max_size=5))
def test_random_transitions_keep_content_and_accounting(initial, batches):
    warm_up()
    gc.collect()
    others = list(jax.live_arrays())
    other_ids = {id(a) for a in others}
    with tempfile.TemporaryDirectory() as store, \
            MovementEngine(Source(), store, workers=2, int4_group_size=GROUP, lowrank_rank=RANK) as eng:
        for b, s in zip(sorted(BLOCKS), initial):
            eng.register(b, s)
        for batch in batches:
            targets = dict(reversed(batch))  # one target per block per batch (first listed wins)
            handles = {b: eng.request(b, s) for b, s in targets.items()}
            for b, t in handles.items():
                assert t.result() == targets[b] and eng.state(b) == targets[b]
            check_accounting(eng, other_ids)
            for b in BLOCKS:
                check_content(b, eng.state(b), eng.inspect(b))
        for b in list(BLOCKS):
            eng.drop(b)
        check_accounting(eng, other_ids)
