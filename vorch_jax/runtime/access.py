"""The ledger's record of one position executed (the engine records the movements)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Access:
    """One read: position `t` of step `step`, its block and layer, a hit or not, from `start` until the weights were
    ready (`end`), in the state it was read in."""

    t: int
    step: int
    layer: int
    block: str
    hit: bool
    start: float
    end: float  # when the weights were ready to use
    state: str
