"""The simulated backend: the same driver, ledger and policies as a real run, with compute and time modelled.

What it replaces of the real run is only what touches hardware: the engine (`sim_engine.SimEngine`: transfers on
modelled links), the compute of a position (a roofline over the spec's cost model) and the clock. Its time model:
  * host: each position costs `host.dispatch_s_per_block` (the jax dispatch of its compute) plus the measured wall
    time of the ledger and policy code the real run executes there too (`host()`: fetch, prefetch, eviction order,
    ticks, the routed bookkeeping); the host waits (a `stall` event) when a block it needs is still in flight, at the
    end of each pass for the compute stream (the sampled token), and after each router (its decision comes to the
    host, as in the real routed run and every MoE offloading runtime);
  * compute stream: a position starts when the host dispatched it and the previous one finished, and lasts
    `block_overhead_s + max(FLOPs / flops_per_s[precision], bytes read / hbm bandwidth, low-bit bytes / dequant)`,
    FLOPs and bytes from `ModelSpec.cost` for the pass's new tokens over its cached context, slowed by copies beside
    it where they share the cores (`SimEngine.compute_slowdown`); on a mesh, the collective after it
    (`ModelSpec.collective_bytes`) on the stream too: the interconnect's latency + bytes / its bandwidth;
  * in place (`runtime/in_place.py`): a position the ledger hands over as `InPlace` runs on the host, whose
    weights sit in its DRAM: its input leaves the device when the stream has made it (`host_compute`'s activation
    latency + bytes / the device->host link), the host computes it (`HostCompute.op_seconds`: a roofline over its
    cores and DRAM), and the result comes back (latency + bytes / host->device) before the stream goes on; the host
    thread waits for it, as the real backend does, so host ops never overlap. Activation copies are not queued behind the
    weight loads on the links (a few KB beside megabytes; GPUs copy each direction on its own engine). On this
    machine's profile the host is the device's own 2 cores: the model does not charge the two against each other;
  * routing: a routed plan replays a routing trace ([pass][layer] -> the experts run: a real MoE run's
    `routing.json`, or a Zipf draw, `zipf_routing`), and its recorded speculation (the router's call costs a
    router's compute and a sync, as in the real run).
"""

from __future__ import annotations

import contextlib
import time

import numpy as np

from vorch_jax.tiers.state import State

PRECISION = {"float32": "fp32", "bfloat16": "bf16"}
ITEMSIZE = {"float32": 4, "bfloat16": 2}
LOWBIT = {State.S1: "int8", State.S2: "int4"}


def in_place_seconds(hw, spec, position, tokens: int, state_bytes: dict, dtype: str) -> tuple[float, float, float,
                                                                                             dict]:
    """(seconds for the activations to reach the host, the op there, the result back; activation bytes per link) of
    one position computed where its weights live, on `hw`'s host and links."""
    hc, itemsize = hw.host_compute, ITEMSIZE[dtype]
    s0 = state_bytes[position.block][State.S0]
    flops, read = spec.cost(position, tokens, 0, s0, itemsize)
    read = read if spec.token_routed(position) else s0  # a lookup reads its tokens' rows, the other ops every weight
    up, down = spec.activation_bytes(position, tokens, itemsize)
    to_host = hc.activation_latency_s + up / hw.device_to_host.bandwidth_bytes_per_s
    back = hc.activation_latency_s + down / hw.host_to_device.bandwidth_bytes_per_s
    return to_host, hc.op_seconds(flops, read, PRECISION[dtype]), back, {"device->host": up, "host->device": down}


def simulated_prices(hw, spec, state_bytes: dict, dtype: str):
    """What the ledger prices compute in place with on `hw`: the same model the simulated backend charges."""
    from vorch_jax.runtime.in_place import InPlacePrices

    def host_s(position, tokens):
        return sum(in_place_seconds(hw, spec, position, tokens, state_bytes, dtype)[:3])

    link = hw.host_to_device
    return InPlacePrices(host_s=host_s, move_s=lambda nbytes: link.latency_s + nbytes / link.bandwidth_bytes_per_s)


def position_seconds(hw, spec, position, state: State, tokens: int, context: int, state_bytes: dict,
                     dtype: str) -> float:
    """Device seconds of one position: overhead + max(FLOPs / throughput, bytes / HBM bandwidth, dequant)."""
    s0 = state_bytes[position.block][State.S0]
    wbytes = state_bytes[position.block].get(state, s0) if state.on_device else s0
    flops, nbytes = spec.cost(position, tokens, context, wbytes, ITEMSIZE[dtype])
    if state == State.S6 and s0:
        flops *= wbytes / s0  # low-rank: the factors' products
    t = max(flops / hw.flops(PRECISION[dtype]), nbytes / hw.hbm_bandwidth_bytes_per_s)
    if state in LOWBIT and position.op not in ("embed", "norm"):
        t = max(t, wbytes / hw.dequant_bytes_per_s[LOWBIT[state]])
    return hw.block_overhead_s + t


class SimBackend:
    settles_ticks = True

    def __init__(self, spec, hw, engine, state_bytes: dict, dtype: str, *, routing=None, speculation=None,
                 barrier=None):
        """`dtype`: what the modelled device holds weights in (its FLOP rate and the bytes it streams); `barrier`:
        the mesh's meeting point at each layer's end (`simulation.mesh.LayerBarrier`; None on one device). Host time is
        CPU time, not wall time, so that the machine's other load does not enter the model (a CI run beside another
        worker once replayed the MoE lru row 22% slower than on a quiet machine): the process's CPU time on one device
        (the controller's jitted work runs on XLA's threads), its own thread's on a mesh, where each device runs in a
        thread of its own beside the others."""
        self.spec, self.hw, self.engine, self.clock = spec, hw, engine, engine.clock
        self.state_bytes, self.dtype = state_bytes, dtype
        self.routing_trace, self.recorded_speculation = routing, speculation
        self.compute_spans: list[tuple[str, float, float]] = []  # (block, start, seconds) of every position
        self.barrier = barrier
        self.host_clock = time.thread_time if barrier is not None else time.process_time
        self._pass, self._tokens, self._context = 0, 0, 0

    def now(self) -> float:
        return self.clock.now

    @contextlib.contextmanager
    def host(self):
        """The real ledger and policy code runs inside; its CPU time (`host_clock`) is the host's time on the modelled
        clock."""
        t0 = self.host_clock()
        try:
            yield
        finally:
            self.clock.now += self.host_clock() - t0

    def new_cache(self, max_len: int, dtype):
        return None

    def begin_pass(self, ids_BxT, cache, pos: int, index: int) -> None:
        self._pass, self._tokens = index, int(np.shape(ids_BxT)[1])
        self._context = pos + self._tokens

    def _compute(self, position) -> None:
        """Dispatch one position (host) and queue its compute on the stream."""
        hw = self.hw
        self.clock.now += hw.dispatch_s_per_block
        state = self.engine.state(position.block)
        dur = position_seconds(hw, self.spec, position, state, self._tokens, self._context, self.state_bytes,
                               self.dtype)
        start = max(self.clock.now, self.clock.gpu)
        dur += self.engine.compute_slowdown(start, dur) + self._collective_s(position, self._tokens)
        self.clock.gpu = start + dur
        self.compute_spans.append((position.block, start, dur))

    def _collective_s(self, position, tokens: int) -> float:
        """On a mesh, the collective after `position` (`ModelSpec.collective_bytes`): latency + bytes / bandwidth of
        the interconnect; nothing on one device."""
        mesh = self.hw.mesh
        sent = self.spec.collective_bytes(position, tokens, ITEMSIZE[self.dtype]) if mesh is not None else 0.0
        return mesh.interconnect.latency_s + sent / mesh.interconnect.bandwidth_bytes_per_s if sent else 0.0

    def _sync(self) -> None:
        """The host waits for the compute stream (a value it needs comes back from the device)."""
        self.clock.now = max(self.clock.now, self.clock.gpu)

    def run(self, position, w):
        from vorch_jax.runtime.in_place import InPlace

        if isinstance(w, InPlace):
            self._compute_in_place(position, w)
        else:
            self._compute(position)
        return None

    def _compute_in_place(self, position, w) -> None:
        """Dispatch one position computed on the host (see the module docstring); the host waits for its result."""
        self.clock.now += self.hw.dispatch_s_per_block
        to_host, host_s, back, moved = in_place_seconds(self.hw, self.spec, position, self._tokens, self.state_bytes,
                                                        self.dtype)
        ready = max(self.clock.now, self.clock.gpu)  # its input: what the stream computed before it
        self.clock.gpu = self.clock.now = ready + to_host + host_s + back  # the host waits: one op at a time
        w.record(ready, self.clock.now, moved)  # the engine's `in_place` event, as the ledger asked

    def layer_done(self, layer: int) -> None:
        """On a mesh, the layer's collective: no device's stream goes on before every device's has reached it."""
        if self.barrier is not None:
            self.clock.gpu = self.barrier.meet(self.clock.gpu)

    def routing(self, position, out):
        self._sync()
        selected = np.zeros(self.spec.n_experts, bool)
        selected[list(self.routing_trace[self._pass][position.layer])] = True
        return selected, None

    def speculate(self, gate_position, gate_w, top_k: int):
        """The prediction is modelled where it is read (`speculation`), as the real backend's wait is."""
        return gate_position

    def speculation(self, gate_position):
        recorded = self.recorded_speculation[self._pass][gate_position.layer] \
            if self.recorded_speculation is not None else None
        if recorded is None:  # the recorded run made no prediction here
            return None
        self._compute(gate_position)
        self._sync()
        ids, probs = recorded
        pred = np.zeros(self.spec.n_experts, bool)
        pred[list(ids)] = True
        return pred, np.asarray(probs, np.float64)

    def end_pass(self):
        self._sync()  # the sampled token: the host waits for the stream
        return None, None

    def next_token(self, logits) -> int:
        return 0

    def resident_step_s(self, positions, context: int) -> float:
        """Compute-only decode step of the all-resident model on this profile (the floor's compute term)."""
        dev = sum(position_seconds(self.hw, self.spec, p, State.S0, 1, context, self.state_bytes, self.dtype)
                  + self._collective_s(p, 1) for p in positions)
        return max(dev, self.hw.dispatch_s_per_block * len(positions))


def zipf_routing(spec, passes: int, *, exponent: float = 1.0, seed: int = 0,
                 tokens_per_pass=None) -> list[list[list[int]]]:
    """A routing trace drawn per token from a Zipf law over each layer's experts (a seeded random rank order per
    layer), top-k without replacement; a pass of several tokens (prefill) runs the union of their experts.
    Returns [pass][layer] -> sorted expert ids."""
    rng = np.random.default_rng(seed)
    E, k, L = spec.n_experts, spec.top_k, spec.n_layers
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
