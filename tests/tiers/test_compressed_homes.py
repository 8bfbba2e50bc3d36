"""Compressed homes in the movement engine: a load into a staged lossy state moves the compressed arrays over
host->device (the bytes the event counts are theirs), lands bit-identical to converting on device, and leaves the
lossless home and the compressed copy in place."""

import numpy as np
import pytest

from vorch_jax.tiers import nvme_store
from vorch_jax.tiers.engine import MovementEngine
from vorch_jax.tiers.state import LINKS, OffDeviceError, State, route

from tests.tiers.test_engine import ToySource

S0, S1, S2, S3, S4, S5, S6 = State


@pytest.fixture
def engine(tmp_path):
    eng = MovementEngine(ToySource(n_blocks=2, k=128, n=64), tmp_path, keep_home=True, int4_group_size=32,
                         lowrank_rank=8)
    yield eng
    eng.close()


def test_route_from_a_compressed_home_is_one_host_to_device_hop():
    for src in (S3, S4, S1, S2, S6):
        for dst in (S1, S2, S6):
            if src == dst:
                continue
            assert route(src, dst, packed={dst}) == route(S3, dst, packed={dst})
            assert [h.link for h in route(src, dst, packed={dst})] == ["host->device"]
    assert route(S0, S1, packed={S1}) == route(S0, S1)  # on device already: convert there, no link
    assert route(S3, S0, packed={S1, S2}) == route(S3, S0)  # S0 only from the lossless home
    assert route(None, S1, packed={S1}) == route(None, S1)  # registration reads the source
    on_disk = route(S3, S2, packed={S2: "disk", S1: "host"})
    assert [(h.link, h.lands_in, h.packed) for h in on_disk] == [("nvme->host", S3, True), ("host->device", S2, True)]
    assert route(S3, S1, packed={S2: "disk", S1: "host"}) == route(S3, S1, packed={S1})
    assert all(not h.packed for h in route(S3, S2)) and all(h.link in LINKS for h in on_disk)


@pytest.mark.parametrize("state", [S1, S2, S6])
def test_load_moves_the_compressed_bytes_and_lands_as_converted_on_device(engine, state):
    engine.register("b0", S3)
    engine.register("b1", S3)
    staged = engine.stage_compressed("b0", state)
    assert engine.compressed_homes("b0") == frozenset({state})
    assert engine.bytes_in("host") == 2 * engine.representation("b1").nbytes + staged
    engine.request("b0", state, "miss").result()
    engine.request("b1", state, "miss").result()  # no compressed home: full precision, converted on device
    moved = engine.events.for_block("b0")[-1]
    assert dict(moved.link_bytes) == {"host->device": engine.representation("b0").nbytes}
    assert moved.link_bytes["host->device"] == staged < engine.events.for_block("b1")[-1].link_bytes["host->device"]
    landed = engine.inspect("b0")
    # back home: nothing moves; the compressed copy and the lossless home stay
    engine.request("b0", S3, "evict").result()
    assert dict(engine.events.for_block("b0")[-1].link_bytes) == {}
    assert engine.state("b0") == S3 and engine.bytes_in("device") == engine.representation("b1").nbytes
    assert engine.compressed_homes("b0") == frozenset({state})
    engine.request("b0", S0, "miss").result()  # full precision comes from the lossless home
    assert dict(engine.events.for_block("b0")[-1].link_bytes) == {"host->device": 128 * 64 * 4 + 128 * 4}
    np.testing.assert_array_equal(engine.inspect("b0")["w"], ToySource(n_blocks=2, k=128, n=64).blocks["b0"]["w"])
    engine.request("b0", state, "plan").result()  # from S0: converted on device, no link
    assert set(engine.events.for_block("b0")[-1].link_bytes) == {"device:convert"}
    converted = engine.inspect("b0")
    assert landed.keys() == converted.keys()
    for k in landed:  # the compressed home is the same conversion, bit for bit
        np.testing.assert_array_equal(landed[k], converted[k])


def test_from_nvme_home_and_between_lossy_states(engine):
    engine.register("b0", S4)
    engine.stage_compressed("b0", S2)
    engine.request("b0", S1, "miss").result()  # not staged: nvme->host, host->device, convert
    assert set(engine.events.for_block("b0")[-1].link_bytes) == {"nvme->host", "host->device", "device:convert"}
    engine.request("b0", S2, "plan").result()  # S1 -> S2 from the compressed copy, the home stays
    assert dict(engine.events.for_block("b0")[-1].link_bytes) == {"host->device": engine.representation("b0").nbytes}
    engine.request("b0", S4, "evict").result()
    assert engine.state("b0") == S4 and engine.bytes_in("device") == 0


def test_staging_is_counted_and_freed(engine):
    engine.register("b0", S3)
    n = engine.stage_compressed("b0", S1)
    ev = engine.events.for_block("b0")[-1]
    assert ev.kind == "staged" and ev.dst == S1 and ev.src is None and set(ev.link_bytes) == {"source->host"}
    assert engine.stage_compressed("b0", S1) == n and len(engine.events.for_block("b0")) == 2  # once
    assert sum(int(a.nbytes) for a in engine.live_arrays()) == engine.bytes_in("host")
    engine.drop("b0")
    assert engine.bytes_in("host") == 0 and engine.live_arrays() == []


def test_a_compressed_home_cannot_be_computed_on_and_needs_a_kept_home(tmp_path):
    with MovementEngine(ToySource(n_blocks=1), tmp_path, keep_home=False) as eng:
        eng.register("b0", S3)
        with pytest.raises(ValueError, match="keep_home"):
            eng.stage_compressed("b0", S1)
    with MovementEngine(ToySource(n_blocks=1), tmp_path, keep_home=True) as eng:
        eng.register("b0", S3)
        eng.stage_compressed("b0", S1)
        with pytest.raises(OffDeviceError):
            eng.get("b0")


@pytest.mark.parametrize("state", [S1, S2, S6])
def test_a_compressed_home_on_nvme_is_read_then_moved_compressed(engine, state):
    engine.register("b0", S4)
    engine.register("b1", S3)
    staged = engine.stage_compressed("b0", state, where="disk")
    engine.stage_compressed("b1", state)
    ev = engine.events.for_block("b0")[-1]
    assert ev.kind == "staged" and dict(ev.link_bytes)["host->nvme"] == staged
    assert engine.bytes_in("host") == engine.representation("b1").nbytes + engine.stage_compressed("b1", state)
    assert engine.bytes_in("disk") == engine.representation("b0").nbytes + staged
    engine.request("b0", state, "miss").result()
    moved = dict(engine.events.for_block("b0")[-1].link_bytes)
    landed = engine.representation("b0").nbytes
    assert moved == {"nvme->host": staged, "host->device": landed}  # compressed on both links
    assert staged == landed  # the same arrays, uncompressed chunks of exactly their bytes
    engine.request("b1", state, "miss").result()
    a = engine.inspect("b0")
    engine.request("b0", S4, "evict").result()
    engine.request("b0", S0, "miss").result()
    engine.request("b0", state, "plan").result()  # converted on device from S0: the same arrays
    b = engine.inspect("b0")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert engine.live_arrays() and sum(int(x.nbytes) for x in engine.live_arrays()) == (
        engine.bytes_in("host") + engine.bytes_in("device"))
    engine.drop("b0")
    assert not list(engine.store_dir.glob("b0*"))


def test_a_corrupt_compressed_home_on_nvme_is_made_again_from_the_source(engine):
    engine.register("b0", S4)
    engine.stage_compressed("b0", S1, where="disk")
    engine.request("b0", S1, "miss").result()
    want = engine.inspect("b0")
    engine.request("b0", S4, "evict").result()
    (chunk,) = nvme_store._chunk_files(engine.store_dir / "b0@S1" / "000")  # the first flat leaf's chunk
    raw = bytearray(chunk.read_bytes())
    raw[100] ^= 0x01
    chunk.write_bytes(bytes(raw))  # one bit flipped: the checksum catches it
    engine.request("b0", S1, "miss").result()
    assert [e.kind for e in engine.events.for_block("b0")][-2:] == ["recovered", "transition"]
    got = engine.inspect("b0")
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    engine.request("b0", S4, "evict").result()
    engine.request("b0", S1, "miss").result()  # the rewritten copy reads clean
    assert engine.events.for_block("b0")[-1].kind == "transition"
