"""The ledger's reads that load nothing: an op computed where its weights live, in host DRAM (`in_place.py` chooses
which), and a token-routed lookup gathering its tokens' rows where its block is. `ReadsInPlace` is a part of
`Ledger` (it reads the ledger's residency: `on_device`, `inflight`, the engine, the policy, the cursor, the
counters), kept apart so that each module stays one job long.
"""

from __future__ import annotations

from vorch_jax.tiers.state import State

from vorch_jax.runtime.access import Access
from vorch_jax.runtime.in_place import InPlace


class ReadsInPlace:
    """The `Ledger`'s reads served where the weights live (see the module docstring)."""

    def _gather(self, block: str):
        """The weights a token-routed lookup reads its tokens' rows from (kilobytes, never worth a load of its own):
        on the device where its block has landed, else in host memory where the block's lossless arrays are (an
        `InPlace`: the ids and the activations cross the link, an `in_place` event with reason "lookup" records
        them); a block with no copy in host DRAM (a home on NVMe) loads as on a miss. Whichever, a lookup is no
        read of the access stream: no policy sees it, neither Belady nor the bound counts it (the resident
        reference leaves it out too), and the position count skips it; only a load it needed counts in the bytes
        moved."""
        self._gathered = True
        self._settle_landed()
        if block in self.on_device and block not in self.inflight:
            self.counters.lookups_on_device += 1
            return self.engine.wait(block)
        if self.engine.has_host_copy(block):
            self.counters.lookups_in_place += 1
            return self._in_place(block, "lookup")
        self.counters.lookups_loaded += 1
        return self._bring(block, "lookup")

    def _chooses_in_place(self, block: str) -> bool:
        landed = block in self.on_device and block not in self.inflight
        since = self.requested_at.get(block) if block in self.inflight else None
        return self.in_place.choose(self.cursor.current, self.tokens, landed=landed,
                                    in_flight_for=None if since is None else self.now() - since,
                                    load_bytes=self.device_bytes[block])  # no compressed home: it moves S0

    def _read_in_place(self, block: str):
        """The read runs where the weights live: no load, no HBM; the policy still sees the access, and an
        `auto` block loads in the background when the link is idle and the policy ranks it above its victims."""
        t0 = self.now()
        self.policy.on_access(self.t, block)  # neither a hit nor a miss: the summary counts it from its event
        self.accesses.append(Access(self.t, self.step, self.info[block].layer, block, False, t0, t0,
                                    State.S3.name))
        if self.in_place.mode(block) == "auto":
            self._background_load(block)
        return self._in_place(block, "in_place")

    def _in_place(self, block: str, reason: str) -> InPlace:
        """What the backend computes `block`'s op over instead of device weights: its arrays in host memory, and the
        engine's `in_place` event (with `reason`) to record."""
        return InPlace(block, self.engine.host_leaves(block), lambda start, end, link_bytes:
                       self.engine.record_in_place(block, start, end, link_bytes, reason=reason))

    def _settle_landed(self) -> None:
        """Loads that have landed leave `inflight` (they are otherwise settled when their block is next read)."""
        for b in [b for b in self.inflight if self.engine.state(b) != State.S5]:
            self.inflight.pop(b)
            self.requested_at.pop(b, None)
            self.on_device[b] = self.engine.representation(b).nbytes

    def _background_load(self, block: str) -> None:
        """Load `block`, just computed in place, if nothing is in flight and room is made by evicting only blocks
        the policy ranks below it (`victim_order` over them and it: it must not come first) and that the plan does
        not know to be read before it comes again: a load that pushes out a block needed sooner only churns (on a
        dense pass, where the cursor knows every next read, LRU would always rank the block just read first)."""
        self._settle_landed()
        if self.inflight or block in self.on_device:
            return
        need = self._bytes(block, self.policy.device_state(block))
        used = sum(self.on_device.values())
        victims, freed = [], 0
        if used + need > self.budget:
            window = self._window()
            candidates = [b for b in self.on_device if b not in window]
            order = self.policy.victim_order(self.t, candidates + [block])
            nxt = dict(zip(order, self.cursor.next_uses(order)))
            for v in order:
                if used - freed + need <= self.budget or v == block or (self.cursor.is_known(v)
                                                                          and nxt[v] <= nxt[block]):
                    break
                victims.append(v)
                freed += self.on_device[v]
            if used - freed + need > self.budget:
                return
        for v in victims:
            self._evict(v, "evict:in-place")
        self._load(block, "prefetch:in-place")
        self.prefetched.add(block)
        self.counters.prefetch_issued += 1
        self.counters.in_place_loads += 1
