"""Reports: `vorch report DIR` writes DIR/report.md and PNG figures for a run, a compare or a sweep folder.

* A run folder (summary.json + trace.jsonl, as `vorch run` writes): `run_report.py`.
* A compare folder (compare.json, as `vorch compare` writes): `compare_report.py`.
* Several sweep folders (the shards of one sweep, `vorch sweep --shard I/N`) with --out: merged by
  `sweep_shards.merge_sweeps` into one results.csv and sweep.json in --out, then reported there as a sweep folder.
* A sweep folder (results.csv, as `vorch sweep` writes): budget curves (decode tok/s, bytes moved / Belady
  bytes, perplexity delta against the budget, a line per policy and lossy variant), the latency-vs-quality Pareto
  plot, and a table of the key numbers per point (failed points listed with their error).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from vorch_jax.tooling import plots as plots
from vorch_jax.errors import ReportError
from vorch_jax.tooling.run_report import _mb, _num, report_run, run_table

__all__ = ["report", "report_run", "report_sweep", "run_table", "sweep_table", "add_cli"]


def report(directory: str | Path) -> Path:
    """Write the report of a run or sweep directory; return the path of report.md."""
    from vorch_jax.tooling.compare_report import MANIFEST, report_compare

    directory = Path(directory)
    if not directory.is_dir():
        raise ReportError(f"{directory} is not a folder: give the --out folder of a run, a compare or a sweep")
    if (directory / "results.csv").exists():
        return report_sweep(directory)
    if (directory / MANIFEST).exists():
        return report_compare(directory)
    if (directory / "summary.json").exists() and ((directory / "trace.jsonl").exists()
                                                  or any(directory.glob("device-*/trace.jsonl"))
                                                  or any(directory.parent.glob("device-*/trace.jsonl"))):
        return report_run(directory)  # a mesh's traces are per device
    if (directory / "config.yaml").exists():
        raise ReportError(f"{directory} holds a run that did not complete (no summary.json): re-run it")
    raise ReportError(f"{directory} holds neither a sweep (results.csv), a compare (compare.json) nor a complete "
                      f"run (summary.json and trace.jsonl)")


# -------------------------------------------------------------------------------------------------------- sweeps


SWEEP_COLUMNS = ("point", "policy", "budget", "tok/s", "step ms", "stall s", "moved MB", "/belady", "/bound",
                 "peak MB", "ppl", "Δppl", "KL", "top-1", "status")


def sweep_table(rows: Sequence[Mapping]) -> list[list[str]]:
    """Key numbers per point, sorted by variant then budget; failed points keep their sweep values."""
    def key(r):
        if r.get("status") == "complete":
            return (plots.variant(r), r["hbm_budget_bytes"] / r["model_bytes"])
        return ("~failed", 0.0)

    out = []
    for r in sorted(rows, key=key):
        if r.get("status") != "complete":
            label = ", ".join(f"{k[4:]}={v}" for k, v in r.items() if k.startswith("cfg.") and v is not None)
            out.append([str(r["point_id"]), label, "", "", "", "", "", "", "", "", "", "", "", "",
                        f"failed: {r.get('error') or ''}"])
            continue
        out.append([str(r["point_id"]), plots.variant(r), f"{r['hbm_budget_bytes'] / r['model_bytes']:.2f}",
                    _num(r["decode_tok_s"], ".2f"), _num(r["decode_step_s"] * 1e3, ".1f"), _num(r["stall_s"], ".3f"),
                    _mb(r["bytes_moved"]), _num(plots.belady_ratio(r), ".3f"),
                    _num(plots.bound_ratio(r), ".3f"), _mb(r["peak_device_bytes"]),
                    _num(r.get("quality.ppl"), ".4f"), _num(plots.ppl_delta(r), "+.4f"),
                    _num(r.get("quality.kl_mean"), ".2e"), _num(r.get("quality.top1_agree"), ".3f"), "complete"])
    return out


def report_sweep(directory: str | Path) -> Path:
    """Budget curves, Pareto plot and report.md for a sweep directory."""
    from vorch_jax.tooling.sweep_results import read_results

    directory = Path(directory)
    rows = read_results(directory / "results.csv")
    name = directory.name
    try:
        name = json.loads((directory / "sweep.json").read_text())["name"]
    except (OSError, ValueError, KeyError):
        pass
    plots.save(plots.budget_curves(rows, f"Budget curves: sweep {name}"), directory / "budget_curves.png")
    plots.save(plots.pareto(rows), directory / "pareto.png")
    plots.save(plots.frontier(rows), directory / "frontier.png")
    done = [r for r in rows if r.get("status") == "complete"]
    pts = [(r["decode_step_s"] * 1e3, plots.ppl_delta(r)) for r in done]
    front = [done[i] for i in plots.pareto_front(pts)]
    lines = [f"# Sweep report: {name}", "",
             f"{len(done)} of {len(rows)} points complete"
             f"{'' if len(done) == len(rows) else f', {len(rows) - len(done)} failed'}. "
             f"Budget is the fraction of the model's full-precision bytes; Δppl = ppl - resident ppl; "
             f"/belady = bytes moved / Belady's bytes for the same access stream; /bound = bytes moved / the LP lower "
             f"bound on any policy's bytes for it.", "",
             "| " + " | ".join(SWEEP_COLUMNS) + " |", "|" + "---|" * len(SWEEP_COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in sweep_table(rows)]
    negative = [r for r in done if plots.ppl_delta(r) < 0]
    if negative:
        where = ", ".join(f"{plots.variant(r)} @ {r['hbm_budget_bytes'] / r['model_bytes']:.2f}" for r in negative)
        lines += ["", f"Note: Δppl < 0 at {len(negative)} point(s) ({where}"
                      + "): on a short evaluation text a lossy perturbation can fit the text better by chance; "
                        "the KL to the resident model (> 0 there) is the reliable measure of what changed."]
    lines += ["", "Pareto front (decode step time vs Δppl): " +
              (", ".join(f"{plots.variant(r)} @ {r['hbm_budget_bytes'] / r['model_bytes']:.2f}" for r in front) or "-"),
              "", "## Budget curves", "", "![Budget curves](budget_curves.png)", "",
              "## Latency vs quality", "", "![Pareto](pareto.png)", "",
              "## Quality vs traffic", "", "Bytes moved against KL to the resident model, a curve per variant "
              "through its budgets: a curve below and left of another reaches the same quality with fewer bytes.", "",
              "![Frontier](frontier.png)", ""]
    out = directory / "report.md"
    out.write_text("\n".join(lines))
    return out


# ----------------------------------------------------------------------------------------------------------- CLI


def _cmd_report(args) -> int:
    """One folder: its report, in it. Several (the shards of a sweep) or --out: merged into --out, reported there."""
    from vorch_jax.tooling.sweep_shards import merge_sweeps

    if args.out is None and len(args.dir) > 1:
        raise ReportError(f"{len(args.dir)} folders are merged into one report: give --out MERGED_DIR for it "
                          f"(the folders themselves are left as they are)")
    out = report(args.dir[0]) if args.out is None else report_sweep(merge_sweeps(args.dir, args.out))
    print(out)
    return 0


def add_cli(subparsers) -> None:
    """`vorch report DIR` and `vorch report DIR1 DIR2 ... --out MERGED_DIR`."""
    p = subparsers.add_parser("report", help="report.md and PNG figures for a run or sweep directory; several sweep "
                                             "directories (shards) merged into one with --out")
    p.add_argument("dir", nargs="+", help="a run directory (summary.json, trace.jsonl) or a sweep directory "
                                          "(results.csv); or several sweep directories of one sweep (its shards)")
    p.add_argument("--out", help="merge the sweep directories into this one: results.csv in the sweep's order, "
                                 "sweep.json, report.md and figures")
    p.set_defaults(func=_cmd_report)
