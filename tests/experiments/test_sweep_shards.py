"""Tests for sweeps across machines (vorch_jax.tooling.sweep_shards): `vorch sweep --shard I/N` and the merge of shard
folders by `vorch report DIR1 DIR2 ... --out MERGED`.

The share function is tested without running a point. A three-point sweep (the shipped smoke sweep's grid, on the
simulator with a shape-only model, so each point is a second of start-up and not a model load and a compile) runs
once as three shards, started together like the jobs of an array, and once as one process beside them; the merged
table must equal the one-process table on every column that a clock does not measure.
"""

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vorch_jax.cli import main
from vorch_jax.config import ConfigError
from vorch_jax.tooling.sweep import load_sweep
from vorch_jax.tooling.sweep_shards import parse_shard, shard_indices, shard_of

REPO = Path(__file__).resolve().parents[2]
SIM_SMOKE = """name: smoke
base: {model: llama-3-8b, executor: sim, hardware: h100-sxm, dtype: bfloat16, new_tokens: 3, prompt_tokens: 8}
groups:
  - product: {hbm_budget: [0.5], policy: [static, lru]}
  - product: {hbm_budget: [0.8], policy: [lru]}
"""
# measured by a clock (seconds, rates, link speeds) or by the controller's timing: differ between two runs
TIMED = re.compile(r"(_s|tok_s)$|gbps|^controller")


# ------------------------------------------------------------------------------------ the share function, no runs


@pytest.mark.parametrize("n_points", [0, 1, 2, 3, 7, 18, 100])
@pytest.mark.parametrize("count", [1, 2, 3, 5, 8])
def test_shares_are_disjoint_cover_the_grid_and_keep_sweep_order(n_points, count):
    shares = [shard_indices(n_points, i, count) for i in range(1, count + 1)]
    flat = [i for share in shares for i in share]
    assert sorted(flat) == list(range(n_points)), "every point in exactly one share"
    assert len(flat) == len(set(flat))
    assert all(share == sorted(share) for share in shares), "a share runs its points in sweep order"
    assert max(map(len, shares)) - min(map(len, shares)) <= 1, "round-robin: shares differ by at most one point"
    assert shares == [shard_indices(n_points, i, count) for i in range(1, count + 1)], "deterministic"


def test_shards_of_a_sweep_file_depend_on_the_file_alone(tmp_path):
    text = "name: grid\nbase: {new_tokens: 2}\nproduct: {hbm_budget: [0.3, 0.5, 0.8], policy: [static, lru]}\n"
    (tmp_path / "a.yaml").write_text(text)
    (tmp_path / "b.yaml").write_text(text)
    a, b = load_sweep(tmp_path / "a.yaml"), load_sweep(tmp_path / "b.yaml")
    shards = [shard_of(a, i, 4) for i in range(1, 5)]
    assert [[p.id for p in s.points] for s in shards] == [[p.id for p in shard_of(b, i, 4).points] for i in range(1, 5)]
    assert [p.id for p in shards[0].points] == [a.points[0].id, a.points[4].id]
    assert sorted(p.id for s in shards for p in s.points) == sorted(p.id for p in a.points)
    for i, s in enumerate(shards, 1):
        assert s.shard == (i, 4) and s.grid == a.points and s.name == "grid"
        assert s.swept_keys == a.swept_keys, "a shard's table has the whole sweep's cfg columns"


@pytest.mark.parametrize("text, want", [("1/3", (1, 3)), ("3/3", (3, 3)), (" 2 / 5 ", (2, 5)), ("1/1", (1, 1))])
def test_parse_shard_accepts_i_of_n(text, want):
    assert parse_shard(text) == want


@pytest.mark.parametrize("text, words", [("0/3", "from 1 to 3"), ("4/3", "from 1 to 3"), ("x/y", "expects I/N"),
                                         ("1/0", "at least 1"), ("2", "expects I/N"), ("-1/3", "expects I/N"),
                                         ("1/2/3", "expects I/N"), ("", "expects I/N")])
def test_parse_shard_refuses_with_one_line(text, words):
    with pytest.raises(ConfigError) as info:
        parse_shard(text)
    assert words in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------------------------- the smoke sweep, run for real


def _sweep(sweep_file: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vorch_jax.cli", "sweep", str(sweep_file), "--out", str(out), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The sweep as shards 1/3, 2/3, 3/3 (started together, as a job array would) and as one process."""
    root = tmp_path_factory.mktemp("shards")
    sweep_file = root / "smoke.yaml"
    sweep_file.write_text(SIM_SMOKE)
    procs = {f"s{i}": _sweep(sweep_file, root / f"s{i}", "--shard", f"{i}/3") for i in (1, 2, 3)}
    procs["whole"] = _sweep(sweep_file, root / "whole")
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{name}: {err[-2000:]}"
    return root, [p.id for p in load_sweep(sweep_file).points]


def _table(path: Path) -> tuple[list[str], list[dict]]:
    with open(path / "results.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def test_each_shard_runs_its_share_and_records_it(runs):
    root, ids = runs
    whole_header = _table(root / "whole")[0]
    for i in (1, 2, 3):
        header, rows = _table(root / f"s{i}")
        assert [r["point_id"] for r in rows] == [ids[i - 1]]
        assert rows[0]["status"] == "complete"
        assert header == whole_header, "a shard's table has the one-process table's columns"
        assert sorted(d.name for d in (root / f"s{i}" / "points").iterdir()) == [ids[i - 1]]
        manifest = json.loads((root / f"s{i}" / "sweep.json").read_text())
        assert manifest["name"] == "smoke"
        assert manifest["shard"] == {"index": i, "count": 3, "grid": ids}
        assert [p["id"] for p in manifest["points"]] == [ids[i - 1]]
    assert "shard" not in json.loads((root / "whole" / "sweep.json").read_text())


def test_merged_shards_equal_the_one_process_sweep(runs, tmp_path, capsys):
    root, ids = runs
    merged = tmp_path / "merged"
    assert main(["report", str(root / "s3"), str(root / "s1"), str(root / "s2"), "--out", str(merged)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(merged / "report.md")
    assert "3 of 3 points have a row" in captured.err
    header, rows = _table(merged)
    whole_header, whole = _table(root / "whole")
    assert header == whole_header, "same columns, same order"
    assert [r["point_id"] for r in rows] == [r["point_id"] for r in whole] == ids, "the sweep's order"
    compared = [c for c in header if not TIMED.search(c)]
    assert {"status", "cfg.policy", "cfg.hbm_budget", "bytes_moved", "hits", "misses", "link_bytes.host->device",
            "belady_bytes", "peak_device_bytes", "prompt_tokens"} <= set(compared)
    assert {"point_s", "decode_tok_s", "wall_s", "link_gbps.host->device"}.isdisjoint(compared)
    for got, want in zip(rows, whole):
        assert {c: got[c] for c in compared} == {c: want[c] for c in compared}
    manifest = json.loads((merged / "sweep.json").read_text())
    assert manifest["name"] == "smoke" and [p["id"] for p in manifest["points"]] == ids
    assert [m["shard"]["index"] for m in manifest["merged_from"]] == [3, 1, 2]
    assert "3 of 3 points complete" in (merged / "report.md").read_text()


def test_a_shard_resumes_like_a_sweep_and_only_as_itself(runs, tmp_path, capsys):
    root, ids = runs
    shard = tmp_path / "s2"
    shutil.copytree(root / "s2", shard)
    done = shard / "points" / ids[1] / "summary.json"
    mtime = done.stat().st_mtime_ns
    proc = _sweep(root / "smoke.yaml", shard, "--shard", "2/3", "--resume")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "shard 2/3: 1 of the grid's 3 points" in err and "done: 1/1 complete" in err
    assert done.stat().st_mtime_ns == mtime, "a complete point is not re-run"
    for other in (["--shard", "1/3"], []):
        assert main(["sweep", str(root / "smoke.yaml"), "--out", str(shard), "--resume", *other]) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("vorch: error:") and "holds shard 2/3" in error and "--shard 2/3" in error
    assert sorted(d.name for d in (shard / "points").iterdir()) == [ids[1]], "nothing else ran into the shard"


def _refused(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("vorch: error:"), lines
    return lines[0]


def test_merge_refuses_other_sweeps_and_disagreeing_overlaps(runs, tmp_path, capsys):
    root, ids = runs
    other = tmp_path / "other"
    shutil.copytree(root / "s2", other)
    manifest = json.loads((other / "sweep.json").read_text())
    (other / "sweep.json").write_text(json.dumps({**manifest, "name": "budget_policy"}))
    merged = tmp_path / "merged"
    assert "merge only the folders" in _refused(["report", str(root / "s1"), str(other), "--out", str(merged)], capsys)
    (other / "sweep.json").write_text(json.dumps({**manifest, "shard": {**manifest["shard"], "grid": ids[:2]}}))
    assert "different grids" in _refused(["report", str(root / "s1"), str(other), "--out", str(merged)], capsys)
    # the whole sweep and shard 1 both ran the first point, each with its own timings: they disagree
    error = _refused(["report", str(root / "whole"), str(root / "s1"), "--out", str(merged)], capsys)
    assert ids[0] in error and "disagree" in error
    assert "give --out" in _refused(["report", str(root / "s1"), str(root / "s2")], capsys)
    assert "folder of its own" in _refused(["report", str(root / "s1"), str(root / "s2"), "--out", str(root / "s1")],
                                           capsys)
    assert not merged.exists(), "a refused merge writes nothing"


def test_a_partial_merge_says_what_is_missing(runs, tmp_path, capsys):
    root, ids = runs
    merged = tmp_path / "merged"
    assert main(["report", str(root / "s1"), str(root / "s3"), str(root / "s1"), "--out", str(merged)]) == 0
    assert "2 of 3 points have a row (1 not run or not finished yet)" in capsys.readouterr().err
    assert [r["point_id"] for r in _table(merged)[1]] == [ids[0], ids[2]]
