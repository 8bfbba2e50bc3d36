"""Where a pass is: the positions run so far, the one running, and the ones known to come next.

A spec's pass is its skeleton with each routed layer's experts inserted once its router has chosen them
(`resolve`). So what is known ahead of the running position is everything up to and including the next router
whose choice is not made yet; where the rest of the pass holds no such router, the next pass is known up to its
first router too (a dense model's next pass entirely). That known list is what prefetching reads, and exact
distances to a block's next read come from it; beyond it `next_use` counts slots in the spec's pass order (one
pass touching every block), one pass more for an expert its router just passed over.

A pass over given tokens runs the skeleton's positions that read them (`ModelSpec.pass_positions`: a vocabulary
shard's lookup only where the shard holds one of the tokens); the next pass's tokens are not known while this one
runs, so what is known of it is `every_pass`, the positions every pass runs.

The run's last pass (a generation's last token) has no next pass: what lies beyond it still orders victims (a block
not read again this pass is as far away as its slot says), but nothing beyond it is prefetched (`ahead`). Before
2026-12-07 every prefetching policy loaded one or two blocks at the end of a run for a pass that never came.
"""

from __future__ import annotations

import numpy as np


class PassCursor:
    def __init__(self, spec):
        self.spec = spec
        self.skeleton = spec.skeleton()
        self.every_pass = spec.every_pass()  # what is known of a pass before its tokens are
        order = spec.pass_order()
        self.n = len(order)  # positions of a pass that reads every block
        self._slots: dict[str, list[int]] = {}
        for i, b in enumerate(order):
            self._slots.setdefault(b, []).append(i)
        self._slot_of = {}  # (block, op) -> its first slot (a tied embedding's lookup and head have one each)
        for p, i in zip(self._positions_with_every_expert(), range(self.n)):
            self._slot_of.setdefault((p.block, p.op), i)
        self._every_slot = dict(zip(self._indices_in_skeleton(self.every_pass), range(len(self.every_pass))))
        self._single_slot = {b: s[0] for b, s in self._slots.items() if len(s) == 1}
        self.route_of_layer = {p.layer: p for p in self.skeleton if p.op == "route"}
        self.routed = bool(self.route_of_layer)
        self._next_known = self._to_first_route(self.every_pass)
        self.passes = -1  # passes begun, less one: the index of the running pass (0: the first)
        self.last = False  # whether the running pass is the run's last (`begin_pass`)
        self._start(None)

    def _indices_in_skeleton(self, positions) -> list[int]:
        """Where each of `positions`, a subsequence of the skeleton, stands in it."""
        out, j = [], 0
        for p in positions:
            while self.skeleton[j] != p:
                j += 1
            out.append(j)
            j += 1
        return out

    @staticmethod
    def _to_first_route(positions) -> list:
        """`positions` up to and including the first router (all of them where none routes)."""
        i = next((i for i, p in enumerate(positions) if p.op == "route"), None)
        return list(positions) if i is None else list(positions[: i + 1])

    def _positions_with_every_expert(self):
        for p in self.every_pass:
            yield p
            if p.op == "route":
                yield from self.spec.experts(p.layer, np.ones(self.spec.n_experts, bool))

    # ------------------------------------------------------------------ walking a pass
    def begin_pass(self, ids_BxT=None, last: bool = False) -> None:
        """A pass over the token ids `ids_BxT` begins (None: every skeleton position runs); `last`: no pass follows
        it in the run (nothing beyond it is prefetched)."""
        self.passes += 1
        self.last = bool(last)
        self._start(ids_BxT)

    def _start(self, ids_BxT) -> None:
        self._pass = self.skeleton if ids_BxT is None else self.spec.pass_positions(ids_BxT)
        self._pass_at = (range(len(self._pass)) if self._pass is self.skeleton  # each one's index in the skeleton
                         else self._indices_in_skeleton(self._pass))
        self._i = 0  # next index into `_pass`
        self._at = None  # the skeleton index of the current position (None: an expert)
        self._experts: list = []  # resolved experts of the current layer still to run
        self.current = None
        self.unselected = set()  # experts of the current routed layer its router did not choose
        self._known = None
        self._this_pass = 0  # of the known positions, those in the running pass (`known`)
        self._reached_next = False  # whether the last walk of what is known reached into the next pass
        self._resolved = False

    @property
    def unselected(self) -> set:
        return self._unselected

    @unselected.setter
    def unselected(self, blocks) -> None:
        self._unselected = set(blocks)
        self._uses = {}  # the memo of `next_uses`: beyond what is known these count a pass more

    def next(self):
        """The next position of the pass, or None at its end."""
        self._at = None
        if self._experts:
            self.current = self._experts.pop(0)
        elif self._i < len(self._pass):
            self.current, self._at = self._pass[self._i], self._pass_at[self._i]
            self._i += 1
        else:
            self.current = None
        self._known, self._resolved = None, False
        return self.current

    def resolve(self, layer: int, selected_E) -> None:
        """Layer `layer`'s router chose `selected_E` (bool [E]): its experts come next."""
        self._experts = self.spec.experts(layer, selected_E)
        chosen = {p.block for p in self._experts}
        self.unselected = {p.block for p in self.spec.experts(layer, np.ones(self.spec.n_experts, bool))} - chosen
        self._known, self._resolved = None, True

    def ends_layer(self, position) -> bool:
        """Whether `position` is its layer's last feed-forward position (the MLP, or the last chosen expert, or the
        router when none of the experts it chose runs here: a mesh device holding none of them)."""
        if position.op == "route":
            return self._resolved and not self._experts
        return position.op == "mlp" or (position.op == "expert" and not self._experts)

    # ------------------------------------------------------------------ what is known
    def _iter_known(self, next_pass: bool = True):
        """What is known to follow, in order; `next_pass` False: only what lies in the running pass."""
        yield from self._experts
        if self.current is not None and self.current.op == "route" and not self._resolved:
            return  # its choice is not made yet: nothing beyond it is known
        cut = None
        for p in self._pass[self._i:]:
            yield p
            if p.op == "route":
                cut = p
                break
        if cut is None and next_pass:  # nothing unresolved in this pass: the next pass is known to its first router
            self._reached_next = True
            yield from self._next_known

    def known(self) -> list:
        """The positions known to follow the current one, in order (see the module docstring)."""
        if self._known is None:
            self._reached_next = False
            self._known = list(self._iter_known())
            self._this_pass = len(self._known) - (len(self._next_known) if self._reached_next else 0)
            self._uses = {}  # `next_uses` of this position, block by block (the eviction order asks repeatedly)
            self._known_index = {}
            for k, p in enumerate(self._known):
                self._known_index.setdefault(p.block, k)
        return self._known

    def is_known(self, block: str) -> bool:
        return block in self.known_index()

    def known_index(self) -> dict:
        """block -> index of its first known position (what `is_known` asks, for many blocks at once)."""
        self.known()
        return self._known_index

    def ahead(self, depth: int) -> list[str]:
        """The blocks of the next `depth` known positions: what prefetching reads (none past the run's last pass)."""
        if self._known is not None:
            return [p.block for p in self._known[:min(depth, self._this_pass) if self.last else depth]]
        out = []
        for p in self._iter_known(next_pass=not self.last):
            if len(out) == depth:
                break
            out.append(p.block)
        return out

    def current_slot(self) -> int:
        p = self.current
        return self._slot_of.get((p.block, p.op), 0) if p is not None else self.n - 1

    def cycle_position(self, passes: int) -> int | None:
        """Where the running position falls in a cycle of `passes` passes of a dense model's `pass_order` (what a
        steady-state plan is indexed by, `pass_plan`): its index among the positions every pass runs, so a block
        read twice a pass has two; None for a position outside them (a token-routed lookup) or of a routed model."""
        slot = None if self.routed or self._at is None else self._every_slot.get(self._at)
        return None if slot is None else (self.passes % passes) * self.n + slot

    def next_uses(self, blocks) -> list[int]:
        """`next_use` of each of `blocks`: the eviction order's hot path, so each block's distance is computed once a
        position (what is known, the current slot and `unselected` fix it; each of them changing clears the memo).
        Measured on the shared-expert MoE at 25% of its experts, under cProfile: 127,726 slot-distance walks in a
        24-token decode, where the ledger asks for the same few dozen blocks several times a position."""
        known = self.known()
        uses = self._uses
        missing = [b for b in blocks if b not in uses]
        if missing:
            index, here = self._known_index, self.current_slot()
            for b in missing:
                uses[b] = index[b] + 1 if b in index else self._beyond_known(b, here, len(known))
        return [uses[b] for b in blocks]

    def next_use(self, block: str) -> int:
        """Positions until `block` is next read: exact where known, else its pass-order slot distance (plus a pass
        for an expert its router just passed over) beyond what is known."""
        return self.next_uses([block])[0]

    def _beyond_known(self, block: str, here: int, beyond: int) -> int:
        single = self._single_slot.get(block)
        if single is not None:
            d = ((single - here - 1) % self.n) + 1
        elif block in self._slots:
            d = min(((s - here - 1) % self.n) + 1 for s in self._slots[block])
        else:
            return self.n + 1 + beyond
        return d + (self.n if block in self.unselected else 0) + beyond
