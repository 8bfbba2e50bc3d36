"""Residency policies: one interface, each a small class. The executor and the engine do the moving.

A policy answers four questions, each from the block table and what it has observed:
  * `initial_resident()`  which blocks start on the device (in order; the executor stops at the budget);
  * `pinned`              blocks never evicted (static placements, protected blocks);
  * `victim_order(t, candidates)`  which device blocks to evict first when room is needed at access `t`;
  * `prefetch_depth`      how many upcoming schedule positions the executor may load ahead (0: none);
  * `tick(t)`             an optional periodic re-plan returning target states (the scored controller).
It observes every access through `on_access(t, block)`.

Baselines and where they come from:
  resident          everything on device (the reference run);
  static            fill the budget in layer order, stream the rest each step, no prefetch (Accelerate device_map);
  static-prefetch   the same, with lookahead prefetch of the streamed blocks;
  lru               an LRU cache of blocks, no lookahead (the Mixtral-offloading cache, without its MoE prefetch);
  lfu               least-frequently-used eviction (ties by recency);
  belady            evict the block whose next use is furthest in the recorded future (see belady.py).
"""

from __future__ import annotations

import dataclasses

from vorch_jax.tiers.state import State


@dataclasses.dataclass(frozen=True)
class PolicyContext:
    """What every policy may read: the blocks (in schedule order), their device bytes, the budget, the schedule."""

    block_ids: tuple[str, ...]
    device_bytes: dict  # block id -> bytes on device in its compute state
    budget_bytes: int
    schedule: tuple[str, ...]  # one forward pass
    prefetch_depth: int
    protected: frozenset = frozenset()
    future: tuple[str, ...] = ()  # the recorded access stream; only the Belady oracle reads it
    forced: dict = dataclasses.field(default_factory=dict)  # block -> on-device State a placement rule fixes
    state_bytes: dict | None = None  # block -> {State: device bytes}; None: only S0 (device_bytes)
    packed: dict = dataclasses.field(default_factory=dict)  # block -> lossy State of its compressed home
    packed_where: dict = dataclasses.field(default_factory=dict)  # block -> "host" | "disk": where that home is


POSITIONS, LET_GO_READS = "positions", "let-go reads"  # what the prefetch window counts (`Policy.reads_ago`)


class Policy:
    name = "base"
    prefetch_depth = 0
    prefetch_victims_read_within = 0  # > 0: a prefetch may evict only blocks read that many reads ago at most
    prefetch_window_counts = POSITIONS  # what those reads are: positions, or LET_GO_READS (`reads_ago`)

    def __init__(self, ctx: PolicyContext):
        self.ctx = ctx
        self.pinned: frozenset = frozenset(ctx.protected)
        self.last_use: dict[str, int] = {}
        self.uses: dict[str, int] = {}
        self.let_go_rank: dict[str, int] = {}  # block -> how many reads of blocks a prefetch may evict preceded its
        # last one, if a prefetch may evict it then (`prefetch_window.replay` counts the same)
        self._let_go_reads, self._last_let_go_t = 0, -1

    def initial_resident(self) -> list[str]:
        """Protected blocks first, then the rest in schedule order; the executor stops at the budget."""
        rest = [b for b in dict.fromkeys(self.ctx.schedule) if b not in self.pinned]
        return sorted(self.pinned, key=self.ctx.block_ids.index) + rest

    def on_access(self, t: int, block: str) -> None:
        self.last_use[block] = t
        self.uses[block] = self.uses.get(block, 0) + 1
        if self.prefetch_window_counts == LET_GO_READS and block not in self.ctx.protected \
                and self.prefetch_may_evict(block):  # counted only where the window counts them
            self.let_go_rank[block] = self._let_go_reads
            self._let_go_reads, self._last_let_go_t = self._let_go_reads + 1, t

    def reads_ago(self, block: str, t: int) -> int:
        """How long before position `t` `block` was last read, for the prefetch window: in positions, or in reads of
        blocks a prefetch may evict (`prefetch_window` says why both). Never read: as if read at position -1."""
        if self.prefetch_window_counts == POSITIONS:
            return t - self.last_use.get(block, -1)
        return self._let_go_reads - (self._last_let_go_t >= t) - self.let_go_rank.get(block, -1)

    def prefetch_may_evict(self, block: str) -> bool:
        """Whether a prefetch may evict `block` (the ledger asks before its other rules); every block here."""
        return True

    def victim_order(self, t: int, candidates: list[str]) -> list[str]:
        raise NotImplementedError

    def device_state(self, block: str):
        """The on-device state a block is loaded into: the one a placement rule fixes, else its compressed home's
        (what the link then carries), else lossless S0."""
        if block in self.ctx.forced:
            return self.ctx.forced[block]
        return self.ctx.packed.get(block, State.S0)

    def held_bytes(self, block: str) -> int:
        """Device bytes of `block` in the state this policy loads it into."""
        if self.ctx.state_bytes is None:
            return self.ctx.device_bytes[block]
        return self.ctx.state_bytes[block][self.device_state(block)]

    def largest_load(self, block: str) -> int:
        """The most device bytes `block` may be loaded in: a policy without a plan loads it in one state only."""
        return self.held_bytes(block)

    def tick(self, t: int):
        return None

    def take_scores(self) -> dict | None:
        """{block: score} decided since the last call (a bounded sample of blocks), for the trace; None if none."""
        return None

    def settle(self) -> None:
        """Wait for any decision still being computed asynchronously (the simulator calls it before each tick: on
        its modelled clock a tick has long finished, while the host that runs the simulation may not be there yet)."""

    def run_by(self, executor) -> None:
        """Called once by the ledger that runs the policy, which offers its queries (a routed plan's expected next
        use from the router). Most policies need nothing from it."""


class ResidentPolicy(Policy):
    """Everything on the device: the reference. A budget below the model is a configuration error."""

    name = "resident"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.pinned = frozenset(ctx.block_ids)

    def victim_order(self, t, candidates):
        return []


class StaticPolicy(Policy):
    """Fill the budget in layer order, leaving room to stream the largest remaining block(s); never re-plan."""

    name = "static"

    def __init__(self, ctx, prefetch_depth: int = 0):
        super().__init__(ctx)
        self.prefetch_depth = prefetch_depth
        self.pinned = frozenset(self._fill())

    def _fill(self) -> list[str]:
        order = super().initial_resident()
        slots = self.prefetch_depth + 1  # blocks that must fit at once while streaming
        for n in range(len(order), -1, -1):
            kept, streamed = order[:n], order[n:]
            stream_room = sum(sorted((self.held_bytes(b) for b in set(streamed)), reverse=True)[:slots])
            if sum(self.held_bytes(b) for b in kept) + stream_room <= self.ctx.budget_bytes:
                return kept
        return []

    def initial_resident(self):
        return [b for b in self.ctx.schedule if b in self.pinned][: len(self.pinned)]

    def victim_order(self, t, candidates):
        # Streamed blocks only, the one used last goes first: a streamed layer is released right after its use
        # (Accelerate's offload hook), which is also the furthest-next-use choice on a cyclic schedule.
        return sorted((b for b in candidates if b not in self.pinned), key=lambda b: -self.last_use.get(b, -1))


class LRUPolicy(Policy):
    name = "lru"

    def victim_order(self, t, candidates):
        return sorted((b for b in candidates if b not in self.pinned), key=lambda b: self.last_use.get(b, -1))


class LFUPolicy(Policy):
    name = "lfu"

    def victim_order(self, t, candidates):
        free = [b for b in candidates if b not in self.pinned]
        return sorted(free, key=lambda b: (self.uses.get(b, 0), self.last_use.get(b, -1)))
