"""The real executor: a model's forward pass, block by block, under an HBM budget, with blocks really moving.

The loop is the schedule (FlexGen's shape):

    for t, block in positions:
        w = ensure(t, block)        # hit, or wait for it to land (a timed stall)
        prefetch(t)                 # issue loads for the next `prefetch_depth` positions, within the budget
        x = compute(block, w, x)    # async dispatch: transfers overlap with compute
        maybe_tick(t)               # every N layers, let the policy re-plan (the scored controller)

The budget is kept by a ledger of device bytes per block (landed or in flight to the device); the bytes are the
real arrays' sizes the engine reports, and `peak_device_bytes` is sampled from the engine's live device arrays.
Evicting a block whose lossless home copy is kept off device (the engine's `keep_home`) frees its device arrays
without traffic, as in every offloading runtime where weights are read-only.
"""

from __future__ import annotations

import dataclasses
import time

import jax.numpy as jnp
import numpy as np

from vorch_jax.errors import BudgetError
from vorch_jax.models.llama import KVCache
from vorch_jax.tiers.state import State

from . import block_compute as C


@dataclasses.dataclass
class Access:
    """One schedule position executed: the executor's own record (the engine records the movements)."""

    t: int
    step: int
    layer: int
    block: str
    hit: bool
    start: float
    end: float  # when the weights were ready to use
    state: str


@dataclasses.dataclass
class Counters:
    hits: int = 0
    misses: int = 0
    prefetch_issued: int = 0
    prefetch_useful: int = 0
    prefetch_wasted_bytes: int = 0
    controller_s: float = 0.0
    peak_device_bytes: int = 0


class Executor:
    def __init__(self, cfg, engine, policy, *, budget_bytes: int, device_bytes: dict, homes: dict,
                 layer_of: dict, tick_every_n_layers: int = 4, dtype=jnp.float32, state_bytes: dict | None = None):
        self.cfg, self.engine, self.policy = cfg, engine, policy
        self.budget = int(budget_bytes)
        self.device_bytes = dict(device_bytes)  # block -> full-precision (S0) bytes on device
        self.state_bytes = state_bytes or {b: {State.S0: n} for b, n in device_bytes.items()}  # block -> {state: bytes}
        self.homes = dict(homes)  # block -> State.S3 | State.S4 (its lossless home off device)
        self.layer_of = layer_of
        self.tick_every = max(1, tick_every_n_layers)
        self.dtype = dtype
        self.schedule = list(policy.ctx.schedule)
        self._positions: dict[str, list[int]] = {}
        for i, b in enumerate(self.schedule):
            self._positions.setdefault(b, []).append(i)
        self.on_device: dict[str, int] = {}  # ledger: landed or in flight to device
        self.inflight: dict[str, object] = {}  # block -> Transition to device
        self.prefetched: set[str] = set()  # loaded ahead, not yet used
        self.accesses: list[Access] = []
        self.score_samples: list[tuple] = []  # (time, step, layer, {block: score}) of each adopted tick, for the trace
        self.counters = Counters()
        self.t = 0  # global access index
        self.step = 0
        self._check_fits()

    # ------------------------------------------------------------------ setup
    def _check_fits(self):
        check_fits(self.policy, self.device_bytes, self.budget, self.state_bytes)

    def place_initial(self):
        """Bring the policy's initial residents to the device, in order, while they fit; wait for all."""
        used = 0
        for b in self.policy.initial_resident():
            if b in self.on_device:
                continue
            need = self._bytes(b, self.policy.device_state(b))
            if used + need > self.budget:
                if b in self.policy.pinned:
                    raise BudgetError(f"pinned block '{b}' does not fit in the HBM budget")
                continue
            used += need
            self._load(b, "placement")
        for b in list(self.on_device):
            self.engine.wait(b)
        self._sample_peak()

    # ------------------------------------------------------------------ the schedule
    def forward(self, ids_BxT, cache: KVCache, pos: int):
        """One forward pass over the whole schedule; returns (logits [B, T, V], cache)."""
        ids = jnp.asarray(ids_BxT, jnp.int32)
        pos_arr = jnp.int32(pos)
        x = h = logits = None
        ks, vs = list(cache.k), list(cache.v)
        n = len(self.schedule)
        for i, block in enumerate(self.schedule):
            w = self.ensure(block)
            self.prefetch()
            kind = block.rsplit(".", 1)[-1]
            if i == 0:
                x = C.embed_lookup(w, ids, jnp.dtype(self.dtype).name)
            elif i == n - 1:
                logits = C.tied_head(w, h)
            elif kind == "attn":
                layer = self.layer_of[block]
                x, ks[layer], vs[layer] = C.attention(self.cfg, w, x, ks[layer], vs[layer], pos_arr)
            elif kind == "mlp":
                x = C.mlp(self.cfg, w, x)
                if (self.layer_of[block] + 1) % self.tick_every == 0:
                    self.maybe_tick()
            elif block == "final_norm":
                h = C.final_norm(self.cfg, w, x)
            else:
                raise AssertionError(f"no compute for block '{block}'")
            self.t += 1
        self.step += 1
        return logits, KVCache(ks, vs)

    def _record_scores(self):
        scores = self.policy.take_scores()
        if scores:
            self.score_samples.append((self.now(), self.step, self.layer_of[self.current()], scores))

    def now(self) -> float:
        """The executor's clock (wall seconds here; the simulator's modelled time there)."""
        return time.perf_counter()

    def ensure(self, block: str):
        """The block's weights on the device; a miss loads it now, an in-flight block is waited for."""
        t0 = self.now()
        hit = block in self.on_device
        if hit:
            if block in self.prefetched:
                self.prefetched.discard(block)
                self.counters.prefetch_useful += 1
            self.counters.hits += 1
        else:
            self.counters.misses += 1
            self._make_room(block, self._bytes(block, self.policy.device_state(block)), strict=True,
                            keep=self._window())
            self._load(block, "miss")
        w = self.engine.wait(block)  # records a stall event only when it had to wait
        if block in self.inflight:
            self.inflight.pop(block)
            self.on_device[block] = self.engine.representation(block).nbytes  # the landed arrays' real size
        self.policy.on_access(self.t, block)
        self._sample_peak()
        self.accesses.append(Access(self.t, self.step, self.layer_of[block], block, hit, t0, self.now(),
                                    self.engine.state(block).name))
        return w

    def prefetch(self):
        """Issue loads for the next `prefetch_depth` positions that are off device, if room can be made without
        evicting anything needed before them."""
        here, ahead = self.current(), self.upcoming()
        for j, u in enumerate(ahead):
            if u in self.on_device:
                continue
            horizon = {here, *ahead[: j + 1]}
            if not self._make_room(u, self._bytes(u, self.policy.device_state(u)), strict=False, keep=horizon):
                return
            self._load(u, "prefetch")
            self.prefetched.add(u)
            self.counters.prefetch_issued += 1

    def maybe_tick(self):
        t0 = time.perf_counter()
        targets = self.policy.tick(self.t)
        self.counters.controller_s += time.perf_counter() - t0
        self._record_scores()
        if targets:
            self.apply_targets(targets, getattr(self.policy, "reasons", None))

    def apply_targets(self, targets: dict, reasons: dict | None = None):
        """Carry out a policy's target states: evict what should leave, load (as prefetch) what should come.
        `reasons`: the controller's reason per block (SCORE, BUDGET, PREFETCH, ...), recorded on each transition."""
        why = {b: f"plan:{(reasons or {}).get(b, 'SCORE')}" for b in targets}
        for b, s in targets.items():
            s = State(int(s))
            if not s.on_device and b in self.on_device and b not in self.inflight:
                self._evict(b, why[b])
        keep = set(targets_on(targets)) | self._window()
        for b, s in targets.items():
            s = State(int(s))
            if not s.on_device:
                continue
            if b in self.on_device and b not in self.inflight and self.engine.state(b) != s:
                grow = self._bytes(b, s) - self.on_device[b]  # an on-device conversion (e.g. S0 -> S2)
                if grow <= 0 or self._make_room(b, grow, strict=False, keep=keep):
                    self.on_device[b] = max(self.on_device[b], self._bytes(b, s))
                    self.inflight[b] = self.engine.request(b, s, why[b])
            elif b not in self.on_device:
                if self._make_room(b, self._bytes(b, s), strict=False, keep=keep):
                    self._load(b, why[b])
                    self.prefetched.add(b)
                    self.counters.prefetch_issued += 1

    # ------------------------------------------------------------------ movement
    def _bytes(self, block: str, state) -> int:
        return self.state_bytes[block][State(int(state))]

    def current(self) -> str:
        """The block of the position being executed."""
        return self.schedule[self.t % len(self.schedule)]

    def upcoming(self) -> list[str]:
        """The next `prefetch_depth` positions' blocks, in order (a routed executor knows them only as it routes)."""
        n = len(self.schedule)
        return [self.schedule[(self.t + j) % n] for j in range(1, self.policy.prefetch_depth + 1)]

    def _window(self) -> set:
        """The blocks of the current position and the prefetch window: never evicted to make room."""
        return {self.current(), *self.upcoming()}

    def _load(self, block: str, reason: str):
        state = self.policy.device_state(block)
        self.on_device[block] = self._bytes(block, state)
        self.inflight[block] = self.engine.request(block, state, reason)

    def _evict(self, block: str, reason: str):
        if block in self.prefetched:  # loaded ahead and never used: wasted
            self.prefetched.discard(block)
            self.counters.prefetch_wasted_bytes += self.device_bytes[block]
        if block in self.inflight:
            self.engine.wait(block)
            self.inflight.pop(block, None)
        self.engine.request(block, self.homes[block], reason).result()  # kept home copy: no bytes move
        self.on_device.pop(block, None)

    def _make_room(self, block: str, need: int, *, strict: bool, keep=frozenset()) -> bool:
        used = sum(self.on_device.values())
        if used + need <= self.budget:
            return True
        candidates = [b for b in self.on_device if b != block and b not in keep and b not in self.inflight]
        order = self._victim_order(candidates)
        if not strict:
            # A prefetch may only evict blocks the schedule needs after the prefetched one.
            order = [v for v in order if self._next_use(v) > self._next_use(block)]
        freed, victims = 0, []
        for v in order:
            if used - freed + need <= self.budget:
                break
            victims.append(v)
            freed += self.on_device[v]
        if used - freed + need > self.budget:
            if strict:
                # Let in-flight loads land, then retry once with them as candidates.
                waiting = [b for b in self.inflight if b != block]
                for b in waiting:
                    self.engine.wait(b)
                    self.inflight.pop(b, None)
                if waiting:
                    return self._make_room(block, need, strict=True, keep=keep)
                raise BudgetError(f"cannot make room for '{block}' ({need} bytes) under the HBM budget of "
                                  f"{self.budget} bytes: {used} bytes are on device and the policy releases "
                                  f"only {freed}")
            return False
        for v in victims:
            self._evict(v, f"evict:{'miss' if strict else 'prefetch'}")
        return True

    def _victim_order(self, candidates: list) -> list:
        """The policy's eviction order over `candidates` (the simulator charges the host the time it takes)."""
        return self.policy.victim_order(self.t, candidates)

    def _next_use(self, block: str) -> int:
        """Positions until the schedule next reads `block` (1 = the next position; n = a full pass away)."""
        n = len(self.schedule)
        here = self.t % n
        return min(((p - here - 1) % n) + 1 for p in self._positions.get(block, (here - 1 + n,)))

    def _sample_peak(self):
        self.counters.peak_device_bytes = max(self.counters.peak_device_bytes, self.engine.bytes_in("device"))


def check_fits(policy, device_bytes: dict, budget: int, state_bytes: dict | None = None) -> None:
    """The budget must hold the pinned blocks (in the state the policy loads them) plus the largest block that has
    to stream through."""
    def held(b):
        return state_bytes[b][policy.device_state(b)] if state_bytes else device_bytes[b]

    pinned = sum(held(b) for b in policy.pinned)
    streamed = [device_bytes[b] for b in device_bytes if b not in policy.pinned]
    need = pinned + (max(streamed) if streamed else 0)
    if need > budget:
        raise BudgetError(f"the HBM budget of {budget} bytes cannot hold the blocks the policy keeps on device "
                          f"({pinned} bytes) plus the largest block it streams ({max(streamed) if streamed else 0} "
                          f"bytes)")


def targets_on(targets: dict):
    return [b for b, s in targets.items() if State(int(s)).on_device]


@dataclasses.dataclass(frozen=True)
class Generation:
    """Greedy tokens and the clock at each step boundary: `marks[0]` prefill starts, `marks[1]` it ends (the first
    decode step starts), `marks[k + 1]` decode step k ends. Steps follow each other without gaps."""

    tokens: list
    marks: tuple

    @property
    def prefill_s(self) -> float:
        return self.marks[1] - self.marks[0]

    @property
    def step_s(self) -> list:
        """Seconds of each decode step."""
        return [b - a for a, b in zip(self.marks[1:-1], self.marks[2:])]

    def measured_window(self) -> tuple[float, float, int]:
        """(start, end, steps) of the decode steps a summary times: all but the first (its warm-up), unless that is
        the only one."""
        first = 2 if len(self.marks) > 3 else 1
        return self.marks[first], self.marks[-1], len(self.marks) - 1 - first


def greedy_generate(executor, prompt_ids: list[int], new_tokens: int, on_step=None) -> Generation:
    """Prefill then greedy decode through the executor (anything with `forward(ids, cache, pos)`, `cfg`, `dtype`)."""
    cfg = executor.cfg
    cache = KVCache.zeros(cfg, 1, len(prompt_ids) + new_tokens, executor.dtype)
    marks = [time.perf_counter()]
    logits, cache = executor.forward(np.asarray([prompt_ids]), cache, 0)
    nxt = int(jnp.argmax(logits[0, -1]))
    marks.append(time.perf_counter())
    tokens = [nxt]
    pos = len(prompt_ids)
    for _ in range(new_tokens - 1):
        logits, cache = executor.forward(np.asarray([[nxt]]), cache, pos)
        nxt = int(jnp.argmax(logits[0, -1]))
        marks.append(time.perf_counter())
        tokens.append(nxt)
        pos += 1
        if on_step:
            on_step(len(tokens))
    return Generation(tokens, tuple(marks))
