"""The routed executor: the MoE model's forward pass under an HBM budget, with the router choosing the schedule.

One pass reads, per layer l: `layers.l.attn`, `layers.l.moe_gate`, then only the experts the router selected for
this step's tokens (ascending expert index), then `final_norm` and `embed` (the tied head). The loop still reads as
the schedule:

    for each position:  w = ensure(block); prefetch(); compute(block, w); maybe_tick()

with two MoE additions right after layer l's gate is computed:
  * the router's decision comes to the host (one small sync per layer, as in every MoE offloading runtime) and the
    selected experts become the *known* next positions that `prefetch()` loads ahead;
  * speculative prefetch: layer l+1's router applied to layer l's MoE input (Mixtral-offloading's trick,
    `moe.speculative_expert_probs`) predicts layer l+1's experts; their loads are issued at once, while layer l's
    experts and layer l+1's attention compute, within the budget and evicting only blocks needed later.
The router also feeds the scored controller's λ (`lam_for_tick`): expert blocks get P(selected) decayed with layer
distance, dense blocks 1. P(selected) per (layer, expert) is an exponential average (weight `P_EMA`) of the router's
decisions at that layer and of the speculative probabilities for it (as min(1, top_k·p), the mean over tokens).

`RoutedForward` is the schedule alone, shared by the executor and by the resident reference (`ResidentMoE`): both run
the same jitted block functions in the same order, so a lossless run routes exactly as the reference and its access
stream (`accesses`) equals the reference's `stream` position for position (what the Belady oracle is fed).

Shapes: B batch, T tokens, D model width, E experts per layer, L layers, V vocabulary.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vorch_jax.access_stats import lookahead_lambda
from vorch_jax.models import moe
from vorch_jax.models.llama import KVCache

from . import block_compute as C
from vorch_jax.tiers.state import State

from .executor import BudgetError, Executor

P_EMA = 0.2  # weight of the newest observation in P(expert selected): routing, or the next layer's speculation


# ------------------------------------------------------------------------------------------------ block compute


@functools.partial(jax.jit, static_argnames=("cfg", "top_k"))
def route(cfg, gate_w, x_BxTxD, top_k):
    """(h [B,T,D], mask [B,T,E], selected bool[E], mean probs float32[E]) of one layer's router."""
    h, mask, probs = moe.moe_route(cfg, gate_w, x_BxTxD, top_k)
    return h, mask, mask.any((0, 1)), probs.mean((0, 1))


@functools.partial(jax.jit, static_argnames=("cfg", "top_k"))
def speculate(cfg, gate_next_w, x_BxTxD, top_k):
    """(predicted bool[E], mean probs float32[E]): layer l+1's router on layer l's MoE input, each token's top_k."""
    probs = moe.speculative_expert_probs(gate_next_w, x_BxTxD, cfg.norm_eps)
    return moe.topk_mask(probs, top_k).any((0, 1)), probs.mean((0, 1))


@jax.jit
def expert_add(w, h_BxTxD, x_BxTxD, mask_BxTxE, e):
    """x + [token chose e]·expert_e(h): one expert's contribution (`moe.moe_combine`, one expert at a time)."""
    y = moe.expert_mlp(w, h_BxTxD)
    chose = jax.lax.dynamic_slice_in_dim(mask_BxTxE, e, 1, axis=-1)
    return x_BxTxD + jnp.where(chose, y, jnp.zeros_like(y))


def compile_on_zeros(cfg, source, n_experts: int, top_k: int, seq_lens, max_len: int, dtype):
    """Compile every MoE block function for each sequence length on zero weights (the timed phases never compile)."""
    one = {"embed": "embed", "attn": "layers.0.attn", "gate": moe.gate_block_id(0),
           "expert": moe.expert_block_id(0, 0), "norm": "final_norm"}
    z = {k: {n: jnp.zeros(s.shape, s.dtype) for n, s in source.block_shapes(b).items()} for k, b in one.items()}
    for T_ in seq_lens:
        x = C.embed_lookup(z["embed"], jnp.zeros((1, T_), jnp.int32), jnp.dtype(dtype).name)
        k = jnp.zeros((1, max_len, cfg.n_kv_heads, cfg.head_dim), dtype)
        x, k, v = C.attention(cfg, z["attn"], x, k, jnp.zeros_like(k), jnp.int32(0))
        h, mask, sel, p = route(cfg, z["gate"], x, top_k)
        speculate(cfg, z["gate"], x, top_k)
        x = expert_add(z["expert"], h, x, mask, jnp.int32(0))
        C.tied_head(z["embed"], C.final_norm(cfg, z["norm"], x)).block_until_ready()
    for w in z.values():
        for a in w.values():
            a.delete()


def speculation_record(predicted_E, probs_E) -> tuple[list, list]:
    """(predicted expert ids, mean probabilities) of one speculation, as a routing trace stores it (JSON lists)."""
    return np.flatnonzero(predicted_E).tolist(), np.asarray(probs_E, np.float64).tolist()


# ------------------------------------------------------------------------------------------------ the schedule


class RoutedForward:
    """The routed schedule of one forward pass. Subclasses supply `fetch(block, ahead)` (the weights, after making
    sure they are on device; `ahead` = the blocks known to come next, in order), and may react to a layer's routing
    (`after_route`) and to a layer's end (`after_layer`)."""

    top_k: int
    n_experts: int

    def fetch(self, block: str, ahead: list):
        raise NotImplementedError

    def after_route(self, layer: int, x_BxTxD, selected_E: np.ndarray, probs_E: np.ndarray) -> None:
        pass

    def after_layer(self, layer: int) -> None:
        pass

    def forward(self, ids_BxT, cache: KVCache, pos: int):
        """One pass; returns (logits [B, T, V] float32, cache)."""
        cfg, E, L = self.cfg, self.n_experts, self.cfg.n_layers
        ks, vs = list(cache.k), list(cache.v)
        pos_arr = jnp.int32(pos)
        w = self.fetch("embed", ["layers.0.attn", moe.gate_block_id(0)])
        x = C.embed_lookup(w, jnp.asarray(ids_BxT, jnp.int32), jnp.dtype(self.dtype).name)
        for i in range(L):
            w = self.fetch(f"layers.{i}.attn", [moe.gate_block_id(i)])
            x, ks[i], vs[i] = C.attention(cfg, w, x, ks[i], vs[i], pos_arr)
            w = self.fetch(moe.gate_block_id(i), [])
            h, mask, sel, probs = route(cfg, w, x, self.top_k)
            sel, probs = jax.device_get((sel, probs))  # the router's decision: the one host sync per layer
            chosen = [moe.expert_block_id(i, e) for e in range(E) if sel[e]]
            tail = [f"layers.{i + 1}.attn", moe.gate_block_id(i + 1)] if i + 1 < L else ["final_norm", "embed"]
            self.after_route(i, x, sel, probs)
            for j, b in enumerate(chosen):
                w = self.fetch(b, chosen[j + 1:] + tail)
                x = expert_add(w, h, x, mask, self._expert_index[int(b.rsplit(".", 1)[1])])
            self.after_layer(i)
        w = self.fetch("final_norm", ["embed"])
        hN = C.final_norm(cfg, w, x)
        w = self.fetch("embed", [])
        logits = C.tied_head(w, hN)
        self.end_pass()
        return logits, KVCache(ks, vs)

    def end_pass(self) -> None:
        pass

    @functools.cached_property
    def _expert_index(self) -> tuple:
        """int32 device scalars 0..E-1, made once: `jnp.int32(e)` per expert call was an eager host->device put each
        time (508 calls, 0.2 s of 6 profiled passes of the MoE at top-2)."""
        return tuple(jnp.int32(e) for e in range(self.n_experts))


class ResidentMoE(RoutedForward):
    """Every block on device (plain arrays): the reference run. Records the access stream it reads and, with
    `record_speculation`, what speculation would predict: `speculation[pass][layer]` = (expert ids, mean
    probabilities [E]) of layer `layer`'s router applied to layer - 1's MoE input (`spec_top_k` per token), the
    prediction `RoutedExecutor` makes at that point (it depends only on the activations, which a lossless run shares
    with the reference); the simulator replays it. Layer 0 has no prediction (None)."""

    def __init__(self, cfg, weights: dict, n_experts: int, top_k: int, dtype=jnp.float32, *,
                 record_speculation: bool = False, spec_top_k: int | None = None):
        self.cfg, self.weights, self.n_experts, self.top_k, self.dtype = cfg, weights, n_experts, top_k, dtype
        self.stream: list[str] = []
        self.record_speculation, self.spec_top_k = record_speculation, spec_top_k or top_k
        self.speculation: list[list] = []
        self._spec_pass: list = []

    def fetch(self, block, ahead):
        self.stream.append(block)
        return self.weights[block]

    def after_route(self, layer, x, selected, probs):
        if not self.record_speculation:
            return
        if layer == 0:
            self._spec_pass = [None]
        if layer + 1 < self.cfg.n_layers:
            pred, sprobs = jax.device_get(speculate(self.cfg, self.weights[moe.gate_block_id(layer + 1)], x,
                                                    self.spec_top_k))
            self._spec_pass.append(speculation_record(pred, sprobs))

    def end_pass(self):
        if self.record_speculation:
            self.speculation.append(self._spec_pass)
            self._spec_pass = []


# ------------------------------------------------------------------------------------------------ the executor


class RoutedLedger:
    """The routed executor's bookkeeping over `Executor`'s ledger, shared by the real `RoutedExecutor` and the
    simulator's `simulator.SimRoutedExecutor` (which replays recorded routing instead of computing it).

    The policy's `ctx.schedule` is the full pass order with every expert (`moe.moe_block_ids` + the head): what
    static placement fills in order, and the cyclic order `_next_use` measures distances in. Positions known for
    sure (`ahead`) come first; an expert its layer's router did not select is a whole pass away.

    `speculative`: issue speculative loads of layer l+1's predicted experts (`spec_top_k` per token, and only those
    whose speculative probability, averaged over the step's tokens, is at least `spec_min_prob`). Every wrong guess
    is bytes for nothing, so the threshold is high. Measured with `MoEScoredPolicy`'s expected-next-use eviction
    (`experiments/moe_policies.py --new-tokens 24 --fractions 0.25 0.5`), bytes / Belady's: 0.3 -> 1.52 at 25% of the
    experts, 1.34 at 50%; 0.45 -> 1.37 and 1.29; without speculation 1.38 and 1.29.
    `lam_decay`: per-layer decay of expert λ for the scored controller (λ of an expert = P(selected)·decay^distance).
    `eager_plan_loads`: load a block as soon as the controller's plan takes it in (`Executor.apply_targets`). Off by
    default for the MoE: the plan then decides what is *kept* (blocks outside it are evicted first) and experts come
    on demand or by (speculative) prefetch; an expert loaded on plan entry may well be evicted before its router
    selects it, which is bytes for nothing. On-device conversions (lossy plans) are applied either way.
    Initial placement loads only the protected blocks (and a static policy's fixed placement): filling the rest of
    the budget with experts in layer order would load experts no token may select.

    The order of one position: `_enter(block, ahead)`, `ensure(block)`, `_fetched(block)`, `prefetch()`, compute;
    after a layer's router: `observe_routing`, then (where `speculation_gate` names a gate) `observe_speculation`
    with that gate's prediction; after a layer's experts: `after_layer`; after the head: `end_pass`.
    """

    def _init_routed(self, *, n_experts: int, top_k: int, speculative: bool = True, spec_top_k: int | None = None,
                     spec_min_prob: float = 0.45, lam_decay: float | None = None, eager_plan_loads: bool = False):
        self.policy.run_by(self)
        self.eager_plan_loads = eager_plan_loads
        self.n_experts, self.top_k = n_experts, top_k
        self.speculative = speculative
        self.spec_top_k = spec_top_k or top_k
        self.spec_min_prob = spec_min_prob
        L = self.cfg.n_layers
        # Mild by default: λ loses 10% over a whole pass. On a cyclic schedule every layer comes round once per step,
        # so a steep decay would only rotate the plan with the layer position (churn, i.e. bytes).
        self.lam_decay = lam_decay if lam_decay is not None else 0.9 ** (1.0 / (L + 2))
        layer_S, expert_S, is_expert_S = _block_coords(tuple(self.schedule), L)  # the parse lam_for_tick uses
        self._expert_coords = {b: (int(layer), int(e)) for b, layer, e, x in
                               zip(self.schedule, layer_S, expert_S, is_expert_S) if x}
        self._slot = {}
        for i, b in enumerate(self.schedule):
            self._slot.setdefault(b, i)
        self._head = self.schedule[-1]  # the head's block (the tied `embed` is read first and last)
        self._ahead: list[str] = []
        self._cur = self.schedule[0]
        self._cur_slot = 0
        self._unselected: set[str] = set()  # experts of the current layer the router did not choose
        # Router statistics per (layer, expert): P(selected) estimates, refreshed by routing and speculation.
        self.p_sel_LxE = np.full((L, n_experts), top_k / n_experts, np.float64)
        self.spec = {"predicted": 0, "actual": 0, "predicted_and_actual": 0, "issued": 0, "issued_bytes": 0,
                     "used": 0, "loads": []}  # loads: (layer, block) of every speculative load issued
        self._spec_pending: dict[str, int] = {}  # block -> layer, speculatively loaded and not yet read
        self._spec_pred: tuple[int, np.ndarray] | None = None
        self.spec_trace: dict[tuple[int, int], tuple] = {}  # (pass, layer) -> (predicted ids, mean probs), as made

    # -------------------------------------------------------------- one position
    def _enter(self, block, ahead):
        """The position of `block` begins; `ahead`: the blocks known to come next, in order."""
        self._cur, self._ahead = block, list(ahead)
        last = block == self._head and not ahead
        self._cur_slot = len(self.schedule) - 1 if last else self._slot[block]

    def _fetched(self, block):
        """`block` was read: a speculative load of it was used."""
        if block in self._spec_pending:
            self._spec_pending.pop(block)
            self.spec["used"] += 1

    # -------------------------------------------------------------- routing and speculation
    def observe_routing(self, layer: int, selected_E: np.ndarray) -> None:
        """Layer `layer`'s router chose `selected_E` (bool [E]): the statistics, and the prediction made a layer ago."""
        E = self.n_experts
        self._unselected = {moe.expert_block_id(layer, e) for e in range(E) if not selected_E[e]}
        self.p_sel_LxE[layer] = (1 - P_EMA) * self.p_sel_LxE[layer] + P_EMA * selected_E.astype(np.float64)
        if self._spec_pred is not None and self._spec_pred[0] == layer:  # score the prediction made a layer ago
            pred = self._spec_pred[1]
            self.spec["predicted"] += int(pred.sum())
            self.spec["actual"] += int(selected_E.sum())
            self.spec["predicted_and_actual"] += int((pred & selected_E).sum())
        self._spec_pred = None

    def speculation_gate(self, layer: int) -> str | None:
        """The gate whose router predicts layer + 1's experts after layer `layer` routed, or None (speculation off,
        the last layer, or that gate not sitting on device: speculation never loads a gate)."""
        nxt = layer + 1
        gate = moe.gate_block_id(nxt) if nxt < self.cfg.n_layers else None
        if not self.speculative or gate is None or gate not in self.on_device or gate in self.inflight:
            return None
        return gate

    def observe_speculation(self, layer: int, predicted_E: np.ndarray, probs_E: np.ndarray) -> None:
        """Layer `layer`'s router, applied a layer early, predicted `predicted_E` (bool [E]) with mean probabilities
        `probs_E`: update P(selected) and load the sure predictions now."""
        self._spec_pred = (layer, predicted_E)
        self.spec_trace[(self.step, layer)] = speculation_record(predicted_E, probs_E)
        self.p_sel_LxE[layer] = (1 - P_EMA) * self.p_sel_LxE[layer] + P_EMA * np.minimum(1.0, self.top_k * probs_E)
        sure = predicted_E & (probs_E >= self.spec_min_prob)
        for e in np.flatnonzero(sure)[np.argsort(-probs_E[sure])]:
            self._speculative_load(layer, moe.expert_block_id(layer, int(e)))

    def _speculative_load(self, layer: int, block: str):
        if block in self.on_device:
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

    # -------------------------------------------------------------- the ledger, routed
    def place_initial(self):
        keep = self.policy.pinned if self.policy.name == "static" else self.policy.ctx.protected
        used = 0
        for b in self.policy.initial_resident():
            if b in self.on_device or b not in keep:
                continue
            used += self._bytes(b, self.policy.device_state(b))
            if used > self.budget:
                raise BudgetError(f"pinned block '{b}' does not fit in the HBM budget")
            self._load(b, "placement")
        for b in list(self.on_device):
            self.engine.wait(b)
        self._sample_peak()

    def apply_targets(self, targets, *reasons):
        if not self.eager_plan_loads:
            targets = {b: s for b, s in targets.items() if b in self.on_device and State(int(s)).on_device}
        if targets:
            super().apply_targets(targets, *reasons)

    def _evict(self, block, *reason):
        self._spec_pending.pop(block, None)  # evicted before its layer read it: not a used prefetch
        super()._evict(block, *reason)

    def after_layer(self, layer):
        self._unselected = set()
        if (layer + 1) % self.tick_every == 0:
            self.set_lambda(layer + 1)
            self.maybe_tick()

    def end_pass(self):
        self.step += 1
        for b in list(self._spec_pending):  # a prediction for a pass that ended: no longer pending
            self._spec_pending.pop(b)

    # -------------------------------------------------------------- λ for the scored controller
    def set_lambda(self, current_layer: int):
        """Write λ into the scored policy's block table (other policies have no table: nothing to do)."""
        table = getattr(self.policy, "table", None)
        if table is None:
            return
        lam = lam_for_tick(self.policy.ids, self.p_sel_LxE, current_layer, self.cfg.n_layers, self.lam_decay)
        self.policy.table = table.replace(lam=jnp.asarray(lam, jnp.float32))

    # -------------------------------------------------------------- the executor's schedule queries, routed
    def current(self):
        return self._cur

    def upcoming(self):
        """The next `prefetch_depth` known positions (this layer's selected experts, the next attn and gate)."""
        return self._ahead[: self.policy.prefetch_depth]

    def expected_next_use(self, block) -> float:
        """Expected positions until `block` is next read: `_next_use` (the cyclic distance, exact where known), plus,
        for an expert, the passes its layer is expected to go by without selecting it: with q = P(selected) per
        visit from the router statistics, (1/q - 1) whole passes (a geometric wait). What Belady knows from the
        recorded future, estimated from the router."""
        d = float(self._next_use(block))
        coords = self._expert_coords.get(block)
        if coords is None or block in self._ahead:  # a dense block, or known to come next
            return d
        q = max(float(self.p_sel_LxE[coords]), 1e-3)
        return d + len(self.schedule) * (1.0 / q - 1.0)

    def _next_use(self, block):
        """Positions until `block` is next read: exact for known positions, else its slot's cyclic distance (an
        expert its router just passed over: a pass later)."""
        if block in self._ahead:
            return self._ahead.index(block) + 1
        n = len(self.schedule)
        d = ((self._slot[block] - self._cur_slot - 1) % n) + 1
        if block == self._head and self._slot[block] == 0:  # the tied head: read at the pass's end too
            d = min(d, (n - 1 - self._cur_slot - 1) % n + 1)
        return d + (n if block in self._unselected else 0) + len(self._ahead)


class RoutedExecutor(RoutedLedger, RoutedForward, Executor):
    """`Executor`'s ledger, ensure, eviction and targets, over the routed schedule, with the router computed here
    (`RoutedForward.forward`) and speculation run on the next gate's real weights. See `RoutedLedger` for the
    knobs (`speculative`, `spec_top_k`, `spec_min_prob`, `lam_decay`, `eager_plan_loads`)."""

    def __init__(self, cfg, engine, policy, *, n_experts: int, top_k: int, speculative: bool = True,
                 spec_top_k: int | None = None, spec_min_prob: float = 0.45, lam_decay: float | None = None,
                 eager_plan_loads: bool = False, **kw):
        Executor.__init__(self, cfg, engine, policy, **kw)
        self._init_routed(n_experts=n_experts, top_k=top_k, speculative=speculative, spec_top_k=spec_top_k,
                          spec_min_prob=spec_min_prob, lam_decay=lam_decay, eager_plan_loads=eager_plan_loads)

    def fetch(self, block, ahead):
        self._enter(block, ahead)
        w = self.ensure(block)
        self._fetched(block)
        self.prefetch()
        self.t += 1
        return w

    def after_route(self, layer, x, selected, probs):
        self.observe_routing(layer, selected)
        gate = self.speculation_gate(layer)
        if gate is None:
            return
        pred, sprobs = jax.device_get(speculate(self.cfg, self.engine.get(gate), x, self.spec_top_k))
        self.observe_speculation(layer + 1, pred, sprobs)


def lam_for_tick(ids, p_sel_LxE: np.ndarray, current_layer: int, n_layers: int, decay: float) -> np.ndarray:
    """float32[B]: λ of every block for a tick at `current_layer`: 1 for dense blocks, P(selected)·decay^distance
    for experts (distance in layers ahead, wrapping into the next step; `access_stats.lookahead_lambda`)."""
    layer_B, expert_B, is_expert_B = _block_coords(tuple(ids), n_layers)
    p_B = np.where(is_expert_B, p_sel_LxE[np.clip(layer_B, 0, n_layers - 1), expert_B], 1.0).astype(np.float32)
    decayed = _lookahead_lambda(layer_B, np.int32(current_layer), n_layers, n_layers + 2, np.float32(decay),
                                np.ones(len(ids), np.float32), ~is_expert_B)
    return np.asarray(decayed) * p_B


_lookahead_lambda = jax.jit(lookahead_lambda, static_argnums=(2, 3))  # one dispatch per tick, not ten eager ops


@functools.lru_cache(maxsize=8)
def _block_coords(ids: tuple, n_layers: int):
    """(layer int32[B], expert index int32[B] (0 for dense blocks), is_expert bool[B]) of block ids, parsed once.
    An untied model's `lm_head` (simulated shapes) sits after the final norm."""
    layer_B, expert_B, is_expert_B = [], [], []
    for b in ids:
        kind, layer = ("head", n_layers + 1) if b == "lm_head" else moe.moe_block_kind_layer(n_layers, b)
        layer_B.append(layer)
        is_expert_B.append(kind == "expert")
        expert_B.append(int(b.rsplit(".", 1)[1]) if kind == "expert" else 0)
    return np.asarray(layer_B, np.int32), np.asarray(expert_B, np.int32), np.asarray(is_expert_B)
