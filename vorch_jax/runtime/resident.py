"""Everything on the device: the reference run's residency (plain arrays, no budget, no engine).

It records what the reference reads (the access stream, the recorded future every lossless run is held to and
Belady replays) and, with `record_speculation`, what the next layer's router would predict after each routed layer
(the prediction a lossless run's ledger makes at that point, which the simulator replays): `speculation[pass][layer]`
= (expert ids, mean probabilities [E]) for the layer predicted, None where no prediction is made (layer 0).
"""

from __future__ import annotations

from vorch_jax.runtime.routing import speculation_record


class ResidentWeights:
    def __init__(self, cursor, weights: dict, *, record_speculation: bool = False):
        self.cursor, self.weights = cursor, weights
        self.stream: list[str] = []
        self.record_speculation = record_speculation
        self.speculation: list[list] = []
        self._pass: list = []

    def begin_pass(self, tokens: int) -> None:
        pass

    def fetch(self, block: str):
        if not self.cursor.spec.token_routed(self.cursor.current):  # a lookup is no read of the stream (`Ledger`)
            self.stream.append(block)
        return self.weights[block]

    def weights_of(self, block: str):
        return self.weights[block]

    def observe_routing(self, layer: int, selected_E) -> None:
        if self.record_speculation and layer == 0:
            self._pass = [None]

    def speculation_gate(self, layer: int) -> str | None:
        nxt = self.cursor.route_of_layer.get(layer + 1)
        return nxt.block if self.record_speculation and nxt is not None else None

    def observe_speculation(self, layer: int, predicted_E, probs_E) -> None:
        self._pass.append(speculation_record(predicted_E, probs_E))

    def done(self) -> None:
        pass

    def after_layer(self, layer: int) -> None:
        pass

    def end_pass(self) -> None:
        if self.record_speculation:
            self.speculation.append(self._pass)
            self._pass = []
