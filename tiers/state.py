"""The seven states a weight block can be in, the links bytes travel over, and ONE table of routes.

Invariants:
  * States are exclusive: a block lives in exactly one representation at a time (S5 while it moves).
  * Lossless states (S0, S3, S4) hold the block bit-for-bit; lossy states (S1, S2, S6) hold an approximation.
  * A route never goes lossy -> lossless by "un-quantizing": it re-reads the authoritative source
    (`source->host`). Lossy -> other lossy also starts from the source, so errors never compound.
  * Every hop of a route lands in a real representation state (`Hop.lands_in`); the engine builds that
    representation, so the bytes each link carries are measured from the arrays actually moved.
  * A block may also keep *compressed homes*, in host memory or on NVMe: its int8 / int4 / low-rank representation,
    made once when the block is staged. A load into such a state from anywhere but S0 then moves the compressed
    arrays (`route(..., packed=...)`): one `host->device` hop, after an `nvme->host` read when the copy is on disk,
    so the links carry the compressed bytes, not full precision.
    Its lossless home (S3 / S4) stays the only way back to S0: expanding a compressed copy would give a lossy
    block in a lossless state.
"""

from __future__ import annotations

import dataclasses
import enum


class TierError(Exception):
    """Base class of the errors the tiers raise."""


class UnknownStateError(TierError, ValueError):
    """A state name or number that is not one of S0..S6 (or not a valid target)."""


class UnknownBlockError(TierError, LookupError):
    """A block id the engine does not know."""

    def __str__(self) -> str:  # LookupError would repr-quote the message
        return str(self.args[0]) if self.args else ""


class OffDeviceError(TierError, RuntimeError):
    """Weights were asked for while the block is not on the device (S3, S4)."""


class BlockInFlightError(TierError, RuntimeError):
    """The block is in flight (S5): it cannot be used, and a different target cannot be requested."""


class State(enum.IntEnum):
    S0 = 0  # full precision (float32) on device
    S1 = 1  # int8 on device
    S2 = 2  # int4 (grouped) on device
    S3 = 3  # pinned host DRAM
    S4 = 4  # NVMe (tensorstore zarr3 store)
    S5 = 5  # in flight between two states (never a target)
    S6 = 6  # low-rank factors on device

    @classmethod
    def parse(cls, value: "str | int | State") -> "State":
        """`State.parse("S3")`, `State.parse(3)`, `State.parse(State.S3)` -> State.S3; clear error otherwise."""
        if isinstance(value, State):
            return value
        if isinstance(value, str):
            name = value.strip().upper()
            if name in cls.__members__:
                return cls[name]
        elif isinstance(value, int) and not isinstance(value, bool) and value in cls._value2member_map_:
            return cls(value)
        raise UnknownStateError(f"unknown state {value!r}: expected one of {', '.join(cls.__members__)}")

    @property
    def on_device(self) -> bool:
        return self in ON_DEVICE

    @property
    def lossless(self) -> bool:
        return self in LOSSLESS

    @property
    def where(self) -> str:
        """'device' | 'host' | 'disk' | 'in_flight'."""
        return WHERE[self]


ON_DEVICE = frozenset({State.S0, State.S1, State.S2, State.S6})
LOSSLESS = frozenset({State.S0, State.S3, State.S4})
LOSSY = frozenset({State.S1, State.S2, State.S6})
TARGETS = (State.S0, State.S1, State.S2, State.S3, State.S4, State.S6)  # every state but S5
WHERE = {
    State.S0: "device", State.S1: "device", State.S2: "device", State.S6: "device",
    State.S3: "host", State.S4: "disk", State.S5: "in_flight",
}

# The links bytes travel over. `device:convert` is on-device quantization / factorisation (bytes = input read).
LINKS = ("source->host", "nvme->host", "host->device", "device->host", "host->nvme", "device:convert")


@dataclasses.dataclass(frozen=True)
class Hop:
    """One step of a route: carry the block over `link`, landing in representation `lands_in`. `packed`: the hop
    carries a compressed home (its bytes are those of the lossy state the route ends in), not full precision."""

    link: str
    lands_in: State
    packed: bool = False


_SRC = Hop("source->host", State.S3)   # read the authoritative model file into pinned host memory
_N2H = Hop("nvme->host", State.S3)     # read the store into pinned host memory (checksum verified)
_H2D = Hop("host->device", State.S0)
_D2H = Hop("device->host", State.S3)
_H2N = Hop("host->nvme", State.S4)


def _cv(s: State) -> Hop:
    return Hop("device:convert", s)


S0, S1, S2, S3, S4, S6 = State.S0, State.S1, State.S2, State.S3, State.S4, State.S6

# THE table. Key (from, to); `None` as `from` means "from the authoritative source" (register, recovery).
# Rows from a lossy state equal the rows from the source (see module docstring).
_FROM_SOURCE = {
    S0: (_SRC, _H2D),
    S1: (_SRC, _H2D, _cv(S1)),
    S2: (_SRC, _H2D, _cv(S2)),
    S3: (_SRC,),
    S4: (_SRC, _H2N),
    S6: (_SRC, _H2D, _cv(S6)),
}
ROUTES: dict[tuple[State | None, State], tuple[Hop, ...]] = {
    **{(None, dst): hops for dst, hops in _FROM_SOURCE.items()},
    # from S0 (lossless, device)
    (S0, S1): (_cv(S1),),
    (S0, S2): (_cv(S2),),
    (S0, S3): (_D2H,),
    (S0, S4): (_D2H, _H2N),            # written from host memory
    (S0, S6): (_cv(S6),),
    # from S3 (lossless, pinned host)
    (S3, S0): (_H2D,),
    (S3, S1): (_H2D, _cv(S1)),
    (S3, S2): (_H2D, _cv(S2)),
    (S3, S4): (_H2N,),
    (S3, S6): (_H2D, _cv(S6)),
    # from S4 (lossless, disk)
    (S4, S0): (_N2H, _H2D),
    (S4, S1): (_N2H, _H2D, _cv(S1)),
    (S4, S2): (_N2H, _H2D, _cv(S2)),
    (S4, S3): (_N2H,),
    (S4, S6): (_N2H, _H2D, _cv(S6)),
    # from the lossy states: through the lossless copy, i.e. the source (states are exclusive)
    **{(lossy, dst): hops for lossy in (S1, S2, S6) for dst, hops in _FROM_SOURCE.items() if dst != lossy},
}


def from_compressed_home(src: "State | None", dst: State, packed) -> bool:
    """Whether a move src -> dst is served by a compressed home in `packed` (see `route`)."""
    return dst in packed and src is not None and src != State.S0 and src != dst


def route(src: "State | None", dst: State, packed=()) -> tuple[Hop, ...]:
    """Hops from `src` (None: the source) to `dst`; `()` when src == dst. Raises UnknownStateError for S5.

    `packed`: the lossy states the block keeps a compressed home of, as a collection (in host memory) or a mapping
    state -> "host" | "disk". A load into one of them from an off-device or other lossy state moves that copy: one
    `host->device` hop landing in `dst`, after an `nvme->host` read for a copy on disk; from S0 the on-device
    conversion is cheaper (no link), and registration reads the source as always."""
    if dst == State.S5 or src == State.S5:
        raise UnknownStateError("S5 (in flight) is neither a source nor a target of a transition")
    if src == dst:
        return ()
    if from_compressed_home(src, dst, packed):
        to_device = Hop("host->device", dst, packed=True)
        on_disk = isinstance(packed, dict) and packed[dst] == "disk"
        return (Hop("nvme->host", State.S3, packed=True), to_device) if on_disk else (to_device,)
    return ROUTES[(src, dst)]
