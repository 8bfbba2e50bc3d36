"""Lossy runs end to end: quality guarded by measurement (a calibration, measured first when none is stored), the
run-level quality budget respected, and the lossless guarantees that still hold (budget, traffic = trace).

The calibration is measured on 16 tokens into a temporary cache, once for the module (about 30 s here)."""

import json
from pathlib import Path

import pytest

from vorch_jax.errors import QualityError
from vorch_jax.runtime.run import run

LOSSY_READS = ("S1", "S2", "S6")
SMOKE = Path(__file__).parents[2] / "configs" / "smoke.yaml"


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


def test_compressed_homes_over_the_quality_budget_are_one_line_exit_2(lossy_run, cache, tmp_path, capsys):
    """From the command line, with the calibration the module stored: int4 homes for every layer spend more ΔKL than
    quality.max_kl allows, which the run says in one line before any work."""
    from vorch_jax.cli import main

    out = tmp_path / "out"
    rc = main(["run", str(SMOKE), "lossy=true", "policy=static", "quality.calibration_tokens=16", "new_tokens=2",
               "prompt_tokens=8", "eval_tokens=16", "placement=[{path: 'layers.*', home_format: int4}]",
               "--out", str(out)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("vorch: error:") and "quality.max_kl" in err[0], err
    assert not (out / "summary.json").exists()


# ------------------------------------------------------------------------------------------- compressed homes


def _transitions(out):
    recs = [json.loads(line) for line in (out / "trace.jsonl").read_text().splitlines()]
    return [r for r in recs if r["event"] == "transition"]


def test_a_lossy_scored_run_streams_from_compressed_homes(lossy_run):
    """quant.compressed_homes (the default): every block the quality budget allows a lossy state keeps one compressed
    home, in its best-quality allowed state, and each load of it into that state moved exactly that state's bytes."""
    out, s, said = lossy_run
    from vorch_jax.config import config_from_dict
    from vorch_jax.runtime.setup import build_setup

    homes = s["states"]["compressed_homes"]
    assert homes["blocks"] > 0 and homes["per_state"]["S1"] == homes["blocks"], homes
    assert any("staging" in m and "compressed homes" in m for m in said)
    state_bytes = build_setup(config_from_dict(s["config"])).state_bytes
    from vorch_jax.tiers.state import State

    loads = [r for r in _transitions(out) if r["link"] == "host->device" and r["to"] == "S1"
             and -s["initial_placement_s"] <= r["t"] <= s["wall_s"]]
    assert loads, "no block was loaded in its compressed state"
    for r in loads:
        assert r["bytes"] == state_bytes[r["block"]][State.S1], r  # the compressed bytes crossed the link
    per_state = s["states"]["per_state"]
    assert sum(v["reads"] for v in per_state.values()) == s["hits"] + s["misses"], per_state
    assert all("compressed home S1" in v["why"] or "controller" in v["why"] for v in s["states"]["lossy_blocks"].values())


@pytest.fixture(scope="module")
def uniform_int8(cache, lossy_run, reference, small_config, tmp_path_factory):
    """policy=static with every layer block's home compressed to int8 (the uniform baseline), real; DRAM holds about
    half of the compressed homes, the rest are on NVMe."""
    out = tmp_path_factory.mktemp("uniform")
    cfg = small_config("policy=static", "lossy=true", "hbm_budget=0.4", "dram_budget=0.1",
                       "quality.calibration_tokens=16",
                       "placement=[{path: embed, state: S0, protect: true}, {path: final_norm, state: S0, "
                       "protect: true}, {path: 'layers\\..*', home_format: int8}]")
    return cfg, out, run(cfg, out, reference=reference)


def test_uniform_compression_is_a_placement_rule_measured_like_any_run(uniform_int8):
    cfg, out, s = uniform_int8
    q = s["quality"]
    assert q["budget"]["forced_kl"] > 0 and q["kl_mean"] > 0 and q["budget"]["within_budget"] is True, q
    reads = {r["to"] for r in (json.loads(x) for x in (out / "trace.jsonl").read_text().splitlines())
             if r["event"] == "access" and r["block"].startswith("layers.")}
    assert reads == {"S1"}, reads  # every layer block is loaded, and read, as its int8 home
    assert s["peak_device_bytes"] <= s["hbm_budget_bytes"]
    gen = [r for r in _transitions(out) if -s["initial_placement_s"] <= r["t"] <= s["wall_s"]]
    assert sum(r["bytes"] for r in gen if r["link"] == "host->device") == s["link_bytes"]["host->device"]
    assert "device:convert" not in s["link_bytes"], "nothing converts on device: the homes hold int8 already"
    homes = s["states"]["compressed_homes"]
    assert 0 < homes["on_nvme"] < homes["blocks"], homes
    disk = [r for r in gen if r["link"] == "nvme->host"]
    assert disk and s["link_bytes"]["nvme->host"] == sum(r["bytes"] for r in disk)
    assert 0 < s["lower_bound_bytes"] <= s["belady_bytes"] and s["lower_bound_bytes"] <= s["bytes_moved"]


def test_a_lossy_run_replayed_in_the_simulator_moves_the_same_bytes_per_link(uniform_int8, tmp_path):
    """The simulator prices a compressed home's load as the real engine moves it: same bytes on every link, same hits
    and misses (static: no prefetch, so nothing depends on timing)."""
    from vorch_jax.config import apply_overrides
    from vorch_jax.runtime.run import simulate
    from vorch_jax.simulation.hardware import load_profile

    cfg, _, real = uniform_int8
    sim = simulate(apply_overrides(cfg, ["executor=sim", "hardware=this-machine"]), tmp_path,
                   hardware=load_profile("this-machine"))
    assert sim["link_bytes"] == real["link_bytes"]
    for key in ("bytes_moved", "belady_bytes", "lower_bound_bytes", "hits", "misses", "peak_device_bytes"):
        assert sim[key] == real[key], (key, sim[key], real[key])
    assert sim["states"]["compressed_homes"] == real["states"]["compressed_homes"]


def test_real_and_simulated_runs_allocate_one_quality_budget(lossy_run, small_config):
    """The simulator's lossy states are the real run's: the rules' compressed homes spend first, the other blocks
    share the rest (`inputs.lossy_allowance`, computed once, before the compressed homes it decides)."""
    from vorch_jax.runtime.inputs import quality_guard, simulated_lossy_states
    from vorch_jax.runtime.setup import build_setup

    cfg = small_config("policy=scored", "lossy=true", "quality.calibration_tokens=16",
                       "placement=[{path: embed, state: S0, protect: true}, {path: final_norm, state: S0, "
                       "protect: true}, {path: 'layers\\.[0-3]\\..*', home_format: int8}]")
    setup = build_setup(cfg)
    guard = quality_guard(cfg, setup)
    assert guard.forced_kl > 0 and not any(guard.allowance.states.get(b) for b in setup.packed)
    assert simulated_lossy_states(cfg, setup, guard.calibration) == guard.allowance.states
