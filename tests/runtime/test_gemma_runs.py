"""Gemma 3 through the same runtime as SmolLM2: every lossless policy at the tightest budget (0.3, below two of its
four embedding shards plus a layer's worth) generates the resident tokens within the budget, above the LP bound."""

import jax.numpy as jnp
import pytest

from vorch_jax.config import load_config
from vorch_jax.runtime.reference import resident_reference
from vorch_jax.runtime.run import run
from vorch_jax.runtime.setup import build_setup

SMALL = ["model=gemma3-270m", "placement=[]", "new_tokens=3", "prompt_tokens=8", "eval_tokens=16",
         "tick_every_n_layers=6", "lossy=false"]


@pytest.fixture(scope="module")
def reference():
    cfg = load_config(None, SMALL)
    return resident_reference(build_setup(cfg), jnp.float32, cfg.new_tokens)


@pytest.mark.parametrize("policy", ["static", "static-prefetch", "lru", "lfu", "scored", "belady"])
def test_every_policy_runs_gemma_under_a_third_of_its_bytes(policy, reference, tmp_path):
    s = run(load_config(None, SMALL + [f"policy={policy}", "hbm_budget=0.3"]), tmp_path, reference=reference)
    assert s["complete"] and s["tokens"] == reference.tokens and s["quality"]["kl_mean"] == 0.0
    assert 0 < s["peak_device_bytes"] <= s["hbm_budget_bytes"] < 0.31 * s["model_bytes"]
    assert s["link_bytes"]["host->device"] == s["bytes_moved"] > s["model_bytes"]  # the shards really stream
    assert 0 < s["lower_bound_bytes"] <= min(s["belady_bytes"], s["bytes_moved"])
