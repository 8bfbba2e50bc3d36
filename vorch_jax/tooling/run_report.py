"""The report of one run folder (`vorch run`): report.md with the run's key numbers and figures from its trace.

Figures: state timeline, score evolution (the scored policy records each tick's score R(b, s) of a sample of blocks
in the state it chose; other policies have no score, and the report says so), action counts, device occupancy
against the budget, cumulative bytes per link.

Device occupancy needs each block's device bytes per state. Full-precision sizes come from the trace (the bytes of
the block's host->device transfers); lossy sizes (S1, S2, S6) are not in the trace, so when a run used lossy
states they are computed from the model's tensor shapes with `vorch_jax.tiers.footprint` (the int4 group size and
low-rank rank are read from the run's config.yaml).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from vorch_jax.tooling import plots as plots
from vorch_jax.config import ConfigError, QuantConfig, load_config
from vorch_jax.errors import ReportError

LOSSY = ("S1", "S2", "S6")


def _quant(directory: Path) -> tuple[QuantConfig, str | None]:
    """The run's quantization settings from its config.yaml, and a note when they had to be assumed.

    An unreadable or invalid config.yaml is an error naming the file: guessing the formats would draw another run's
    device occupancy."""
    cfg_path = directory / "config.yaml"
    if not cfg_path.exists():
        return QuantConfig(), (f"{cfg_path} is missing: lossy sizes assume the default formats "
                               f"(int4 group {QuantConfig().int4_group_size}, rank {QuantConfig().lowrank_rank})")
    try:
        return load_config(cfg_path).quant, None
    except ConfigError as e:
        raise ReportError(f"cannot report {directory}: its run config is unreadable ({e}); restore {cfg_path} "
                          f"or re-run the point") from None


def lossy_state_bytes(blocks: Sequence[str], quant: QuantConfig, model: str) -> dict[str, dict[str, int]]:
    """{block: {S0, S1, S2, S6: device bytes}} from the model's tensor shapes (its spec: nothing is read)."""
    from vorch_jax.models.registry import get
    from vorch_jax.tiers import footprint
    from vorch_jax.tiers.state import State

    spec = get(model)
    out = {}
    for b in blocks:
        shapes = spec.block_shapes(b)
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
    bound, lb = s.get("lower_bound_bytes"), s.get("lower_bound") or {}
    solved = "" if not lb else (f", solved in {_num(lb.get('solver_s'), '.2f')} s"
                                f"{'' if lb.get('status') == 'optimal' else ', ' + str(lb.get('status'))}")
    bound_text = "-" if not bound else \
        f"{_num(s['bytes_moved'] / bound, '.3f')} x the LP lower bound ({_mb(bound)} MB{solved})"
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
        ("lower bound", bound_text),
        ("per link", ", ".join(f"{k} {_mb(v)} MB" for k, v in s.get("link_bytes", {}).items()) or "-"),
        ("hits / misses", f"{s['hits']} / {s['misses']}"),
        ("peak device", f"{_mb(s['peak_device_bytes'])} MB"),
        ("quality", "not measured: a simulated run computes no logits" if s.get("simulated") else
                    f"ppl {_num(q.get('ppl'), '.4f')} vs resident {_num(q.get('ppl_resident'), '.4f')}, "
                    f"KL {_num(q.get('kl_mean'), '.2e')}, top-1 agreement {_num(q.get('top1_agree'), '.3f')} "
                    f"on {q.get('eval_tokens')} tokens"),
        ("same tokens as resident", str(s.get("tokens_match_resident"))),
        ("backend", str(s.get("backend"))),
    ] + ([("mesh", f"tp {s['mesh']['tp']} x ep {s['mesh']['ep']}: budget, peak and model bytes are per device, "
                   f"bytes moved summed over the devices; figures from device {s['mesh']['per_device'][0]['device']}'s "
                   f"trace")] if "mesh" in s else [])


SUMMARY_FIELDS = ("policy", "hbm_budget_bytes", "model_bytes", "decode_tok_s", "decode_step_s", "floor_step_s",
                  "bytes_moved", "belady_bytes", "peak_device_bytes")


def trace_folder(directory: Path, summary) -> Path:
    """Where a run's trace is: its own folder, or for a mesh (traces per device) its first device's folder, beside
    the summary or one level up (a process of a multi-process run writes `process-<i>/summary.json`)."""
    if not isinstance(summary, dict) or "mesh" not in summary or (directory / "trace.jsonl").exists():
        return directory
    rows = summary["mesh"].get("per_device") or [{"device": 0}]
    name = f"device-{rows[0]['device']}"
    return directory / name if (directory / name).is_dir() else directory.parent / name


def read_run(directory: Path) -> tuple[dict, list]:
    """(summary, trace records) of a complete run folder; ReportError naming the file when either is damaged. A
    mesh's figures are its first device's (`trace_folder`)."""
    path = directory / "summary.json"
    try:
        summary = json.loads(path.read_text())
        records = plots.read_trace(trace_folder(directory, summary))
    except (OSError, ValueError) as e:
        raise ReportError(f"cannot report {directory}: {e}; re-run it") from None
    missing = [k for k in SUMMARY_FIELDS if k not in summary] if isinstance(summary, dict) else ["all"]
    if missing or summary.get("complete") is not True:
        why = f"lacks {', '.join(missing)}" if missing else "does not say the run completed"
        raise ReportError(f"cannot report {directory}: {path} {why}; re-run it")
    return summary, records


def report_run(directory: str | Path) -> Path:
    """Figures and report.md for one run directory."""
    directory = Path(directory)
    summary, records = read_run(directory)
    n_tokens = len(summary.get("tokens") or []) or None  # a simulated run has no tokens
    name = f"{summary['policy']}{' +lossy' if summary.get('lossy') else ''}, budget " \
           f"{summary['hbm_budget_bytes'] / summary['model_bytes']:.2f}"
    notes = []
    sizes = plots.device_bytes_from_trace(records)
    if any(r.get("to") in LOSSY for r in records if r["event"] in ("transition", "recovered")):
        quant, note = _quant(directory)
        sizes = lossy_state_bytes(plots.block_order(records), quant, summary["model"])
        notes += [note] if note else []
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
        notes.append(f"Score evolution: none, the {summary['policy']} policy has no controller score (only the "
                     f"scored policy's ticks record one).")
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
