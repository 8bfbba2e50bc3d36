"""Every policy, lossless, at budgets 0.3 / 0.5 / 0.8: the resident tokens, the budget held, Belady a bound."""

import pytest

from vorch_jax.runtime.run import run

POLICIES = ["static", "static-prefetch", "lru", "lfu", "scored", "belady"]


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.8])
@pytest.mark.parametrize("policy", POLICIES)
def test_policy_generates_resident_tokens_within_budget(policy, budget, reference, small_config, tmp_path):
    s = run(small_config(f"policy={policy}", f"hbm_budget={budget}", "lossy=false"), tmp_path, reference=reference)
    assert s["complete"] and s["policy"] == policy
    assert s["tokens"] == reference.tokens, "a lossless policy must generate exactly the resident tokens"
    assert s["quality"]["kl_mean"] == 0.0 and s["quality"]["top1_agree"] == 1.0
    assert 0 < s["peak_device_bytes"] <= s["hbm_budget_bytes"]
    assert s["lower_bound"]["status"] == "optimal" and s["lower_bound"]["accesses"] == s["hits"] + s["misses"]
    assert 0 < s["lower_bound_bytes"] <= min(s["belady_bytes"], s["bytes_moved"]), "no policy beats the LP bound"
    assert s["link_bytes"].get("host->device", 0) == s["bytes_moved"] > 0  # blocks really moved
    assert s["hits"] + s["misses"] == 4 * 63  # 4 passes x (62 blocks + the tied head's second use of embed)
    held = s["held_memory"]  # loads land in evicted blocks' memory (peak above counts it), fresh memory otherwise
    assert held["bytes_reused"] + held["bytes_fresh"] >= s["bytes_moved"]  # every S0 load, the quality pass's too
    if s["bytes_moved"] > s["model_bytes"]:  # blocks were dropped and loaded again
        assert held["bytes_reused"] > 0


def test_resident_policy_moves_only_the_initial_placement(reference, small_config, tmp_path):
    s = run(small_config("policy=resident", "hbm_budget=1.0"), tmp_path, reference=reference)
    assert s["tokens"] == reference.tokens and s["misses"] == 0
    assert s["bytes_moved"] == s["model_bytes"] == s["peak_device_bytes"]


def test_small_dram_budget_streams_through_nvme(reference, small_config, tmp_path):
    s = run(small_config("policy=static", "hbm_budget=0.5", "dram_budget=0.2"), tmp_path, reference=reference)
    assert s["tokens"] == reference.tokens
    assert s["link_bytes"].get("nvme->host", 0) > 0, "blocks beyond the DRAM budget must come from NVMe"
    assert s["peak_device_bytes"] <= s["hbm_budget_bytes"]


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.8])
def test_scored_loads_within_3_percent_of_the_lower_bound_and_less_than_static_prefetch(budget, tmp_path):
    """The controller issue's target on SmolLM2 (the demo's 16 tokens, lossless), on the simulated executor (the
    ledger's decisions are the real runs'; experiments/bench_policies.py measures both), in what the scored policy
    minimises: its loads priced in link seconds (the profile's latency + bytes / bandwidth) within 1.03x the LP
    bound priced the same way (or, where the LP lies further below what is achievable, the bound the integral
    problem proves in 20 s: at 0.5 the LP is 1.017x below it), and fewer of them, and fewer bytes, than
    static-prefetch's."""
    from vorch_jax.config import load_config
    from vorch_jax.policies.lower_bound import NS_PER_S, integral_optimum
    from vorch_jax.runtime.inputs import profile_load_seconds
    from vorch_jax.runtime.setup import build_setup
    from vorch_jax.simulation.hardware import load_profile

    over = [f"hbm_budget={budget}", "executor=sim", "hardware=this-machine"]
    scored = run(load_config("configs/demo.yaml", over + ["policy=scored"]), tmp_path / "scored")
    baseline = run(load_config("configs/demo.yaml", over + ["policy=static-prefetch"]), tmp_path / "sp")
    moved, bound = scored["link_seconds"]["moved"], scored["link_seconds"]["lower_bound"]
    if moved > 1.03 * bound:
        st = build_setup(load_config("configs/demo.yaml", over), simulated=True)
        load = {b: s * NS_PER_S for b, s in profile_load_seconds(st, load_profile("this-machine")).items()}
        proven = integral_optimum(list(st.pass_order) * 16, st.device_bytes, st.hbm_budget, pinned=st.protected,
                                  load_bytes=load, time_limit_s=20).proven_bytes
        bound = max(bound, (proven or 0) / NS_PER_S)
    assert moved <= 1.03 * bound
    assert scored["link_seconds"]["moved"] < baseline["link_seconds"]["moved"]
    assert scored["bytes_moved"] < baseline["bytes_moved"]
    assert scored["peak_device_bytes"] <= scored["hbm_budget_bytes"]
