"""The MoE model under a budget (vorch_jax/moe_run.py, moe_executor.py): lossless policies, recorded stream,
speculative prefetch really issued, outputs as runner.run's.

Small on purpose: 8 prompt tokens, 3 new tokens, 16 evaluation tokens; one resident reference for the module.
"""

import dataclasses
import json
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest

from vorch_jax import moe_run as M
from vorch_jax.config import RunConfig
from vorch_jax.moe_executor import lam_for_tick
from vorch_jax.runner import RunError

BASE = RunConfig(model=M.MOE_MODEL, policy="lru", hbm_budget=1.0, new_tokens=3, prompt_tokens=8, eval_tokens=16,
                 placement=M.dense_protect_rules())


@pytest.fixture(scope="module")
def setup():
    return M.prepare_moe(BASE)


@pytest.fixture(scope="module")
def reference(setup):
    return M.moe_reference(setup, jnp.float32, BASE.new_tokens, speculation=True)


@pytest.fixture(scope="module")
def budget(setup):
    return M.expert_budget(setup, 0.25, 5)[0]


def test_reference_stream_is_the_routed_schedule(setup, reference):
    L, k = setup.model_cfg.n_layers, setup.top_k
    s = list(reference.stream)
    assert s[0] == "embed" and s[reference.gen_positions - 1] == "embed"
    decode = s[reference.gen_positions - (1 + L * (2 + k) + 2): reference.gen_positions]  # last decode step: T = 1
    assert decode[0] == "embed" and decode[-2:] == ["final_norm", "embed"]
    assert sum(".expert." in b for b in decode) == L * k  # one token: exactly top_k experts per layer
    assert len(reference.tokens) == BASE.new_tokens


@pytest.mark.parametrize("policy", ["lru", "lfu", "scored", "belady", "static"])
def test_lossless_policies_generate_the_resident_tokens(tmp_path, setup, reference, budget, policy):
    cfg = dataclasses.replace(BASE, policy=policy, hbm_budget=str(budget))
    s = M.run_moe(cfg, tmp_path, reference=reference)
    assert s["tokens"] == reference.tokens and s["tokens_match_resident"]
    assert s["stream_matches_resident"]  # same routing, position for position: Belady's future is exact
    assert s["peak_device_bytes"] <= budget
    assert s["quality"]["kl_mean"] < 1e-6
    assert s["bytes_moved"] >= s["belady_bytes"] * 0.999 or policy == "belady"
    assert json.loads((tmp_path / "summary.json").read_text())["complete"]
    assert (tmp_path / "trace.jsonl").stat().st_size > 0 and (tmp_path / "trace.perfetto.json").exists()
    sp = s["moe"]["speculative"]
    if policy == "scored":  # speculative prefetch on: loads really issued, each one an engine transition
        assert sp["enabled"] and sp["issued"] > 0 and sp["issued_with_engine_event"] == sp["issued"]
        assert 0 < sp["precision"] <= 1 and 0 < sp["prediction_recall"] <= 1
    else:
        assert not sp["enabled"] and sp["issued"] == 0


def test_lambda_is_router_probability_decayed_with_distance(setup):
    L, E = setup.model_cfg.n_layers, setup.n_experts
    p = np.full((L, E), 0.25)
    p[3, 1] = 1.0
    lam = dict(zip(setup.block_ids, lam_for_tick(setup.block_ids, p, 3, L, 0.9)))
    assert lam["layers.3.attn"] == 1.0 and lam["embed"] == 1.0
    assert lam["layers.3.expert.1"] == pytest.approx(1.0) and lam["layers.3.expert.0"] == pytest.approx(0.25)
    assert lam["layers.5.expert.0"] == pytest.approx(0.25 * 0.9 ** 2)
    assert lam["layers.2.expert.0"] == pytest.approx(0.25 * 0.9 ** (L + 1))  # behind: next step


def test_budget_below_the_dense_blocks_and_wrong_model_fail_before_work(tmp_path, reference):
    with pytest.raises(RunError, match="protected"):
        M.run_moe(dataclasses.replace(BASE, hbm_budget="100MiB"), tmp_path, reference=reference)
    with pytest.raises(RunError, match="not the MoE model"):
        M.prepare_moe(dataclasses.replace(BASE, model="smollm2-135m"))
    assert not (tmp_path / "summary.json").exists()


def test_expected_next_use_adds_the_passes_the_router_is_expected_to_skip(setup):
    """Belady's rule on the router's estimate: distance + (1/q - 1) passes for an expert selected with q per visit;
    known positions (`_ahead`) and dense blocks keep their exact distance."""
    from vorch_jax.moe_executor import RoutedExecutor

    L, E = setup.model_cfg.n_layers, setup.n_experts
    p = np.full((L, E), 0.5)
    p[4, 2] = 0.1
    coords = {f"layers.4.expert.{e}": (4, e) for e in range(E)}
    fake = SimpleNamespace(cfg=setup.model_cfg, schedule=list(range(100)), p_sel_LxE=p, _ahead=["layers.4.expert.3"],
                           _next_use=lambda b: 7, _expert_coords=coords)
    gap = lambda b: RoutedExecutor.expected_next_use(fake, b)  # noqa: E731
    assert gap("layers.4.attn") == 7 and gap("layers.4.expert.3") == 7  # dense; known to come next
    assert gap("layers.4.expert.1") == pytest.approx(7 + 100 * (1 / 0.5 - 1))
    assert gap("layers.4.expert.2") == pytest.approx(7 + 100 * (1 / 0.1 - 1))


def test_moe_scored_evicts_the_furthest_expected_use_first_and_never_a_protected_block(setup):
    policy = object.__new__(M.MoEScoredPolicy)  # the rule alone, without a controller
    policy.ctx = SimpleNamespace(protected=frozenset({"layers.0.attn"}))
    waits = {"layers.0.attn": 1e9, "layers.1.expert.0": 5.0, "layers.1.expert.1": 80.0, "layers.2.expert.0": 30.0}
    policy._expected_next_use = waits.__getitem__
    assert policy.victim_order(0, list(waits)) == ["layers.1.expert.1", "layers.2.expert.0", "layers.1.expert.0"]


@pytest.mark.parametrize("policy", ["lru", "scored", "static"])
def test_simulator_replays_a_real_moe_run_move_for_move(tmp_path, setup, reference, budget, policy):
    """The simulator's routed executor, fed the reference's routing and speculative predictions, makes the real
    run's decisions: the same hits, misses, prefetches (speculative ones included) and bytes on every link. Time is
    modelled, traffic is not: this is what the timing validation (experiments/sim_validate.py) stands on."""
    from vorch_jax.routing_trace import routing_from_stream
    from vorch_jax.simulator import simulate

    cfg = dataclasses.replace(BASE, policy=policy, hbm_budget=str(budget))
    real = M.run_moe(cfg, tmp_path / "real", reference=reference)
    trace = json.loads((tmp_path / "real" / "routing.json").read_text())  # what the run wrote for the simulator
    assert trace["passes"] == routing_from_stream(reference.stream[: reference.gen_positions])
    if policy == "scored":  # the predictions the run made are the ones the resident reference recorded
        made = [[p for p in layers] for layers in trace["speculation"]]
        assert all(m is None or m[0] == r[0] for ms, rs in zip(made, reference.speculation) for m, r in zip(ms, rs))
    sim = simulate(dataclasses.replace(cfg, executor="sim", routing_trace=str(tmp_path / "real" / "routing.json")),
                   tmp_path / "sim", hardware="this-machine")
    assert sim["routing"]["source"].startswith("trace ")
    assert (sim["hits"], sim["misses"]) == (real["hits"], real["misses"])
    assert sim["prefetch"]["issued"] == real["prefetch"]["issued"]
    assert sim["bytes_moved"] == real["bytes_moved"] and sim["belady_bytes"] == real["belady_bytes"]
    assert sim["link_bytes"]["host->device"] == real["link_bytes"]["host->device"]
    if policy == "scored":
        assert real["moe"]["speculative"]["issued"] > 0  # the replay includes speculative loads
