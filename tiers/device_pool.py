"""Device memory of blocks dropped to their homes, kept for the next loads of the same shapes.

On a CPU backend a load with nowhere to land takes a fresh allocation, which a large copy then faults in page by
page and freeing unmaps again; a copy into device memory already held is 2-6x faster on this project's 2-core CPU
(`experiments/host_copy_rates.py`, its results file: 'into held' against 'landed'). A run under a budget drops and
loads blocks of a handful of shapes over and over (every layer's attention has the same shapes, and every embedding
shard), so the engine keeps the arrays of a block dropped to its home here and copies the next load of a leaf of
the same shape and dtype into one of them (`full_precision.copy_into`: a jitted copy that donates the held array,
so XLA writes its output into that memory). Accelerators allocate from pools of their own; the runtime holds
dropped memory only where it was measured to pay (`full_precision.copies_measured`: CPU backends).

The pool never holds memory the budget does not leave free: it keeps at most `room()` bytes, the device bytes its
runtime's budget leaves unused (the ledger: the budget less the bytes landed or in flight to the device), checked
whenever a dropped block offers its arrays and whenever a load is requested, so the blocks' arrays and the pool's
together never exceed the budget. An engine without a `room` (the engine alone, the resident reference) pools
nothing and frees a dropped block's arrays at once, as before.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import jax


def leaf_key(a) -> tuple:
    """What a held array must share with a leaf to take its copy: shape and dtype."""
    return tuple(a.shape), str(a.dtype)


def free_unlanded(arrays: dict) -> None:
    """Free held arrays a load claimed and did not land in (cancelled, or failed before its copy consumed them)."""
    for a in arrays.values():
        if not a.is_deleted():
            a.delete()


def _remove(arrays: list, a) -> None:
    """Remove `a` itself from `arrays` (`list.remove` would compare arrays by value)."""
    del arrays[next(i for i, x in enumerate(arrays) if x is a)]


class DevicePool:
    """Held device arrays by (shape, dtype), at most `room()` bytes of them (the module docstring)."""

    def __init__(self, room: Callable[[], int]):
        self._room = room
        self._held: dict[tuple, list[jax.Array]] = {}
        self._order: list[jax.Array] = []  # oldest first: what a shrinking room frees first
        self._bytes = 0
        self._lock = threading.Lock()
        self.reused = self.reused_bytes = 0  # leaves (and their bytes) landed in held memory
        self.fresh = self.fresh_bytes = 0  # leaves (and their bytes) landed in new memory

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    def arrays(self) -> list[jax.Array]:
        with self._lock:
            return list(self._order)

    def give(self, leaves: dict) -> None:
        """Keep the device arrays of a block just dropped while the room allows (the rest are deleted)."""
        room = self._room()
        with self._lock:
            for a in leaves.values():
                if self._bytes + a.nbytes <= room:
                    self._held.setdefault(leaf_key(a), []).append(a)
                    self._order.append(a)
                    self._bytes += a.nbytes
                else:
                    a.delete()
        self.trim()

    def claim(self, leaves: dict) -> dict:
        """Held arrays for the leaves of a load about to be requested, {leaf: array} for those with a match (they
        leave the pool and become the load's memory); then the pool is trimmed to the room the load leaves."""
        taken = {}
        with self._lock:
            for name, a in leaves.items():
                stack = self._held.get(leaf_key(a))
                if stack:
                    taken[name] = held = stack.pop()
                    _remove(self._order, held)
                    self._bytes -= held.nbytes
            self.reused += len(taken)
            self.fresh += len(leaves) - len(taken)
            self.reused_bytes += sum(int(leaves[k].nbytes) for k in taken)
            self.fresh_bytes += sum(int(a.nbytes) for k, a in leaves.items() if k not in taken)
        self.trim()
        return taken

    def trim(self) -> None:
        """Free the oldest held arrays until the pool fits the room."""
        room = self._room()
        with self._lock:
            while self._order and self._bytes > room:
                a = self._order.pop(0)
                _remove(self._held[leaf_key(a)], a)
                self._bytes -= a.nbytes
                a.delete()

    def clear(self) -> None:
        with self._lock:
            for a in self._order:
                a.delete()
            self._held, self._order, self._bytes = {}, [], 0
