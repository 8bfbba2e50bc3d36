"""Tests for vorch_jax.tooling.report and vorch_jax.tooling.plots: reports of a real run and a real sweep, and the derivations."""

import subprocess
import sys
from pathlib import Path

import pytest

from vorch_jax.tooling import plots as plots
from vorch_jax.errors import ReportError
from vorch_jax.tooling.report import report, sweep_table
from vorch_jax.tooling.sweep import load_sweep, run_sweep

REPO = Path(__file__).resolve().parents[2]
TINY = {"new_tokens": 2, "prompt_tokens": 8, "eval_tokens": 16,
        "placement": [{"path": "embed", "state": "S0", "protect": True},
                      {"path": "final_norm", "state": "S0", "protect": True}]}
RUN_PNGS = ("state_timeline.png", "action_counts.png", "device_occupancy.png", "link_bytes.png")


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    """A real two-point sweep (run in parallel): lru and static at half the model's bytes.

    Lossy points are left out for time (the scored policy's lossy set-up measures dequantisation costs, a minute
    more on a loaded CPU); the lossy parts of the report are checked on synthetic rows and against the footprint.
    """
    out = tmp_path_factory.mktemp("sweep")
    spec = {"name": "report-test", "base": TINY, "product": {"hbm_budget": [0.5], "policy": ["lru", "static"]}}
    sweep = load_sweep(out / "spec.yaml", data=spec)
    assert run_sweep(sweep, out, jobs=2, stream=open(out / "progress.txt", "w")) == 0
    return out, sweep


def _png_ok(path: Path) -> None:
    assert path.exists() and path.stat().st_size > 5000, path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_of_a_sweep(sweep_dir):
    out, sweep = sweep_dir
    proc = subprocess.run([sys.executable, "-m", "vorch_jax.cli", "report", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    md = (out / "report.md").read_text()
    for png in ("budget_curves.png", "pareto.png", "frontier.png"):
        _png_ok(out / png)
        assert f"({png})" in md
    assert "| point | policy | budget |" in md
    for p in sweep.points:
        assert p.id in md
    assert "Pareto front" in md


def test_report_of_a_single_run(sweep_dir):
    out, sweep = sweep_dir
    run_dir = out / "points" / sweep.points[1].id
    md = report(run_dir).read_text()
    for png in RUN_PNGS:
        _png_ok(run_dir / png)
        assert f"({png})" in md
    assert "Score evolution: none" in md
    assert "decode" in md and "tok/s" in md
    records = plots.read_trace(run_dir)
    blocks, codes, accesses = plots.state_matrix(records)
    assert codes.shape == (len(blocks), len(accesses)) and len(accesses) > 0
    assert (codes[:, -1] >= 0).all()  # every block registered by the end


def test_occupancy_never_exceeds_the_budget_during_generation(sweep_dir):
    """The device bytes rebuilt from the trace stay within the budget (lossless run: sizes from the trace)."""
    out, sweep = sweep_dir
    import json

    run_dir = out / "points" / sweep.points[0].id
    summary = json.loads((run_dir / "summary.json").read_text())
    records = plots.read_trace(run_dir)
    t, v, approx = plots.occupancy_series(records, plots.device_bytes_from_trace(records))
    assert not approx and len(v)
    tq = plots.quality_pass_start(records, len(summary["tokens"]))
    gen = v[(t >= plots.placement_start(records)) & (t < tq)]
    assert gen.max() <= summary["hbm_budget_bytes"]
    assert gen.max() == pytest.approx(summary["peak_device_bytes"], rel=0.05)
    cum = plots.link_cumulative(records)
    moved = cum["host->device"][1][-1]
    assert moved >= summary["bytes_moved"]  # generation plus the quality pass


def test_lossy_sizes_from_the_footprint_agree_with_the_trace(sweep_dir):
    """The shapes-based sizes the report uses for lossy states give the S0 bytes the trace moved, and shrink."""
    from vorch_jax.config import QuantConfig
    from vorch_jax.tooling.run_report import lossy_state_bytes

    out, sweep = sweep_dir
    records = plots.read_trace(out / "points" / sweep.points[0].id)
    from_trace = plots.device_bytes_from_trace(records)
    blocks = ["embed", "layers.0.attn", "layers.0.mlp"]
    sizes = lossy_state_bytes(blocks, QuantConfig(), "smollm2-135m")
    for b in blocks:
        assert sizes[b]["S0"] == from_trace[b]["S0"]
        assert sizes[b]["S0"] > sizes[b]["S1"] > sizes[b]["S2"]


def test_pareto_front():
    pts = [(1.0, 0.5), (2.0, 0.0), (1.5, 0.6), (0.5, 1.0), (3.0, 0.0)]
    assert plots.pareto_front(pts) == [3, 0, 1]
    assert plots.pareto_front([]) == []


def test_sweep_table_and_figures_with_a_failed_row():
    base = {"status": "complete", "model_bytes": 100, "decode_tok_s": 5.0, "decode_step_s": 0.2, "stall_s": 0.1,
            "bytes_moved": 50, "belady_bytes": 40, "lower_bound_bytes": 25, "peak_device_bytes": 30, "quality.ppl": 7.5,
            "quality.ppl_resident": 7.5, "quality.kl_mean": 0.0, "quality.top1_agree": 1.0}
    rows = [dict(base, point_id="a", policy="lru", lossy=False, hbm_budget_bytes=30),
            dict(base, point_id="b", policy="lru", lossy=False, hbm_budget_bytes=50, decode_tok_s=6.0),
            dict(base, point_id="c", policy="scored", lossy=True, hbm_budget_bytes=30, **{"quality.ppl": 7.9}),
            {"point_id": "d", "status": "failed", "error": "vorch: error: too small", "cfg.hbm_budget": "1MiB"}]
    table = sweep_table(rows)
    assert [r[0] for r in table] == ["a", "b", "c", "d"]
    assert table[2][11] == "+0.4000" and table[0][7] == "1.250" and table[0][8] == "2.000"
    assert table[3][-1].startswith("failed: vorch: error")
    for fig in (plots.budget_curves(rows), plots.pareto(rows), plots.frontier(rows)):
        assert all(ax.get_xlabel() and ax.get_ylabel() for ax in fig.axes)


def test_the_frontier_draws_a_curve_per_variant_its_homes_named():
    row = {"status": "complete", "model_bytes": 100, "quality.kl_mean": 0.01, "bytes_moved": 5e8, "lossy": True}
    rows = [dict(row, policy="scored", hbm_budget_bytes=30, home_formats="int8"),
            dict(row, policy="scored", hbm_budget_bytes=50, home_formats="int8", bytes_moved=3e8),
            dict(row, policy="static", hbm_budget_bytes=30, home_formats="int4 g64", **{"quality.kl_mean": 0.5}),
            dict(row, policy="scored", hbm_budget_bytes=30, lossy=False, home_formats="", **{"quality.kl_mean": 0.0})]
    assert [plots.variant(r) for r in rows] == ["scored +lossy homes int8", "scored +lossy homes int8",
                                                "static +lossy homes int4 g64", "scored"]
    ax = plots.frontier(rows).axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert set(lines) == {"scored +lossy homes int8", "static +lossy homes int4 g64", "scored"}
    assert list(lines["scored +lossy homes int8"].get_xdata()) == [300.0, 500.0]  # MB, through its budgets


def test_score_evolution_is_drawn_when_the_trace_has_scores():
    records = [{"event": "score", "block": b, "t": t, "score": s}
               for b in ("a", "b") for t, s in ((0.0, 1.0), (1.0, 2.0))]
    fig = plots.score_evolution(records)
    assert fig is not None and fig.axes[0].get_ylabel()
    assert plots.score_evolution([{"event": "access", "block": "a", "t": 0.0}]) is None


def test_report_refuses_an_empty_directory(tmp_path):
    with pytest.raises(ReportError, match="neither"):
        report(tmp_path)


def test_a_damaged_row_is_shown_failed_and_resume_rebuilds_it(sweep_dir, tmp_path):
    import json
    import shutil

    from vorch_jax.tooling.sweep_results import read_results, write_results

    src, sweep = sweep_dir
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    (out / ".sweep.lock").unlink(missing_ok=True)
    damaged = out / "points" / sweep.points[0].id / "row.json"
    damaged.write_text('{"point_id": ')
    write_results(out, sweep)
    rows = {r["point_id"]: r for r in read_results(out)}
    assert len(rows) == 2, "a damaged row must stay in the table"
    bad = rows[sweep.points[0].id]
    assert bad["status"] == "failed" and "row.json is unreadable" in bad["error"] and str(damaged) in bad["error"]
    assert run_sweep(sweep, out, resume=True, stream=open(tmp_path / "progress.txt", "w")) == 0  # nothing re-runs
    assert json.loads(damaged.read_text())["status"] == "complete"
    assert {r["status"] for r in read_results(out)} == {"complete"}


@pytest.fixture(scope="module")
def compare_dir(tmp_path_factory):
    """A real `compare` of lru and scored at half the model's bytes (one shared resident reference); scored brings
    its companions, static-prefetch and belady."""
    from vorch_jax.config import config_from_dict
    from vorch_jax.runtime.run import compare

    out = tmp_path_factory.mktemp("compare")
    cfg = config_from_dict({**TINY, "hbm_budget": 0.5, "tick_every_n_layers": 4})
    summaries = compare(cfg, ["lru", "scored"], out)
    return out, summaries


def test_report_of_a_compare_folder(compare_dir):
    out, summaries = compare_dir
    assert [s["policy"] for s in summaries] == ["lru", "scored", "static-prefetch", "belady"]
    proc = subprocess.run([sys.executable, "-m", "vorch_jax.cli", "report", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    md = (out / "report.md").read_text()
    for png in ("compare_traffic.png", "compare_time.png", "compare_occupancy.png", "compare_timelines.png"):
        _png_ok(out / png)
        assert f"({png})" in md
    for s in summaries:  # one table row per policy, with its measured bytes
        assert f"| {s['policy']} |" in md and f"{s['bytes_moved'] / 1e6:.1f}" in md
    assert "(lru/report.md)" in md and (out / "scored" / "report.md").exists()
    _png_ok(out / "scored" / "score_evolution.png")  # fed by the scored policy's own score events


def test_scored_runs_trace_their_scores_and_every_summary_its_versions(compare_dir):
    import json

    from vorch_jax.controller.scored_policy import SCORE_SAMPLE_BLOCKS

    out, summaries = compare_dir
    scores = [r for r in plots.read_trace(out / "scored") if r["event"] == "score"]
    blocks = {r["block"] for r in scores}
    assert scores and 0 < len(blocks) <= SCORE_SAMPLE_BLOCKS
    ticks = {r["t"] for r in scores}
    assert len(scores) == len(ticks) * len(blocks)  # every adopted tick scores the same sample
    assert all(isinstance(r["score"], float) and r["score"] >= 0 for r in scores)
    assert not [r for r in plots.read_trace(out / "lru") if r["event"] == "score"]
    perfetto = json.loads((out / "scored" / "trace.perfetto.json").read_text())
    assert any(e["ph"] == "C" and e["name"].startswith("score ") for e in perfetto["traceEvents"])
    for s in summaries:
        assert s["versions"]["jax"] and s["versions"]["flax"] and s["versions"]["backend"] == s["backend"]
