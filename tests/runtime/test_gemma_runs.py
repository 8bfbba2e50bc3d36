"""Gemma 3 through the same runtime as SmolLM2: every lossless policy at the tightest budget (0.3, under half of its
embedding's bytes) generates the resident tokens within the budget, above the LP bound."""

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


def test_a_lossy_gemma_run_is_calibrated_through_its_own_ops_and_keeps_its_quality_budget(reference, tmp_path,
                                                                                         monkeypatch):
    """Gemma is computed by its own ops, not Llama's: a lossy run measures its ΔKL per block and state through them
    first (`ops_calibration`, 8 tokens here), streams from compressed homes, and stays within quality.max_kl."""
    monkeypatch.setenv("VORCH_CACHE", str(tmp_path / "cache"))
    said = []
    cfg = load_config(None, [x for x in SMALL if x != "lossy=false"]
                      + ["policy=scored", "hbm_budget=0.3", "lossy=true", "quality.calibration_tokens=8", "score.alpha=0"])
    s = run(cfg, tmp_path / "run", reference=reference, progress=said.append)
    assert any("no stored calibration" in m for m in said), said
    assert s["quality"]["budget"]["measured_by"].startswith("gemma ops")
    q = s["quality"]
    assert q["kl_mean"] > 0 and q["budget"]["within_budget"] is True, q
    homes = s["states"]["compressed_homes"]
    assert homes["blocks"] > 0 and s["home_formats"], homes
    assert 0 < s["peak_device_bytes"] <= s["hbm_budget_bytes"]
    assert 0 < s["lower_bound_bytes"] <= s["bytes_moved"]


def test_a_pass_looks_its_tokens_up_only_in_the_shards_holding_them(reference, tmp_path):
    """Each pass runs the lookup of the shards holding its tokens, then the layers and the sixteen head shards. A
    lookup gathers its rows where its shard is (`Ledger._gather`: on the device, else in host memory), no read of
    the access stream; what the cursor knows of the next pass before its token is sampled is every position but a
    lookup."""
    from vorch_jax.models.gemma import VOCAB_SHARDS, embed_block_id, vocab_rows
    from vorch_jax.runtime.cursor import PassCursor

    setup = build_setup(load_config(None, SMALL))
    spec = setup.spec
    passes = [setup.prompt_ids] + [[t] for t in reference.tokens[:-1]]
    lookups = sum(spec.reads_tokens(p, [ids]) for ids in passes for p in spec.skeleton() if p.op == "embed")
    every = [p.block for p in spec.every_pass()]
    assert list(reference.stream[:len(passes) * len(every)]) == every * len(passes)  # then the quality pass's
    s = run(load_config(None, SMALL + ["policy=static", "hbm_budget=0.3"]), tmp_path, reference=reference)
    assert s["tokens"] == reference.tokens and s["hits"] + s["misses"] == len(passes) * len(every)
    assert s["lookups"]["on_device"] + s["lookups"]["in_place"] == lookups and s["lookups"]["in_place"] > 0
    assert s["lookups"]["loaded"] == 0  # every home in DRAM
    cursor = PassCursor(spec)
    cursor.begin_pass([[vocab_rows(spec.config, 1)[0] + 7]])
    assert cursor.next().block == embed_block_id(1)
    while cursor.current.block != embed_block_id(VOCAB_SHARDS - 1):
        cursor.next()
    assert cursor.known() == spec.every_pass()  # the next pass, without its lookup


@pytest.mark.parametrize("dram", [1.0, 0.25])
def test_a_simulated_run_reads_the_stream_its_oracle_is_given(dram, tmp_path):
    """The simulated run hands Belady the stream of its passes (`plan_stream`) and reads exactly that, lookups
    left out; with homes on NVMe (a quarter of the model's bytes in DRAM) the lookups of shards there load as on a
    miss and are still no reads."""
    import json

    from vorch_jax.runtime.run import plan_stream

    cfg = load_config("configs/demo.yaml", ["model=gemma3-270m", "placement=[]", "executor=sim",
                                            "hardware=this-machine", "new_tokens=5", "prompt_tokens=8",
                                            "policy=belady", "hbm_budget=0.5", f"dram_budget={dram}"])
    s = run(cfg, tmp_path)
    setup = build_setup(cfg, simulated=True)
    read = [r["block"] for r in map(json.loads, (tmp_path / "trace.jsonl").read_text().splitlines())
            if r["event"] == "access"]
    assert read == plan_stream(setup.spec, None, cfg.new_tokens, setup.prompt_ids)
    assert not any(p.op == "embed" for p in setup.spec.every_pass())
    lookups = s["lookups"]
    assert sum(lookups.values()) >= cfg.new_tokens and (lookups["loaded"] > 0) == (dram < 1)
