"""The handle of one requested transition (`MovementEngine.request`): future-like, it lands asynchronously."""

from __future__ import annotations

import concurrent.futures as cf
import time

from vorch_jax.tiers.state import State


class Transition:
    """Future-like handle of one requested transition. `.result()` returns the target state or raises the
    worker's exception; `.cancel()` succeeds only while the transition is still queued."""

    def __init__(self, block_id: str, src: State, dst: State, future: cf.Future, reason: str = ""):
        self.block_id, self.src, self.dst = block_id, src, dst
        self.reason = reason
        self.requested_at = time.perf_counter()
        self.into: dict = {}  # held device arrays its leaves land in (`device_pool`), claimed when requested
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    def running(self) -> bool:
        return self._future.running()

    def cancelled(self) -> bool:
        return self._future.cancelled()

    def cancel(self) -> bool:
        return self._future.cancel()

    def result(self, timeout: float | None = None) -> State:
        self._future.result(timeout)
        return self.dst

    def exception(self, timeout: float | None = None):
        return self._future.exception(timeout)

    def __repr__(self) -> str:
        status = "done" if self.done() else "running" if self.running() else "queued"
        return f"Transition({self.block_id!r}, {self.src.name}->{self.dst.name}, {status})"
