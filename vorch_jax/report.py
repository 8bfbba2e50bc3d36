"""Reports: `vorch report DIR` writes DIR/report.md and PNG figures for a run directory or a sweep directory.

* A run directory (summary.json + trace.jsonl, as `vorch run` writes): state timeline, score evolution (when the
  trace carries scores; today it does not, and the report says so), action counts, device occupancy against the
  budget, cumulative bytes per link; and the run's key numbers.
* A sweep directory (results.csv, as `vorch sweep` writes): budget curves (decode tok/s, bytes moved / Belady
  bytes, perplexity delta against the budget, a line per policy and lossy variant), the latency-vs-quality Pareto
  plot, and a table of the key numbers per point (failed points listed with their error).

Device occupancy needs each block's device bytes per state. Full-precision sizes come from the trace (the bytes of
the block's host->device transfers); lossy sizes (S1, S2, S6) are not in the trace, so when a run used lossy
states they are computed from the model's tensor shapes with `vorch_jax.tiers.footprint` (the int4 group size and
low-rank rank are read from the run's config.yaml when present, else the defaults).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from vorch_jax import plots
from vorch_jax.config import ConfigError, QuantConfig, load_config

__all__ = ["report", "report_run", "report_sweep", "run_table", "sweep_table", "add_cli"]

LOSSY = ("S1", "S2", "S6")


def report(directory: str | Path) -> Path:
    """Write the report of a run or sweep directory; return the path of report.md."""
    directory = Path(directory)
    if (directory / "results.csv").exists():
        return report_sweep(directory)
    if (directory / "summary.json").exists() and (directory / "trace.jsonl").exists():
        return report_run(directory)
    raise FileNotFoundError(f"{directory} holds neither a sweep (results.csv) nor a complete run "
                            f"(summary.json and trace.jsonl)")


# ------------------------------------------------------------------------------------------------------ one run


def _quant(directory: Path) -> QuantConfig:
    cfg_path = directory / "config.yaml"
    if cfg_path.exists():
        try:
            return load_config(cfg_path).quant
        except ConfigError:
            pass
    return QuantConfig()


def lossy_state_bytes(blocks: Sequence[str], quant: QuantConfig) -> dict[str, dict[str, int]]:
    """{block: {S0, S1, S2, S6: device bytes}} from the model's tensor shapes (loads the model file's metadata)."""
    from vorch_jax.models.smollm2 import load_smollm2_source
    from vorch_jax.tiers import footprint
    from vorch_jax.tiers.state import State

    source = load_smollm2_source()
    out = {}
    for b in blocks:
        shapes = source.block_shapes(b)
        out[b] = {s.name: footprint.state_bytes(shapes, s, int4_group_size=quant.int4_group_size,
                                                lowrank_rank=quant.lowrank_rank)
                  for s in (State.S0, State.S1, State.S2, State.S6)}
    return out


def _mb(n) -> str:
    return f"{n / 1e6:.1f}" if isinstance(n, (int, float)) and math.isfinite(n) else "-"


def _num(x, fmt: str) -> str:
    return format(x, fmt) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else "-"


def run_table(s: Mapping) -> list[tuple[str, str]]:
    """(name, value) pairs of a run summary's key numbers."""
    q = s.get("quality", {})
    ratio = s["bytes_moved"] / s["belady_bytes"] if s.get("belady_bytes") else float("nan")
    return [
        ("policy", f"{s['policy']}{' (lossy states allowed)' if s.get('lossy') else ''}"),
        ("HBM budget", f"{_mb(s['hbm_budget_bytes'])} MB ({s['hbm_budget_bytes'] / s['model_bytes']:.2f} of "
                       f"{_mb(s['model_bytes'])} MB)"),
        ("decode", f"{_num(s['decode_tok_s'], '.2f')} tok/s, {_num(s['decode_step_s'] * 1e3, '.1f')} ms/step "
                   f"(resident {_num(s['resident_step_s'] * 1e3, '.1f')} ms, "
                   f"floor {_num(s['floor_step_s'] * 1e3, '.1f')} ms)"),
        ("prefill", f"{_num(s['prefill_s'], '.3f')} s for {s['prompt_tokens']} tokens"),
        ("stall / transfer", f"{_num(s['stall_s'], '.3f')} s / {_num(s['transfer_s'], '.3f')} s"),
        ("bytes moved", f"{_mb(s['bytes_moved'])} MB host->device, {_num(ratio, '.3f')} x Belady "
                        f"({_mb(s['belady_bytes'])} MB)"),
        ("per link", ", ".join(f"{k} {_mb(v)} MB" for k, v in s.get("link_bytes", {}).items()) or "-"),
        ("hits / misses", f"{s['hits']} / {s['misses']}"),
        ("peak device", f"{_mb(s['peak_device_bytes'])} MB"),
        ("quality", f"ppl {_num(q.get('ppl'), '.4f')} vs resident {_num(q.get('ppl_resident'), '.4f')}, "
                    f"KL {_num(q.get('kl_mean'), '.2e')}, top-1 agreement {_num(q.get('top1_agree'), '.3f')} "
                    f"on {q.get('eval_tokens')} tokens"),
        ("same tokens as resident", str(s.get("tokens_match_resident"))),
        ("backend", str(s.get("backend"))),
    ]


def report_run(directory: str | Path) -> Path:
    """Figures and report.md for one run directory."""
    directory = Path(directory)
    summary = json.loads((directory / "summary.json").read_text())
    records = plots.read_trace(directory)
    n_tokens = len(summary.get("tokens", [])) or None
    name = f"{summary['policy']}{' +lossy' if summary.get('lossy') else ''}, budget " \
           f"{summary['hbm_budget_bytes'] / summary['model_bytes']:.2f}"
    notes = []
    sizes = plots.device_bytes_from_trace(records)
    if any(r.get("to") in LOSSY for r in records if r["event"] in ("transition", "recovered")):
        sizes = lossy_state_bytes(plots.block_order(records), _quant(directory))
        notes.append("Lossy device sizes (S1, S2, S6) computed from the model's tensor shapes "
                     "(`tiers.footprint`); full-precision sizes agree with the trace's host->device bytes.")
    figures = {
        "state_timeline.png": ("State timeline", plots.state_timeline(
            records, n_tokens, f"Block state at each access ({name})")),
        "action_counts.png": ("Action counts", plots.action_counts(
            records, n_tokens, f"Transitions per kind and phase ({name})")),
        "device_occupancy.png": ("Device occupancy", plots.device_occupancy(
            records, summary["hbm_budget_bytes"], sizes, n_tokens, f"Device occupancy vs budget ({name})")),
        "link_bytes.png": ("Bytes per link", plots.link_bytes_over_time(
            records, n_tokens, f"Cumulative bytes per link ({name})")),
    }
    scores = plots.score_evolution(records, f"Score evolution ({name})")
    if scores is not None:
        figures["score_evolution.png"] = ("Score evolution", scores)
    else:
        notes.append("Score evolution: skipped, the trace carries no score records (the executor traces accesses "
                     "and engine events only).")
    t, v, _ = plots.occupancy_series(records, sizes)
    tq = plots.quality_pass_start(records, n_tokens)
    gen = v[(t >= plots.placement_start(records)) & (t < tq)]
    if len(gen):
        notes.append(f"Reconstructed peak device bytes from the initial placement to the end of generation: "
                     f"{gen.max() / 1e6:.1f} MB (the summary's "
                     f"sampled peak: {summary['peak_device_bytes'] / 1e6:.1f} MB; budget "
                     f"{summary['hbm_budget_bytes'] / 1e6:.1f} MB).")
    for file, (_, fig) in figures.items():
        plots.save(fig, directory / file)
    lines = [f"# Run report: {directory.name}", "", "| quantity | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in run_table(summary)]
    lines += [""] + [f"- {n}" for n in notes] + [""]
    for file, (heading, _) in figures.items():
        lines += [f"## {heading}", "", f"![{heading}]({file})", ""]
    out = directory / "report.md"
    out.write_text("\n".join(lines))
    return out


# -------------------------------------------------------------------------------------------------------- sweeps


SWEEP_COLUMNS = ("point", "policy", "budget", "tok/s", "step ms", "stall s", "moved MB", "/belady", "peak MB",
                 "ppl", "Δppl", "KL", "top-1", "status")


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
            out.append([str(r["point_id"]), label, "", "", "", "", "", "", "", "", "", "", "",
                        f"failed: {r.get('error') or ''}"])
            continue
        out.append([str(r["point_id"]), plots.variant(r), f"{r['hbm_budget_bytes'] / r['model_bytes']:.2f}",
                    _num(r["decode_tok_s"], ".2f"), _num(r["decode_step_s"] * 1e3, ".1f"), _num(r["stall_s"], ".3f"),
                    _mb(r["bytes_moved"]), _num(plots.belady_ratio(r), ".3f"), _mb(r["peak_device_bytes"]),
                    _num(r["quality.ppl"], ".4f"), _num(plots.ppl_delta(r), "+.4f"), _num(r["quality.kl_mean"], ".2e"),
                    _num(r["quality.top1_agree"], ".3f"), "complete"])
    return out


def report_sweep(directory: str | Path) -> Path:
    """Budget curves, Pareto plot and report.md for a sweep directory."""
    from vorch_jax.sweep import read_results

    directory = Path(directory)
    rows = read_results(directory / "results.csv")
    name = directory.name
    try:
        name = json.loads((directory / "sweep.json").read_text())["name"]
    except (OSError, ValueError, KeyError):
        pass
    plots.save(plots.budget_curves(rows, f"Budget curves: sweep {name}"), directory / "budget_curves.png")
    plots.save(plots.pareto(rows), directory / "pareto.png")
    done = [r for r in rows if r.get("status") == "complete"]
    pts = [(r["decode_step_s"] * 1e3, plots.ppl_delta(r)) for r in done]
    front = [done[i] for i in plots.pareto_front(pts)]
    lines = [f"# Sweep report: {name}", "",
             f"{len(done)} of {len(rows)} points complete"
             f"{'' if len(done) == len(rows) else f', {len(rows) - len(done)} failed'}. "
             f"Budget is the fraction of the model's full-precision bytes; Δppl = ppl - resident ppl; "
             f"/belady = bytes moved / Belady's bytes for the same access stream.", "",
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
              "## Latency vs quality", "", "![Pareto](pareto.png)", ""]
    out = directory / "report.md"
    out.write_text("\n".join(lines))
    return out


# ----------------------------------------------------------------------------------------------------------- CLI


def _cmd_report(args) -> int:
    out = report(args.dir)
    print(out)
    return 0


def add_cli(subparsers) -> None:
    """`vorch report DIR`."""
    p = subparsers.add_parser("report", help="report.md and PNG figures for a run or sweep directory")
    p.add_argument("dir", help="a run directory (summary.json, trace.jsonl) or a sweep directory (results.csv)")
    p.set_defaults(func=_cmd_report)
