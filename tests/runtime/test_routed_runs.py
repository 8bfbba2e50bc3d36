"""A routed model (the MoE SmolLM2) through the one runtime: lossless policies, the recorded stream, speculative
prefetch really issued, the same outputs as any run, and the simulator replaying a real run move for move.

Small on purpose: 8 prompt tokens, 3 new tokens, 16 evaluation tokens; one resident reference for the module.
"""

import dataclasses
import json
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest

from vorch_jax.config import MoEConfig, PlacementRule, RunConfig
from vorch_jax.errors import RunError
from vorch_jax.models import registry
from vorch_jax.controller.access_stats import lookahead_lambda
from vorch_jax.controller.scored_policy import ScoredPolicy
from vorch_jax.runtime.cursor import PassCursor
from vorch_jax.runtime.reference import resident_reference
from vorch_jax.runtime.routing import RouterStats
from vorch_jax.runtime.run import run, simulate
from vorch_jax.runtime.setup import build_setup, expert_budget, protect_all_but

MOE = "smollm2-135m-moe"
BASE = RunConfig(model=MOE, policy="lru", hbm_budget=1.0, new_tokens=3, prompt_tokens=8, eval_tokens=16,
                 placement=protect_all_but(registry.get(MOE), "expert"))


@pytest.fixture(scope="module")
def setup():
    return build_setup(BASE)


@pytest.fixture(scope="module")
def reference(setup):
    return resident_reference(setup, jnp.float32, BASE.new_tokens, speculation=True)


@pytest.fixture(scope="module")
def budget(setup):
    return expert_budget(setup, 0.25, 5)[0]


def test_reference_stream_is_the_routed_schedule(setup, reference):
    L, k = setup.spec.n_layers, setup.spec.top_k
    s = list(reference.stream)
    assert s[0] == "embed" and s[reference.gen_positions - 1] == "embed"
    decode = s[reference.gen_positions - (1 + L * (2 + k) + 2): reference.gen_positions]  # last decode step: T = 1
    assert decode[0] == "embed" and decode[-2:] == ["final_norm", "embed"]
    assert sum(".expert." in b for b in decode) == L * k  # one token: exactly top_k experts per layer
    assert len(reference.tokens) == BASE.new_tokens


SPECULATING = MoEConfig(speculative="on")  # `auto` measures whether it pays: on this CPU it does not


@pytest.mark.parametrize("policy", ["lru", "lfu", "scored", "belady", "static"])
def test_lossless_policies_generate_the_resident_tokens(tmp_path, setup, reference, budget, policy):
    cfg = dataclasses.replace(BASE, policy=policy, hbm_budget=str(budget),
                              moe=SPECULATING if policy == "scored" else BASE.moe)
    s = run(cfg, tmp_path, reference=reference)
    assert s["tokens"] == reference.tokens and s["tokens_match_resident"]
    assert s["stream_matches_resident"]  # same routing, position for position: Belady's future is exact
    assert s["peak_device_bytes"] <= budget
    assert s["quality"]["kl_mean"] < 1e-6
    assert s["bytes_moved"] >= s["belady_bytes"] * 0.999 or policy == "belady"
    assert s["lower_bound"]["status"] == "optimal"
    assert 0 < s["lower_bound_bytes"] <= min(s["belady_bytes"], s["bytes_moved"])
    assert json.loads((tmp_path / "summary.json").read_text())["complete"]
    assert (tmp_path / "trace.jsonl").stat().st_size > 0 and (tmp_path / "trace.perfetto.json").exists()
    sp = s["routing"]["speculative"]
    if policy == "scored":  # speculative prefetch on: loads really issued, each one an engine transition
        assert sp["enabled"] and sp["issued"] > 0 and sp["issued_with_engine_event"] == sp["issued"]
        assert 0 < sp["precision"] <= 1 and 0 < sp["prediction_recall"] <= 1
    else:
        assert not sp["enabled"] and sp["issued"] == 0


def test_auto_speculates_only_where_an_experts_load_is_half_a_layer_or_more(tmp_path, reference, budget):
    """`moe.speculative: auto` reads the run's measured expert load time and resident layer time, says both in the
    summary, and follows SPECULATION_MIN_LOAD_OF_LAYER; `on` and `off` are obeyed whatever they say."""
    from vorch_jax.runtime.inputs import SPECULATION_MIN_LOAD_OF_LAYER, speculative

    s = run(dataclasses.replace(BASE, policy="scored", hbm_budget=str(budget)), tmp_path, reference=reference)
    sp = s["routing"]["speculative"]  # on this CPU the off branch: an expert loads in a few percent of a layer
    assert sp["expert_load_s"] > 0 and sp["layer_s"] > 0
    assert sp["enabled"] == (sp["expert_load_s"] >= SPECULATION_MIN_LOAD_OF_LAYER * sp["layer_s"])
    cfg = lambda pol, mode: dataclasses.replace(BASE, policy=pol, moe=MoEConfig(speculative=mode))  # noqa: E731
    assert speculative(cfg("scored", "auto"), 1.0, 1.0) and not speculative(cfg("scored", "auto"), 0.1, 1.0)
    assert speculative(cfg("scored", "auto")) and speculative(cfg("scored", "auto"), 0.1, float("nan"))  # unmeasured
    assert not speculative(cfg("lru", "auto"), 1.0, 1.0)  # the baselines stay plain caches
    assert speculative(cfg("lru", "on"), 0.0, 1.0) and not speculative(cfg("scored", "off"), 9.0, 1.0)


def test_experts_computed_on_the_host_generate_the_resident_tokens(tmp_path, setup, reference, budget):
    """(`in_place: auto` is left to the dense tests: here an expert's 0.9 MB loads in tens of microseconds, far
    quicker than any op in place, so the choice rightly never makes one.)"""
    rules = BASE.placement + (PlacementRule(path=r"layers\.\d+\.expert\.\d+", compute="host"),)
    s = run(dataclasses.replace(BASE, policy="lfu", hbm_budget=str(budget), placement=rules), tmp_path,
            reference=reference)
    assert s["tokens"] == reference.tokens and s["peak_device_bytes"] <= budget
    # every expert read ran in place and none loaded
    assert s["in_place"]["reads"] == s["routing"]["expert_accesses"] > 0 and s["routing"]["expert_bytes_moved"] == 0


def test_lambda_is_router_probability_decayed_with_distance(setup):
    L, E = setup.spec.n_layers, setup.spec.n_experts
    stats = RouterStats(setup.info, PassCursor(setup.spec), setup.block_ids, lam_decay=0.9)
    stats.p_sel_LxE = np.full((L, E), 0.25)
    stats.p_sel_LxE[3, 1] = 1.0
    lam = dict(zip(setup.block_ids, stats.lam_for_tick(3)))
    assert lam["layers.3.attn"] == 1.0 and lam["embed"] == 1.0
    assert lam["layers.3.expert.1"] == pytest.approx(1.0) and lam["layers.3.expert.0"] == pytest.approx(0.25)
    assert lam["layers.5.expert.0"] == pytest.approx(0.25 * 0.9 ** 2)
    assert lam["layers.2.expert.0"] == pytest.approx(0.25 * 0.9 ** (L + 1))  # behind: next step
    for layer in (0, 3, L - 1, L):  # the host's numpy rule is the controller's jnp reference over a whole pass
        ref = lookahead_lambda(stats.layer_B, layer, L, L + 2, 0.9, np.ones(len(stats.ids), np.float32),
                               ~stats.is_expert_B)
        p_B = np.where(stats.is_expert_B, stats.p_sel_LxE[np.clip(stats.layer_B, 0, L - 1), stats.expert_B], 1.0)
        np.testing.assert_allclose(stats.lam_for_tick(layer), np.asarray(ref) * p_B, rtol=1e-6)


def test_the_estimator_that_predicts_the_routers_best_is_the_one_read(setup):
    """P(selected) is read from whichever estimator (`routing.ESTIMATORS`) has the least squared error on the
    routers' decisions so far: routing that is skewed over the run but not repeated token to token favours the run's
    mean; routing that holds for a few tokens and then moves favours a short average."""
    from vorch_jax.runtime.routing import ESTIMATORS

    L, E = setup.spec.n_layers, setup.spec.n_experts
    rng = np.random.default_rng(0)

    def stats_after(choose):
        stats = RouterStats(setup.info, PassCursor(setup.spec), setup.block_ids)
        for t in range(60):
            stats.observe(2, np.isin(np.arange(E), choose(t)))
        return stats

    skewed = stats_after(lambda t: [0, rng.choice([1, 2, 3, 4, 5, 6, 7], p=[.4, .2, .1, .1, .1, .05, .05])])
    assert ESTIMATORS[skewed.estimator] is None
    assert skewed.p_sel_LxE[2, 0] == pytest.approx(61 / 61, abs=0.05) and skewed.p_sel_LxE[2, 7] < 0.15
    runs = stats_after(lambda t: [(t // 6) % E, (t // 6 + 3) % E])  # each pair held for six tokens
    assert ESTIMATORS[runs.estimator] == 0.4
    assert runs.p_sel_LxE[5].tolist() == [2 / E] * E  # a layer never observed keeps the uniform rate


def test_budget_below_the_dense_blocks_fails_before_work(tmp_path, reference):
    with pytest.raises(RunError, match="protected"):
        run(dataclasses.replace(BASE, hbm_budget="100MiB"), tmp_path, reference=reference)
    assert not (tmp_path / "summary.json").exists()


def test_expected_next_use_adds_the_passes_the_router_is_expected_to_skip(setup):
    """Belady's rule on the router's estimate: (1/q - 1) passes more for an expert selected with q per visit that is
    not known to come next; known positions and dense blocks keep their exact distance."""
    L, E = setup.spec.n_layers, setup.spec.n_experts
    cursor = PassCursor(setup.spec)
    stats = RouterStats(setup.info, cursor, setup.block_ids)
    stats.p_sel_LxE = np.full((L, E), 0.5)
    stats.p_sel_LxE[4, 2] = 0.1
    while cursor.next().block != "layers.4.moe_gate":
        pass
    cursor.resolve(4, np.arange(E) == 3)  # the router chose expert 3: it is known to come next
    n = cursor.n
    assert stats.expected_skip_positions("layers.4.attn") == 0 and stats.expected_skip_positions("layers.4.expert.3") == 0
    assert stats.expected_skip_positions("layers.4.expert.1") == pytest.approx(n * (1 / 0.5 - 1))
    assert stats.expected_skip_positions("layers.4.expert.2") == pytest.approx(n * (1 / 0.1 - 1))
    assert cursor.next_use("layers.4.expert.3") == 1 and cursor.next_use("layers.5.attn") == 2
    assert cursor.next_use("layers.4.expert.1") > n  # passed over by its router: a pass and more away


def test_next_uses_remembered_within_a_position_equal_a_fresh_walk(setup):
    """The cursor keeps each block's distance for the position it was asked at; moving on, a router's choice and
    clearing `unselected` each invalidate it, so every answer equals the distance computed afresh."""
    cursor = PassCursor(setup.spec)
    blocks = list(setup.block_ids)

    def fresh():
        known, here = cursor.known(), cursor.current_slot()
        return [cursor._known_index[b] + 1 if b in cursor._known_index else cursor._beyond_known(b, here, len(known))
                for b in blocks]

    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(2):
        cursor.begin_pass()
        while (p := cursor.next()) is not None:
            assert cursor.next_uses(blocks) == fresh() and cursor.next_uses(blocks[::-1]) == fresh()[::-1]
            if p.op == "route":
                cursor.resolve(p.layer, rng.permutation(setup.spec.n_experts) < setup.spec.top_k)
                assert cursor.next_uses(blocks) == fresh()
                before = cursor.next_uses(blocks)
                cursor.unselected = set()  # what the ledger does when the layer ends
                assert cursor.next_uses(blocks) == fresh() != before
            checked += 1
    assert checked > 2 * setup.spec.n_layers


def test_scored_evicts_the_furthest_expected_use_first_and_never_a_protected_block(setup):
    policy = object.__new__(ScoredPolicy)  # the rule alone, without a controller
    policy.ctx = SimpleNamespace(protected=frozenset({"layers.0.attn"}))
    waits = {"layers.0.attn": 1e9, "layers.1.expert.0": 5.0, "layers.1.expert.1": 80.0, "layers.2.expert.0": 30.0}
    policy._expected_next_uses = lambda blocks: [waits[b] for b in blocks]
    assert policy.victim_order(0, list(waits)) == ["layers.1.expert.1", "layers.2.expert.0", "layers.1.expert.0"]


@pytest.mark.parametrize("policy", ["lru", "scored", "static"])
def test_simulator_replays_a_real_moe_run_move_for_move(tmp_path, setup, reference, budget, policy):
    """The simulator's routed executor, fed the reference's routing and speculative predictions, makes the real
    run's decisions: the same hits, misses, prefetches (speculative ones included) and bytes on every link. Time is
    modelled, traffic is not: this is what the timing validation (experiments/sim_validate.py) stands on."""
    cfg = dataclasses.replace(BASE, policy=policy, hbm_budget=str(budget),
                              moe=SPECULATING if policy == "scored" else BASE.moe)
    real = run(cfg, tmp_path / "real", reference=reference)
    trace = json.loads((tmp_path / "real" / "routing.json").read_text())  # what the run wrote for the simulator
    assert trace["passes"] == [list(map(list, p)) for p in reference.routing]
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
        assert real["routing"]["speculative"]["issued"] > 0  # the replay includes speculative loads
