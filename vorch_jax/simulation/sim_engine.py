"""The simulator's movement engine and clock: the movement engine's interface on modelled links and time.

Time model (one host thread, one compute stream, one FIFO queue per link and direction; `backend.py` holds the
compute side):
  * links: `nvme->host` carries one transfer at a time, `host->device` and `device->host` each
    `links.copies_at_once` (FIFO: a transfer starts when requested or when a channel of its link is free,
    whichever is later), each taking latency + bytes / bandwidth (this CPU: 2, the movement engine's two worker
    threads copy at once, each on a core; GPU/TPU profiles: 1, concurrent copies share the link's bandwidth); a
    host->device transfer of a block above `hbm.fresh_alloc_threshold_bytes` lands no faster than
    `hbm.fresh_alloc_bytes_per_s` (on the CPU backend a buffer above glibc's 32 MiB mmap threshold is mapped afresh
    on every allocation, and first touching its pages runs at ~2.2 GB/s against ~15 GB/s into reused memory: a
    measured 4x; GPU/TPU profiles say .inf, their allocators pool device memory). Routes are the engine's
    (`tiers.state.route`): S4 -> S0 is nvme->host then host->device; a load into the state of a block's compressed
    home (`packed`) is one host->device hop of that state's bytes, as the real engine moves it.
    Evicting to a kept home copy moves no bytes (as in the real engine with `keep_home`); freeing a block above the
    threshold holds the host for bytes / `hbm.fresh_free_bytes_per_s` (its pages are unmapped on the thread that
    drops it: 6-11 ms for the 113 MB embedding here; GPU/TPU profiles: .inf, a pool).
  * contention: where copies and compute share the same cores (a CPU), compute loses `compute.copy_contention`
    seconds per second of copy beside it (`SimEngine._contend`, `compute_slowdown`), and a host<->device copy
    with compute beside it takes longer (the copying thread waits for a core: measured on this 2-core machine, a
    3.5 MB load took 1.3 ms with the forward's compute queued and 0.3 ms with the stream idle). A copy the host
    waits for (a miss, an initial placement) takes `compute.copy_beside_compute_s` more when the stream is busy as
    it starts (the compute queued before the host stopped to wait) and nothing more when it is idle; a copy the
    host does not wait for (a prefetch, speculative or planned load) takes `compute.prefetch_beside_compute_s`
    more: the host goes on dispatching, so compute runs beside it throughout (a static-prefetch run's 3.5 MB
    prefetches took a mean 1.7 ms against 0.7 ms for its static twin's misses). GPU/TPU profiles: 0, 0, 0.
"""

from __future__ import annotations

import dataclasses

from vorch_jax.tiers.events import Event, EventLog
from vorch_jax.tiers.state import State, from_compressed_home, route

SHARED_CORE_LINKS = ("host->device", "device->host")  # copies a CPU's cores carry out, beside its compute
WAITED_FOR_ALONE = ("miss", "placement")  # loads the host waits for before it dispatches any more compute


# ---------------------------------------------------------------------------------------------------------- engine
@dataclasses.dataclass
class _Rep:
    state: State
    nbytes: int


class _Handle:
    """A transition's handle, like `tiers.engine.Transition`: already decided, lands at `land`."""

    def __init__(self, block: str, src: State, dst: State, land: float):
        self.block_id, self.src, self.dst, self.land = block, src, dst, land

    def result(self, timeout=None) -> State:
        return self.dst

    def done(self) -> bool:
        return True


class SimEngine:
    """The movement engine's interface (request / wait / state / representation / bytes_in / events) on a modelled
    clock. `clock.now` is the host's time; a link is a FIFO queue served by `copies_at_once` channels
    (`link_free[link]`: when each channel's last transfer ends; nvme->host has one)."""

    def __init__(self, hw, state_bytes: dict, homes: dict, clock, packed: dict | None = None,
                 packed_where: dict | None = None):
        self.hw, self.state_bytes, self.homes, self.clock = hw, state_bytes, homes, clock
        # block -> {state of its compressed home: "host" | "disk"}, as `state.route` takes it
        self.packed = {b: {s: (packed_where or {}).get(b, "host")} for b, s in (packed or {}).items()}
        self.events = EventLog()
        self.rep = {b: _Rep(homes[b], 0) for b in homes}  # off device: no device bytes
        self.device_total = 0  # Σ rep.nbytes, kept as reps change
        self.pending: dict[str, _Handle] = {}
        k = int(hw.copies_at_once)
        self.link_free = {"nvme->host": [0.0], "host->device": [0.0] * k, "device->host": [0.0] * k}
        self.copy_spans: list[tuple[float, float]] = []  # copies not yet over (for `copy_contention`)

    def _link(self, link: str) -> tuple[float, float]:
        hw = self.hw
        if link == "host->device":
            return hw.host_to_device.bandwidth_bytes_per_s, hw.host_to_device.latency_s
        if link == "device->host":
            return hw.device_to_host.bandwidth_bytes_per_s, hw.device_to_host.latency_s
        if link == "nvme->host":
            return hw.nvme_read_bytes_per_s, hw.nvme_latency_s
        if link == "host->nvme":
            return hw.nvme_write_bytes_per_s, hw.nvme_latency_s
        raise AssertionError(link)

    def _event(self, *args, reason: str = "", **kw) -> None:
        self.events.append(Event(*args, **kw, reason=reason))

    def request(self, block: str, target, reason: str = "") -> _Handle:
        dst = State.parse(target)
        self._settle(block)
        if block in self.pending:
            return self.pending[block]
        src = self.rep[block].state
        now = self.clock.now
        if src == dst:
            return _Handle(block, src, dst, now)
        if not dst.on_device:  # back to the kept home copy: no traffic; freeing a big block holds the host
            nbytes = self.rep[block].nbytes
            if nbytes > self.hw.fresh_alloc_threshold_bytes:
                self.clock.now += nbytes / self.hw.fresh_free_bytes_per_s  # its pages are unmapped
            self._event("transition", block, src, dst, now, self.clock.now, {}, "device copy dropped; home kept",
                        reason=reason)
            self._set(block, _Rep(dst, 0))
            return _Handle(block, src, dst, self.clock.now)
        packed = self.packed.get(block, {})
        # as the real engine: a lossy device state routes from the lossless home, unless a compressed home serves
        # the target; S0 converts on device
        from_home = not src.lossless and not from_compressed_home(src, dst, packed)
        start = self.homes[block] if from_home else src
        t, first, link_bytes = now, None, {}
        s0 = self.state_bytes[block][State.S0]
        for hop in route(start, dst, packed):
            if hop.link == "device:convert":
                t += s0 / self.hw.hbm_bandwidth_bytes_per_s
                link_bytes[hop.link] = link_bytes.get(hop.link, 0) + s0
                continue
            bw, lat = self._link(hop.link)
            nbytes = self.state_bytes[block][dst] if hop.packed else s0  # a compressed home carries its state's
            if hop.link == "host->device" and nbytes > self.hw.fresh_alloc_threshold_bytes:
                bw = min(bw, self.hw.fresh_alloc_bytes_per_s)  # lands in freshly mapped pages
            channels = self.link_free[hop.link]
            ch = min(range(len(channels)), key=channels.__getitem__)  # the channel free first
            begin = max(t, channels[ch])
            t = begin + lat + nbytes / bw
            if hop.link in SHARED_CORE_LINKS:  # compute beside this copy: it waits for a core
                if reason not in WAITED_FOR_ALONE:
                    t += self.hw.prefetch_beside_compute_s  # the host goes on dispatching: beside it throughout
                elif self.clock.gpu > begin:
                    t += self.hw.copy_beside_compute_s  # the compute queued before the host waited
            channels[ch] = t
            self._contend(begin, t)
            first = begin if first is None else first
            link_bytes[hop.link] = link_bytes.get(hop.link, 0) + nbytes
        self._event("transition", block, start, dst, first if first is not None else now, t, link_bytes,
                    reason=reason)
        h = _Handle(block, src, dst, t)
        self.pending[block] = h
        return h

    def _contend(self, begin: float, end: float) -> None:
        """A copy over [begin, end]: compute already queued beside it loses `copy_contention` of the overlap (the
        queued work runs from now, or from `begin`, to `clock.gpu`). Compute queued later is charged for the copies
        already running by `compute_slowdown`, so each (copy, compute) overlap is counted once."""
        c = self.hw.copy_contention
        if c <= 0:
            return
        self.copy_spans.append((begin, end))
        overlap = min(end, self.clock.gpu) - max(begin, self.clock.now)
        if overlap > 0:
            self.clock.gpu += c * overlap

    def compute_slowdown(self, start: float, dur: float) -> float:
        """Extra device seconds for a compute span [start, start + dur] that copies in flight run beside."""
        c = self.hw.copy_contention
        if c <= 0:
            return 0.0
        self.copy_spans = [(b, e) for b, e in self.copy_spans if e > self.clock.now]
        overlap = sum(max(0.0, min(e, start + dur) - max(b, start)) for b, e in self.copy_spans)
        return c * overlap

    def _settle(self, block: str) -> None:
        h = self.pending.get(block)
        if h is not None and h.land <= self.clock.now:
            self.pending.pop(block)
            self._set(block, _Rep(h.dst, self.state_bytes[block][h.dst]))

    def _set(self, block: str, rep: _Rep) -> None:
        self.device_total += rep.nbytes - self.rep[block].nbytes
        self.rep[block] = rep

    def wait(self, block: str):
        h = self.pending.get(block)
        if h is not None and h.land > self.clock.now:
            self.events.append(Event("stall", block, h.src, h.dst, self.clock.now, h.land))
            self.clock.now = h.land
        self._settle(block)
        return None

    def get(self, block: str):
        return None  # no weights: the simulated backend computes nothing

    def has_host_copy(self, block: str) -> bool:
        """Whether the block's lossless home is in host DRAM (S3; a compressed copy beside it or not): what an op
        in place reads."""
        return self.homes[block] == State.S3

    def host_leaves(self, block: str):
        return None  # (the same: an op computed in place is modelled, `SimBackend`)

    def record_in_place(self, block: str, start: float, end: float, link_bytes: dict,
                        reason: str = "in_place") -> None:
        self._event("in_place", block, State.S3, State.S3, start, end, link_bytes, reason=reason)

    def state(self, block: str) -> State:
        self._settle(block)
        return State.S5 if block in self.pending else self.rep[block].state

    def representation(self, block: str) -> _Rep:
        self._settle(block)
        return self.rep[block]

    def bytes_in(self, where: str) -> int:
        if where != "device":
            raise ValueError("the simulated engine tracks device bytes only")
        for b in list(self.pending):
            self._settle(b)
        return self.device_total


@dataclasses.dataclass
class Clock:
    now: float = 0.0  # the host thread
    gpu: float = 0.0  # when the compute stream is free
