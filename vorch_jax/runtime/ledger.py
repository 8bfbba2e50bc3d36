"""The ledger: which blocks are on the device (landed or in flight), under the HBM budget, and every access.

The budget is kept by a record of device bytes per block (landed or in flight to the device); the bytes are the
real arrays' sizes the engine reports, and `peak_device_bytes` is sampled from the engine's live device arrays.
Evicting a block whose lossless home copy is kept off device (the engine's `keep_home`) frees its device arrays
without traffic, as in every offloading runtime where weights are read-only. A position's order is:

    ensure(block)   hit, or load it now and wait (a timed stall)
    prefetch()      loads for the next `prefetch_depth` known positions, evicting only blocks needed after them
                    (again in `done()`, once the position has computed and its block may leave)
    (compute)
    after_layer()   every N layers, the policy's tick (the scored controller) and its targets

The engine is the real movement engine or the simulator's (same interface); `now()` is the backend's clock.

Routed plans add the router's bookkeeping (`routing.py`'s statistics feed λ and the MoE policy's expected next
use): known positions only as routers reveal them, speculative loads of the next layer's predicted experts, and an
initial placement of the protected blocks only (filling the budget with experts in layer order would load experts
no token may select). Reads that load nothing (an op computed in place, a lookup's gather) are `reads_in_place`'s.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import numpy as np

from vorch_jax.errors import BudgetError
from vorch_jax.tiers.state import State

from vorch_jax.runtime.access import Access
from vorch_jax.runtime.reads_in_place import ReadsInPlace
from vorch_jax.runtime.routing import RouterStats, speculation_record


@dataclasses.dataclass
class Counters:
    hits: int = 0
    misses: int = 0
    prefetch_issued: int = 0
    prefetch_useful: int = 0
    prefetch_wasted_bytes: int = 0
    controller_s: float = 0.0
    peak_device_bytes: int = 0
    in_place_loads: int = 0  # background loads of blocks just computed in place
    lookups_on_device: int = 0  # token-routed lookups that read their rows on the device (`Ledger._gather`)
    lookups_in_place: int = 0  # ... and in host memory, where their block had not landed
    lookups_loaded: int = 0  # ... and on the device after a load, where their block had no copy in host DRAM


def check_fits(policy, device_bytes: dict, budget: int, state_bytes: dict | None = None,
               host_only=frozenset()) -> None:
    """The budget must hold the pinned blocks (in the state the policy loads them) plus the largest block that has
    to stream through (the most bytes the policy may load it in: `Policy.largest_load`); blocks computed on the
    host (`host_only`) never stream."""
    def held(b):
        return state_bytes[b][policy.device_state(b)] if state_bytes else device_bytes[b]

    pinned = sum(held(b) for b in policy.pinned)
    streamed = [policy.largest_load(b) if state_bytes else device_bytes[b] for b in device_bytes
                if b not in policy.pinned and b not in host_only]
    need = pinned + (max(streamed) if streamed else 0)
    if need > budget:
        raise BudgetError(f"the HBM budget of {budget} bytes cannot hold the blocks the policy keeps on device "
                          f"({pinned} bytes) plus the largest block it streams ({max(streamed) if streamed else 0} "
                          f"bytes)")


def targets_on(targets: dict):
    return [b for b, s in targets.items() if State(int(s)).on_device]


class Ledger(ReadsInPlace):
    """The residency of a run under a budget (see the module docstring). `info`: block id -> BlockInfo."""

    def __init__(self, info: dict, cursor, engine, policy, *, budget_bytes: int, device_bytes: dict, homes: dict,
                 state_bytes: dict, tick_every_n_layers: int, now=time.perf_counter, settle_ticks: bool = False,
                 speculative: bool = False, speculation_basis: dict | None = None, spec_min_prob: float = 0.45,
                 eager_plan_loads: bool | None = None, in_place=None):
        self.info, self.cursor, self.engine, self.policy = info, cursor, engine, policy
        self.budget = int(budget_bytes)
        self.device_bytes = dict(device_bytes)  # block -> full-precision (S0) bytes on device
        self.state_bytes = state_bytes  # block -> {State: device bytes}
        self.homes = dict(homes)  # block -> State.S3 | State.S4 (its lossless home off device)
        self.tick_every = max(1, tick_every_n_layers)
        self.now, self.settle_ticks = now, settle_ticks
        self.on_device: dict[str, int] = {}  # landed or in flight to device
        self.inflight: dict[str, object] = {}  # block -> transition to device
        self.prefetched: set[str] = set()  # loaded ahead, not yet used
        self.accesses: list[Access] = []
        self.score_samples: list[tuple] = []  # (time, step, layer, {block: score}) of each adopted tick
        self.counters = Counters()
        self.t = 0  # global position index
        self.step = 0
        self.routed = cursor.routed
        # Routed plans: an expert loaded on plan entry may well be evicted before its router selects it (bytes for
        # nothing), so the plan there only decides what is kept; on-device conversions are applied either way.
        self.eager_plan_loads = (not self.routed) if eager_plan_loads is None else eager_plan_loads
        self.speculative = speculative and self.routed
        self.speculation_basis = dict(speculation_basis or {})  # what `inputs.speculation_choice` read
        self.spec_min_prob = spec_min_prob
        self.router = RouterStats(info, cursor, policy.ctx.block_ids) if self.routed else None
        self.spec = {"predicted": 0, "actual": 0, "predicted_and_actual": 0, "issued": 0, "issued_bytes": 0,
                     "used": 0, "loads": []}  # loads: (layer, block) of every speculative load issued
        self._spec_pending: dict[str, int] = {}  # block -> layer, speculatively loaded and not yet read
        self._spec_pred: tuple[int, np.ndarray] | None = None
        self.spec_trace: dict[tuple[int, int], tuple] = {}  # (pass, layer) -> (predicted ids, mean probs), as made
        self.in_place = in_place  # an `in_place.InPlaceChoice`, or None: every read on the device
        self.host_only = in_place.host_only if in_place is not None else frozenset()  # never loaded
        self.requested_at: dict[str, float] = {}  # block -> when its load in flight was requested
        self.tokens = 1  # new tokens of the pass running (what an op in place is priced for)
        self._lookups = any(cursor.spec.token_routed(p) for p in cursor.skeleton)
        self._gathered = False  # the position running is a lookup `_gather` served
        policy.run_by(self)
        check_fits(policy, self.device_bytes, self.budget, self.state_bytes, self.host_only)

    # ------------------------------------------------------------------ placement
    def place_initial(self):
        """Bring the policy's initial residents to the device, in order, while they fit; wait for all. A routed plan
        places only the protected blocks (and a static placement's fixed set)."""
        keep = None
        if self.routed:
            keep = self.policy.pinned if self.policy.name == "static" else self.policy.ctx.protected
        used = 0
        for b in self.policy.initial_resident():
            if b in self.on_device or b in self.host_only or (keep is not None and b not in keep):
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

    # ------------------------------------------------------------------ one position
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
        w = self._bring(block, "miss")
        self.policy.on_access(self.t, block)
        self.accesses.append(Access(self.t, self.step, self.info[block].layer, block, hit, t0, self.now(),
                                    self.engine.state(block).name))
        if block in self._spec_pending:  # a speculative load of it was used
            self._spec_pending.pop(block)
            self.spec["used"] += 1
        return w

    def _bring(self, block: str, reason: str):
        """The block's weights on the device: loaded now where it is off device (room made as for a miss, the load
        recorded with `reason`), waited for where it is in flight (a stall event only where it had to wait)."""
        if block not in self.on_device:
            self._make_room(block, self._bytes(block, self.policy.device_state(block)), strict=True,
                            keep=self._window())
            self._load(block, reason)
        w = self.engine.wait(block)
        if block in self.inflight:
            self.inflight.pop(block)
            self.requested_at.pop(block, None)
            self.on_device[block] = self.engine.representation(block).nbytes  # the landed arrays' real size
        self._sample_peak()
        return w

    def weights_of(self, block: str):
        return self.engine.get(block)

    def begin_pass(self, tokens: int) -> None:
        self.tokens = int(tokens)

    def fetch(self, block: str):
        """ensure, then prefetch: what the runtime does before a position computes; or, where the run computes it
        in place (`in_place.py`), an `InPlace` for the backend instead of device weights. A token-routed lookup
        reads its rows where the block is (`_gather`)."""
        if self._lookups and self.cursor.spec.token_routed(self.cursor.current):
            w = self._gather(block)
            self.prefetch()
            return w
        if self.in_place is not None and self._chooses_in_place(block):
            w = self._read_in_place(block)
        else:
            w = self.ensure(block)
        self.prefetch()
        return w

    def done(self):
        """The position computed: the next one begins. Its block may now leave, so the prefetch runs again: on a
        full device (the scored policy's rotation keeps it full) a load can only start once room is freed, and
        waiting for the next position's prefetch started each load one position ahead of its use. Measured on
        SmolLM2, lossless, 16 tokens, 3 rounds, medians, this CPU: scored 9.60 / 12.26 / 17.89 tok/s at budgets
        0.3 / 0.5 / 0.8 before, 10.92 / 12.86 / 19.76 after, the same bytes (static-prefetch 10.26 / 12.91 /
        19.09); a load's lead before its use was 0.8 ms against static-prefetch's 2.2 ms. A lookup `_gather`
        served is no read: the position count does not advance."""
        if self._gathered:
            self._gathered = False
        else:
            self.t += 1
        self.prefetch(computed=True)

    def prefetch(self, computed: bool = False):
        """Issue loads for the next `prefetch_depth` known positions that are off device, if room can be made
        without evicting anything needed before them; `computed`: the current position has run, so its block is
        no longer kept for it."""
        here, ahead = self.current(), self.upcoming()
        for j, u in enumerate(ahead):
            if u in self.on_device or u in self.host_only:
                continue
            if self.in_place is not None and not self.in_place.loads_pay(self.cursor.known()[j], self.tokens,
                                                                          self.device_bytes[u]):
                continue  # the read runs in place before a load could land
            horizon = set(ahead[: j + 1]) if computed else {here, *ahead[: j + 1]}
            if not self._make_room(u, self._bytes(u, self.policy.device_state(u)), strict=False, keep=horizon,
                                   read_within=self.policy.prefetch_victims_read_within):
                return
            self._load(u, "prefetch")
            self.prefetched.add(u)
            self.counters.prefetch_issued += 1

    def after_layer(self, layer: int):
        """Layer `layer`'s feed-forward finished: every `tick_every_n_layers` layers, the policy re-plans."""
        if self.routed:
            self.cursor.unselected = set()
        if (layer + 1) % self.tick_every == 0:
            if self.routed:
                self.set_lambda(layer + 1)
            self.maybe_tick()

    def maybe_tick(self):
        if self.settle_ticks:
            self.policy.settle()  # on a modelled clock the previous tick has long finished, as in real runs
        t0 = time.perf_counter()
        targets = self.policy.tick(self.t)
        self.counters.controller_s += time.perf_counter() - t0
        scores = self.policy.take_scores()
        if scores:
            self.score_samples.append((self.now(), self.step, self.info[self.current()].layer, scores))
        if targets:
            self.apply_targets(targets, getattr(self.policy, "reasons", None))

    def end_pass(self):
        self.step += 1
        self._spec_pending.clear()  # a prediction for a pass that ended: no longer pending

    # ------------------------------------------------------------------ the policy's targets
    def apply_targets(self, targets: dict, reasons: dict | None = None):
        """Carry out a policy's target states: evict what should leave, load (as prefetch) what should come.
        `reasons`: the controller's reason per block (SCORE, BUDGET, PREFETCH, ...), recorded on each transition."""
        targets = self.actionable_targets(targets)
        if not targets:
            return
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

    def actionable_targets(self, targets: dict) -> dict:
        """The targets `apply_targets` would act on: a routed plan's only where a block on the device changes its
        on-device state (it never loads or evicts for the plan: `eager_plan_loads`), never a block computed on the
        host. The scored policy ticks less often while none of its changes is actionable."""
        if not self.eager_plan_loads:
            targets = {b: s for b, s in targets.items() if b in self.on_device and State(int(s)).on_device
                       and self.engine.state(b) != State(int(s))}
        return {b: s for b, s in targets.items() if b not in self.host_only}

    # ------------------------------------------------------------------ movement
    def _bytes(self, block: str, state) -> int:
        return self.state_bytes[block][State(int(state))]

    def current(self) -> str:
        """The block of the position being executed."""
        p = self.cursor.current
        return p.block if p is not None else self.cursor.skeleton[-1].block

    def upcoming(self) -> list[str]:
        """The next `prefetch_depth` known positions' blocks, in order."""
        return self.cursor.ahead(self.policy.prefetch_depth)

    def _window(self) -> set:
        """The blocks of the current position and the prefetch window: never evicted to make room."""
        return {self.current(), *self.upcoming()}

    def _load(self, block: str, reason: str):
        state = self.policy.device_state(block)
        self.on_device[block] = self._bytes(block, state)
        self.inflight[block] = self.engine.request(block, state, reason)
        self.requested_at[block] = self.now()

    def _evict(self, block: str, reason: str):
        self._spec_pending.pop(block, None)  # evicted before its layer read it: not a used prefetch
        if block in self.prefetched:  # loaded ahead and never used: wasted
            self.prefetched.discard(block)
            self.counters.prefetch_wasted_bytes += self.on_device[block]  # the bytes that load moved
        if block in self.inflight:
            self.engine.wait(block)
            self.inflight.pop(block, None)
        self.on_device.pop(block, None)  # first: the room its device memory leaves may hold it (`free_bytes`)
        self.engine.request(block, self.homes[block], reason).result()  # kept home copy: no bytes move

    def _make_room(self, block: str, need: int, *, strict: bool, keep=frozenset(), read_within: int = 0) -> bool:
        """Evict the policy's victims until `need` bytes fit. strict (a miss): must succeed. Otherwise (a prefetch)
        only blocks needed after `block` may go, and with `read_within` = W > 0 only if every victim was read at
        most W reads ago (`Policy.reads_ago`): on a pass, the blocks read furthest ahead, those a miss of `block`
        would evict too."""
        used = sum(self.on_device.values())
        if used + need <= self.budget:
            return True
        candidates = [b for b in self.on_device if b != block and b not in keep and b not in self.inflight]
        order = self.policy.victim_order(self.t, candidates)
        if not strict:  # every candidate's next use at once (one walk of what is known), the prefetched block's last
            *uses, nxt = self.cursor.next_uses(order + [block])
            later = {v for v, u in zip(order, uses) if u > nxt}
        freed, victims = 0, []
        for v in order:
            if used - freed + need <= self.budget:
                break
            if not strict and v not in later:
                continue  # a prefetch may only evict blocks needed after the prefetched one
            if not strict and not self.policy.prefetch_may_evict(v):
                continue
            victims.append(v)
            freed += self.on_device[v]
        if not strict and read_within and any(self.policy.reads_ago(v, self.t) > read_within for v in victims):
            return False  # a victim the pass may still need: not worth a prefetch (ScoredPolicy's docstring)
        if used - freed + need > self.budget:
            if strict:
                # Let in-flight loads land, then retry once with them as candidates.
                waiting = [b for b in self.inflight if b != block]
                for b in waiting:
                    self.engine.wait(b)
                    self.inflight.pop(b, None)
                if waiting:
                    return self._make_room(block, need, strict=True, keep=keep)
                if keep:  # the prefetch window's blocks are hopes, this one is needed now: they may go
                    return self._make_room(block, need, strict=True)
                raise BudgetError(f"cannot make room for '{block}' ({need} bytes) under the HBM budget of "
                                  f"{self.budget} bytes: {used} bytes are on device and the policy releases "
                                  f"only {freed}")
            return False
        for v in victims:
            self._evict(v, f"evict:{'miss' if strict else 'prefetch'}")
        return True

    def free_bytes(self) -> int:
        """Device bytes the budget leaves free: what the engine may hold of dropped blocks' memory for the next
        loads (`MovementEngine.hold_dropped_memory`)."""
        return self.budget - sum(self.on_device.values())

    def _sample_peak(self):
        self.counters.peak_device_bytes = max(self.counters.peak_device_bytes, self.engine.bytes_in("device"))

    # ------------------------------------------------------------------ routing (routed plans)
    def observe_routing(self, layer: int, selected_E: np.ndarray) -> None:
        """Layer `layer`'s router chose `selected_E` (bool [E]): the statistics, and the prediction made a layer ago."""
        self.router.observe(layer, selected_E)
        if self._spec_pred is not None and self._spec_pred[0] == layer:  # score the prediction made a layer ago
            pred = self._spec_pred[1]
            self.spec["predicted"] += int(pred.sum())
            self.spec["actual"] += int(selected_E.sum())
            self.spec["predicted_and_actual"] += int((pred & selected_E).sum())
        self._spec_pred = None

    def speculation_gate(self, layer: int) -> str | None:
        """The router block that predicts layer + 1's experts after layer `layer` routed, or None (speculation off,
        the last layer, or that router not sitting on device: speculation never loads a router)."""
        nxt = self.cursor.route_of_layer.get(layer + 1)
        if not self.speculative or nxt is None or nxt.block not in self.on_device or nxt.block in self.inflight:
            return None
        return nxt.block

    def observe_speculation(self, layer: int, predicted_E: np.ndarray, probs_E: np.ndarray) -> None:
        """Layer `layer`'s router, applied a layer early, predicted `predicted_E` (bool [E]) with mean probabilities
        `probs_E`: update P(selected) and load the sure predictions now."""
        self._spec_pred = (layer, predicted_E)
        self.spec_trace[(self.step, layer)] = speculation_record(predicted_E, probs_E)
        self.router.observe_speculation(layer, probs_E)
        sure = predicted_E & (probs_E >= self.spec_min_prob)
        held = {p.expert: p.block for p in self.cursor.spec.experts(layer, np.ones(len(predicted_E), bool))}
        for e in np.flatnonzero(sure)[np.argsort(-probs_E[sure])]:
            if int(e) in held:  # a mesh device holds only its share of the experts
                self._speculative_load(layer, held[int(e)])

    def _speculative_load(self, layer: int, block: str):
        if block in self.on_device or block in self.host_only:
            return
        need = self._bytes(block, self.policy.device_state(block))
        if not self._make_room(block, need, strict=False, keep=self._window() | {block}):
            return
        self._load(block, "prefetch:speculative")
        self.prefetched.add(block)
        self.counters.prefetch_issued += 1
        self._spec_pending[block] = layer
        self.spec["issued"] += 1
        self.spec["issued_bytes"] += need
        self.spec["loads"].append((layer, block))

    def expected_next_uses(self, blocks) -> list[float]:
        """Expected positions until each of `blocks` is next read (the scored policy's eviction order), in one pass
        over what the cursor knows: the cursor's distance, plus, for an expert not known to come, the passes its
        router is expected to skip it (`RouterStats`). The eviction order asks this again and again: the cursor keeps
        its distances for a position, the router its waits for its current P(selected)."""
        d = self.cursor.next_uses(blocks)
        if self.router is None:
            return d
        return [x + skip for x, skip in zip(d, self.router.expected_skips(blocks))]

    def set_lambda(self, current_layer: int):
        """Hand the scored policy λ for a tick at `current_layer` (other policies have no table: nothing to do). It
        is computed only if a tick is dispatched before the next layer's: most are deferred or quiet, and writing λ
        into the table at every one cost 0.09 s of a 2.5 s routed decode under cProfile (shared-expert MoE, 25%)."""
        if getattr(self.policy, "table", None) is not None:
            self.policy.lam_source = functools.partial(self.router.lam_for_tick, current_layer)
