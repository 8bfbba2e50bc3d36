"""The scored policy's own schedule: a plan that stopped changing is re-planned ever more rarely, a change brings
the tick back to every interval, and a quiet stretch decays ρ by all the intervals it spans."""

from vorch_jax.controller.scored_policy import MAX_QUIET_INTERVAL, ScoredPolicy


class Script(ScoredPolicy):
    """The tick's schedule alone: `_adopt` reports the scripted changes, `_dispatch` records the decay it used."""

    def __init__(self, changes_at=()):
        self._pending, self._interval, self._skipped, self.ticks_quiet = None, 1, 0, 0
        self.changes_at, self.calls, self.adopted, self.spans = set(changes_at), 0, [], []

    def _adopt(self):
        self.adopted.append(self.calls)
        return {"b": 1} if self.calls in self.changes_at else {}

    def _dispatch(self, params=None):
        self.spans.append(min(self._skipped + 1, MAX_QUIET_INTERVAL))

    def tick(self, t):
        out = super().tick(t)
        self.calls += 1
        return out


def test_a_quiet_plan_doubles_the_interval_up_to_the_cap():
    p = Script()
    for t in range(40):
        p.tick(t)
    assert p.adopted == [0, 2, 6, 14, 22, 30, 38]  # intervals 2, 4, 8, 8, ... (MAX_QUIET_INTERVAL = 8)
    assert p.ticks_quiet == 40 - len(p.adopted)
    assert p.spans == [1, 2, 4, 8, 8, 8, 8]  # ρ decays over every interval a tick's accesses span


def test_a_change_brings_the_tick_back_to_every_interval():
    p = Script(changes_at={14})
    for t in range(30):
        p.tick(t)
    assert p.adopted == [0, 2, 6, 14, 15, 17, 21, 29]
