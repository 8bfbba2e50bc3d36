"""The movement engine on SmolLM2's real blocks (round trips, accounting, recovery) and on a toy source
(faults, cancellation, asynchrony)."""

import errno
import gc
import shutil
import threading

import jax
import numpy as np
import pytest

from vorch_jax.models.gguf_source import load_smollm2_source
from vorch_jax.tiers import nvme_store
from vorch_jax.tiers.engine import MovementEngine
from vorch_jax.tiers.nvme_store import CHECKSUM_FILE, CorruptBlockError
from vorch_jax.tiers.state import (
    BlockInFlightError, OffDeviceError, State, UnknownBlockError, UnknownStateError,
)

S0, S1, S2, S3, S4, S5, S6 = State


@pytest.fixture(scope="module")
def smol():
    return load_smollm2_source()


class ToySource:
    """A few small random blocks; `hook(block_id)` runs before every read (gates, barriers, faults)."""

    def __init__(self, n_blocks=4, k=64, n=32, seed=0):
        rng = np.random.default_rng(seed)
        self.blocks = {
            f"b{i}": {"norm": rng.standard_normal(k).astype(np.float32),
                      "w": rng.standard_normal((k, n)).astype(np.float32)}
            for i in range(n_blocks)
        }
        self.hook = None

    @property
    def block_ids(self):
        return list(self.blocks)

    def __call__(self, block_id):
        if self.hook is not None:
            self.hook(block_id)
        return {k: v.copy() for k, v in self.blocks[block_id].items()}


def buffers(arrays) -> dict[int, int]:
    """{device buffer address: bytes} of distinct buffers (aliases of one buffer count once)."""
    return {a.unsafe_buffer_pointer(): int(a.nbytes) for a in arrays}


def assert_accounting(engine, others):
    """engine.bytes_in equals the live arrays (identified by identity) and the chunk files; nothing stale."""
    gc.collect()
    other_ids = {id(a) for a in others}
    owned = engine.live_arrays()
    assert not any(a.is_deleted() for a in owned)
    live = [a for a in jax.live_arrays() if id(a) not in other_ids]
    for kind, where in (("device", "device"), ("pinned_host", "host")):
        # compare BUFFERS, not Python wrappers: on GPU (jax 0.11) np.asarray(x) leaves a second ArrayImpl
        # aliasing x's buffer alive until x is deleted (no extra bytes: checked with memory_stats).
        live_k = buffers([a for a in live if a.sharding.memory_kind == kind])
        owned_k = buffers([a for a in owned if a.sharding.memory_kind == kind])
        assert live_k == owned_k, f"{kind} buffers alive that no block owns: {set(live_k) - set(owned_k)}"
        assert engine.bytes_in(where) == sum(live_k.values()) == sum(a.nbytes for a in owned if a.sharding.memory_kind == kind)
    files = [p for p in engine.store_dir.rglob("*") if p.is_file()]
    assert not [p for p in engine.store_dir.iterdir() if p.name.startswith(".")], "temp dirs left in the store"
    chunks = [p for p in files if p.name not in ("zarr.json", CHECKSUM_FILE)]
    assert engine.bytes_in("disk") == sum(p.stat().st_size for p in chunks)


def assert_bitwise(got: dict, ref: dict):
    assert set(got) == set(ref)
    for k in ref:
        g = np.asarray(got[k])
        assert g.dtype == ref[k].dtype and g.shape == ref[k].shape
        assert g.tobytes() == ref[k].tobytes(), k


# ------------------------------------------------------------------ SmolLM2: lossless round trips, every block
@pytest.mark.slow
def test_lossless_round_trips_every_smollm2_block(smol, tmp_path):
    """S0->S3->S0, S0->S4->S0, S0->S4->S3->S0 bitwise, for all 62 blocks, one block alive at a time."""
    assert len(smol.block_ids) == 62
    with MovementEngine(smol, tmp_path) as eng:
        for b in smol.block_ids:
            ref = smol(b)
            eng.register(b, S0)
            for path in ((S3, S0), (S4, S0), (S4, S3, S0)):
                for s in path:
                    eng.request(b, s).result()
                    assert eng.state(b) == s
                assert_bitwise(eng.get(b), ref)
            eng.drop(b)
        assert eng.bytes_in("device") == eng.bytes_in("host") == eng.bytes_in("disk") == 0


def test_transition_events_measure_bytes_from_arrays(smol, tmp_path):
    b = "layers.0.mlp"
    ref = smol(b)
    raw = sum(a.nbytes for a in ref.values())
    with MovementEngine(smol, tmp_path) as eng:
        eng.register(b, S4)
        eng.request(b, S0).result()
        eng.request(b, S2).result()
        ev = [e for e in eng.events if e.kind == "transition"]
        assert ev[0].src is None and ev[0].dst == S4
        assert 0 < ev[0].link_bytes["source->host"] < raw  # Q4_1 file bytes, fewer than float32
        assert ev[0].link_bytes["host->nvme"] == raw
        assert dict(ev[1].link_bytes) == {"nvme->host": raw, "host->device": raw}
        assert dict(ev[2].link_bytes) == {"device:convert": raw}
        assert all(e.end >= e.start for e in ev)


def test_accounting_matches_live_arrays_and_files(smol, tmp_path):
    others = list(jax.live_arrays())
    blocks = ["layers.0.attn", "layers.0.mlp", "layers.1.attn", "final_norm"]
    with MovementEngine(smol, tmp_path, lowrank_rank=16) as eng:
        for b, s in zip(blocks, (S0, S3, S4, S1)):
            eng.register(b, s)
        assert_accounting(eng, others)
        rounds = [
            [("layers.0.attn", S3), ("layers.0.mlp", S4), ("layers.1.attn", S2), ("final_norm", S0)],
            [("layers.0.attn", S6), ("layers.0.mlp", S0), ("layers.1.attn", S4), ("final_norm", S3)],
        ]
        for plan in rounds:
            handles = [eng.request(b, s) for b, s in plan]  # all four in flight together
            for (b, s), t in zip(plan, handles):  # the same target again: the pending handle, or once landed a
                again = eng.request(b, s)  # finished transition to it (a small block may land at once)
                assert again is t or (t.done() and again.done() and again.dst == s)
            for b, s in plan:
                eng.wait(b) if s.on_device else eng.request(b, s).result()
            assert_accounting(eng, others)
        assert eng.bytes_in("device") > 0 and eng.bytes_in("host") > 0 and eng.bytes_in("disk") > 0
        for b in blocks:
            eng.drop(b)
        assert_accounting(eng, others)
        assert eng.bytes_in("device") == eng.bytes_in("host") == eng.bytes_in("disk") == 0


# ------------------------------------------------------------------ faults
def test_corrupt_chunk_is_recovered_from_the_source(smol, tmp_path):
    b = "layers.2.attn"
    ref = smol(b)
    with MovementEngine(smol, tmp_path) as eng:
        eng.register(b, S4)
        (chunk,) = nvme_store._chunk_files(tmp_path / b / "wq")
        raw = bytearray(chunk.read_bytes())
        raw[1234] ^= 0x01
        chunk.write_bytes(bytes(raw))
        with pytest.raises(CorruptBlockError, match=f"block '{b}' leaf 'wq'"):
            eng.inspect(b)  # the store never serves the wrong bytes
        assert eng.request(b, S0).result() == S0
        assert_bitwise(eng.get(b), ref)
        (rec,) = eng.events.of_kind("recovered")
        assert rec.block == b and "leaf 'wq'" in rec.detail and rec.link_bytes["source->host"] > 0
        assert rec.link_bytes["host->nvme"] == sum(a.nbytes for a in ref.values())


def test_recovery_rewrites_the_store_when_the_rest_of_the_route_fails(tmp_path, monkeypatch):
    src = ToySource()
    with MovementEngine(src, tmp_path) as eng:
        eng.register("b0", S4)
        (chunk,) = nvme_store._chunk_files(tmp_path / "b0" / "w")
        chunk.write_bytes(b"\0" * chunk.stat().st_size)
        from vorch_jax.tiers import engine as engine_mod

        def broken_h2d(*a, **k):
            raise RuntimeError("host->device failed")

        monkeypatch.setattr(engine_mod.FullPrecisionBlock, "from_pinned_host", broken_h2d)
        with pytest.raises(RuntimeError, match="host->device failed"):
            eng.request("b0", S0).result()
        assert eng.state("b0") == S4
        assert_bitwise(eng.inspect("b0"), src.blocks["b0"])  # the prior state is intact and correct again


@pytest.mark.parametrize("how", ["enospc", "not_a_directory"])
def test_failed_write_to_nvme_leaves_the_prior_state(tmp_path, monkeypatch, how):
    src = ToySource()
    store = tmp_path / "store"
    with MovementEngine(src, store) as eng:
        eng.register("b1", S0)  # warm-up of the same path, before the baseline of foreign arrays
        eng.request("b1", S4).result()
        eng.request("b1", S0).result()
        eng.drop("b1")
        gc.collect()
        others = list(jax.live_arrays())
        eng.register("b0", S0)
        before = eng.get("b0")
        if how == "enospc":
            real = nvme_store._write_leaf
            n = []

            def full(path, a):
                n.append(1)
                if len(n) == 2:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real(path, a)

            monkeypatch.setattr(nvme_store, "_write_leaf", full)
        else:  # a real I/O error: the store directory became a file
            shutil.rmtree(store)
            store.write_text("not a directory")
        t = eng.request("b0", S4)
        with pytest.raises(OSError):
            t.result()
        assert eng.state("b0") == S0
        after = eng.get("b0")
        assert all(after[k] is before[k] and not after[k].is_deleted() for k in before)
        assert_bitwise(after, src.blocks["b0"])
        (err,) = eng.events.of_kind("error")
        assert err.block == "b0" and err.dst == S4
        if how == "enospc":
            assert list(store.iterdir()) == []
            assert_accounting(eng, others)


def test_unknown_block_and_state_are_clear_errors(tmp_path):
    with MovementEngine(ToySource(), tmp_path) as eng:
        eng.register("b0", "S0")
        with pytest.raises(UnknownBlockError, match="unknown block 'nope'"):
            eng.request("nope", S0)
        with pytest.raises(UnknownBlockError, match="unknown block 'nope'"):
            eng.state("nope")
        with pytest.raises(UnknownStateError, match="unknown state 'S9'"):
            eng.request("b0", "S9")
        with pytest.raises(UnknownStateError, match="S5"):
            eng.request("b0", S5)
        with pytest.raises(ValueError, match="already registered"):
            eng.register("b0", S3)
        with pytest.raises(ValueError, match="unknown place"):
            eng.bytes_in("gpu")
        eng.request("b0", S3).result()
        with pytest.raises(OffDeviceError):
            eng.get("b0")


def test_worker_exception_reaches_the_caller(tmp_path):
    src = ToySource()
    with MovementEngine(src, tmp_path) as eng:
        eng.register("b0", S1)
        eng.register("b1", S1)

        def boom(block_id):
            raise RuntimeError(f"model file unreadable for {block_id}")

        src.hook = boom
        t = eng.request("b0", S0)  # lossy -> lossless reads the source
        with pytest.raises(RuntimeError, match="unreadable for b0"):
            t.result()
        eng.request("b1", S0)
        with pytest.raises(RuntimeError, match="unreadable for b1"):
            eng.wait("b1")
        assert eng.state("b0") == eng.state("b1") == S1  # prior state, still usable
        assert set(eng.get("b0")) == {"norm", "w"}
        assert [e.block for e in eng.events.of_kind("error")] == ["b0", "b1"]


def test_cancel_a_queued_transition(tmp_path):
    src = ToySource()
    gate = threading.Event()
    with MovementEngine(src, tmp_path, workers=1) as eng:
        eng.register("b0", S1)
        eng.register("b1", S0)
        before = eng.get("b1")
        src.hook = lambda b: gate.wait(10)
        running = eng.request("b0", S0)  # occupies the only worker, waiting in the source
        queued = eng.request("b1", S3)
        assert eng.state("b1") == S5
        assert queued.cancel() and queued.cancelled()
        assert eng.state("b1") == S0 and eng.get("b1")["w"] is before["w"]
        gate.set()
        assert running.result() == S0
        assert not running.cancel()  # too late: it ran
        (c,) = eng.events.of_kind("cancelled")
        assert (c.block, c.src, c.dst) == ("b1", S0, S3)
        assert eng.request("b1", S3).result() == S3  # and it can be requested again


# ------------------------------------------------------------------ asynchrony
def test_in_flight_reads_s5_and_lands_later(tmp_path):
    src = ToySource()
    gate = threading.Event()
    with MovementEngine(src, tmp_path) as eng:
        eng.register("b0", S2)
        src.hook = lambda b: gate.wait(10)
        t = eng.request("b0", S0)
        assert eng.state("b0") == S5 and not t.done()
        with pytest.raises(BlockInFlightError, match="in flight"):
            eng.get("b0")
        with pytest.raises(BlockInFlightError, match="in flight to S0"):
            eng.request("b0", S3)
        assert eng.request("b0", S0) is t  # the same target: the pending handle
        threading.Timer(0.2, gate.set).start()
        w = eng.wait("b0")
        assert t.done() and eng.state("b0") == S0
        assert_bitwise(w, src.blocks["b0"])
        (stall,) = eng.events.of_kind("stall")
        assert stall.block == "b0" and stall.duration >= 0.15


def test_two_transitions_overlap_with_two_workers(tmp_path):
    src = ToySource()
    barrier = threading.Barrier(2, timeout=20)  # passes only if both transitions are running at once
    with MovementEngine(src, tmp_path, workers=2) as eng:
        eng.register("b0", S1)
        eng.register("b1", S6)
        src.hook = lambda b: barrier.wait()
        ta, tb = eng.request("b0", S4), eng.request("b1", S0)
        assert ta.result() == S4 and tb.result() == S0
        a, b = [e for e in eng.events.of_kind("transition") if e.src is not None]
        assert a.start < b.end and b.start < a.end  # the intervals intersect
