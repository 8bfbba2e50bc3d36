"""Tests for vorch_jax.tooling.sweep: strict spec errors, shipped sweeps, a failing point, resume after SIGINT and SIGKILL."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vorch_jax.config import ConfigError
from vorch_jax.tooling.sweep import load_sweep, run_sweep
from vorch_jax.tooling.sweep_results import point_status, read_results

REPO = Path(__file__).resolve().parents[2]
SWEEPS = REPO / "configs" / "sweeps"
TINY = {"new_tokens": 2, "prompt_tokens": 8, "eval_tokens": 16,
        "placement": [{"path": "embed", "state": "S0", "protect": True},
                      {"path": "final_norm", "state": "S0", "protect": True}]}


def _write(tmp_path: Path, text: str, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _csv_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a CSV, asserting every line has the header's column count."""
    lines = path.read_text().splitlines()
    parsed = list(csv.reader(lines))
    header, rows = parsed[0], parsed[1:]
    assert len(parsed) == len(lines), "a CSV record spans lines"
    for row in rows:
        assert len(row) == len(header), f"half-written row: {row}"
    return header, rows


# ---------------------------------------------------------------------------------------------------- the spec


@pytest.mark.parametrize("text, key, words", [
    ("base: {}\nproduct: {policy: [lru]}\nfoo: 1\n", "foo", "unknown"),
    ("base: {}\nproduct: {policy: []}\n", "product.policy", "empty axis"),
    ("base: {}\nproduct: {policy: lru}\n", "product.policy", "list"),
    ("base: {}\nproduct: {policy: [lru]}\nproduct: {policy: [static]}\n", "product", "set twice"),
    ("base: {}\nproduct: {policy: [lru]}\nzip: {hbm_budget: [0.3, 0.5], seed: [1]}\n", "zip", "equal lengths"),
    ("base: {}\nfixed: {policy: lru}\nproduct: {policy: [lru, static]}\n", "policy", "set twice"),
    ("product: {policy: [lru]}\n", "base", "required"),
    ("base: {}\n", None, "product"),
    ("base: {}\nproduct: {polcy: [lru]}\n", "polcy", "unknown key"),
    ("base: {}\nproduct: {policy.x: [1]}\n", "policy.x", "not a section"),
    ("base: {}\ngroups: [{product: {policy: [lru]}, extra: 1}]\n", "groups[0].extra", "unknown"),
    ("base: {}\nname: 3\nproduct: {policy: [lru]}\n", "name", "string"),
    ("base: {}\nproduct: {policy: [lru, lru]}\n", None, "same run"),
])
def test_spec_errors_name_the_key_and_the_file(tmp_path, text, key, words):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_sweep(path)
    message = str(info.value)
    assert str(path) in message
    assert words in message
    if key is not None:
        assert f"'{key}'" in message or key in message


def test_a_bad_value_fails_at_start_naming_the_point(tmp_path):
    path = _write(tmp_path, "base: {}\nproduct: {policy: [lru], hbm_budget: [0.5, 2]}\n")
    with pytest.raises(ConfigError) as info:
        load_sweep(path)
    message = str(info.value)
    assert "point 2" in message and "hbm_budget=2" in message and "(0, 1]" in message


def test_base_file_is_relative_to_the_sweep_file(tmp_path):
    (tmp_path / "runs").mkdir()
    _write(tmp_path / "runs", "policy: lru\nnew_tokens: 3\n", "base.yaml")
    sweep = load_sweep(_write(tmp_path, "base: runs/base.yaml\nproduct: {hbm_budget: [0.3, 0.5]}\n"
                                        "zip: {seed: [1, 2], prefetch_depth: [0, 1]}\n"))
    assert len(sweep.points) == 4
    assert {p.config.policy for p in sweep.points} == {"lru"}
    assert {p.config.new_tokens for p in sweep.points} == {3}
    assert {(p.config.seed, p.config.prefetch_depth) for p in sweep.points} == {(1, 0), (2, 1)}
    assert len({p.id for p in sweep.points}) == 4


def test_point_ids_are_stable_and_follow_the_whole_config(tmp_path):
    a = load_sweep(_write(tmp_path, "base: {new_tokens: 2}\nproduct: {policy: [lru, static]}\n"))
    b = load_sweep(_write(tmp_path, "base: {new_tokens: 2}\nproduct: {policy: [lru, static]}\n", "again.yaml"))
    c = load_sweep(_write(tmp_path, "base: {new_tokens: 3}\nproduct: {policy: [lru, static]}\n", "other.yaml"))
    assert [p.id for p in a.points] == [p.id for p in b.points]
    assert not {p.id for p in a.points} & {p.id for p in c.points}
    assert a.points[0].id.startswith("lru-")


def test_shipped_sweeps_load_and_have_headers():
    files = sorted(SWEEPS.glob("*.yaml"))
    assert {f.name for f in files} >= {"budget_policy.yaml", "smoke.yaml"}
    for path in files:
        header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
        for label in ("# Measures:", "# Run:", "# Takes:"):
            assert label in header, f"{path} lacks {label}"
        assert path.relative_to(REPO).as_posix() in header
        assert load_sweep(path).points
    bp = load_sweep(SWEEPS / "budget_policy.yaml")
    kinds = {(p.config.policy, p.config.lossy) for p in bp.points}
    assert kinds == {("static", False), ("static-prefetch", False), ("lru", False), ("scored", False),
                     ("belady", False), ("scored", True)}
    assert {p.config.hbm_budget for p in bp.points} == {0.3, 0.5, 0.8}
    assert len(bp.points) == 18


# -------------------------------------------------------------------------------------------------- running


def test_failing_point_is_recorded_and_the_sweep_goes_on(tmp_path):
    spec = {"name": "fail", "base": TINY, "groups": [{"product": {"hbm_budget": ["1MiB"], "policy": ["static"]}},
                                                     {"product": {"hbm_budget": [0.5], "policy": ["static"]}}]}
    sweep = load_sweep(tmp_path / "fail.yaml", data=spec)
    out = tmp_path / "out"
    rc = run_sweep(sweep, out, jobs=2, stream=open(tmp_path / "progress.txt", "w"))
    assert rc == 1
    header, rows = _csv_rows(out / "results.csv")
    assert len(rows) == 2
    by_id = {r["point_id"]: r for r in read_results(out)}
    bad, good = sweep.points
    assert by_id[bad.id]["status"] == "failed"
    assert "below" in by_id[bad.id]["error"] and "protected" in by_id[bad.id]["error"]
    assert "protected" in (out / "points" / bad.id / "error.txt").read_text()
    assert by_id[good.id]["status"] == "complete"
    assert by_id[good.id]["quality.ppl"] > 1 and by_id[good.id]["link_bytes.host->device"] > 0
    assert point_status(out / "points" / good.id) == "complete"
    progress = (tmp_path / "progress.txt").read_text()
    assert "1/2" in progress and "2/2" in progress and "eta" in progress
    with pytest.raises(ConfigError, match="--resume"):
        run_sweep(sweep, out)


def _start(sweep_file: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vorch_jax.cli", "sweep", str(sweep_file), "--out", str(out), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def _wait_running(out: Path, point_id: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    """Until the point's child has started and written to its log (it is mid-point)."""
    log = out / "points" / point_id / "log.txt"
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, proc.communicate()
        if log.exists() and log.stat().st_size > 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"point {point_id} did not start within {timeout} s")


# Three simulated points of a few seconds each (Mixtral's 100 simulated passes), long enough to be interrupted
# mid-point and far cheaper than the shipped smoke sweep's real runs (a model load and a compile each).
SLOW_SIM_SWEEP = """name: smoke
base: {model: mixtral-8x7b, executor: sim, hardware: h100-sxm, dtype: bfloat16, new_tokens: 100, prompt_tokens: 8}
groups:
  - product: {hbm_budget: [0.3], policy: [static, lru]}
  - product: {hbm_budget: [0.5], policy: [lru]}
"""


def test_resume_after_sigint_and_sigkill(tmp_path):
    sweep_file = tmp_path / "smoke.yaml"
    sweep_file.write_text(SLOW_SIM_SWEEP)
    ids = [p.id for p in load_sweep(sweep_file).points]
    assert len(ids) == 3
    out = tmp_path / "smoke"

    # 1. SIGINT while the second point runs: the first is complete, no row for the second, a hint to resume.
    proc = _start(sweep_file, out)
    _wait_running(out, ids[1], proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "--resume" in err
    _, rows = _csv_rows(out / "results.csv")
    assert [r[0] for r in rows] == [ids[0]]
    assert point_status(out / "points" / ids[0]) == "complete"
    assert point_status(out / "points" / ids[1]) == "partial"
    first_mtime = (out / "points" / ids[0] / "summary.json").stat().st_mtime_ns

    # 2. --resume, then SIGKILL while the third point runs: the second completes, the third is left half-done.
    proc = _start(sweep_file, out, "--resume")
    _wait_running(out, ids[2], proc)
    time.sleep(1.0)
    proc.kill()
    proc.communicate(timeout=30)
    _, rows = _csv_rows(out / "results.csv")
    assert [r[0] for r in rows] == ids[:2]
    assert point_status(out / "points" / ids[2]) == "partial"
    second_mtime = (out / "points" / ids[1] / "summary.json").stat().st_mtime_ns
    time.sleep(0.5)
    # the killed sweep's child died with it (PDEATHSIG): nothing writes into the third point any more
    size = (out / "points" / ids[2] / "log.txt").stat().st_size
    time.sleep(1.0)
    assert (out / "points" / ids[2] / "log.txt").stat().st_size == size

    # 3. --resume finishes; completed points were not re-run.
    proc = _start(sweep_file, out, "--resume")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    header, rows = _csv_rows(out / "results.csv")
    assert [r[0] for r in rows] == ids
    assert all(r[header.index("status")] == "complete" for r in rows)
    assert (out / "points" / ids[0] / "summary.json").stat().st_mtime_ns == first_mtime
    assert (out / "points" / ids[1] / "summary.json").stat().st_mtime_ns == second_mtime
    assert "resuming: 2 complete, 1 to run" in err
    manifest = json.loads((out / "sweep.json").read_text())
    assert [p["id"] for p in manifest["points"]] == ids
    assert not os.path.exists(out / "results.csv.tmp")
