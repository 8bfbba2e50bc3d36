"""`telemetry.covered_seconds`: the time spans cover, once or at least twice over (the link's busy time, and the
time two copies ran at once)."""

import random

import pytest

from vorch_jax.runtime.telemetry import covered_seconds


def _union_by_merging(spans):
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(spans):
        if cur_e is None or s > cur_e:
            total += (cur_e - cur_s) if cur_e is not None else 0.0
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return total + ((cur_e - cur_s) if cur_e is not None else 0.0)


def test_union_and_two_at_once_of_known_spans():
    spans = [(0.0, 4.0), (2.0, 6.0), (5.0, 7.0), (9.0, 10.0), (9.5, 9.5)]
    assert covered_seconds(spans) == pytest.approx(8.0)  # [0, 7) and [9, 10)
    assert covered_seconds(spans, at_least=2) == pytest.approx(3.0)  # [2, 4) and [5, 6)
    assert covered_seconds(spans, at_least=3) == 0.0
    assert covered_seconds([]) == 0.0


def test_the_union_is_what_merging_the_spans_gives():
    rng = random.Random(0)
    for _ in range(200):
        spans = [(s, s + rng.uniform(0, 3)) for s in (rng.uniform(0, 20) for _ in range(rng.randint(1, 12)))]
        assert covered_seconds(spans) == pytest.approx(_union_by_merging(spans))
        assert covered_seconds(spans, at_least=2) <= covered_seconds(spans)
