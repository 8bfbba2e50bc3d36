"""The movement engine: asynchronous, measured transitions of weight blocks between the seven states.

Design (the simplest honest one):
  * States are EXCLUSIVE: a block is in exactly one representation at a time. While it moves it reads S5 and
    cannot be used; its prior representation stays alive (and is what `bytes_in` counts) until the whole route
    has landed, so an error anywhere (ENOSPC, EIO, a worker exception) leaves the block in its prior state.
    Intermediate representations (e.g. S3 on the way S4 -> S0) are freed as soon as the next hop landed.
  * Routes come from `state.ROUTES`. Lossy -> lossless (and lossy -> other lossy) re-reads the authoritative
    `source` (the model file), since no lossless copy is kept beside a lossy one.
  * A request for a block already in flight: the same target returns the pending handle; a different target
    raises BlockInFlightError (no chaining: the caller waits first).
  * A request for the state the block is already in returns a completed handle and records nothing.
  * `register` is synchronous (it loads from the source, recording events with `src=None`).
  * A corrupt S4 chunk found while reading is recovered: the block is re-read from the source and the store is
    re-written (a `recovered` event naming block and leaf), then the route goes on with the source's bytes.
  * Weights returned by `get` / `wait` are valid until the block's next transition: the engine deletes the old
    arrays (`.delete()`) so the memory is really freed.
  * `keep_home=True` (what the runtime uses): a block brought onto the device from S3 or S4 keeps that lossless
    copy as its *home*. Going back to the home state then only frees the device arrays (a `transition` event with
    no link bytes: weights are read-only, nothing needs writing back), and lossy -> other states route from the
    home instead of the source. Home copies are counted in `bytes_in` and `live_arrays`.
  * Compressed homes (`stage_compressed`, with `keep_home`): a block may keep int8 / int4 / low-rank copies in
    pinned host memory or on NVMe beside its lossless home, made once from the source. A request for one of those
    states from off device (or another lossy state) moves that copy (nvme->host first when it is on disk, then
    host->device) and lands it as is: the event counts the compressed bytes (`state.route(..., packed=...)`). Dropping back to the home frees the device copy
    only; the compressed copy stays until the block is dropped.
  * Held memory (`hold_dropped_memory`, what the runtime uses): a block dropped from S0 to its home leaves its
    device arrays to a pool, bounded by what the run's budget leaves free, and a later S0 load from pinned host
    memory copies its leaves of the same shapes into them instead of landing in fresh allocations
    (`tiers/device_pool.py`). `bytes_in("device")` and `live_arrays` count the held arrays.

Threads: a ThreadPoolExecutor of `workers` threads runs routes; tensorstore futures run the disk I/O of all
leaves of a block together. A GGUF source (one with `nbytes_read`) is read under a lock so the file bytes
read can be attributed to one block.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import threading
import time
from pathlib import Path

import jax
import numpy as np

from vorch_jax.tiers.device_pool import DevicePool, free_unlanded
from vorch_jax.tiers.events import Event, EventLog
from vorch_jax.tiers.full_precision import FullPrecisionBlock
from vorch_jax.tiers.nvme_store import CorruptBlockError, NvmeBlock
from vorch_jax.tiers.packed_home import PackedHostBlock, PackedNvmeBlock, convert_on_device
from vorch_jax.tiers.pinned_host import PinnedHostBlock
from vorch_jax.tiers.state import (
    BlockInFlightError, Hop, OffDeviceError, State, UnknownBlockError, UnknownStateError, from_compressed_home, route,
)
from vorch_jax.tiers.transition import Transition

WHERES = ("device", "host", "disk")


@dataclasses.dataclass
class _Entry:
    rep: object                     # the block's current representation (its prior one while in flight)
    pending: Transition | None = None
    home: object | None = None      # keep_home: the lossless off-device copy kept while the block is on device
    packed: dict = dataclasses.field(default_factory=dict)  # State -> PackedHostBlock | PackedNvmeBlock


class MovementEngine:
    """Holds every registered block in one representation and moves it on request.

    Args:
      source: callable `block_id -> {leaf: float32 ndarray}`, the authoritative lossless copy.
      store_dir: directory of the NVMe store (S4).
      workers: threads running transitions concurrently.
      int4_group_size: S2 group size along K (32, 64 or 128).
      lowrank_rank: S6 rank (clamped per leaf to min(K, N)).
      device: the jax device (default `jax.devices()[0]`).
      keep_home: keep the S3/S4 copy of a block brought onto the device (see the module docstring).
    """

    def __init__(self, source, store_dir, *, workers: int = 2, int4_group_size: int = 64, lowrank_rank: int = 32,
                 device: jax.Device | None = None, keep_home: bool = False):
        from vorch_jax.tiers.quant_int4 import check_group_size

        check_group_size(int4_group_size)
        if lowrank_rank < 1:
            raise ValueError(f"lowrank_rank must be >= 1, got {lowrank_rank}")
        self.source = source
        self.store_dir = Path(store_dir)
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.int4_group_size, self.lowrank_rank = int4_group_size, lowrank_rank
        self.keep_home = keep_home
        self.device = device if device is not None else jax.devices()[0]
        self.events = EventLog()
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.RLock()
        self._device_bytes = 0  # Σ nbytes of the device representations, kept as entries change (read every access)
        self._source_lock = threading.Lock()
        self._pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vorch-move")
        self.held: DevicePool | None = None  # device memory of dropped blocks (`hold_dropped_memory`)

    def hold_dropped_memory(self, room) -> DevicePool:
        """Keep the device arrays of blocks dropped to their homes, up to `room()` bytes (what the run's budget
        leaves free), and land loads of the same shapes in them (`tiers/device_pool.py`)."""
        self.held = DevicePool(room)
        return self.held

    # ---------------------------------------------------------------- public API
    @property
    def block_ids(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def register(self, block_id: str, state) -> None:
        """Load `block_id` from the source into `state` (synchronously). Raises if already registered."""
        dst = State.parse(state)
        if dst == State.S5:
            raise UnknownStateError("cannot register a block in S5 (in flight)")
        with self._lock:
            if block_id in self._entries:
                raise ValueError(f"block '{block_id}' is already registered (in {self.state(block_id).name})")
        rep = self._execute(block_id, None, None, dst)
        with self._lock:
            self._entries[block_id] = _Entry(rep)
            self._device_bytes += self._on_device(self._entries[block_id])

    def stage_compressed(self, block_id: str, state, where: str = "host") -> int:
        """Keep a compressed home of `block_id` in lossy `state` (S1, S2, S6) in pinned host memory (`where` "host") or
        on NVMe ("disk"), made now from the source (synchronously, like `register`; a `transition` event from the
        source with reason `stage`). Loads into `state` then move it (see the module docstring). Returns its bytes."""
        dst = State.parse(state)
        if where not in ("host", "disk"):
            raise ValueError(f"a compressed home lives on 'host' or 'disk', not {where!r}")
        if dst.lossless:
            raise ValueError(f"a compressed home holds a lossy state (S1, S2, S6), not {dst.name}")
        if not self.keep_home:
            raise ValueError("compressed homes need keep_home=True: a block landed from one must still have its "
                             "lossless home to return to")
        with self._lock:
            entry = self._entry(block_id)
            if dst in entry.packed:
                return entry.packed[dst].nbytes
        t0 = time.perf_counter()
        packed, link_bytes = self._make_compressed(block_id, dst, where)
        with self._lock:
            if self._entries.get(block_id) is not entry or dst in entry.packed:  # dropped, or staged meanwhile
                packed.free()
                return entry.packed[dst].nbytes if dst in entry.packed else 0
            entry.packed[dst] = packed
        self.events.append(Event("staged", block_id, None, dst, t0, time.perf_counter(), link_bytes,
                                 f"compressed home {dst.name} on {where} ({packed.nbytes} bytes)", "stage"))
        return packed.nbytes

    def _make_compressed(self, block_id: str, dst: State, where: str, store=None):
        """(a compressed home of `block_id` in `dst` made from the source, its link bytes); on disk it is written to
        the store (`store`: rewrite that NVMe copy in place, the recovery of a corrupt one)."""
        leaves, n = self._read_source(block_id)
        host = PackedHostBlock.stage(leaves, dst, self.device, int4_group_size=self.int4_group_size,
                                     lowrank_rank=self.lowrank_rank)
        if where == "host":
            return host, {"source->host": n}
        try:
            disk = PackedNvmeBlock(block_id, host, self.store_dir)
        finally:
            host.free()
        if store is not None:
            store.store = disk.store
        return disk, {"source->host": n, "host->nvme": disk.nbytes}

    def compressed_homes(self, block_id: str) -> frozenset:
        """The lossy states `block_id` keeps a compressed home of."""
        with self._lock:
            return frozenset(self._entry(block_id).packed)


    def request(self, block_id: str, target, reason: str = "") -> Transition:
        """Start moving `block_id` to `target` asynchronously; the block reads S5 until it lands. `reason` is
        recorded on the transition's event (the runtime says why it asked: miss, prefetch, plan:SCORE, ...)."""
        dst = State.parse(target)
        if dst == State.S5:
            raise UnknownStateError("S5 (in flight) is not a target: request S0, S1, S2, S3, S4 or S6")
        with self._lock:
            entry = self._entry(block_id)
            if entry.pending is not None:
                if entry.pending.dst == dst:
                    return entry.pending
                raise BlockInFlightError(
                    f"block '{block_id}' is in flight to {entry.pending.dst.name}; wait for it before requesting "
                    f"{dst.name}"
                )
            src = entry.rep.state
            if src == dst:
                done = cf.Future()
                done.set_result(dst)
                return Transition(block_id, src, dst, done)
            if entry.home is not None and dst == entry.home.state:
                return self._drop_to_home(block_id, entry, reason)
            future: cf.Future = cf.Future()  # placeholder so the handle exists before the worker may start
            transition = Transition(block_id, src, dst, future, reason)
            if self.held is not None and dst == State.S0 and isinstance(entry.rep, PinnedHostBlock):
                transition.into = self.held.claim(entry.rep.leaves)
            elif self.held is not None and dst.on_device:  # lands in fresh memory: the pool first fits the room
                self.held.trim()
            entry.pending = transition
            transition._future = self._pool.submit(self._run, block_id, entry, transition)
            transition._future.add_done_callback(lambda f, t=transition: self._on_done(t))
            return transition

    def state(self, block_id: str) -> State:
        with self._lock:
            entry = self._entry(block_id)
            return State.S5 if entry.pending is not None else entry.rep.state

    def states(self) -> dict[str, State]:
        with self._lock:
            return {b: self.state(b) for b in self._entries}

    def get(self, block_id: str) -> dict:
        """The block's weights for device compute, without waiting. Raises BlockInFlightError in S5 and
        OffDeviceError in S3 / S4."""
        with self._lock:
            entry = self._entry(block_id)
            if entry.pending is not None:
                raise BlockInFlightError(f"block '{block_id}' is in flight (S5) to {entry.pending.dst.name}")
            return entry.rep.materialize()

    def wait(self, block_id: str) -> dict:
        """Block until `block_id`'s pending transition lands (raising its error, if any), record the wait as a
        `stall` event, and return the materialized weights."""
        with self._lock:
            pending = self._entry(block_id).pending
        if pending is not None:
            t0 = time.perf_counter()
            try:
                cf.wait([pending._future])
            finally:
                self.events.append(Event("stall", block_id, pending.src, pending.dst, t0, time.perf_counter()))
            if not pending.cancelled():
                pending.result()
        return self.get(block_id)

    def has_host_copy(self, block_id: str) -> bool:
        """Whether the block's lossless arrays are in pinned host memory (`host_leaves` has them)."""
        with self._lock:
            entry = self._entry(block_id)
            return any(isinstance(r, PinnedHostBlock) for r in (entry.home, entry.rep))

    def host_leaves(self, block_id: str) -> dict:
        """The block's lossless arrays in pinned host memory (its S3 home, kept while on device or in flight), for an
        op computed where they live: nothing moves. OffDeviceError when its home is on NVMe."""
        with self._lock:
            entry = self._entry(block_id)
            host = [r for r in (entry.home, entry.rep) if isinstance(r, PinnedHostBlock)]
        if not host:
            raise OffDeviceError(f"block '{block_id}' has no copy in host DRAM to compute in place (home on NVMe)")
        return host[0].leaves

    def record_in_place(self, block_id: str, start: float, end: float, link_bytes: dict,
                        reason: str = "in_place") -> None:
        """An op computed where the block lives: the activation bytes per link and the host span."""
        self.events.append(Event("in_place", block_id, State.S3, State.S3, start, end, link_bytes, reason=reason))

    def inspect(self, block_id: str) -> dict[str, np.ndarray]:
        """Host numpy copy of the block's content in any settled state (lossy states dequantized); for tests
        and debugging: moves nothing between tiers and records no event."""
        with self._lock:
            entry = self._entry(block_id)
            if entry.pending is not None:
                raise BlockInFlightError(f"block '{block_id}' is in flight (S5)")
            rep = entry.rep
        if isinstance(rep, NvmeBlock):
            return rep.read()
        if isinstance(rep, PinnedHostBlock):
            return rep.to_numpy()
        leaves = rep.dequantize() if hasattr(rep, "dequantize") else rep.leaves
        return {k: np.asarray(v) for k, v in leaves.items()}

    def representation(self, block_id: str):
        """The live representation object (FullPrecisionBlock, LowBitBlock, ...): for accounting checks."""
        with self._lock:
            return self._entry(block_id).rep

    def live_arrays(self) -> list[jax.Array]:
        """Every jax.Array the engine's blocks hold right now (device and pinned host)."""
        with self._lock:
            reps = [r for e in self._entries.values() for r in (e.rep, e.home, *e.packed.values()) if r is not None]
        return [a for r in reps for a in r.arrays()] + (self.held.arrays() if self.held is not None else [])

    def bytes_in(self, where: str) -> int:
        """Bytes held by blocks in 'device', 'host' or 'disk', from the live arrays / chunk files; on the device
        also the dropped blocks' memory held for the next loads (`hold_dropped_memory`)."""
        if where not in WHERES:
            raise ValueError(f"unknown place {where!r}: expected one of {WHERES}")
        with self._lock:
            if where == "device":
                return self._device_bytes + (self.held.nbytes if self.held is not None else 0)
            reps = [r for e in self._entries.values() for r in (e.rep, e.home, *e.packed.values()) if r is not None]
        return sum(r.nbytes for r in reps if r.where == where)

    def drop(self, block_id: str) -> None:
        """Forget a settled block and free its representation (arrays deleted, store files removed)."""
        with self._lock:
            entry = self._entry(block_id)
            if entry.pending is not None:
                raise BlockInFlightError(f"block '{block_id}' is in flight (S5); wait before dropping it")
            del self._entries[block_id]
            self._device_bytes -= self._on_device(entry)
        entry.rep.free()
        if entry.home is not None:
            entry.home.free()
        for packed in entry.packed.values():
            packed.free()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self.held is not None:
            self.held.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---------------------------------------------------------------- internals
    @staticmethod
    def _on_device(entry: _Entry) -> int:
        return sum(r.nbytes for r in (entry.rep, entry.home) if r is not None and r.where == "device")

    def _entry(self, block_id: str) -> _Entry:
        try:
            return self._entries[block_id]
        except KeyError:
            raise UnknownBlockError(
                f"unknown block '{block_id}' (engine has {len(self._entries)} blocks: "
                f"{', '.join(list(self._entries)[:4])}{', ...' if len(self._entries) > 4 else ''})"
            ) from None

    def _on_done(self, transition: Transition) -> None:
        if transition.cancelled():  # never started: the block keeps its prior representation
            free_unlanded(transition.into)
            with self._lock:
                entry = self._entries.get(transition.block_id)
                if entry is not None and entry.pending is transition:
                    entry.pending = None
            self.events.append(Event("cancelled", transition.block_id, transition.src, transition.dst,
                                      transition.requested_at, time.perf_counter()))

    def _drop_to_home(self, block_id: str, entry: _Entry, reason: str = "") -> Transition:
        """Free the device copy and fall back to the kept home copy: no bytes move (called under the lock)."""
        t0 = time.perf_counter()
        dropped, src = entry.rep, entry.rep.state
        self._device_bytes -= self._on_device(entry)
        entry.rep, entry.home = entry.home, None
        self._device_bytes += self._on_device(entry)
        if self.held is not None and isinstance(dropped, FullPrecisionBlock):
            self.held.give(dropped.leaves)
        else:
            dropped.free()
        self.events.append(Event("transition", block_id, src, entry.rep.state, t0, time.perf_counter(), {},
                                 "device copy dropped; home copy kept", reason))
        done = cf.Future()
        done.set_result(entry.rep.state)
        return Transition(block_id, src, entry.rep.state, done)

    def _run(self, block_id: str, entry: _Entry, transition: Transition) -> State:
        origin, src, dst = entry.rep, transition.src, transition.dst
        # A lossy device copy with a home: start from the home's lossless bytes, not from the model file.
        start = entry.home if (entry.home is not None and not src.lossless) else origin
        with self._lock:
            packed_reps = dict(entry.packed)
        packed = {s: p.where for s, p in packed_reps.items()}
        if from_compressed_home(src, dst, packed):  # its arrays move as they are
            start, src_state = packed_reps[dst], src
        else:
            src_state = start.state
        try:
            new = self._execute(block_id, start, src_state, dst, transition.reason, packed, transition.into)
        except BaseException:
            free_unlanded(transition.into)
            with self._lock:
                entry.pending = None
            raise
        keep = self.keep_home and start is not entry.home and not src.on_device and transition.dst.on_device
        with self._lock:
            self._device_bytes -= self._on_device(entry)
            old_home = entry.home
            if keep:
                entry.home = origin
            elif not transition.dst.on_device and old_home is not None:
                entry.home = None  # the block landed off device: that copy is its home now
            entry.rep = new
            entry.pending = None
            self._device_bytes += self._on_device(entry)
        if not keep:
            origin.free()
        if old_home is not None and entry.home is None:
            old_home.free()
        return transition.dst

    def _execute(self, block_id: str, origin, src: State | None, dst: State, reason: str = "", packed=frozenset(),
                 into=None):
        """Run the route src -> dst hop by hop (`packed`: the compressed homes, `state.route`; `into`: held device
        arrays the host->device hop lands leaves in); return the landed representation. `origin` is never freed
        here; intermediates are. Records one `transition` event, or an `error` event and re-raises."""
        t0 = time.perf_counter()
        link_bytes: dict[str, int] = {}
        cur = origin
        try:
            for hop in route(src, dst, packed):
                nxt = self._hop(block_id, cur, hop, link_bytes, into)
                if cur is not origin:
                    cur.free()
                cur = nxt
        except BaseException as e:
            if cur is not origin and cur is not None:
                cur.free()
            self.events.append(Event("error", block_id, src, dst, t0, time.perf_counter(), link_bytes,
                                     f"{type(e).__name__}: {e}", reason))
            raise
        self.events.append(Event("transition", block_id, src, dst, t0, time.perf_counter(), link_bytes,
                                 reason=reason))
        return cur

    def _hop(self, block_id: str, cur, hop: Hop, link_bytes: dict[str, int], into=None):
        def count(n: int) -> None:
            link_bytes[hop.link] = link_bytes.get(hop.link, 0) + int(n)

        if hop.link == "source->host":
            leaves, n = self._read_source(block_id)
            count(n)
            return PinnedHostBlock.from_numpy(leaves, self.device)
        if hop.link == "nvme->host" and hop.packed:  # a compressed home on disk (checksums verified by the store)
            try:
                leaves = cur.read_async().result()
            except CorruptBlockError as e:  # made again from the source and rewritten, like a lossless S4 block
                t0 = time.perf_counter()
                _, made = self._make_compressed(block_id, cur.lands_in, "disk", store=cur)
                self.events.append(Event("recovered", block_id, State.S4, State.S4, t0, time.perf_counter(), made,
                                         f"compressed home {cur.lands_in.name}: {e}"))
                leaves = cur.read_async().result()
            count(sum(a.nbytes for a in leaves.values()))
            return PackedHostBlock.from_flat(leaves, cur, self.device)
        if hop.link == "nvme->host":
            try:
                leaves = cur.read_async().result()
            except CorruptBlockError as e:
                leaves = self._recover(block_id, cur, e)
            count(sum(a.nbytes for a in leaves.values()))
            return PinnedHostBlock.from_numpy(leaves, self.device)
        if hop.link == "device->host":
            new = PinnedHostBlock.from_device(cur, self.device)
            count(new.nbytes)
            return new
        if hop.link == "host->device" and hop.packed:  # a compressed home, moved as it is
            new = cur.to_device(self.device)
            count(new.nbytes)
            return new
        if hop.link == "host->device":
            new = FullPrecisionBlock.from_pinned_host(cur, self.device, into)
            count(new.nbytes)
            return new
        if hop.link == "host->nvme":
            new = NvmeBlock.write(block_id, cur.to_numpy(), self.store_dir)
            count(new.nbytes)
            return new
        if hop.link == "device:convert":
            count(cur.nbytes)  # bytes read by the conversion
            return convert_on_device(cur, hop.lands_in, int4_group_size=self.int4_group_size,
                                     lowrank_rank=self.lowrank_rank)
        raise AssertionError(f"route table has a hop the engine cannot run: {hop}")

    def _read_source(self, block_id: str) -> tuple[dict[str, np.ndarray], int]:
        """Read the block from the authoritative source; bytes = file bytes read when the source counts them."""
        if hasattr(self.source, "nbytes_read"):
            with self._source_lock:
                before = self.source.nbytes_read
                leaves = self.source(block_id)
                return leaves, self.source.nbytes_read - before
        leaves = self.source(block_id)
        return leaves, sum(np.asarray(a).nbytes for a in leaves.values())

    def _recover(self, block_id: str, corrupt: NvmeBlock, error: CorruptBlockError) -> dict[str, np.ndarray]:
        """Re-read a corrupt S4 block from the source and re-write the store; returns the source's bytes."""
        t0 = time.perf_counter()
        leaves, n_src = self._read_source(block_id)
        leaves = {k: np.ascontiguousarray(v) for k, v in leaves.items()}
        rewritten = NvmeBlock.write(block_id, leaves, self.store_dir)  # same directory: the old one is replaced
        corrupt.meta = rewritten.meta
        self.events.append(Event("recovered", block_id, State.S4, State.S4, t0, time.perf_counter(),
                                 {"source->host": n_src, "host->nvme": rewritten.nbytes}, str(error)))
        return leaves
