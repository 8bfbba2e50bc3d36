"""The event record: every transition, stall, recovery, cancellation and error the engine saw.

Invariant: `link_bytes` counts bytes measured from the arrays actually moved / written / read (chunk files on
disk, file bytes read from the model), never a formula; times are `time.perf_counter()` seconds.
"""

from __future__ import annotations

import dataclasses
import threading
import types
from typing import Iterator, Mapping

from vorch_jax.tiers.state import State

# staged: a compressed home was made; in_place: an op computed where the block lives (link_bytes: its activations)
KINDS = ("transition", "stall", "recovered", "cancelled", "error", "staged", "in_place")


@dataclasses.dataclass(frozen=True)
class Event:
    kind: str                      # one of KINDS
    block: str
    src: State | None              # None: from the authoritative source (register)
    dst: State | None
    start: float                   # time.perf_counter()
    end: float
    link_bytes: Mapping[str, int] = dataclasses.field(default_factory=lambda: types.MappingProxyType({}))
    detail: str = ""               # error / recovery message (names the block and leaf)
    reason: str = ""               # why the caller asked for it (miss, prefetch, plan:SCORE, evict, ...)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown event kind {self.kind!r}: expected one of {KINDS}")
        object.__setattr__(self, "link_bytes", types.MappingProxyType(dict(self.link_bytes)))

    @property
    def duration(self) -> float:
        return self.end - self.start

    @property
    def total_bytes(self) -> int:
        return sum(self.link_bytes.values())


class EventLog:
    """Append-only, thread-safe list of events. Reads return snapshots."""

    def __init__(self):
        self._lock = threading.Lock()
        self._events: list[Event] = []

    def append(self, event: Event) -> None:
        with self._lock:
            self._events.append(event)

    def snapshot(self) -> list[Event]:
        with self._lock:
            return list(self._events)

    def of_kind(self, kind: str) -> list[Event]:
        return [e for e in self.snapshot() if e.kind == kind]

    def for_block(self, block: str) -> list[Event]:
        return [e for e in self.snapshot() if e.block == block]

    def __iter__(self) -> Iterator[Event]:
        return iter(self.snapshot())

    def __len__(self) -> int:
        with self._lock:
            return len(self._events)

    def __getitem__(self, i):
        with self._lock:
            return self._events[i]
