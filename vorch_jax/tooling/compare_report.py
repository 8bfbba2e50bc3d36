"""The report of a `vorch compare` folder: the policies side by side, from each run's summary.json and trace.jsonl.

`vorch compare` writes one run folder per policy and, last, `compare.json` naming them. `report_compare(DIR)`
writes DIR/report.md with one table of every policy's key numbers and four figures drawn across the policies:
traffic (bytes moved against Belady's, per link), time (decode step against its floor, stalls), device occupancy
over the run against each budget, and each policy's state timeline. Every policy's own run report is written in
its folder too and linked.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from vorch_jax.tooling import plots as plots
from vorch_jax.errors import ReportError
from vorch_jax.tooling.run_report import read_run, report_run

MANIFEST = "compare.json"
MB = 1e6


def write_manifest(out_dir: Path, policies: list[str], config: dict) -> Path:
    """`compare.json`: which folder holds which policy (written last: its presence means every run finished)."""
    from vorch_jax.runtime.telemetry import write_json_atomic

    path = Path(out_dir) / MANIFEST
    write_json_atomic(path, {"policies": list(policies), "runs": {p: p for p in policies}, "config": config})
    return path


def read_compare(directory: Path) -> list[tuple[str, Path, dict, list]]:
    """(policy, run folder, summary, trace records) of every run a compare folder names, in its order."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        runs = [(p, directory / manifest["runs"][p]) for p in manifest["policies"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ReportError(f"{directory / MANIFEST} is unreadable ({type(e).__name__}: {e}); re-run `vorch compare`"
                          ) from None
    out = []
    for policy, run_dir in runs:
        try:
            summary, records = read_run(run_dir)
        except ReportError as e:
            raise ReportError(f"the {policy} run of {directory} is incomplete or damaged ({e})") from None
        out.append((policy, run_dir, summary, records))
    return out


def _f(x, fmt: str) -> str:
    return format(x, fmt) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else "-"


COLUMNS = ("policy", "budget MB", "tok/s", "step ms", "floor ms", "step / floor", "stall s", "moved MB",
           "/ belady", "/ bound", "peak MB", "ppl", "KL", "top-1", "same tokens")


def compare_table(summaries: list[dict]) -> list[list[str]]:
    rows = []
    for s in summaries:
        q = s.get("quality") or {}
        rows.append([s["policy"] + (" +lossy" if s.get("lossy") else ""), _f(s["hbm_budget_bytes"] / MB, ".1f"),
                     _f(s["decode_tok_s"], ".2f"), _f(s["decode_step_s"] * 1e3, ".1f"),
                     _f(s["floor_step_s"] * 1e3, ".1f"), _f(s["decode_step_s"] / s["floor_step_s"], ".3f"),
                     _f(s["stall_s"], ".3f"), _f(s["bytes_moved"] / MB, ".1f"),
                     _f(s["bytes_moved"] / s["belady_bytes"] if s.get("belady_bytes") else float("nan"), ".3f"),
                     _f(s["bytes_moved"] / s["lower_bound_bytes"] if s.get("lower_bound_bytes") else float("nan"),
                        ".3f"),
                     _f(s["peak_device_bytes"] / MB, ".1f"), _f(q.get("ppl"), ".4f"), _f(q.get("kl_mean"), ".2e"),
                     _f(q.get("top1_agree"), ".3f"), str(s.get("tokens_match_resident"))])
    return rows


def traffic_figure(runs) -> "plots.Figure":
    """Bytes moved per link and Belady's bytes, one group of bars per policy."""
    fig = plots.figure(10, 4.5)
    ax = fig.add_subplot()
    links = sorted({k for _, _, s, _ in runs for k in s.get("link_bytes", {}) if k != "source->host"})
    names = [p for p, _, _, _ in runs]
    width = 0.8 / (len(links) + 1)
    x = np.arange(len(names))
    for i, link in enumerate(links):
        ax.bar(x + i * width, [s["link_bytes"].get(link, 0) / MB for _, _, s, _ in runs], width, label=link)
    bars = ax.bar(x + len(links) * width, [(s.get("belady_bytes") or 0) / MB for _, _, s, _ in runs], width,
                  label="Belady (host->device)", color="black", alpha=0.35)
    ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(x + width * len(links) / 2, names)
    ax.set_xlabel("policy")
    ax.set_ylabel("bytes moved, generation incl. initial placement (MB)")
    ax.set_title("Traffic per link against Belady's bytes for the same access stream")
    ax.legend(fontsize=8)
    return fig


def time_figure(runs) -> "plots.Figure":
    """Decode step beside its floor, and stalls beside transfer time, per policy."""
    fig = plots.figure(12, 4.2)
    a, b = fig.subplots(1, 2)
    names = [p for p, _, _, _ in runs]
    summaries = [s for _, _, s, _ in runs]
    _bar_pair(a, names, [(s["decode_step_s"] * 1e3, s["floor_step_s"] * 1e3) for s in summaries],
              ("decode step (measured)", "floor (compute or link bound)"), "milliseconds per token",
              "Decode step against its floor")
    _bar_pair(b, names, [(s["stall_s"], s["transfer_s"]) for s in summaries],
              ("stalls (host waited for a block)", "link busy (host->device, nvme->host)"),
              "seconds during generation", "Stalls against transfer time")
    return fig


def _bar_pair(ax, names, pairs, labels, ylabel: str, title: str) -> None:
    """Two bars per policy side by side: `pairs` [(left, right)] in policy order."""
    x = np.arange(len(names))
    for side, label in zip((-0.2, 0.2), labels):
        ax.bar(x + side, [pair[side > 0] for pair in pairs], 0.4, label=label)
    ax.set_xticks(x, names)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)


def occupancy_figure(runs) -> "plots.Figure":
    """Device bytes over time (reconstructed from each trace's transitions), one line per policy, budgets dashed."""
    fig = plots.figure(10, 4.5)
    ax = fig.add_subplot()
    for k, (policy, _, s, records) in enumerate(runs):
        t, v, _ = plots.occupancy_series(records, plots.device_bytes_from_trace(records))
        keep = t >= plots.placement_start(records)
        line, = ax.step(t[keep], v[keep] / MB, where="post", lw=1.0, label=policy)
        ax.axhline(s["hbm_budget_bytes"] / MB, color=line.get_color(), ls="--", lw=0.7)
    ax.set_xlabel("time since generation start (s)")
    ax.set_ylabel("device bytes (MB); dashed: each run's HBM budget")
    ax.set_title("Device occupancy per policy (lossy states drawn at their full-precision size)")
    ax.legend(fontsize=8)
    ax.set_ylim(bottom=0)
    return fig


def timelines_figure(runs) -> "plots.Figure":
    """Each policy's state timeline (block x access, coloured by state), stacked."""
    fig = plots.figure(11, 2.6 * len(runs) + 0.6)
    axes = np.atleast_1d(fig.subplots(len(runs), 1))
    colours = ["#ffffff"] + [plots.STATE_COLOURS[s] for s in plots.STATE_ORDER]
    present = set()
    for ax, (policy, _, _, records) in zip(axes, runs):
        blocks, codes, _ = plots.state_matrix(records)
        ax.imshow(codes + 1, aspect="auto", interpolation="nearest", cmap=plots.ListedColormap(colours), vmin=0,
                  vmax=len(colours) - 1)
        present |= {plots.STATE_ORDER[c] for c in np.unique(codes) if c >= 0}
        ax.set_ylabel(f"{policy}\nblock", fontsize=8)
        ax.set_yticks([])
    axes[-1].set_xlabel("access index (every block computed, in schedule order; all steps)")
    handles = [plots.Patch(color=plots.STATE_COLOURS[s], label=plots.STATE_NAMES[s])
               for s in plots.STATE_ORDER if s in present]
    fig.legend(handles=handles, loc="outside upper center", ncols=len(handles), fontsize=7, frameon=False)
    return fig


def report_compare(directory: str | Path) -> Path:
    """report.md and figures for a `vorch compare` folder (and each run's own report in its folder)."""
    directory = Path(directory)
    runs = read_compare(directory)
    for _, run_dir, _, _ in runs:
        report_run(run_dir)
    figures = {"compare_traffic.png": ("Traffic", traffic_figure(runs)),
               "compare_time.png": ("Time: decode step, floor, stalls", time_figure(runs)),
               "compare_occupancy.png": ("Device occupancy", occupancy_figure(runs)),
               "compare_timelines.png": ("State timelines", timelines_figure(runs))}
    for file, (_, fig) in figures.items():
        plots.save(fig, directory / file)
    summaries = [s for _, _, s, _ in runs]
    first = summaries[0]
    lines = [f"# Compare report: {directory.name}", "",
             f"Model {first['model']}, {len(runs)} policies; every figure comes from each run's recorded events. "
             f"/ belady = bytes moved / Belady's bytes for the same access stream; / bound = bytes moved / the LP lower "
             f"bound on any policy's bytes for it (Belady can be beaten when blocks differ in size); step / floor = measured decode "
             f"step over max(resident compute step, bytes per step / fastest measured link rate).", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in compare_table(summaries)]
    lines += ["", "Each run's own report: " + ", ".join(f"[{p}]({d.name}/report.md)" for p, d, _, _ in runs), ""]
    for file, (heading, _) in figures.items():
        lines += [f"## {heading}", "", f"![{heading}]({file})", ""]
    out = directory / "report.md"
    out.write_text("\n".join(lines))
    return out
