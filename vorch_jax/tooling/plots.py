"""Figures of one run (from its trace) and of a sweep (from its results rows). Matplotlib, Agg canvas, no pyplot.

Every function returns a `matplotlib.figure.Figure` (save it with `save(fig, path)`); none touches global state, so
they are safe in scripts, tests and notebooks alike. Trace derivations (states, device bytes, link bytes) are plain
functions beside the figures that draw them.

Trace conventions (see `vorch_jax.runtime.telemetry.trace_records`): `t` is seconds from the start of generation; set-up
(registering every block at its home: `source->host` reads) and the initial placement come before, with t < 0.
The initial placement is taken to start at the first transfer over any other link (`placement_start`). Transition
records carry one link each (a multi-hop transition has one record per link, all with the same from/to); steps
0..n-1 are prefill and decode, step n (= number of generated tokens) is the quality pass. A transition takes effect
when it ends (t + dur_s).
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

__all__ = [
    "read_trace", "block_order", "quality_pass_start", "state_matrix", "device_bytes_from_trace", "occupancy_series",
    "link_cumulative", "transition_counts_by_phase", "pareto_front", "variant", "state_timeline", "score_evolution",
    "action_counts", "device_occupancy", "link_bytes_over_time", "budget_curves", "pareto", "save",
]

STATE_ORDER = ("S0", "S1", "S2", "S6", "S3", "S4", "S5")
STATE_COLOURS = {"S0": "#1b7837", "S1": "#7fbf7b", "S2": "#d9f0d3", "S6": "#fdb863", "S3": "#4393c3",
                 "S4": "#542788", "S5": "#bababa"}
STATE_NAMES = {"S0": "S0 device fp", "S1": "S1 device int8", "S2": "S2 device int4", "S6": "S6 device low-rank",
               "S3": "S3 host DRAM", "S4": "S4 NVMe", "S5": "S5 in flight"}
ON_DEVICE = ("S0", "S1", "S2", "S6")
_STATE_EVENTS = ("transition", "recovered")
MB = 1e6


def figure(w: float = 9.0, h: float = 5.0) -> Figure:
    fig = Figure(figsize=(w, h), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: str | Path) -> Path:
    """Write `fig` as a PNG (or whatever the suffix says) and return the path."""
    path = Path(path)
    fig.savefig(path)
    return path


# ------------------------------------------------------------------------------------------------ trace analysis


def read_trace(path: str | Path) -> list[dict]:
    """Records of a run's trace.jsonl (a run directory or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "trace.jsonl"
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def block_order(records: Sequence[dict]) -> list[str]:
    """Blocks in the order they first appear (registration follows the model's order)."""
    return list(dict.fromkeys(r["block"] for r in records if r.get("block")))


def placement_start(records: Sequence[dict]) -> float:
    """Trace time of the first transfer that is not a set-up read of the model file (the initial placement's
    first load); 0.0 when there is none."""
    times = [r["t"] for r in records if r["event"] in _STATE_EVENTS and r["link"] and r["link"] != "source->host"]
    return min(min(times), 0.0) if times else 0.0


def quality_pass_start(records: Sequence[dict], n_tokens: int | None) -> float:
    """Trace time at which the quality pass begins (its first access, step == n_tokens); inf if unknown."""
    if n_tokens is None:
        return math.inf
    starts = [r["t"] for r in records if r["event"] == "access" and r["step"] is not None and r["step"] >= n_tokens]
    return min(starts) if starts else math.inf


def _state_changes(records: Sequence[dict]) -> list[tuple[float, str, str]]:
    """(time the change takes effect, block, new state), sorted by time."""
    changes = {(r["t"] + max(r["dur_s"] or 0.0, 0.0), r["block"], r["to"]) for r in records
               if r["event"] in _STATE_EVENTS and r.get("to")}
    return sorted(changes)


def state_matrix(records: Sequence[dict]) -> tuple[list[str], np.ndarray, list[dict]]:
    """(blocks, codes_BxA, accesses): the state each block was in when each access began.

    Codes index `STATE_ORDER`; -1 means the block was not registered yet. Column a is access number a (in time
    order, the quality pass included).
    """
    blocks = block_order(records)
    row = {b: i for i, b in enumerate(blocks)}
    code = {s: i for i, s in enumerate(STATE_ORDER)}
    accesses = sorted((r for r in records if r["event"] == "access"), key=lambda r: r["t"])
    changes = _state_changes(records)
    current = np.full(len(blocks), -1, dtype=np.int16)
    out = np.full((len(blocks), len(accesses)), -1, dtype=np.int16)
    j = 0
    for a, acc in enumerate(accesses):
        while j < len(changes) and changes[j][0] <= acc["t"]:
            _, b, s = changes[j]
            current[row[b]] = code.get(s, -1)
            j += 1
        out[:, a] = current
    return blocks, out, accesses


def device_bytes_from_trace(records: Sequence[dict]) -> dict[str, dict[str, int]]:
    """{block: {"S0": bytes}} from the host->device records (a block's full-precision device size, as moved)."""
    out: dict[str, dict[str, int]] = defaultdict(dict)
    for r in records:
        if r["event"] in _STATE_EVENTS and r["link"] == "host->device" and r["bytes"]:
            out[r["block"]]["S0"] = max(out[r["block"]].get("S0", 0), int(r["bytes"]))
    return dict(out)


def occupancy_series(records: Sequence[dict], state_bytes: Mapping[str, Mapping[str, int]]
                     ) -> tuple[np.ndarray, np.ndarray, bool]:
    """(times_s, device_bytes, approximated): bytes on device after each state change.

    A block counts `state_bytes[block][state]` while in an on-device state. When a lossy state's size is missing,
    its S0 size stands in (an upper bound) and `approximated` is True.
    """
    where: dict[str, str] = {}
    total, times, values, approximated = 0, [], [], False

    def size(block, state):
        nonlocal approximated
        if state not in ON_DEVICE:
            return 0
        sizes = state_bytes.get(block, {})
        if state in sizes:
            return sizes[state]
        approximated = True
        return sizes.get("S0", 0)

    for t, b, s in _state_changes(records):
        total += size(b, s) - size(b, where.get(b))
        where[b] = s
        times.append(t)
        values.append(total)
    return np.asarray(times, float), np.asarray(values, float), approximated


def link_cumulative(records: Sequence[dict], t_min: float | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{link: (end times, cumulative bytes)} for transfers that start at or after `t_min` (default: the initial
    placement's start, so set-up reads of the model file are left out)."""
    t_min = placement_start(records) if t_min is None else t_min
    per: dict[str, list] = defaultdict(list)
    for r in records:
        if r["event"] in _STATE_EVENTS and r["link"] and r["t"] >= t_min:
            per[r["link"]].append((r["t"] + max(r["dur_s"] or 0.0, 0.0), r["bytes"] or 0))
    out = {}
    for link, items in sorted(per.items()):
        items.sort()
        out[link] = (np.asarray([t for t, _ in items]), np.cumsum([n for _, n in items]).astype(float))
    return out


def transition_counts_by_phase(records: Sequence[dict], n_tokens: int | None) -> dict[str, Counter]:
    """{phase: Counter('S3->S0': n)}: 'set-up', 'initial placement', 'generation' and 'quality pass'.

    A multi-hop transition is counted once (its records share block, start and from/to).
    """
    tq = quality_pass_start(records, n_tokens)
    tp = placement_start(records)
    seen = set()
    out = {"set-up": Counter(), "initial placement": Counter(), "generation": Counter(), "quality pass": Counter()}
    for r in records:
        if r["event"] != "transition":
            continue
        key = (r["t"], r["block"], r["from"], r["to"])
        if key in seen:
            continue
        seen.add(key)
        if r["t"] < tp:
            phase = "set-up"
        elif r["t"] < 0:
            phase = "initial placement"
        else:
            phase = "quality pass" if r["t"] >= tq else "generation"
        out[phase][f"{r['from']}->{r['to']}"] += 1
    return out


# --------------------------------------------------------------------------------------------------- run figures


def _phase_lines(ax, accesses: list[dict], n_tokens: int | None) -> None:
    """Vertical lines between steps on an access-index axis, labelled prefill / decode / quality."""
    steps = [a["step"] for a in accesses]
    for i in range(1, len(steps)):
        if steps[i] != steps[i - 1]:
            ax.axvline(i - 0.5, color="black", lw=0.6, alpha=0.6)
    starts = [0] + [i for i in range(1, len(steps)) if steps[i] != steps[i - 1]]
    for k, i in enumerate(starts):
        s = steps[i]
        label = "prefill" if s == 0 else ("quality" if n_tokens is not None and s >= n_tokens else f"d{s}")
        if k < 12 or label == "quality":
            ax.text(i + 1, 1.0, label, fontsize=7, va="bottom", ha="left", transform=ax.get_xaxis_transform())


def state_timeline(records: Sequence[dict], n_tokens: int | None = None, title: str = "") -> Figure:
    """Blocks x access index, each cell coloured by the block's state when that access began; misses marked."""
    blocks, codes, accesses = state_matrix(records)
    fig = figure(11, max(5.0, 0.11 * len(blocks) + 1.5))
    ax = fig.add_subplot()
    colours = ["#ffffff"] + [STATE_COLOURS[s] for s in STATE_ORDER]
    ax.imshow(codes + 1, aspect="auto", interpolation="nearest", cmap=ListedColormap(colours), vmin=0,
              vmax=len(colours) - 1)
    row = {b: i for i, b in enumerate(blocks)}
    misses = [(a, row[r["block"]]) for a, r in enumerate(accesses) if r.get("hit") is False]
    if misses:
        xs, ys = zip(*misses)
        ax.scatter(xs, ys, marker="x", s=8, c="red", linewidths=0.6, label="miss (access waited for a load)")
    _phase_lines(ax, accesses, n_tokens)
    step = max(1, len(blocks) // 32)
    ax.set_yticks(range(0, len(blocks), step), [blocks[i] for i in range(0, len(blocks), step)], fontsize=6)
    ax.set_xlabel("access index (one per block computed, in schedule order; all steps)")
    ax.set_ylabel("block")
    ax.set_title(title or "Block state at each access", pad=14)
    present = sorted({STATE_ORDER[c] for c in np.unique(codes) if c >= 0}, key=STATE_ORDER.index)
    handles = [Patch(color=STATE_COLOURS[s], label=STATE_NAMES[s]) for s in present]
    if misses:
        handles.append(ax.collections[0])
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    return fig


def score_evolution(records: Sequence[dict], title: str = "") -> Figure | None:
    """Score of each block over time, if the trace carries `score` records (block, t, score); else None."""
    scores = [r for r in records if r.get("event") == "score" and r.get("score") is not None]
    if not scores:
        return None
    per: dict[str, list] = defaultdict(list)
    for r in scores:
        per[r["block"]].append((r["t"], r["score"]))
    fig = figure()
    ax = fig.add_subplot()
    for b, pts in per.items():
        pts.sort()
        ax.plot([t for t, _ in pts], [s for _, s in pts], lw=0.8)
    ax.set_xlabel("time since generation start (s)")
    ax.set_ylabel("residency score (dimensionless)")
    ax.set_title(title or "Score evolution per block")
    return fig


def action_counts(records: Sequence[dict], n_tokens: int | None = None, title: str = "") -> Figure:
    """Transitions per from->to, one bar per phase (set-up, initial placement, generation, quality pass)."""
    by_phase = transition_counts_by_phase(records, n_tokens)
    kinds = sorted({k for c in by_phase.values() for k in c})
    fig = figure(9, 4.5)
    ax = fig.add_subplot()
    phases = [p for p, c in by_phase.items() if c]
    width = 0.8 / max(1, len(phases))
    x = np.arange(len(kinds))
    for i, p in enumerate(phases):
        bars = ax.bar(x + (i - (len(phases) - 1) / 2) * width, [by_phase[p][k] for k in kinds], width, label=p)
        ax.bar_label(bars, fontsize=7)
    ax.set_xticks(x, kinds, rotation=20)
    ax.set_xlabel("transition (from state -> to state)")
    ax.set_ylabel("count (transitions)")
    ax.set_title(title or "Actions: transitions per kind and phase")
    ax.legend(fontsize=8)
    return fig


def device_occupancy(records: Sequence[dict], budget_bytes: int | None,
                     state_bytes: Mapping[str, Mapping[str, int]] | None = None, n_tokens: int | None = None,
                     title: str = "") -> Figure:
    """Bytes on device after each state change (from the initial placement on), with the HBM budget as a line."""
    sizes = state_bytes if state_bytes is not None else device_bytes_from_trace(records)
    t, v, approx = occupancy_series(records, sizes)
    tp = placement_start(records)
    keep = t >= tp
    fig = figure(9, 4.5)
    ax = fig.add_subplot()
    t_end = max((r["t"] + max(r.get("dur_s") or 0.0, 0.0) for r in records), default=0.0)
    last = v[keep][-1] if keep.any() else 0.0
    ax.step(np.r_[tp, t[keep], t_end], np.r_[0.0, v[keep], last] / MB, where="post", lw=1.0,
            label="device bytes (reconstructed from transitions)")
    if tp < 0:
        ax.axvspan(tp, 0.0, color="gold", alpha=0.15, label="initial placement")
    if budget_bytes:
        ax.axhline(budget_bytes / MB, color="red", ls="--", lw=1.0, label=f"HBM budget {budget_bytes / MB:.1f} MB")
    tq = quality_pass_start(records, n_tokens)
    if math.isfinite(tq):
        ax.axvspan(tq, t_end, color="grey", alpha=0.15, label="quality pass")
    ax.set_xlabel("time since generation start (s)")
    ax.set_ylabel("device bytes (MB)")
    note = " (lossy sizes approximated by S0)" if approx else ""
    ax.set_title((title or "Device occupancy vs budget") + note)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_ylim(bottom=0)
    return fig


def link_bytes_over_time(records: Sequence[dict], n_tokens: int | None = None, title: str = "") -> Figure:
    """Cumulative bytes per link from the initial placement on (set-up reads of the model file excluded)."""
    series = link_cumulative(records)
    fig = figure(9, 4.5)
    ax = fig.add_subplot()
    t_end = max((r["t"] + max(r.get("dur_s") or 0.0, 0.0) for r in records), default=0.0)
    for link, (t, cum) in series.items():
        ax.step(np.r_[t, t_end], np.r_[cum, cum[-1]] / MB, where="post", label=f"{link} ({cum[-1] / MB:.0f} MB)")
    tq = quality_pass_start(records, n_tokens)
    ax.axvline(0.0, color="black", ls=":", lw=0.8, label="generation starts")
    if math.isfinite(tq):
        ax.axvline(tq, color="grey", ls=":", label="quality pass starts")
    ax.set_xlabel("time since generation start (s)")
    ax.set_ylabel("cumulative bytes (MB)")
    ax.set_title(title or "Bytes per link over time")
    if series:
        ax.legend(fontsize=8)
    return fig


# ------------------------------------------------------------------------------------------------- sweep figures


def variant(row: Mapping) -> str:
    """A line's name: the policy, with '+lossy' when lossy states were allowed and the format of its compressed homes
    when it kept some ('static +lossy homes int4 g64': uniform compression)."""
    homes = row.get("home_formats") or ""
    return (f"{row.get('policy')}{' +lossy' if row.get('lossy') in (True, 'True', 'true') else ''}"
            f"{f' homes {homes}' if homes else ''}")


def _budget_fraction(row: Mapping) -> float:
    return row["hbm_budget_bytes"] / row["model_bytes"]


def _complete(rows: Sequence[Mapping]) -> list[Mapping]:
    return [r for r in rows if r.get("status") == "complete" and r.get("hbm_budget_bytes") and r.get("model_bytes")]


def ppl_delta(row: Mapping) -> float:
    """ppl - resident ppl; NaN for a simulated run (quality is not simulated: its row has no ppl)."""
    if row.get("quality.ppl") is None or row.get("quality.ppl_resident") is None:
        return float("nan")
    return row["quality.ppl"] - row["quality.ppl_resident"]


def belady_ratio(row: Mapping) -> float:
    return row["bytes_moved"] / row["belady_bytes"] if row.get("belady_bytes") else float("nan")


def bound_ratio(row: Mapping) -> float:
    return row["bytes_moved"] / row["lower_bound_bytes"] if row.get("lower_bound_bytes") else float("nan")


def budget_curves(rows: Sequence[Mapping], title: str = "") -> Figure:
    """Decode tok/s, bytes moved / Belady bytes, perplexity delta and KL against the HBM budget, a line per variant.

    The KL panel is there because a perplexity delta on a short text can be negative for a lossy run (the
    perturbation happens to fit the text better); the KL to the resident model cannot.
    """
    done = _complete(rows)
    panels = (("decode_tok_s", "decode throughput (tokens/s)", lambda r: r["decode_tok_s"]),
              ("belady", "bytes moved / Belady bytes (ratio)", belady_ratio),
              ("ppl", "perplexity - resident perplexity", ppl_delta),
              ("kl", "mean KL(resident || run) per token (nats)", lambda r: r.get("quality.kl_mean", float("nan"))))
    fig = figure(16, 4.4)
    axes = fig.subplots(1, 4)
    names = sorted({variant(r) for r in done})
    for ax, (_, ylabel, get) in zip(axes, panels):
        for name in names:
            pts = sorted((_budget_fraction(r), get(r)) for r in done if variant(r) == name)
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", lw=1.2, label=name,
                    ls="--" if "lossy" in name else "-")
        ax.set_xlabel("HBM budget (fraction of full-precision model bytes)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[1].axhline(1.0, color="black", lw=0.6, ls=":")
    axes[0].set_title("Decode throughput")
    axes[1].set_title("Traffic vs Belady's optimum")
    axes[2].set_title("Quality: perplexity delta")
    axes[3].set_title("Quality: KL to the resident model")
    axes[0].legend(fontsize=8)
    fig.suptitle(title or "Budget curves")
    return fig


def frontier(rows: Sequence[Mapping], title: str = "") -> Figure:
    """The quality/traffic frontier: bytes moved host->device against KL to the resident model, a curve per variant
    through its budgets (labels: the budget fraction). KL is drawn on a symmetric-log axis so that lossless runs (0)
    sit on it beside nats of lossy ones."""
    done = [r for r in _complete(rows) if r.get("quality.kl_mean") is not None]
    fig = figure(9, 5.5)
    ax = fig.add_subplot()
    for name in sorted({variant(r) for r in done}):
        pts = sorted((r["bytes_moved"] / 1e6, r["quality.kl_mean"], _budget_fraction(r)) for r in done
                     if variant(r) == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", lw=1.2, label=name,
                ls="--" if "homes" in name and not name.startswith("scored") else "-")
        for x, y, b in pts:
            ax.annotate(f"{b:.1f}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.set_ylim(0, 3 * max([r["quality.kl_mean"] for r in done] + [1e-3]))  # KL >= 0: no negative decades
    ax.set_xlabel("bytes moved host->device (MB, log)")
    ax.set_ylabel("mean KL(resident || run) per token (nats, symlog)")
    ax.set_title(title or "Quality vs traffic (labels: HBM budget fraction); lower left is better")
    ax.grid(alpha=0.3, which="both")
    if done:
        ax.legend(fontsize=8)
    else:  # simulated runs measure no quality
        ax.text(0.5, 0.5, "no run measured quality (simulated)", transform=ax.transAxes, ha="center")
    return fig


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both coordinates (both minimised), sorted by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best_y = [], math.inf
    for i in order:
        if points[i][1] < best_y:
            front.append(i)
            best_y = points[i][1]
    return front


def pareto(rows: Sequence[Mapping], title: str = "") -> Figure:
    """Decode step time against perplexity delta, one marker per variant, the Pareto front drawn and ringed."""
    done = _complete(rows)
    pts = [(r["decode_step_s"] * 1e3, ppl_delta(r)) for r in done]
    fig = figure(8, 5)
    ax = fig.add_subplot()
    markers = "osD^v<>P*X"
    for k, name in enumerate(sorted({variant(r) for r in done})):
        idx = [i for i, r in enumerate(done) if variant(r) == name]
        ax.scatter([pts[i][0] for i in idx], [pts[i][1] for i in idx], marker=markers[k % len(markers)], s=36,
                   label=name, zorder=3)
    for i, r in enumerate(done):
        ax.annotate(f"{_budget_fraction(r):.1f}", pts[i], textcoords="offset points", xytext=(4, 3), fontsize=7)
    front = pareto_front(pts)
    if front:
        ax.step([pts[i][0] for i in front], [pts[i][1] for i in front], where="post", color="black", lw=1, zorder=2,
                label="Pareto front")
        ax.scatter([pts[i][0] for i in front], [pts[i][1] for i in front], s=140, facecolors="none",
                   edgecolors="black", zorder=4)
    ax.set_xlabel("decode step time (ms per token)")
    ax.set_ylabel("perplexity - resident perplexity")
    ax.set_title(title or "Latency vs quality (labels: HBM budget fraction)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig
