"""The simulated executor: the same controller, policies, ledger and schedule as the real one, with time modelled.

`simulate(cfg, out_dir, hardware=..., model_shape=...)` replays what `runner.run` does (initial placement from a
cold device, prefill, `new_tokens - 1` decode steps) through `SimExecutor`, a subclass of the real `Executor`
that keeps its ledger code (`_make_room`, `_evict`, `_load`, `prefetch`, `apply_targets`, `place_initial`: budget
never exceeded, eviction in the policy's `victim_order`, a prefetch only evicts blocks needed after the prefetched
one) and replaces the three things that touch real hardware: the engine (`SimEngine`: transfers on modelled links),
the compute of a position (a roofline), and the clock.

Time model (one host thread, one compute stream, one FIFO queue per link and direction):
  * host: each schedule position costs `host.dispatch_s_per_block` (the jax dispatch of its compute) plus the
    measured wall time of the ledger and policy code the real executor runs there too (ensure, prefetch, eviction
    order, the routed bookkeeping: `SimExecutor._host`), and a policy's tick and (MoE) the λ update cost their
    measured wall time; the host waits (a `stall` event) when a block it needs is still in flight, at the end of
    each pass for the compute stream (the sampled token), and, in a MoE, after each router for the compute stream
    (the routing decision comes to the host, as in the real routed executor and every MoE offloading runtime).
  * compute stream: a position starts when the host dispatched it and the previous one finished, and lasts
    `block_overhead_s + max(FLOPs / flops_per_s[precision], bytes read / hbm bandwidth, low-bit bytes / dequant)`,
    FLOPs and bytes for M = the pass's new tokens (`model_shapes.ModelShape.flops / bytes_read`).
  * links: `nvme->host` carries one transfer at a time, `host->device` and `device->host` each
    `links.copies_at_once` (FIFO: a transfer starts when requested or when a channel of its link is free,
    whichever is later), each taking latency + bytes / bandwidth (this CPU: 2, the movement engine's two worker
    threads copy at once, each on a core; GPU/TPU profiles: 1, concurrent copies share the link's bandwidth); a
    host->device transfer of a block above `hbm.fresh_alloc_threshold_bytes` lands no faster than
    `hbm.fresh_alloc_bytes_per_s` (on the CPU backend a buffer above glibc's 32 MiB mmap threshold is mapped afresh
    on every allocation, and first touching its pages runs at ~2.2 GB/s against ~15 GB/s into reused memory: a
    measured 4x; GPU/TPU profiles say .inf, their allocators pool device memory). Routes are the engine's
    (`tiers.state.route`): S4 -> S0 is nvme->host then host->device.
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
So prefetches overlap with compute, and stalls appear exactly when a needed block has not landed.

Outputs: `summary.json` with the real runner's fields where they make sense (`tokens: null`, `"simulated": true`,
quality not simulated), `trace.jsonl` and `trace.perfetto.json` via `telemetry`, from the simulated events.
MoE models replay a routing trace (`routing_trace.py`: a real MoE run's `routing.json`, or `zipf_routing`): per
pass, per layer, the experts run; `SimRoutedExecutor` runs them with the real routed executor's bookkeeping.
"""

from __future__ import annotations

import bisect
import dataclasses
import time
from pathlib import Path

import numpy as np

from vorch_jax.config import RunConfig, parse_budget
from vorch_jax.errors import RoutingTraceError
from vorch_jax.outputs import check_out_dir, writing
from vorch_jax.placement import resolve_placement
from vorch_jax.tiers import footprint
from vorch_jax.tiers.events import Event, EventLog
from vorch_jax.tiers.state import State, route
from vorch_jax.versions import environment

from . import telemetry as T
from .belady import belady_bytes
from .executor import BudgetError, Executor, check_fits
from .moe_executor import RoutedLedger
from .moe_policy import MoEScoredPolicy
from .routing_trace import read_routing_trace
from .hardware import HardwareProfile, load_profile
from .model_shapes import ModelShape, model_shape as get_model_shape
from .policies import PolicyContext

PRECISION = {"float32": "fp32", "bfloat16": "bf16"}
ON_DEVICE_RULE_STATES = ("S0", "S1", "S2", "S6")
LOWBIT = {State.S1: "int8", State.S2: "int4"}
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

    def __init__(self, hw: HardwareProfile, state_bytes: dict, homes: dict, clock):
        self.hw, self.state_bytes, self.homes, self.clock = hw, state_bytes, homes, clock
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
        start = self.homes[block] if src.on_device else src  # lossy/other device states route from the home
        t, first, link_bytes = now, None, {}
        s0 = self.state_bytes[block][State.S0]
        for hop in route(start, dst):
            if hop.link == "device:convert":
                t += s0 / self.hw.hbm_bandwidth_bytes_per_s
                link_bytes[hop.link] = link_bytes.get(hop.link, 0) + s0
                continue
            bw, lat = self._link(hop.link)
            if hop.link == "host->device" and s0 > self.hw.fresh_alloc_threshold_bytes:
                bw = min(bw, self.hw.fresh_alloc_bytes_per_s)  # lands in freshly mapped pages
            channels = self.link_free[hop.link]
            ch = min(range(len(channels)), key=channels.__getitem__)  # the channel free first
            begin = max(t, channels[ch])
            t = begin + lat + s0 / bw
            if hop.link in SHARED_CORE_LINKS:  # compute beside this copy: it waits for a core
                if reason not in WAITED_FOR_ALONE:
                    t += self.hw.prefetch_beside_compute_s  # the host goes on dispatching: beside it throughout
                elif self.clock.gpu > begin:
                    t += self.hw.copy_beside_compute_s  # the compute queued before the host waited
            channels[ch] = t
            self._contend(begin, t)
            first = begin if first is None else first
            link_bytes[hop.link] = link_bytes.get(hop.link, 0) + s0
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


# -------------------------------------------------------------------------------------------------------- cost model
def block_compute_s(hw: HardwareProfile, shape: ModelShape, block: str, op: str, state: State, tokens: int,
                    context: int, state_bytes: dict) -> float:
    """Device seconds of one position: overhead + max(FLOPs / throughput, bytes / HBM bandwidth, dequant)."""
    s0 = shape.device_bytes[block]
    wbytes = state_bytes[block].get(state, s0) if state.on_device else s0
    flops = shape.flops(block, op, tokens, context)
    if state == State.S6 and s0:
        flops *= wbytes / s0  # low-rank: the factors' products
    t = max(flops / hw.flops(PRECISION[shape.dtype]),
            shape.bytes_read(block, op, tokens, context, wbytes) / hw.hbm_bandwidth_bytes_per_s)
    if state in LOWBIT and op not in ("lookup", "norm"):
        t = max(t, wbytes / hw.dequant_bytes_per_s[LOWBIT[state]])
    return hw.block_overhead_s + t


# ------------------------------------------------------------------------------------------------------- executor
class SimExecutor(Executor):
    """The real executor's ledger and policy calls, on a modelled clock (see the module docstring). The schedule is
    the policy's one-pass schedule, read cyclically as the real executor does."""

    def __init__(self, shape: ModelShape, engine: SimEngine, policy, hw: HardwareProfile, *, tick_every_n_layers: int,
                 budget_bytes: int, homes: dict, state_bytes: dict):
        super().__init__(shape.cfg, engine, policy, budget_bytes=budget_bytes, device_bytes=shape.device_bytes,
                         homes=homes, layer_of=shape.layers, tick_every_n_layers=tick_every_n_layers,
                         state_bytes=state_bytes)
        self.shape, self.hw, self.clock = shape, hw, engine.clock
        self._positions: dict[str, list[int]] = {}
        for i, b in enumerate(self.schedule):
            self._positions.setdefault(b, []).append(i)
        self.compute_spans: list[tuple[str, float, float]] = []  # (block, start, seconds) of every position

    def _next_use(self, block: str) -> int:
        """As Executor._next_use (smallest k >= 1 with schedule[(t + k) % n] == block, else n + 1), by bisection."""
        n = len(self.schedule)
        pos = self._positions.get(block)
        if not pos:
            return n + 1
        cur = self.t % n
        i = bisect.bisect_right(pos, cur)
        nxt = pos[i] if i < len(pos) else pos[0] + n
        return nxt - cur

    def _sample_peak(self):
        self.counters.peak_device_bytes = max(self.counters.peak_device_bytes, self.engine.bytes_in("device"))

    def now(self) -> float:
        return self.clock.now

    def maybe_tick(self):
        self.policy.settle()  # the previous tick had a simulated 15 layers to finish: it is ready, as in real runs
        t0 = time.perf_counter()
        targets = self.policy.tick(self.t)
        spent = time.perf_counter() - t0  # the real controller ran: its wall time is host time
        self.counters.controller_s += spent
        self.clock.now += spent
        self._record_scores()
        if targets:
            self.apply_targets(targets, getattr(self.policy, "reasons", None))

    def _host(self, fn, *args):
        """Run the real ledger and policy code `fn(*args)` (the real executor runs the same between positions) and
        charge its wall time to the host."""
        t0 = time.perf_counter()
        out = fn(*args)
        self.clock.now += time.perf_counter() - t0
        return out

    def _compute(self, block: str, op: str, tokens: int, context: int) -> None:
        """Dispatch one position (host) and queue its compute on the stream."""
        hw = self.hw
        self.clock.now += hw.dispatch_s_per_block
        state = self.engine.state(block)
        dur = block_compute_s(hw, self.shape, block, op, state, tokens, context, self.state_bytes)
        start = max(self.clock.now, self.clock.gpu)
        dur += self.engine.compute_slowdown(start, dur)
        self.clock.gpu = start + dur
        self.compute_spans.append((block, start, dur))

    def _sync(self) -> None:
        """The host waits for the compute stream (a value it needs comes back from the device)."""
        self.clock.now = max(self.clock.now, self.clock.gpu)

    def run_pass(self, positions: list[tuple[str, str]], tokens: int, context: int) -> None:
        """One forward pass: ensure; prefetch; compute (async on the stream); tick after every N-th layer's FFN."""
        last_ffn = {}
        for i, (b, op) in enumerate(positions):
            if op in ("mlp", "expert"):
                last_ffn[self.layer_of[b]] = i
        for i, (block, op) in enumerate(positions):
            self._host(self.ensure, block)
            self._host(self.prefetch)
            self._compute(block, op, tokens, context)
            if op == "router":  # the routing decision comes to the host (moe_executor.RoutedForward): it waits
                self._sync()
            layer = self.layer_of[block]
            if op in ("mlp", "expert") and last_ffn.get(layer) == i and (layer + 1) % self.tick_every == 0:
                self.maybe_tick()
            self.t += 1
        self._sync()  # the sampled token: host waits for the stream
        self.step += 1


class SimRoutedExecutor(RoutedLedger, SimExecutor):
    """The routed executor on the modelled clock: `moe_executor.RoutedLedger`'s bookkeeping (known positions only
    as the router reveals them, P(selected) statistics, expected-next-use for `MoEScoredPolicy`, λ per tick,
    speculative loads, initial placement of the protected blocks only), with the routing replayed from a trace.

    Per pass, as `moe_executor.RoutedForward.forward`: each position knows the blocks up to and including the next
    router (a router itself knows nothing ahead: its decision is not made yet); after a router the host syncs with
    the stream, the executor observes the layer's selected experts (the experts of the trace's pass), and, where
    `speculation` holds the real run's prediction for the next layer and the next gate is on device, it dispatches
    the speculative router call (a router's compute on the stream), syncs again and observes that prediction
    (`observe_speculation`: statistics and speculative loads). Ticks come after a layer's experts
    (`RoutedLedger.after_layer`); their λ update is host time like the tick itself.

    `speculation`: [pass][layer] -> (predicted expert ids, mean probabilities [E]) for the layer predicted, as
    recorded by `moe_executor.ResidentMoE(record_speculation=True)`; None: no speculation."""

    def __init__(self, shape: ModelShape, engine: SimEngine, policy, hw: HardwareProfile, *, speculation=None,
                 speculative: bool = False, **kw):
        SimExecutor.__init__(self, shape, engine, policy, hw, **kw)
        self.speculation = speculation
        self._init_routed(n_experts=shape.n_experts, top_k=shape.top_k,
                          speculative=speculative and speculation is not None)

    def set_lambda(self, current_layer: int):
        t0 = time.perf_counter()
        super().set_lambda(current_layer)
        self.clock.now += time.perf_counter() - t0

    def run_pass(self, positions, tokens: int, context: int) -> None:
        E = self.n_experts
        layer_end = {}
        for i, (b, op) in enumerate(positions):
            if op in ("attn", "router", "expert"):
                layer_end[self.layer_of[b]] = i
        for i, (block, op) in enumerate(positions):
            ahead = []
            if op != "router":
                for b, o in positions[i + 1:]:
                    ahead.append(b)
                    if o == "router":
                        break
            self._host(self._enter, block, ahead)
            self._host(self.ensure, block)
            self._host(self._fetched, block)
            self._host(self.prefetch)
            self._compute(block, op, tokens, context)
            self.t += 1
            layer = self.layer_of[block]
            if op == "router":
                self._sync()
                selected = np.zeros(E, bool)
                selected[[int(b.rsplit(".", 1)[1]) for b, o in positions if o == "expert"
                          and self.layer_of[b] == layer]] = True
                self._host(self.observe_routing, layer, selected)
                gate = self.speculation_gate(layer)
                recorded = self.speculation[self.step][layer + 1] if gate is not None else None
                if recorded is not None:  # (None: the recorded run made no prediction here)
                    self._compute(gate, "router", tokens, context)
                    self._sync()
                    ids, probs = recorded
                    pred = np.zeros(E, bool)
                    pred[list(ids)] = True
                    self._host(self.observe_speculation, layer + 1, pred, np.asarray(probs, np.float64))
            if op in ("router", "expert") and layer_end.get(layer) == i:
                self.after_layer(layer)
        self._sync()
        self.end_pass()


# ------------------------------------------------------------------------------------------------------- routing
def zipf_routing(shape: ModelShape, passes: int, *, exponent: float = 1.0, seed: int = 0,
                 tokens_per_pass=None) -> list[list[list[int]]]:
    """A routing trace drawn per token from a Zipf law over each layer's experts (a seeded random rank order per
    layer), top-k without replacement; a pass of several tokens (prefill) runs the union of their experts.
    Returns [pass][layer] -> sorted expert ids."""
    rng = np.random.default_rng(seed)
    E, k, L = shape.n_experts, shape.top_k, shape.cfg.n_layers
    weights = 1.0 / np.arange(1, E + 1) ** exponent
    perms = [rng.permutation(E) for _ in range(L)]
    p = weights / weights.sum()
    out = []
    for j in range(passes):
        n_tok = tokens_per_pass[j] if tokens_per_pass else 1
        layers = []
        for i in range(L):
            chosen = set()
            for _ in range(n_tok):
                chosen.update(int(perms[i][r]) for r in rng.choice(E, size=k, replace=False, p=p))
            layers.append(sorted(chosen))
        out.append(layers)
    return out


# ----------------------------------------------------------------------------------------------------- simulate
def _placement_and_homes(cfg: RunConfig, shape: ModelShape, hbm: int, dram: int, schedule_blocks, state_bytes):
    placement = resolve_placement(cfg.placement, list(shape.block_ids))
    # As runner.prepare: a rule fixing an on-device state pins the block; `protect` pins it too.
    protected = frozenset(b for b, p in placement.items() if p.protect or p.state in ON_DEVICE_RULE_STATES)
    if cfg.policy == "resident":
        protected = frozenset(shape.block_ids)
    need = sum(state_bytes[b][State.parse(placement[b].state)] if placement[b].state in ON_DEVICE_RULE_STATES
               else state_bytes[b][State.S0] for b in protected)
    if need > hbm:
        raise BudgetError(f"hbm_budget of {hbm} bytes is below the {need} bytes of the blocks that must stay on device "
                          f"({len(protected)} protected or pinned blocks) of {shape.name}")
    homes, used = {}, 0
    for b in dict.fromkeys(list(schedule_blocks) + list(shape.block_ids)):  # DRAM in schedule order, then NVMe
        forced = placement[b].state
        if forced in ("S3", "S4"):
            homes[b] = State.parse(forced)
        elif used + shape.device_bytes[b] <= dram:
            homes[b] = State.S3
        else:
            homes[b] = State.S4
        used += shape.device_bytes[b] if homes[b] == State.S3 else 0
    return placement, protected, homes


def _state_bytes(shape: ModelShape, cfg: RunConfig) -> dict:
    """{block: {State: device bytes}} from the conversions' shapes (tiers.footprint), one eval per distinct shape."""
    cache, out = {}, {}
    for b in shape.block_ids:
        key = tuple((k, v.shape, str(v.dtype)) for k, v in shape.leaves[b].items())
        if key not in cache:
            cache[key] = {State.S0: shape.device_bytes[b]}
            if cfg.lossy:
                for s in (State.S1, State.S2, State.S6):
                    cache[key][s] = footprint.state_bytes(shape.leaves[b], s, int4_group_size=cfg.quant.int4_group_size,
                                                          lowrank_rank=cfg.quant.lowrank_rank)
            else:
                for s in (State.S1, State.S2, State.S6):
                    cache[key][s] = shape.device_bytes[b]
        out[b] = cache[key]
    return out


def model_calibration(cfg: RunConfig, shape: ModelShape):
    """The calibration (`vorch calibrate`) a real run of this model reads on this machine, or None. Only models whose
    weights are here have one (SmolLM2). ψ and the value lost per lossy state are properties of the weights, so the
    simulator uses them on every profile; bandwidths and δ come from the profile."""
    if shape.name != "smollm2-135m":
        return None
    from vorch_jax.models.smollm2 import load_smollm2_source
    from vorch_jax.runner import calibration_for

    return calibration_for(cfg, load_smollm2_source(), shape.block_ids)


def _scored_extras(cfg, shape, hw, state_bytes, homes, placement, cal) -> dict:
    """The scored policy's inputs: link bandwidths and dequant seconds (δ) from the profile; ψ and the per-state value
    loss from the model's calibration when there is one (as the real runner does, so both plan alike)."""
    delta = None
    if cfg.lossy:
        delta = {}
        for b in shape.block_ids:
            kind = shape.kinds[b]
            if kind in delta:
                continue
            delta[kind] = {State.S0: 0.0, State.S6: 0.0}
            for s, fmt in LOWBIT.items():
                delta[kind][s] = state_bytes[b][s] / hw.dequant_bytes_per_s[fmt]
    from_cal = {} if cal is None else dict(psi=cal.psi, lossy_loss=cal.tick_lossy_loss(),
                                           calibration=f"ψ: {cal.model_key} @ {cal.machine_key}, {cal.created}")
    if cal is not None and cfg.lossy:  # the same quality budget as the real run: the lossy states it may use
        from .quality_budget import allocate

        from_cal["lossy_states"] = allocate(cal.kl, state_bytes, cfg.quality.max_kl, share=cfg.quality.kl_share,
                                            blocks=list(shape.block_ids)).states
    return dict(state_bytes=state_bytes, homes=homes, kinds=dict(shape.kinds), layers=dict(shape.layers),
                placement=placement, h2d_bytes_per_s=hw.host_to_device.bandwidth_bytes_per_s,
                nvme_bytes_per_s=hw.nvme_read_bytes_per_s, delta=delta, **from_cal)


def psi_quality_estimate(cal, accesses) -> dict:
    """ΔKL estimated from the calibration: Σ over blocks of the measured ΔKL of the lossy state each block was last
    read in (an additive, first-order estimate; lossless states add 0)."""
    last = {a.block: a.state for a in accesses}
    lossy = {b: st for b, st in last.items() if st in cal.states and b in cal.kl}
    return {"kl_estimate": float(sum(cal.kl[b][st] for b, st in lossy.items())), "lossy_blocks": len(lossy),
            "source": f"{cal.model_key} @ {cal.machine_key}, {cal.created}"}


def _passes(shape: ModelShape, cfg: RunConfig, routing) -> list[list[tuple[str, str]]]:
    n = cfg.new_tokens  # prefill + (new_tokens - 1) decode steps
    if not shape.n_experts:
        one = shape.pass_positions()
        return [one] * n
    if routing is None:
        routing = zipf_routing(shape, n, seed=cfg.seed, tokens_per_pass=[cfg.prompt_tokens + 1] + [1] * (n - 1))
    if len(routing) < n:
        raise RoutingTraceError(f"the routing trace has {len(routing)} passes; the run needs {n} (new_tokens)")
    return [shape.pass_positions(routing[j]) for j in range(n)]


def simulate(cfg: RunConfig, out_dir, *, hardware=None, model_shape: ModelShape | None = None, routing=None,
             speculation=None, progress=None, write_traces: bool = True) -> dict:
    """Simulate `cfg` on `hardware` (a profile, its name or path; default `cfg.hardware`) and write the outputs.

    `model_shape`: the block table (default: `model_shapes.model_shape(cfg.model, cfg.dtype)`); `routing`: for an
    MoE model, [pass][layer] -> expert ids (default: Zipf, seeded by `cfg.seed`); `speculation`: the real run's
    speculative predictions for the same passes ([pass][layer] -> (expert ids, mean probabilities), see
    `SimRoutedExecutor`), used by the scored policy as the real MoE run does (no trace: no speculation).
    An MoE model runs on `SimRoutedExecutor` (the real routed executor's bookkeeping), a scored policy as
    `MoEScoredPolicy`. `progress(msg)` as in
    `runner.run`. `write_traces=False` writes only `summary.json` (sweeps that need no trace: serialising ~10^5
    records costs more than simulating them).
    Returns the summary.
    """
    from .runner import make_policy

    out_dir = check_out_dir(Path(out_dir))
    hw = load_profile(hardware if hardware is not None else cfg.hardware)
    shape = model_shape or get_model_shape(cfg.model, "float32" if cfg.model.startswith("smollm2") else cfg.dtype)
    hbm = parse_budget(cfg.hbm_budget, shape.model_bytes)
    dram = parse_budget(cfg.dram_budget, shape.model_bytes)
    if hbm > hw.hbm_capacity_bytes:
        raise BudgetError(f"hbm_budget of {hbm} bytes exceeds {hw.name}'s {hw.hbm_capacity_bytes:.0f} bytes of HBM")
    routing_source = "given by the caller" if routing is not None else None
    if cfg.routing_trace and routing is None:
        if not shape.n_experts:
            raise RoutingTraceError(f"routing_trace is set but {shape.name} has no experts to route: drop "
                                    f"routing_trace or choose an MoE model")
        routing, recorded = read_routing_trace(cfg.routing_trace, n_layers=shape.cfg.n_layers,
                                               n_experts=shape.n_experts, passes=cfg.new_tokens)
        speculation = speculation if speculation is not None else recorded
        routing_source = f"trace {cfg.routing_trace}"
    if shape.n_experts and routing_source is None:
        routing_source = f"zipf (seed {cfg.seed})"
    passes = _passes(shape, cfg, routing)
    stream = [b for p in passes for b, _ in p]
    state_bytes = _state_bytes(shape, cfg)
    placement, protected, homes = _placement_and_homes(cfg, shape, hbm, dram, stream, state_bytes)
    if shape.n_experts:  # one pass touching every block in layer order: what static fills from
        one = ["embed"] + [b for b in shape.block_ids if b not in ("embed", "final_norm", "lm_head")] + \
              ["final_norm", shape.head_block()]
    else:
        one = [b for b, _ in passes[0]]
    forced = {b: State.parse(p.state) for b, p in placement.items() if p.state in ON_DEVICE_RULE_STATES}
    ctx = PolicyContext(block_ids=tuple(shape.block_ids), device_bytes=dict(shape.device_bytes), budget_bytes=hbm,
                        schedule=tuple(one), prefetch_depth=cfg.prefetch_depth, protected=protected,
                        future=tuple(stream), forced=forced, state_bytes=state_bytes)
    cal = model_calibration(cfg, shape)
    extras = _scored_extras(cfg, shape, hw, state_bytes, homes, placement, cal) if cfg.policy == "scored" else None
    if shape.n_experts and cfg.policy == "scored":
        policy = MoEScoredPolicy(ctx, cfg, **extras)
    else:
        policy = make_policy(cfg, ctx, extras)
    check_fits(policy, shape.device_bytes, hbm, state_bytes)
    clock = Clock()
    engine = SimEngine(hw, state_bytes, homes, clock)
    common = dict(tick_every_n_layers=cfg.tick_every_n_layers, budget_bytes=hbm, homes=homes, state_bytes=state_bytes)
    if shape.n_experts:  # as moe_run.run_moe: speculative prefetch for the scored policy
        ex = SimRoutedExecutor(shape, engine, policy, hw, speculation=speculation,
                               speculative=cfg.policy == "scored", **common)
    else:
        ex = SimExecutor(shape, engine, policy, hw, **common)
    wall0 = time.perf_counter()
    place0 = clock.now
    ex.place_initial()  # traffic counted from a cold device, as the real runner does; timed apart (t < 0 in traces)
    gen0 = clock.now
    n_acc0 = len(ex.accesses)
    step_s, P = [], cfg.prompt_tokens + 1  # the real runner prepends BOS
    for j, positions in enumerate(passes):
        t0 = clock.now
        tokens, context = (P, P) if j == 0 else (1, P + j)
        ex.run_pass(positions, tokens, context)
        step_s.append(clock.now - t0)
        if progress:
            progress(f"simulated pass {j + 1}/{len(passes)}")
    gen1 = clock.now
    prefill_s, dec = step_s[0], step_s[1:]
    decode_s = sum(dec[1:]) if len(dec) > 1 else sum(dec)  # the first decode step is dropped, as in the runner
    decode_n = max(1, len(dec) - 1) if len(dec) > 1 else len(dec)
    events = engine.events.snapshot()
    end = gen1 + 1e-9  # window() is half-open; the last drop happens at gen1
    gen_events = T.window(events, gen0, end)
    gen_stream = [a.block for a in ex.accesses[n_acc0:]]
    moved = T.link_bytes(T.window(events, place0, end))
    loads = moved.get("host->device", 0)
    used_bytes = {b: state_bytes[b][policy.device_state(b)] for b in shape.block_ids}
    bel = belady_bytes(gen_stream, used_bytes, hbm, [], pinned=protected)  # same guardrails, cold start (runner)
    resident_step = _resident_step_s(hw, shape, passes, P, state_bytes)
    h2d = hw.host_to_device.bandwidth_bytes_per_s
    decode_bytes = T.link_bytes(T.window(events, gen0 + prefill_s, end)).get("host->device", 0)
    floor_s = max(resident_step, decode_bytes / max(1, len(dec)) / h2d)
    link_gbps = {"host->device": h2d / 1e9, "nvme->host": hw.nvme_read_bytes_per_s / 1e9}
    summary = {
        "complete": True,
        "simulated": True,
        "executor": "sim",
        "hardware": hw.name,
        "model": shape.name,
        "policy": cfg.policy,
        "lossy": cfg.lossy,
        "hbm_budget_bytes": hbm,
        "dram_budget_bytes": dram,
        "model_bytes": shape.model_bytes,
        "prompt_tokens": P,
        "tokens": None,
        "tokens_match_resident": None,
        "text": None,
        "prefill_s": prefill_s,
        "decode_tok_s": decode_n / decode_s if decode_s > 0 else float("nan"),
        "decode_step_s": decode_s / decode_n if decode_s > 0 else float("nan"),
        "resident_step_s": resident_step,
        "floor_step_s": floor_s,
        "wall_s": gen1 - gen0,
        "stall_s": T.stall_seconds(gen_events),
        "transfer_s": T.link_seconds(gen_events, "host->device") + T.link_seconds(gen_events, "nvme->host"),
        "compute_s": sum(d for _, b, d in ex.compute_spans if b >= gen0),  # sim only: device busy, contention in
        "controller_s": ex.counters.controller_s,
        "peak_device_bytes": ex.counters.peak_device_bytes,
        "link_bytes": moved,
        "bytes_moved": loads,
        "belady_bytes": bel,
        "hits": ex.counters.hits,
        "misses": ex.counters.misses,
        "prefetch": {"issued": ex.counters.prefetch_issued, "useful": ex.counters.prefetch_useful,
                     "wasted_bytes": ex.counters.prefetch_wasted_bytes},
        "transitions": T.transition_counts(gen_events),
        "quality": {"simulated": True, "note": "quality is not simulated",
                    "psi_estimate": psi_quality_estimate(cal, ex.accesses[n_acc0:]) if cal is not None else None,
                    "psi_note": f"none: no ψ calibration exists for {shape.name}" if cal is None else
                    "calibrated ΔKL per block and state (vorch calibrate), summed over the states blocks were read "
                    "in"},
        "quality_pass_link_bytes": None,
        "link_gbps": link_gbps,  # the profile's (the real runner reports the probe's)
        "initial_placement_s": gen0 - place0,
        "decode_h2d_bytes_per_step": decode_bytes / max(1, len(dec)),  # sim only: the floor's numerator
        "backend": "sim",
        "versions": environment(),
        "routing": None if not shape.n_experts else {
            "source": routing_source, "speculation": isinstance(ex, SimRoutedExecutor) and ex.speculative,
            "speculative_loads": ex.spec["issued"] if shape.n_experts else 0},
        "sim_wall_s": time.perf_counter() - wall0,
    }
    with writing(out_dir):
        if write_traces:
            T.write_trace(out_dir, T.trace_records(ex.accesses, events, gen0, ex.score_samples))
        T.write_json_atomic(out_dir / "summary.json", summary)
    return summary


def _resident_step_s(hw, shape, passes, P, state_bytes) -> float:
    """Compute-only decode step of the all-resident model on this profile (the floor's compute term)."""
    if len(passes) < 2:
        return float("nan")
    positions = passes[-1]
    dev = sum(block_compute_s(hw, shape, b, op, State.S0, 1, P + len(passes) - 1, state_bytes) for b, op in positions)
    host = hw.dispatch_s_per_block * len(positions)
    return max(dev, host)
