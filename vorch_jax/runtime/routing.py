"""What a routed run learns from its routers: P(expert selected) per layer, and what the controller reads from it.

P(selected) per (layer, expert) is estimated several ways at once (`ESTIMATORS`): exponential averages of the
router's decisions at that layer, at weights 0.2, 0.4 and 0.1, and the run's mean selection rate. Which one the run
reads is measured, not guessed: each router decision scores every estimator's prediction for it (Brier:
Σ_e (q_e - selected_e)²), and the one with the least total so far is used. No one weight serves every model: replaying
the recorded expert streams of 24 tokens at 25% of the experts, the MoE SmolLM2 of all neurons evicted best on the
shorter averages (expert loads: 0.4 539, 0.2 552, run mean 607) and the shared-expert variant, whose routing is more
skewed over the run, on the longer ones (0.2 693, 0.1 681, run mean 670); in real runs the Brier score picked 0.2 and
0.1 (the summary's `routing.p_selected_estimator`). The next layer's speculative prediction (as min(1, top_k·p), the
mean over tokens) also enters the averages, but each estimator is scored on what it predicted *before* that layer's
speculation: a speculation tells the pass now running, while P(selected) orders evictions by the passes to come, and
scored on the speculation-fed value an average won while ordering evictions worse (shared-expert MoE at 25% of
experts: 774 MB of experts moved, against 705 MB scored before the speculation). It gives the scored
controller's λ (`lam_for_tick`: experts P(selected) decayed with layer distance, dense blocks 1) and the MoE
policy's expected next read (`expected_skip_positions`: an expert its router is not known to choose is expected to
be passed over 1/q - 1 more times, a geometric wait, each a whole pass).

Coordinates (layer, expert index) come from the spec's block table, never from block ids.
"""

from __future__ import annotations

import numpy as np


ESTIMATORS = (0.2, 0.4, 0.1, None)  # EMA weights of the newest observation (routing or speculation); None: the run's
# mean selection rate (routing only). The first is read until the routers' decisions say otherwise.



def speculation_record(predicted_E, probs_E) -> tuple[list, list]:
    """(predicted expert ids, mean probabilities) of one speculation, as a routing trace stores it (JSON lists)."""
    return np.flatnonzero(predicted_E).tolist(), np.asarray(probs_E, np.float64).tolist()


class RouterStats:
    def __init__(self, info: dict, cursor, ids, lam_decay: float | None = None):
        spec = cursor.spec
        self.cursor, self.top_k, self.n_experts, self.n_layers = cursor, spec.top_k, spec.n_experts, spec.n_layers
        L, E = self.n_layers, self.n_experts
        # Mild by default: λ loses 10% over a whole pass. On a cyclic schedule every layer comes round once per step,
        # so a steep decay would only rotate the plan with the layer position (churn, i.e. bytes).
        self.lam_decay = lam_decay if lam_decay is not None else 0.9 ** (1.0 / (L + 2))
        self._p_CxLxE = np.full((len(ESTIMATORS), L, E), self.top_k / E, np.float64)  # each estimator's P(selected)
        self._brier_C = np.zeros(len(ESTIMATORS))  # each estimator's summed squared error on the routers' decisions
        self._selected_LxE = np.zeros((L, E))  # decisions so far, per layer (the mean-rate estimator)
        self._decisions_L = np.zeros(L)
        self._before_speculation: dict[int, np.ndarray] = {}  # layer -> [C, E] estimates before its speculation
        self._best = 0  # the estimator read now: argmin of the Brier totals (ties: the earlier), kept on each decision
        self.version = 0  # counts changes of P(selected): `_skip_table` is rebuilt when it moves
        self._skip_rows, self._skip_version = None, -1  # `_skip_table` and the version it was built at
        self.ids = list(ids)
        self.layer_B = np.asarray([info[b].layer for b in self.ids], np.int32)
        self.expert_B = np.asarray([max(info[b].expert, 0) for b in self.ids], np.int32)
        self.is_expert_B = np.asarray([info[b].kind == "expert" for b in self.ids])
        self._coords = {b: (info[b].layer, info[b].expert) for b in self.ids if info[b].kind == "expert"}

    @property
    def p_sel_LxE(self) -> np.ndarray:
        """P(expert selected) per layer, by the estimator that has predicted the routers' decisions best so far."""
        return self._p_CxLxE[self.estimator]

    @p_sel_LxE.setter
    def p_sel_LxE(self, value) -> None:  # set outright (tests): every estimator then says the same
        self._p_CxLxE[:] = np.asarray(value, np.float64)[None]
        self.version += 1

    @property
    def estimator(self) -> int:
        """Index into ESTIMATORS of the one read now (ties: the earlier)."""
        return self._best

    def observe(self, layer: int, selected_E: np.ndarray) -> None:
        self.version += 1
        sel = selected_E.astype(np.float64)
        predicted_CxE = self._before_speculation.pop(layer, self._p_CxLxE[:, layer])
        self._brier_C += ((predicted_CxE - sel) ** 2).sum(-1)
        self._best = int(np.argmin(self._brier_C))
        self._selected_LxE[layer] += sel
        self._decisions_L[layer] += 1
        prior = self.top_k / self.n_experts  # one pseudo-decision at the uniform rate
        for c, w in enumerate(ESTIMATORS):
            self._p_CxLxE[c, layer] = ((self._selected_LxE[layer] + prior) / (self._decisions_L[layer] + 1) if w is None
                                       else (1 - w) * self._p_CxLxE[c, layer] + w * sel)

    def observe_speculation(self, layer: int, probs_E: np.ndarray) -> None:
        """Layer `layer`'s router applied a layer early: the averages move towards min(1, top_k·p); the Brier score
        of the coming decision still reads the estimates from before (the module docstring)."""
        self.version += 1
        self._before_speculation.setdefault(layer, self._p_CxLxE[:, layer].copy())
        p = np.minimum(1.0, self.top_k * probs_E)
        for c, w in enumerate(ESTIMATORS):
            if w is not None:
                self._p_CxLxE[c, layer] = (1 - w) * self._p_CxLxE[c, layer] + w * p

    def expected_skip_positions(self, block: str) -> float:
        """For an expert not known to come next: the passes its router is expected to skip it, in positions."""
        return self.expected_skips([block])[0]

    def expected_skips(self, blocks) -> list[float]:
        """`expected_skip_positions` of each of `blocks` at once (the eviction order's hot path: a table of every
        expert's wait, rebuilt only when P(selected) changes, and one lookup a block)."""
        known, skip = self.cursor.known_index(), self._skip_table()
        coords = self._coords
        return [skip[c[0]][c[1]] if (c := coords.get(b)) is not None and b not in known else 0.0 for b in blocks]

    def _skip_table(self) -> list:
        """[L][E] lists: n·(1/q - 1) positions for each expert, q = P(selected) (at least 1e-3), at `version`."""
        if self._skip_version != self.version:
            q_LxE = np.maximum(self.p_sel_LxE, 1e-3)
            self._skip_rows, self._skip_version = (self.cursor.n * (1.0 / q_LxE - 1.0)).tolist(), self.version
        return self._skip_rows

    def lam_for_tick(self, current_layer: int) -> np.ndarray:
        """float32[B]: λ of every block for a tick at `current_layer`: 1 for dense blocks, P(selected)·decay^distance
        for experts (distance in layers ahead, wrapping into the next step). The rule is
        `access_stats.lookahead_lambda` over a whole pass (its jnp reference; tests check the two agree), computed
        here in numpy rather than as a jitted call whose result the host then waited for (under cProfile 0.08-0.10 s
        of a 2.1 s routed decode, the shared-expert MoE at 50% of experts; decode tok/s moved within this CPU's
        noise)."""
        L = self.n_layers
        p_B = np.where(self.is_expert_B, self.p_sel_LxE[np.clip(self.layer_B, 0, L - 1), self.expert_B], 1.0)
        dist_B = np.mod(self.layer_B - np.int32(current_layer), L + 2)
        decayed_B = np.where(self.is_expert_B, np.float32(self.lam_decay) ** dist_B.astype(np.float32), 1.0)
        return (decayed_B * p_B).astype(np.float32)
