"""The candidate-forcing experiment: a forced rule is the one the run follows, and the policy is restored after."""

import importlib.util
from pathlib import Path

from vorch_jax.config import load_config
from vorch_jax.controller import scored_policy
from vorch_jax.controller.prefetch_window import Replay
from vorch_jax.runtime.run import run

spec = importlib.util.spec_from_file_location(
    "scored_candidates", Path(__file__).parents[2] / "experiments" / "scored_candidates.py")
sc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sc)


def test_a_forced_rule_is_the_one_the_run_follows(tmp_path):
    cfg = load_config("configs/demo.yaml", ["model=smollm2-135m", "hbm_budget=0.3", "executor=sim",
                                            "hardware=this-machine", "new_tokens=4", "prompt_tokens=8",
                                            "policy=scored"])
    own_choice = scored_policy.choose_eviction_rule
    with sc.forcing() as state:
        s = run(cfg, tmp_path / "own")
        own = state["chosen"]
        other = next(r for r in state["replays"] if sc.rule_of(r) != own and not r.plan)
        state["force"] = sc.rule_of(other)
        forced = run(cfg, tmp_path / "forced")
    followed = lambda x: (x["prefetch"]["victims_read_within"], x["prefetch"]["window_counts"],  # noqa: E731
                          x["prefetch"]["victim_size_power"], x["prefetch"]["follows_plan"])
    assert followed(s) == own and followed(forced) == sc.rule_of(other) != own
    assert scored_policy.choose_eviction_rule is own_choice


def test_candidates_are_those_within_the_tolerance_one_per_outcome():
    def r(window, nbytes, misses, plan=""):
        return Replay(window=window, bytes_moved=nbytes, misses=misses, plan=plan)

    replays = [r(1, 100, 0), r(2, 100, 0), r(3, 100, 2), r(1, 105, 0, "1-pass"), r(1, 107, 0)]
    got = sc.distinct_candidates(replays, 1.06)
    assert [(c.window, c.bytes_moved, c.misses, c.plan) for c in got] == [(1, 100, 0, ""), (3, 100, 2, ""),
                                                                          (1, 105, 0, "1-pass")]
