"""Dropped blocks' device memory held for the next loads (`tiers/device_pool.py`): the copy into held memory, the
pool's room, and the engine landing loads in it with the accounting intact."""

import threading

import jax
import numpy as np
import pytest

from tests.tiers.test_engine import ToySource, assert_accounting, assert_bitwise
from vorch_jax.tiers.device_pool import DevicePool
from vorch_jax.tiers.engine import MovementEngine
from vorch_jax.tiers.full_precision import (
    copy_into, copy_into_reference, device_sharding, land, pinned_host_sharding,
)
from vorch_jax.tiers.state import State

S0, S3 = State.S0, State.S3


def device_array(shape, dtype=np.float32, fill=0.0):
    dev = device_sharding(jax.devices()[0])
    return jax.jit(lambda: jax.numpy.full(shape, fill, dtype), out_shardings=dev)()


@pytest.mark.parametrize("shape", [(7,), (33, 5), (2, 3, 4)])
def test_copy_into_lands_the_source_bitwise_in_the_held_memory(shape):
    dev = jax.devices()[0]
    src_np = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    src = jax.device_put(src_np, pinned_host_sharding(dev))
    held = device_array(shape)
    address = held.unsafe_buffer_pointer()
    out = copy_into(held, src, dev)
    ref = copy_into_reference(device_array(shape), src, dev)
    assert out.sharding.memory_kind == "device" and held.is_deleted()
    assert np.asarray(out).tobytes() == np.asarray(ref).tobytes() == src_np.tobytes()
    if jax.default_backend() == "cpu":  # XLA reuses the donated buffer (an accelerator may pick another of its pool)
        assert out.unsafe_buffer_pointer() == address


def test_pool_keeps_what_the_room_allows_and_frees_the_oldest_when_it_shrinks():
    room = {"bytes": 3 * 4 * 10}
    pool = DevicePool(lambda: room["bytes"])
    a, b, c, d = (device_array((10,)) for _ in range(4))
    pool.give({"x": a, "y": b})
    pool.give({"z": c, "w": d})  # c fits, d does not: deleted at once
    assert pool.nbytes == 120 and d.is_deleted() and not c.is_deleted()
    room["bytes"] = 80
    pool.trim()  # the oldest goes first
    assert a.is_deleted() and pool.nbytes == 80 and [x is y for x, y in zip(pool.arrays(), (b, c))] == [True, True]
    other = device_array((3, 4))
    taken = pool.claim({"w": device_array((10,)), "v": other, "u": device_array((10,), np.int32)})
    assert list(taken) == ["w"] and taken["w"] is c and pool.nbytes == 40  # by shape and dtype; newest first
    assert (pool.reused, pool.fresh) == (1, 2)
    room["bytes"] = 0
    taken = pool.claim({"w": device_array((10,))})  # a claim takes its match, then trims to the room left
    assert taken["w"] is b and pool.nbytes == 0
    pool.give({"q": device_array((10,))})
    assert pool.nbytes == 0 and pool.arrays() == []


def test_engine_lands_loads_in_dropped_memory_bitwise_and_counts_it(tmp_path):
    src = ToySource(n_blocks=3)
    others = jax.live_arrays()  # arrays of earlier tests in this process
    room = {"bytes": 10**9}
    with MovementEngine(src, tmp_path, keep_home=True) as eng:
        pool = eng.hold_dropped_memory(lambda: room["bytes"])
        for b in src.block_ids:
            eng.register(b, S3)
        block_bytes = sum(v.nbytes for v in src.blocks["b0"].values())
        eng.request("b0", S0).result()
        eng.request("b0", S3).result()  # dropped: its arrays held
        assert pool.nbytes == block_bytes and eng.bytes_in("device") == block_bytes
        assert_accounting(eng, others)
        addresses = {a.unsafe_buffer_pointer() for a in pool.arrays()}
        eng.request("b1", S0).result()  # same shapes: lands in b0's memory
        assert pool.nbytes == 0 and (pool.reused, pool.fresh) == (2, 2)
        assert_bitwise(eng.get("b1"), src.blocks["b1"])
        if jax.default_backend() == "cpu":
            assert {a.unsafe_buffer_pointer() for a in eng.get("b1").values()} == addresses
        assert_accounting(eng, others)
        room["bytes"] = 0  # a budget with no room left: a dropped block's memory is freed
        eng.request("b1", S3).result()
        assert pool.nbytes == 0 and eng.bytes_in("device") == 0
        assert_accounting(eng, others)
    assert pool.arrays() == []


def test_a_cancelled_load_frees_the_memory_it_claimed(tmp_path):
    src = ToySource(n_blocks=2)
    others = jax.live_arrays()
    gate = threading.Event()
    with MovementEngine(src, tmp_path, keep_home=True, workers=1) as eng:
        pool = eng.hold_dropped_memory(lambda: 10**9)
        eng.register("b0", S3)
        eng.request("b0", S0).result()
        eng.request("b0", S3).result()
        held = pool.arrays()
        busy = eng._pool.submit(gate.wait, 10)  # the one worker is busy: the next load stays queued
        t = eng.request("b0", S0)
        assert pool.nbytes == 0 and t.cancel()
        gate.set()
        busy.result()
        assert all(a.is_deleted() for a in held) and eng.state("b0") == S3
        assert_accounting(eng, others)


def test_a_load_landing_in_fresh_memory_first_trims_the_pool_to_the_room(tmp_path):
    """A load from NVMe claims nothing, but the room it takes must still be free of held arrays (a run with NVMe
    homes peaked above its budget before requests trimmed the pool)."""
    src = ToySource(n_blocks=2)
    block_bytes = sum(v.nbytes for v in src.blocks["b0"].values())
    room = {"bytes": block_bytes}
    with MovementEngine(src, tmp_path, keep_home=True) as eng:
        pool = eng.hold_dropped_memory(lambda: room["bytes"])
        eng.register("b0", S3)
        eng.register("b1", State.S4)
        eng.request("b0", S0).result()
        eng.request("b0", S3).result()
        assert pool.nbytes == block_bytes
        room["bytes"] = 0  # what the ledger's room reads once it admitted b1's load
        eng.request("b1", S0).result()
        assert pool.nbytes == 0 and eng.bytes_in("device") == block_bytes


@pytest.mark.parametrize("shape", [(5,), (33, 7)])
def test_land_copies_into_new_memory_bitwise(shape):
    dev = jax.devices()[0]
    src_np = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    src = jax.device_put(src_np, pinned_host_sharding(dev))
    out = land(src, dev)
    assert out.sharding.memory_kind == "device" and out.unsafe_buffer_pointer() != src.unsafe_buffer_pointer()
    out.delete()  # the host copy is not freed with it
    assert np.asarray(src).tobytes() == src_np.tobytes()
    assert np.asarray(land(src, dev)).tobytes() == src_np.tobytes()
