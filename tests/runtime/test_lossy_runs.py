"""Lossy runs end to end: quality guarded by measurement (a calibration, measured first when none is stored), the
run-level quality budget respected, and the lossless guarantees that still hold (budget, traffic = trace).

The calibration is measured on 16 tokens into a temporary cache, once for the module (about 30 s here)."""

import json

import pytest

from vorch_jax.errors import QualityError
from vorch_jax.runtime.run import run

LOSSY_READS = ("S1", "S2", "S6")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    d = tmp_path_factory.mktemp("vorch-cache")
    mp.setenv("VORCH_CACHE", str(d))
    yield d
    mp.undo()


@pytest.fixture(scope="module")
def lossy_run(cache, reference, small_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("lossy")
    said = []
    # score.alpha=0: the plan then does not weigh δ, the measured dequant time, whose probe runs slower when the
    # machine is loaded (in the full suite the plan once chose no lossy state at all); the guard is what is tested.
    cfg = small_config("policy=scored", "lossy=true", "hbm_budget=0.4", "quality.calibration_tokens=16",
                       "score.alpha=0")
    return out, run(cfg, out, reference=reference, progress=said.append), said


def test_a_lossy_run_without_a_stored_calibration_measures_one_first(lossy_run, cache):
    _, s, said = lossy_run
    assert any("no stored calibration" in m for m in said)
    assert list((cache / "calibration").rglob("*")), "the calibration it measured is stored for later runs"
    assert s["quality"]["budget"]["calibration"] and s["calibration"]


def test_lossy_runs_stay_within_their_quality_budget(lossy_run):
    _, s, _ = lossy_run
    q = s["quality"]
    b = q["budget"]
    assert b["max_kl"] == 0.02 and b["bound_kl"] <= b["max_kl"] * b["share"] + 1e-12
    assert q["kl_mean"] <= b["max_kl"] and b["within_budget"] is True, q
    assert q["kl_mean"] > 0, "the run was meant to hold some blocks lossy"


def test_blocks_read_lossy_are_only_those_the_budget_allows(lossy_run):
    out, s, _ = lossy_run
    recs = [json.loads(line) for line in (out / "trace.jsonl").read_text().splitlines()]
    read_lossy = {(r["block"], r["to"]) for r in recs if r["event"] == "access" and r["to"] in LOSSY_READS}
    assert read_lossy, "no block was read in a lossy state"
    # The allowance, recomputed from the calibration the run stored: every lossy read is one it allowed.
    from vorch_jax.controller.calibrate import load_calibration, machine_key, model_key
    from vorch_jax.models.gguf_source import load_smollm2_source
    from vorch_jax.controller.quality_budget import allocate
    from vorch_jax.config import config_from_dict
    from vorch_jax.runtime.setup import build_setup

    cfg = config_from_dict(s["config"])
    setup = build_setup(cfg)
    source = load_smollm2_source()
    cal = load_calibration(None, model_key(source), machine_key(), source=source)
    allowance = allocate(cal.kl, setup.state_bytes, cfg.quality.max_kl, share=cfg.quality.kl_share,
                         blocks=[b for b in setup.block_ids if b not in setup.forced])
    assert allowance.bound_kl == pytest.approx(s["quality"]["budget"]["bound_kl"])
    for block, state in read_lossy:
        assert state in {x.name for x in allowance.states[block]}, (block, state)
    assert s["peak_device_bytes"] <= s["hbm_budget_bytes"]
    # the bound prices each block in the state it was read in (lower_bound's access_bytes), and stays a bound
    assert s["lower_bound"]["status"] == "optimal" and 0 < s["lower_bound_bytes"] <= s["bytes_moved"]
    gen_h2d = sum(r["bytes"] for r in recs if r["event"] == "transition" and r["link"] == "host->device"
                  and -s["initial_placement_s"] <= r["t"] <= s["wall_s"])
    assert gen_h2d == s["link_bytes"]["host->device"]


def test_stored_only_without_a_calibration_is_a_one_line_error(tmp_path, monkeypatch, reference, small_config):
    monkeypatch.setenv("VORCH_CACHE", str(tmp_path / "empty-cache"))
    cfg = small_config("policy=scored", "lossy=true", "quality.calibration=stored")
    with pytest.raises(QualityError, match="vorch calibrate"):
        run(cfg, tmp_path / "out", reference=reference)
    assert not (tmp_path / "out" / "summary.json").exists()


def test_placement_rules_above_the_budget_stop_before_any_work(lossy_run, cache, reference, small_config, tmp_path):
    cfg = small_config("policy=static", "lossy=true", "hbm_budget=0.5",
                       "placement=[{path: 'layers\\.\\d+\\.mlp', state: S6}, {path: embed, state: S0, protect: true}]")
    with pytest.raises(QualityError, match="quality.max_kl"):
        run(cfg, tmp_path, reference=reference)
