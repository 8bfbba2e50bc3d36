"""experiments/moe_policies.replay_bounds: the eviction rules the MoE ceiling compares, on streams small enough to
count by hand; and policy_row, which folds a policy's rounds into one row."""

import numpy as np
import pytest

from experiments.moe_policies import policy_row, replay_bounds
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


def _summary(tok_s, moved=1000, stall=0.1):
    return {"bytes_moved": moved, "belady_bytes": 800, "hits": 3, "misses": 1, "decode_tok_s": tok_s, "stall_s": stall,
            "tokens_match_resident": True, "stream_matches_resident": True,
            "routing": {"expert_hit_rate": 0.5, "expert_bytes_moved": 600, "speculative": {}}}


def test_a_policy_row_takes_medians_over_rounds_and_refuses_bytes_that_do_not_repeat():
    row = policy_row(0.25, "scored", 123, [_summary(10.0, stall=0.3), _summary(14.0, stall=0.1), _summary(11.0)])
    assert row["decode_tok_s"] == 11.0 and row["decode_tok_s_rounds"] == [10.0, 14.0, 11.0]
    assert row["stall_s"] == pytest.approx(0.1) and row["ratio"] == 1000 / 800 and row["hit_rate"] == 0.75
    with pytest.raises(RuntimeError, match="bytes moved differ between rounds"):
        policy_row(0.25, "scored", 123, [_summary(10.0), _summary(10.0, moved=1001)])
