"""State enum, the route table, and each representation on its own (small synthetic arrays, CPU)."""

import errno
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vorch_jax.tiers import nvme_store
from vorch_jax.tiers.full_precision import FullPrecisionBlock, device_sharding
from vorch_jax.tiers.low_bit import LowBitBlock
from vorch_jax.tiers.low_rank import LowRankBlock, LowRankWeight, factorize
from vorch_jax.tiers.nvme_store import CorruptBlockError, NvmeBlock
from vorch_jax.tiers.pinned_host import PinnedHostBlock
from vorch_jax.tiers.state import (
    LINKS, LOSSLESS, LOSSY, ON_DEVICE, ROUTES, TARGETS, OffDeviceError, State, UnknownStateError, route,
)

DEV = jax.devices()[0]
# where each link starts and ends
LINK_ENDS = {
    "source->host": ("source", "host"), "nvme->host": ("disk", "host"), "host->device": ("host", "device"),
    "device->host": ("device", "host"), "host->nvme": ("host", "disk"), "device:convert": ("device", "device"),
}


def _toy(seed=0, k=64, n=48):
    rng = np.random.default_rng(seed)
    return {"norm": rng.standard_normal(k).astype(np.float32), "w": rng.standard_normal((k, n)).astype(np.float32)}


def _s0(leaves):
    return FullPrecisionBlock.from_pinned_host(PinnedHostBlock.from_numpy(leaves, DEV), DEV)


# ------------------------------------------------------------------ State and routes
def test_parse_and_properties():
    assert State.parse("S3") is State.S3 and State.parse("s4") is State.S4 and State.parse(6) is State.S6
    assert State.parse(State.S1) is State.S1
    for bad in ("S7", "S", "fast", 9, -1, None, 1.0):
        with pytest.raises(UnknownStateError, match="unknown state"):
            State.parse(bad)
    assert ON_DEVICE == {State.S0, State.S1, State.S2, State.S6}
    assert LOSSLESS == {State.S0, State.S3, State.S4} and LOSSY == {State.S1, State.S2, State.S6}
    assert [s.where for s in State] == ["device"] * 3 + ["host", "disk", "in_flight", "device"]


def test_route_table_is_complete_and_physically_consistent():
    for src in (None, *TARGETS):
        for dst in TARGETS:
            if src == dst:
                assert route(src, dst) == ()
                continue
            hops = ROUTES[(src, dst)]
            assert hops and hops[-1].lands_in == dst, (src, dst)
            from_source = src is None or src in LOSSY  # lossy states re-read the source (exclusive states)
            here, state = ("source" if from_source else src.where), src
            for hop in hops:
                assert hop.link in LINKS
                start, end = LINK_ENDS[hop.link]
                assert start == here, f"{src}->{dst}: {hop} starts from {here}"
                assert hop.lands_in.where == end
                if hop.link == "device:convert":  # conversions always start from full precision
                    assert state == State.S0 and hop.lands_in in LOSSY
                here, state = end, hop.lands_in
            if src in LOSSY or src is None:  # lossy -> anything goes through the lossless source
                assert hops[0].link == "source->host"
            else:
                assert all(h.link != "source->host" for h in hops)
    with pytest.raises(UnknownStateError, match="S5"):
        route(State.S0, State.S5)


# ------------------------------------------------------------------ S0 / S3
def test_device_and_pinned_host_really_move_and_free():
    leaves = _toy()
    s3 = PinnedHostBlock.from_numpy(leaves, DEV)
    assert all(a.sharding.memory_kind == "pinned_host" for a in s3.arrays())
    s0 = FullPrecisionBlock.from_pinned_host(s3, DEV)
    assert all(a.sharding.memory_kind == "device" for a in s0.arrays())
    s3.free()
    assert all(a.is_deleted() for a in s3.arrays())
    with pytest.raises(OffDeviceError):
        s3.materialize()
    back = PinnedHostBlock.from_device(s0, DEV)
    old = s0.arrays()
    s0.free()
    assert all(a.is_deleted() for a in old)
    np.testing.assert_array_equal(back.to_numpy()["w"], leaves["w"])
    assert back.nbytes == sum(a.nbytes for a in leaves.values())
    # a jitted op cannot mix pinned host and device operands: S3 is not usable by compute
    with pytest.raises(ValueError, match="memory_space"):
        jax.jit(jnp.add)(back.leaves["w"], jax.device_put(leaves["w"], device_sharding(DEV)))


# ------------------------------------------------------------------ S4
def test_store_layout_one_raw_chunk_per_leaf(tmp_path):
    leaves = _toy()
    blk = NvmeBlock.write("layers.0.attn", leaves, tmp_path)
    for leaf, a in leaves.items():
        meta = json.loads((tmp_path / "layers.0.attn" / leaf / "zarr.json").read_text())
        assert meta["codecs"] == [{"name": "bytes", "configuration": {"endian": "little"}}]  # no sharding, no compression
        assert meta["chunk_grid"]["configuration"]["chunk_shape"] == list(a.shape)
        (chunk,) = nvme_store._chunk_files(tmp_path / "layers.0.attn" / leaf)
        assert chunk.read_bytes() == a.tobytes()  # the raw bytes, little-endian
    assert blk.nbytes == sum(a.nbytes for a in leaves.values())
    sums = json.loads((tmp_path / "layers.0.attn" / nvme_store.CHECKSUM_FILE).read_text())
    assert set(sums) == set(leaves)
    got = blk.read_async().result()
    for k in leaves:
        np.testing.assert_array_equal(got[k], leaves[k])
    with pytest.raises(OffDeviceError):
        blk.materialize()


def test_store_detects_a_flipped_byte(tmp_path):
    blk = NvmeBlock.write("b", _toy(), tmp_path)
    (chunk,) = nvme_store._chunk_files(tmp_path / "b" / "w")
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    chunk.write_bytes(bytes(raw))
    with pytest.raises(CorruptBlockError, match="block 'b' leaf 'w'") as info:
        blk.read()
    assert (info.value.block_id, info.value.leaf) == ("b", "w")


def test_store_detects_a_truncated_or_missing_chunk(tmp_path):
    blk = NvmeBlock.write("b", _toy(), tmp_path)
    (chunk,) = nvme_store._chunk_files(tmp_path / "b" / "w")
    chunk.write_bytes(chunk.read_bytes()[:-4])
    with pytest.raises(CorruptBlockError, match="leaf 'w'"):
        blk.read()
    chunk.unlink()
    with pytest.raises(CorruptBlockError, match="leaf 'w'"):
        blk.read()


def test_store_write_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    real = nvme_store._write_leaf
    calls = []

    def full_disk(path, a):
        calls.append(path)
        if len(calls) == 2:  # the first leaf was written, the second hits ENOSPC
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, a)

    monkeypatch.setattr(nvme_store, "_write_leaf", full_disk)
    with pytest.raises(OSError) as info:
        NvmeBlock.write("b", _toy(), tmp_path)
    assert info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []  # no block dir, no temp dir


# ------------------------------------------------------------------ S1 / S2 / S6
@pytest.mark.parametrize("bits,group", [(8, None), (4, 32), (4, 64), (4, 128)])
def test_low_bit_block(bits, group):
    leaves = _toy(k=128)
    s0 = _s0(leaves)
    blk = LowBitBlock.from_full_precision(s0, bits=bits, group_size=group or 64)
    assert blk.state == (State.S1 if bits == 8 else State.S2)
    s0.free()  # the low-bit block shares nothing with the S0 block
    deq = blk.dequantize()
    np.testing.assert_array_equal(np.asarray(deq["norm"]), leaves["norm"])  # 1-D leaves stay float32
    err = np.linalg.norm(np.asarray(deq["w"]) - leaves["w"]) / np.linalg.norm(leaves["w"])
    assert err < (0.01 if bits == 8 else 0.15)
    assert blk.nbytes == sum(int(a.nbytes) for a in jax.tree.leaves(blk.leaves))
    assert blk.nbytes < s0.nbytes / (3 if bits == 8 else 4.5)
    assert all(a.sharding.memory_kind == "device" for a in blk.arrays())


def test_low_rank_weight_contract():
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((40, 8)) @ rng.standard_normal((8, 56))).astype(np.float32)  # exactly rank 8
    lr = factorize(jnp.asarray(w), rank=8)
    assert isinstance(lr, LowRankWeight) and lr.a_KxR.shape == (40, 8) and lr.b_RxN.shape == (8, 56)
    np.testing.assert_allclose(np.asarray(lr.dequantize()), w, rtol=0, atol=1e-4 * np.abs(w).max())
    x = rng.standard_normal((3, 40)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(lr.matmul(jnp.asarray(x))), x @ w, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np.asarray(jax.jit(lambda l, x: l.matmul(x))(lr, x)), x @ w, rtol=1e-4, atol=1e-3)
    ids = np.array([0, 5, 55])
    np.testing.assert_allclose(np.asarray(lr.take_columns(ids)), w[:, ids].T, atol=1e-4 * np.abs(w).max())
    assert lr.nbytes == (40 * 8 + 8 * 56) * 4
    tall = factorize(jnp.asarray(w.T), rank=100)  # K > N branch, rank clamped to min(K, N)
    assert tall.rank == 40
    np.testing.assert_allclose(np.asarray(tall.dequantize()), w.T, atol=1e-4 * np.abs(w).max())


def test_low_rank_matches_eckart_young():
    w = np.random.default_rng(2).standard_normal((64, 96)).astype(np.float32)
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    for rank in (4, 16):
        blk = LowRankBlock.from_full_precision(_s0({"w": w}), rank=rank)
        err = np.linalg.norm(np.asarray(blk.dequantize()["w"]) - w)
        assert err == pytest.approx(np.sqrt((s[rank:] ** 2).sum()), rel=1e-4)
