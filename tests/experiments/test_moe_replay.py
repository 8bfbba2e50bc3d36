"""experiments/moe_policies.replay_bounds: the eviction rules the MoE ceiling compares, on streams small enough to
count by hand."""

import numpy as np

from experiments.moe_policies import replay_bounds
from vorch_jax.models.block_ids import expert_block_id


def test_lfu_keeps_the_expert_read_most_where_lru_lets_it_go():
    # one layer, room for 2: 'a' comes back after two others each time; LRU evicts it at the second of them
    reads = "aabcadeafgah"
    stream = [expert_block_id(0, ord(c) - ord("a")) for c in reads]
    loads = replay_bounds(stream, 2, 1, 8)
    assert loads["lfu"] == len(set(reads))  # every expert once: 'a' never leaves
    assert loads["lru"] > loads["lfu"]


def test_knowing_every_coming_pass_is_belady_and_knowing_less_never_beats_it():
    rng = np.random.default_rng(0)
    L, E, passes = 3, 4, 12
    stream = [expert_block_id(i, int(e)) for _ in range(passes) for i in range(L)
              for e in sorted(rng.choice(E, 2, replace=False))]
    loads = replay_bounds(stream, 5, L, E, lookaheads=(0, 1, passes))
    assert loads[f"lookahead-{passes}"] == loads["belady"]
    assert all(v >= loads["belady"] for v in loads.values())
    assert set(loads) == {"lru", "lfu", "belady", "expected", "expected-oracle", "lookahead-0", "lookahead-1",
                          f"lookahead-{passes}"}
