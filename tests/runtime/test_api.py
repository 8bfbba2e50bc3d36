"""The notebook API drives the same runner: a budget in GB, a policy, generate, then summary and trace."""

import pytest

from vorch_jax.api import VOrchestrate
from vorch_jax.config import ConfigError


def test_vorchestrate_generates_under_a_budget_and_reports(tmp_path):
    vo = VOrchestrate("smollm2-135m", hbm_budget_gb=0.2, policy="static", tick_every_n_layers=4,
                      enable_prefetch=False, out_dir=tmp_path, eval_tokens=16, prompt_tokens=8)
    text = vo.generate("The capital of France is", new_tokens=3)
    assert text.startswith(" Paris")
    s = vo.summary
    assert s["hbm_budget_bytes"] == 200_000_000 and s["peak_device_bytes"] <= 200_000_000
    assert s["config"]["prefetch_depth"] == 0 and s["bytes_moved"] > 0
    assert any(r["event"] == "transition" and r["link"] == "host->device" for r in vo.trace)
    assert vo.trace_path.exists()


def test_vorchestrate_rejects_unknown_keys_and_bad_budgets():
    with pytest.raises(ConfigError, match="polcy"):
        VOrchestrate(polcy="lru")
    with pytest.raises(ConfigError, match="hbm_budget_gb"):
        VOrchestrate(hbm_budget_gb=0)
