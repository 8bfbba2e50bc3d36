"""Compute in place: run a block's op where its weights live, in host DRAM, and move the activations instead.

At batch 1 an op reads each weight once. A block whose lossless home is in host DRAM (S3) can be computed there:
a few kilobytes of activations cross the link instead of the block (KTransformers, Fiddler, llama.cpp's
`--n-cpu-moe`). Which blocks may (`modes`, from `Setup.in_place`):
  * ``host``: a placement rule's `compute: host`: always in place; the block never loads and takes no HBM;
  * ``auto``: with `in_place: auto`, a block off device (or still in flight) whose op the model can run in place
    (`ModelSpec.in_place_ops`) is computed there when that is quicker than waiting for its load (Fiddler's rule,
    here with the load's remaining time when it is already in flight). Computing it in place does not stop the
    policy from wanting it: when the link is idle, the block loads in the background if the policy ranks it above
    what it would evict (`Ledger`), so the device keeps the blocks the policy values and the misses run on the host.

Prices (`InPlacePrices`) are per op and batch size: measured on this machine for a real run (the backend times each
op in place at compile time) and the link rate probed; the hardware profile's `host_compute` section and links for a
simulated one. `InPlace` is what the ledger hands the backend instead of device weights; the backend computes the
op in place and the engine records an `in_place` event: the activation bytes per link and the host span.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from vorch_jax.runtime.telemetry import link_bytes

MODES = ("host", "auto")


@dataclasses.dataclass(frozen=True)
class InPlace:
    """A position computed where its block's weights live. `leaves`: the block's home arrays in host memory (the
    real engine's; None on the simulated one); `record(start, end, link_bytes)`: the engine's `in_place` event."""

    block: str
    leaves: dict | None
    record: Callable


@dataclasses.dataclass(frozen=True)
class InPlacePrices:
    """`host_s(position, tokens)`: seconds an op computed in place takes, activations there and back included;
    `move_s(nbytes)`: seconds a load of `nbytes` takes over the host->device link."""

    host_s: Callable
    move_s: Callable


class InPlaceChoice:
    """Which reads run in place (see the module docstring). `modes`: block -> "host" | "auto"."""

    def __init__(self, modes: dict, prices: InPlacePrices):
        bad = sorted(set(modes.values()) - set(MODES))
        if bad:
            raise ValueError(f"unknown in-place mode(s) {bad}: expected one of {MODES}")
        self.modes, self.prices = dict(modes), prices
        self.host_only = frozenset(b for b, m in self.modes.items() if m == "host")

    def mode(self, block: str) -> str | None:
        return self.modes.get(block)

    def loads_pay(self, position, tokens: int, load_bytes: int) -> bool:
        """Whether loading `position`'s block ahead is worth it for that read: not for a host-only block, nor for
        an `auto` one a whole load of which takes longer than computing the read in place (a prefetch issued a
        position or two ahead would mostly still be in flight, and the read would run in place beside it; whether
        the block is worth keeping on device is the background load's decision)."""
        mode = self.modes.get(position.block)
        if mode is None:
            return True
        return mode == "auto" and self.prices.move_s(load_bytes) <= self.prices.host_s(position, tokens)

    def choose(self, position, tokens: int, *, landed: bool, in_flight_for: float | None, load_bytes: int) -> bool:
        """True: compute `position` in place. `landed`: its block is on device (a hit: never in place unless it is
        host-only); `in_flight_for`: seconds since its load was requested (None: not loading); `load_bytes`: what
        a load of it moves."""
        mode = self.modes.get(position.block)
        if mode is None:
            return False
        if mode == "host":
            return True
        if landed:
            return False
        wait = self.prices.move_s(load_bytes) - (in_flight_for or 0.0)
        return self.prices.host_s(position, tokens) < wait


def in_place_choice(setup, prices: InPlacePrices) -> InPlaceChoice | None:
    """The run's choice over `setup.in_place`, or None where no read may run in place."""
    modes = setup.in_place
    return InPlaceChoice(modes, prices) if modes else None


def measured_prices(backend, link_bw: dict) -> InPlacePrices:
    """A real run's prices: each op in place as the backend timed it at compile time (per batch size), a load at
    the host->device rate probed before the run (16 MiB copies: their per-copy latency is inside that rate, not
    priced apart as the simulated prices' is)."""
    return InPlacePrices(host_s=lambda position, tokens: backend.in_place_s[(position.op, tokens)],
                         move_s=lambda nbytes: nbytes / link_bw["host->device"])


def in_place_section(setup, counters, events, gen) -> dict | None:
    """What computing in place did in the measured decode steps (`Generation.measured_window`) and the whole
    generation: reads, host seconds and their share of the decode time, activation bytes per link, background
    loads. None where nothing may run in place."""
    modes = setup.in_place
    if not modes:
        return None
    w0, w1, steps = gen.measured_window()
    gen_ev = [e for e in events if e.kind == "in_place" and e.reason != "lookup"  # lookups: the summary's `lookups`
              and gen.marks[0] <= e.start < gen.marks[-1]]
    decode_ev = [e for e in gen_ev if w0 <= e.start < w1]
    decode_s = sum(e.duration for e in decode_ev)
    activations = ("in_place",)  # the event kind whose link bytes are activations

    return {"mode": setup.cfg.in_place, "blocks_host": sum(m == "host" for m in modes.values()),
            "blocks_auto": sum(m == "auto" for m in modes.values()), "reads": len(gen_ev),
            "blocks_read": len({e.block for e in gen_ev}), "host_compute_s": sum(e.duration for e in gen_ev),
            "decode_host_compute_share": decode_s / (w1 - w0) if w1 > w0 else float("nan"),
            "activation_bytes": link_bytes(gen_ev, activations),
            "decode_activation_bytes_per_step": {k: v / max(1, steps) for k, v in link_bytes(decode_ev, activations).items()},
            "decode_reads_per_step": len(decode_ev) / max(1, steps), "background_loads": counters.in_place_loads,
            "note": "bytes_moved, Belady and the lower bound count weight loads; a read in place moves none"}
