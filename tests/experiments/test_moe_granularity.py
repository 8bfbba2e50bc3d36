"""experiments/moe_granularity.py: which groupings of the routed neurons it tries."""

from experiments.moe_granularity import groupings


def test_groupings_follow_the_routed_neurons_and_keep_only_divisors():
    assert groupings(1536 - 608) == [8, 16, 29, 58]  # the 40% shared part: experts of 116, 58, 32, 16 neurons
    assert groupings(1536 - 704) == [8, 16, 26, 52]  # the registered MoE's: 104, 52, 32, 16
    assert groupings(100) == []  # no E of 8, 16, 100 // 32 = 3 or 100 // 16 = 6 divides 100
