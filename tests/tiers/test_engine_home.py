"""keep_home: a block brought onto the device keeps its lossless S3/S4 copy; going home is a free drop."""

import numpy as np
import pytest

from vorch_jax.tiers.engine import MovementEngine
from vorch_jax.tiers.state import State

S0, S1, S2, S3, S4, S5, S6 = State


class Toy:
    def __init__(self):
        rng = np.random.default_rng(1)
        self.blocks = {f"b{i}": {"norm": rng.standard_normal(64).astype(np.float32),
                                 "w": rng.standard_normal((64, 32)).astype(np.float32)} for i in range(3)}

    def __call__(self, b):
        return {k: v.copy() for k, v in self.blocks[b].items()}


@pytest.fixture
def engine(tmp_path):
    with MovementEngine(Toy(), tmp_path / "store", keep_home=True) as e:
        yield e


def _bytes(src, b):
    return sum(a.nbytes for a in src.blocks[b].values())


@pytest.mark.parametrize("home", [S3, S4])
def test_home_kept_on_device_and_dropped_for_free(engine, home):
    src = engine.source
    engine.register("b0", home)
    engine.request("b0", S0).result()
    n = _bytes(src, "b0")
    assert engine.state("b0") == S0 and engine.bytes_in("device") == n
    assert engine.bytes_in("host" if home == S3 else "disk") >= n  # the home copy is still there
    before = len(engine.events)
    engine.request("b0", home).result()
    drop = engine.events[before]
    assert drop.kind == "transition" and drop.src == S0 and drop.dst == home and drop.total_bytes == 0
    assert engine.bytes_in("device") == 0
    got = engine.inspect("b0")
    for k, v in src.blocks["b0"].items():
        np.testing.assert_array_equal(got[k], v)  # bitwise: the home copy is the original bytes


def test_lossy_copy_routes_from_home_not_source(engine):
    engine.register("b1", S3)
    engine.request("b1", S2).result()
    assert engine.state("b1") == S2 and engine.bytes_in("host") == _bytes(engine.source, "b1")
    n = len(engine.events)
    engine.request("b1", S0).result()
    ev = engine.events[n]
    assert "source->host" not in ev.link_bytes and ev.link_bytes.get("host->device") == _bytes(engine.source, "b1")
    got = engine.inspect("b1")
    for k, v in engine.source.blocks["b1"].items():
        np.testing.assert_array_equal(got[k], v)


def test_leaving_for_another_off_device_state_frees_the_old_home(engine, tmp_path):
    engine.register("b2", S3)
    engine.request("b2", S0).result()
    engine.request("b2", S4).result()
    assert engine.state("b2") == S4 and engine.bytes_in("host") == 0 and engine.bytes_in("device") == 0
    assert engine.bytes_in("disk") > 0
    assert sum(a.nbytes for a in engine.live_arrays()) == 0


def test_host_leaves_are_the_kept_home_and_an_op_in_place_is_an_event(engine):
    from vorch_jax.tiers.state import OffDeviceError

    src = engine.source
    engine.register("b0", S3)
    engine.register("b1", S4)
    for on_device in (False, True):
        leaves = engine.host_leaves("b0")
        assert {a.sharding.memory_kind for a in leaves.values()} == {"pinned_host"}
        for k, v in src.blocks["b0"].items():
            np.testing.assert_array_equal(np.asarray(leaves[k]), v)
        engine.request("b0", S0).result()
    with pytest.raises(OffDeviceError, match="home on NVMe"):
        engine.host_leaves("b1")
    engine.record_in_place("b0", 1.0, 1.5, {"device->host": 8, "host->device": 8})
    e = engine.events[-1]
    assert e.kind == "in_place" and e.duration == 0.5 and e.total_bytes == 16 and e.src == e.dst == S3
