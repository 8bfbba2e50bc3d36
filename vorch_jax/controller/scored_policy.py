"""The scored policy: the controller's jitted knapsack decides which blocks live on the device, and in which state.

Division of labour, so that every term does one job:
  * the tick (`state_update.tick`) chooses the *resident plan*: for each block a state on its ladder (S0, and with
    `lossy` S1/S2/S6, on device; its home S3/S4 off device) maximising Σ R(b, s)·q(b, s) under the plan budget,
    with guardrails and hysteresis. It runs every `tick_every_n_layers` layers on fresh ρ.
  * the ledger streams everything else, and every unprotected block is a candidate for eviction, the plan's
    included: a victim is the block whose *expected* next read lies furthest ahead (`Ledger.expected_next_uses`: the
    pass's exact distance on a dense plan, plus the passes a router is expected to skip an expert on a routed one).
    Belady's rule on what the runtime knows, not on the recorded future. On a dense model every block is read once a
    pass, and the optimum (`lower_bound.integral_optimum`, experiments/offline_optimum.py) keeps the device full
    and lets the set of missed blocks rotate pass by pass; a fixed resident set beside a reserved streaming area
    (what pinning the plan did, and `static`) pays the reserve in every pass. The plan then chooses each block's
    on-device state and the initial placement;
  * on a dense plan a prefetch may evict only blocks read in the last W positions
    (`prefetch_victims_read_within`): on a pass those are read furthest ahead, the blocks a miss of the prefetched
    one would evict too, so the load moves earlier without a reload. A prefetch that would evict a block the pass
    still needs is not issued: its benefit (one hidden load) is below its cost (a reload). W is chosen per run by
    replaying the dense pass under a clock of the measured link and the resident pass's compute (`prefetch_window`):
    the quickest rule within 1% of the fewest bytes or 2% over the LP bound. Against the baselines and the LP bound:
    experiments/bench_policies.py and experiments/results/bench_policies.txt.
Terms, all measured or configured, none keyword-guessed:
  ρ  decayed access counts of this run (access_stats.update_rho);
  λ  probability the block is needed within the next step: 1 for every block of a dense model (each token step reads
     all of them); the MoE router supplies it for experts;
  κ  from placement rules (`kappa`), else 1 for protected blocks and 0.5 otherwise;
  ψ  calibrated sensitivity (ΔKL at S2, `vorch calibrate`); the calibration also sets each lossy state's value loss
     from measured KL. A lossy run always has one (`runtime.inputs.quality_guard` measures it when none is stored), and
     `lossy_states` (the run's quality budget, `quality_budget.allocate`) limits each block's ladder to the lossy
     states whose calibrated ΔKL the budget can pay for. Only a simulation without a calibration allows every
     lossy state (its quality is not simulated) and then ψ is 0;
  δ  measured seconds of one decode-shaped matmul through each lossy format, minus full precision's;
  τ  the bytes a load moves over the measured link bandwidths (the calibration's, else probed at the start of the
     run): a block's compressed home's bytes where it keeps one (`quant.compressed_homes`), else full precision.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from vorch_jax.controller import state_ids as sid
from vorch_jax.controller.access_stats import update_rho
from vorch_jax.errors import BudgetError
from vorch_jax.controller.block_table import BlockTable
from vorch_jax.controller.pass_plan import kept_by_plan
from vorch_jax.controller.prefetch_window import Timing, choose_eviction_rule, victim_key
from vorch_jax.controller.score import ScoreWeights, score
from vorch_jax.controller.state_update import REASON_NAMES, TickParams, check_budget, commit, tick
from vorch_jax.tiers.state import State

from vorch_jax.policies.baselines import Policy

RHO_DECAY_PER_PASS = 0.9  # ρ forgets 10% per forward pass; per tick it decays by the pass's share of that


SCORE_SAMPLE_BLOCKS = 48  # blocks whose score each tick records for the trace (evenly spaced over the table)
MAX_QUIET_INTERVAL = 8  # a plan that stopped changing is re-planned every 2, 4, .. up to this many tick intervals


def sensitive_blocks(psi: dict | None, threshold: float, ids, forced) -> frozenset:
    """The blocks the ψ guardrail keeps above int8: calibrated sensitivity over the largest above `threshold` (none
    without a calibration; a rule's fixed state wins)."""
    psi_B = np.asarray([(psi or {}).get(b, 0.0) for b in ids], np.float64)
    if psi_B.max(initial=0.0) <= 0:
        return frozenset()
    return frozenset(b for b, p in zip(ids, psi_B) if p / psi_B.max() > threshold and b not in forced)


@functools.partial(jax.jit, static_argnames=("params",))
def _observe_and_tick(table, accessed_N, rho_decay, budget, weights, params, sample_K):
    """One dispatch per tick: fold the accesses into ρ, decide targets, commit them (dwell counters), and read the
    score R(b, s) of the sampled blocks `sample_K` in the state s the tick chose (what the trace's `score` records
    plot)."""
    table = table.replace(rho=update_rho(table.rho, accessed_N, rho_decay))
    target, reason, _ = tick(table, budget, weights, params)
    r_K = jnp.take_along_axis(score(table, weights)[sample_K], target[sample_K][:, None], axis=1)[:, 0]
    return commit(table, target), (target, reason, r_K)


class ScoredPolicy(Policy):
    name = "scored"
    prefetch_victims_read_within = 1  # the ledger: a prefetch evicts only blocks read in the last W positions
    window_replays: list = []  # the replays that chose it (`prefetch_window.choose_window`), dense plans
    _expected_next_uses = None  # blocks -> expected positions until their next reads, from the ledger running this
    victim_size_power = 0.0  # the victim key's size weight (`prefetch_window.victim_key`), dense plans
    _victim_bytes: dict = {}
    _plan = None  # the steady-state optimum's `PassPlan` (a cycle of passes), where the replay chose to follow it
    choice_s = 0.0  # the wall time of that choice (plans and replays), before the run's first pass
    _actionable = staticmethod(lambda changed: changed)  # the ledger's filter: which target changes it acts on
    lam_source = None  # () -> float32 [B]: λ for the next dispatched tick, where a router supplies it (the ledger)

    def __init__(self, ctx, cfg, *, state_bytes: dict, homes: dict, kinds: dict, layers: dict, placement: dict,
                 h2d_bytes_per_s: float, nvme_bytes_per_s: float, psi: dict | None = None,
                 delta: dict | None = None, lossy_loss: tuple | None = None, calibration: str | None = None,
                 lossy_states: dict | None = None, pass_compute_s: float | None = None,
                 load_s: dict | None = None, fresh_load_s: dict | None = None):
        super().__init__(ctx)
        self.h2d_bytes_per_s = h2d_bytes_per_s
        self.load_s = load_s  # {block: seconds} a load of its S0 takes alone, measured (None: bytes over the rate)
        self.fresh_load_s = fresh_load_s  # the same landing in new memory, where the run holds dropped memory
        self.pass_compute_s = pass_compute_s  # a resident decode pass's compute seconds (None: unmeasured)
        self.prefetch_depth = cfg.prefetch_depth
        self.passes = cfg.new_tokens  # passes the run will make (the prompt's, then one a decoded token after the first)
        self.bytes_weight = cfg.score.bytes_weight  # the price of a load's bytes beside its seconds (`_timing`)
        self.ids = list(ctx.block_ids)
        self.index = {b: i for i, b in enumerate(self.ids)}
        self.state_bytes = state_bytes
        B = len(self.ids)
        bps = np.zeros((B, sid.NUM_STATES), np.float64)
        for i, b in enumerate(self.ids):
            for s in (State.S0, State.S1, State.S2, State.S6):
                bps[i, int(s)] = state_bytes[b][s]
        allowed = np.zeros((B, sid.NUM_STATES), bool)
        allowed[:, sid.S0] = True
        if cfg.lossy and lossy_states is None:  # no quality budget (a simulation without a calibration)
            allowed[:, [sid.S1, sid.S2, sid.S6]] = True
        elif cfg.lossy:  # the lossy states the run's quality budget allows each block (`quality_budget.allocate`)
            for i, b in enumerate(self.ids):
                allowed[i, [int(s) for s in lossy_states.get(b, ())]] = True
        for i, b in enumerate(self.ids):
            allowed[i, int(homes[b])] = True  # a block leaves the device only for its home
        for i, b in enumerate(self.ids):
            if b in ctx.forced:  # a rule fixed this block's on-device state: no other device state (it is
                allowed[i, [sid.S0, sid.S1, sid.S2, sid.S6]] = False  # protected, so it never stays home)
                allowed[i, int(ctx.forced[b])] = True
        # Guardrail on quality: a block whose calibrated sensitivity ψ (normalised by the largest) exceeds
        # guardrail.psi_threshold may not be held below int8 (S2 and S6 leave its ladder); going off device is lossless
        # and stays allowed. Without a calibration there is no ψ, and this guardrail has nothing to act on.
        self.sensitive = sensitive_blocks(psi, cfg.guardrail.psi_threshold, self.ids, ctx.forced)
        hot = np.asarray([b in self.sensitive for b in self.ids])
        allowed[hot, sid.S2] = False
        allowed[hot, sid.S6] = False
        protected = [b in ctx.protected for b in self.ids]
        floor = [int(ctx.forced[b]) if b in ctx.forced else
                 State.parse(placement[b].floor).value if placement[b].floor else (sid.S0 if p else sid.S6)
                 for b, p in zip(self.ids, protected)]
        kappa = [placement[b].kappa if placement[b].kappa is not None else (1.0 if p else 0.5)
                 for b, p in zip(self.ids, protected)]
        delta_B7 = np.zeros((B, sid.NUM_STATES))
        for i, b in enumerate(self.ids):
            for s, sec in (delta or {}).get(kinds[b], {}).items():
                delta_B7[i, int(s)] = max(0.0, sec)
        s0 = bps[:, sid.S0]
        # τ: the seconds a load from the block's home takes, in the representation that moves: its compressed
        # home's where it keeps one (read from NVMe first if it lives there), else full precision from S3 or S4.
        streamed = np.asarray([bps[i, int(ctx.packed[b])] if b in ctx.packed else s0[i] for i, b in enumerate(self.ids)])
        packed_on = np.asarray([ctx.packed_where.get(b, "host") if b in ctx.packed else "" for b in self.ids])
        nvme_read = streamed / nvme_bytes_per_s
        tau = np.zeros((B, sid.NUM_STATES))
        tau[:, sid.S3] = np.where(packed_on == "disk", nvme_read, 0.0) + streamed / h2d_bytes_per_s
        tau[:, sid.S4] = np.where(packed_on == "host", 0.0, nvme_read) + streamed / h2d_bytes_per_s
        self.weights = ScoreWeights.make(w1=cfg.score.w1, w2=cfg.score.w2, w3=cfg.score.w3, w4=cfg.score.w4,
                                         alpha=cfg.score.alpha, beta=cfg.score.beta)
        self.calibration = calibration  # which stored calibration supplied ψ, δ and the value loss (None: none)
        extra = {} if lossy_loss is None else {"lossy_loss": tuple(lossy_loss)}
        self.params = TickParams(min_dwell=cfg.guardrail.min_dwell_ticks, margin=cfg.guardrail.switch_margin, **extra)
        self.table = BlockTable.from_rows(
            state=[int(homes[b]) for b in self.ids], bytes_per_state=bps, kind=[kinds[b] for b in self.ids],
            layer=[layers[b] for b in self.ids], protected=protected, floor_state=floor, allowed=allowed,
            lossy=cfg.lossy, rho=np.zeros(B), lam=np.ones(B), kappa=kappa,
            psi=[(psi or {}).get(b, 0.0) for b in self.ids], delta=delta_B7, tau=tau,
            host_bytes=[s0[i] if homes[b] == State.S3 else 0.0 for i, b in enumerate(self.ids)], names=self.ids,
        )
        self.targets: dict[str, State] = {}
        self.plan_budget = self._plan_budget()
        try:
            check_budget(self.table, self.plan_budget)
        except ValueError as e:
            raise BudgetError(f"scored policy: {e}") from None
        self._accessed: list[int] = []
        # accesses between two ticks never exceed MAX_QUIET_INTERVAL passes; a fixed size: one compile
        self._pad = 2 * len(ctx.schedule) * MAX_QUIET_INTERVAL
        n_layers = max(layers.values())
        ticks_per_pass = max(1, n_layers // max(1, cfg.tick_every_n_layers))
        # Decay per tick such that a whole pass decays by RHO_DECAY_PER_PASS: on a cyclic schedule ρ̂ then varies by
        # about 1% across the pass instead of rotating with recency (which would churn the plan every tick).
        self._rho_decay = np.float32(RHO_DECAY_PER_PASS ** (1.0 / ticks_per_pass))
        self.targets: dict[str, State] = {}
        self._rho_decay_dev = jnp.float32(self._rho_decay)  # device scalars: the jit fast path, no per-tick conversion
        # ρ's decay over k tick intervals (a quiet plan skips k - 1 of them), k = 1 .. MAX_QUIET_INTERVAL
        self._rho_decay_k = [None] + [jnp.float32(self._rho_decay ** k) for k in range(1, MAX_QUIET_INTERVAL + 1)]
        self._interval = 1  # tick intervals between two ticks: doubles while the plan does not change
        self._skipped = 0  # intervals skipped since the last tick
        self.ticks_quiet = 0  # tick intervals skipped because the plan had stopped changing
        self._plan_budget_dev = jnp.float32(self.plan_budget)
        self._pending = None
        self.ticks_deferred = 0  # ticks skipped because the previous one had not finished on the device
        self.reasons: dict[str, str] = {}
        n_sample = min(B, SCORE_SAMPLE_BLOCKS)
        self._sample = np.unique(np.linspace(0, B - 1, n_sample).round().astype(np.int32))
        self._sample_dev = jnp.asarray(self._sample)
        self._new_scores: dict[str, float] | None = None  # the adopted tick's R(b, chosen state), sampled blocks
        self.decisions: dict[str, int] = {}  # reason name -> block decisions over all ticks (KEEP included)
        # The first plan places blocks on an empty device: hysteresis (a margin over the current, off-device state)
        # is about not bouncing between plans, so it does not apply to the first one.
        self._dispatch(dataclasses.replace(self.params, margin=0.0))
        self._adopt()
        _observe_and_tick(self.table, np.full(self._pad, -1, np.int32), self._rho_decay_dev, self._plan_budget_dev,
                          self.weights, self.params, self._sample_dev)[1][0].block_until_ready()  # compile it now

    def _plan_budget(self) -> int:
        """The HBM budget less a streaming reserve: room for the `prefetch_depth + 1` largest unprotected blocks."""
        free = sorted((self.ctx.device_bytes[b] for b in self.ids if b not in self.ctx.protected), reverse=True)
        reserve = sum(free[: self.prefetch_depth + 1])
        protected = sum(self.held_bytes(b) for b in self.ctx.protected)
        # A tight budget shrinks the reserve (fewer blocks in flight at once) before it starves the protected set;
        # if not even the largest streamed block fits beside the protected set, check_fits says so.
        reserve = min(reserve, max(self.ctx.budget_bytes - protected, 0))
        return max(1, self.ctx.budget_bytes - reserve)

    def _dispatch(self, params: TickParams | None = None) -> None:
        """Start a tick on the device; nothing waits for it here."""
        if self.lam_source is not None:
            self.table = self.table.replace(lam=jnp.asarray(self.lam_source(), jnp.float32))
            self.lam_source = None
        accessed = np.full(self._pad, -1, np.int32)
        accessed[: len(self._accessed[: self._pad])] = self._accessed[: self._pad]
        self._accessed = []
        decay = self._rho_decay_k[min(self._skipped + 1, MAX_QUIET_INTERVAL)]
        self.table, self._pending = _observe_and_tick(self.table, accessed, decay,
                                                      self._plan_budget_dev, self.weights, params or self.params,
                                                      self._sample_dev)

    def _adopt(self) -> dict:
        """Take the targets of the tick dispatched last time; returns the blocks whose target changed."""
        if self._pending is None:
            return {}
        target, reason, r_K = (np.asarray(a) for a in self._pending)  # hand-off: arrays beat an io_callback
        self._pending = None
        self._new_scores = {self.ids[i]: float(r) for i, r in zip(self._sample, r_K)}
        self.reasons = {b: REASON_NAMES[int(reason[i])] for i, b in enumerate(self.ids)}
        for r in reason:
            self.decisions[REASON_NAMES[int(r)]] = self.decisions.get(REASON_NAMES[int(r)], 0) + 1
        new = {b: State(int(target[i])) for i, b in enumerate(self.ids)}
        changed = {b: s for b, s in new.items() if self.targets.get(b) != s}
        self.targets = new
        return changed

    def initial_resident(self):
        """Protected blocks, then the pass order, not the plan's set: which blocks the rotation streams follows from
        where it starts, and a start from the plan's set (small blocks first, the highest value per byte) settles
        into streaming MLPs only, which moves more (SmolLM2, lossless: 1.056 / 1.064x the LP bound at budgets 0.5 /
        0.8 against 1.010 / 1.015x from the pass order, this CPU, 2026-12-03)."""
        protected = [b for b in self.ids if b in self.ctx.protected]
        return protected + [b for b in dict.fromkeys(self.ctx.schedule) if b not in self.ctx.protected]

    def device_state(self, block):
        """The plan's on-device state for the block; a block the plan leaves home streams in its compressed home's
        state where it keeps one (what the link carries), else in S0."""
        s = self.targets.get(block, self.ctx.forced.get(block, State.S0))
        return s if s.on_device else self.ctx.packed.get(block, State.S0)

    def largest_load(self, block):
        """The plan may bring any block back in S0, a compressed home or not."""
        return self.state_bytes[block][State.S0]

    def on_access(self, t, block):
        super().on_access(t, block)
        self._accessed.append(self.index[block])
        if self._plan is not None:  # where in the plan's cycle of passes it was read (None: a lookup outside it)
            self._plan_read[block] = self._cursor.cycle_position(self._plan.passes)

    def run_by(self, executor):
        """The ledger's expected next use orders the victims; on a dense plan (its passes known before the run) the
        prefetch window W is chosen by replaying a few passes (`prefetch_window`). A routed plan's passes are not
        known ahead: no window (W = 0), the rule measured for the MoE (W = 1 there: 1.309 / 1.215x the bound at 25 /
        50% of the expert bytes, against 1.320 / 1.212x without)."""
        self._expected_next_uses = executor.expected_next_uses
        self._actionable = executor.actionable_targets
        if executor.routed:
            self.prefetch_victims_read_within = 0
            return
        device_bytes = {b: executor._bytes(b, self.device_state(b)) for b in self.ids}
        self._cursor, self._plan_read = executor.cursor, {}
        pass_blocks = [p.block for p in executor.cursor.every_pass]
        t0 = time.perf_counter()
        best, self.window_replays, self._plan = choose_eviction_rule(
            pass_blocks, device_bytes, executor.budget, self.ctx.protected, self.initial_resident(),
            self.prefetch_depth, self.passes, self._timing(pass_blocks, device_bytes))
        self.choice_s = time.perf_counter() - t0
        self.prefetch_victims_read_within, self.victim_size_power = best.window, best.size_power
        self.prefetch_window_counts = best.counts
        self._victim_bytes = device_bytes

    def _timing(self, pass_blocks, device_bytes) -> Timing | None:
        """The replay's clock: loads one at a time, each taking its block's measured load seconds (`load_s`, or
        `fresh_load_s` where no dropped block of its size left memory to land in; without them, its bytes over the
        measured host->device rate), and a position's compute its block's share of the pass's device bytes times
        the resident pass (a decode step reads its weights once)."""
        if not self.pass_compute_s or not np.isfinite(self.pass_compute_s) or not self.h2d_bytes_per_s:
            return None
        total = sum(device_bytes[b] for b in pass_blocks)
        compute_s = {b: self.pass_compute_s * device_bytes[b] / total for b in set(pass_blocks)}
        timing = (Timing(dict(self.load_s), compute_s, self.fresh_load_s) if self.load_s is not None
                  else Timing.at_rate(self.h2d_bytes_per_s, device_bytes, compute_s))
        return timing.with_bytes_weight(self.bytes_weight, device_bytes)

    def _kept(self, block) -> bool:
        return kept_by_plan(self._plan, block, self._plan_read.get(block), self._victim_bytes[block])

    def prefetch_may_evict(self, block) -> bool:
        """Following the optimum's plan (`pass_plan.PassPlan`), a prefetch evicts only what it lets go."""
        return self._plan is None or not self._kept(block)

    def victim_order(self, t, candidates):
        """Unprotected blocks, the one whose expected next read lies furthest ahead first (the module docstring),
        weighed by size^`victim_size_power` where the replay chose so (`prefetch_window.victim_key`), or where it
        chose the optimum's plan, the blocks the plan lets go first."""
        free = [b for b in candidates if b not in self.ctx.protected]
        if self._expected_next_uses is None:  # not run by a ledger: most recently used first (a pass's furthest)
            return sorted(free, key=lambda b: -self.last_use.get(b, -1))
        uses = self._expected_next_uses(free)
        if self._plan is not None:  # what the optimum's plan lets go first, each group furthest next read first
            return [free[i] for i in sorted(range(len(free)), key=lambda i: (self._kept(free[i]), -uses[i]))]
        p = self.victim_size_power
        if not p:  # furthest-next-use (routed plans always): no sizes needed
            return [free[i] for i in sorted(range(len(free)), key=lambda i: -uses[i])]
        size = self._victim_bytes
        return [free[i] for i in sorted(range(len(free)), key=lambda i: -victim_key(uses[i], size[free[i]], p))]

    def take_scores(self):
        scores, self._new_scores = self._new_scores, None
        return scores

    def settle(self):
        if self._pending is not None:
            jax.block_until_ready(self._pending)

    def tick(self, t):
        """Adopt the previous tick's decisions and dispatch the next one. The device runs computations in order, so
        reading a tick's result at once would wait for every layer queued before it (measured: 11% of wall time on
        CPU). The host reads a tick only once it is ready (`is_ready`), a few layers later; until then it keeps the
        current plan and dispatches nothing new, so the controller never makes the host wait. A tick that changed no
        target doubles the interval to the next one (up to MAX_QUIET_INTERVAL intervals; ρ decays by the intervals
        it spans), and a change brings it back to one: a settled plan costs next to nothing, a moving one (routing,
        a budget change) is followed every interval. Only changes the ledger acts on count (`actionable_targets`):
        a routed plan's λ moves with every layer, but a lossless routed run acts on none of its targets (the
        ledger's eviction order decides there), and its ticks cost 8% of the decode step on this CPU (the
        shared-expert MoE at 50% of experts: 15.2 against 16.4 tok/s ticking once a pass)."""
        if self._pending is not None and not self._pending[0].is_ready():
            self.ticks_deferred += 1
            return {}
        if self._skipped + 1 < self._interval:  # a quiet plan: this interval passes without a tick
            self._skipped += 1
            self.ticks_quiet += 1
            return {}
        changed = self._adopt()
        self._interval = 1 if self._actionable(changed) else min(2 * self._interval, MAX_QUIET_INTERVAL)
        self._dispatch()
        self._skipped = 0
        return changed
