"""What a routed run learns from its routers: P(expert selected) per layer, and what the controller reads from it.

P(selected) per (layer, expert) is an exponential average (weight `P_EMA`) of the router's decisions at that layer
and of the speculative probabilities for it (as min(1, top_k·p), the mean over tokens). It gives the scored
controller's λ (`lam_for_tick`: experts P(selected) decayed with layer distance, dense blocks 1) and the MoE
policy's expected next read (`expected_skip_positions`: an expert its router is not known to choose is expected to
be passed over 1/q - 1 more times, a geometric wait, each a whole pass).

Coordinates (layer, expert index) come from the spec's block table, never from block ids.
"""

from __future__ import annotations

import jax
import numpy as np

from vorch_jax.controller.access_stats import lookahead_lambda

P_EMA = 0.2  # weight of the newest observation in P(expert selected): routing, or the next layer's speculation

_lookahead_lambda = jax.jit(lookahead_lambda, static_argnums=(2, 3))  # one dispatch per tick, not ten eager ops


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
        self.p_sel_LxE = np.full((L, E), self.top_k / E, np.float64)
        self.ids = list(ids)
        self.layer_B = np.asarray([info[b].layer for b in self.ids], np.int32)
        self.expert_B = np.asarray([max(info[b].expert, 0) for b in self.ids], np.int32)
        self.is_expert_B = np.asarray([info[b].kind == "expert" for b in self.ids])
        self._coords = {b: (info[b].layer, info[b].expert) for b in self.ids if info[b].kind == "expert"}

    def observe(self, layer: int, selected_E: np.ndarray) -> None:
        self.p_sel_LxE[layer] = (1 - P_EMA) * self.p_sel_LxE[layer] + P_EMA * selected_E.astype(np.float64)

    def observe_speculation(self, layer: int, probs_E: np.ndarray) -> None:
        self.p_sel_LxE[layer] = (1 - P_EMA) * self.p_sel_LxE[layer] + P_EMA * np.minimum(1.0, self.top_k * probs_E)

    def expected_skip_positions(self, block: str) -> float:
        """For an expert not known to come next: the passes its router is expected to skip it, in positions."""
        coords = self._coords.get(block)
        if coords is None or self.cursor.is_known(block):
            return 0.0
        q = max(float(self.p_sel_LxE[coords]), 1e-3)
        return self.cursor.n * (1.0 / q - 1.0)

    def lam_for_tick(self, current_layer: int) -> np.ndarray:
        """float32[B]: λ of every block for a tick at `current_layer`: 1 for dense blocks, P(selected)·decay^distance
        for experts (distance in layers ahead, wrapping into the next step; `access_stats.lookahead_lambda`)."""
        L = self.n_layers
        p_B = np.where(self.is_expert_B, self.p_sel_LxE[np.clip(self.layer_B, 0, L - 1), self.expert_B],
                       1.0).astype(np.float32)
        decayed = _lookahead_lambda(self.layer_B, np.int32(current_layer), L, L + 2, np.float32(self.lam_decay),
                                    np.ones(len(self.ids), np.float32), ~self.is_expert_B)
        return np.asarray(decayed) * p_B
