"""experiments/sim_moe_trace.py: a real shared-expert MoE run's routing, stretched to Mixtral's depth, replayed by the
simulator beside Zipf routing (4 passes: a smoke run of the whole path)."""

from experiments.sim_moe_trace import POLICIES, compare
from vorch_jax.simulation.hardware import load_profile


def test_the_recorded_routing_replaces_zipf_and_belady_stays_the_floor():
    lines, results = compare(4, load_profile("h100-sxm"))
    for routing in ("zipf", "trace"):
        for frac in (0.25, 0.5):
            runs = {p: results[(routing, frac, p)] for p in POLICIES}
            assert all(s["peak_device_bytes"] <= s["hbm_budget_bytes"] for s in runs.values())
            assert all(s["bytes_moved"] >= runs["belady"]["bytes_moved"] for s in runs.values())
            assert all(s["moved_over_belady"] >= 0.999 for s in runs.values())
    # the trace really drove the trace runs: the same policy and budget move other bytes than under Zipf
    assert any(results[("trace", f, p)]["bytes_moved"] != results[("zipf", f, p)]["bytes_moved"]
               for f in (0.25, 0.5) for p in POLICIES)
    assert any("ranking" in line for line in lines) and "next-token reuse" in lines[-1]
