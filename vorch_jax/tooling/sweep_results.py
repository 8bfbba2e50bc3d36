"""A sweep's results: each point's status from its folder, its row (row.json: the run's scalar summary fields,
nested ones dotted, beside the point's swept values) and results.csv, written atomically and read back typed.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROW_LEAD = ("point_id", "status", "error", "point_s")
SKIP_FIELDS = ("complete", "tokens", "text", "quality.note")


def value_text(value: Any) -> str:
    """A swept value as its row and folder name show it: strings as they are, anything else as JSON."""
    return json.dumps(value) if not isinstance(value, str) else value


def point_status(point_dir: Path) -> str:
    """'complete' (summary.json with complete: true), 'failed' (row.json says so), 'partial' or 'absent'."""
    point_dir = Path(point_dir)
    try:
        if json.loads((point_dir / "summary.json").read_text()).get("complete") is True:
            return "complete"
    except (OSError, ValueError):
        pass
    try:
        if json.loads((point_dir / "row.json").read_text()).get("status") == "failed":
            return "failed"
    except (OSError, ValueError):
        pass
    return "partial" if point_dir.exists() else "absent"


def readable_json(path: Path) -> bool:
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


def flatten_summary(summary: Mapping) -> dict[str, Any]:
    """Scalar fields of a run summary, nested ones dotted (``quality.ppl``, ``link_bytes.host->device``)."""
    out: dict[str, Any] = {}
    for k, v in summary.items():
        if k in SKIP_FIELDS:
            continue
        if isinstance(v, Mapping) and k != "transitions":
            for k2, v2 in v.items():
                if f"{k}.{k2}" not in SKIP_FIELDS and (v2 is None or isinstance(v2, (int, float, str, bool))):
                    out[f"{k}.{k2}"] = v2
        elif v is None or isinstance(v, (int, float, str, bool)):
            out[k] = v
    return out


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def make_row(point, status: str, point_s: float, error: str, summary: Mapping | None) -> dict:
    """The row of a finished `sweep.Point` (its id and swept overrides), with its summary's fields if it has one."""
    row = {"point_id": point.id, "status": status, "error": _one_line(error), "point_s": round(point_s, 3)}
    row |= {f"cfg.{k}": value_text(v) for k, v in point.overrides}
    if summary is not None:
        row |= {k: (_one_line(v) if isinstance(v, str) else v) for k, v in flatten_summary(summary).items()}
    return row


def point_row(path: Path, point_id: str, overrides) -> dict | None:
    """The row of a finished point from its row.json (`overrides`: its swept (key, value) pairs); None when the point
    has not finished. A damaged row.json becomes a failed row that says so: a table never drops a finished point."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return {"point_id": point_id, "status": "failed", "error": f"{path} is unreadable ({_one_line(err)}); "
                f"`vorch sweep ... --resume` rebuilds or re-runs it", "point_s": None,
                **{f"cfg.{k}": value_text(v) for k, v in overrides}}


def results_text(rows: list[Mapping], swept_keys: list[str]) -> str:
    """results.csv of `rows` (in sweep order): the lead columns, one cfg column per swept key, then every other field
    in the order the rows first show it. One function, so a merged table of shards matches a one-process one."""
    columns = list(ROW_LEAD) + [f"cfg.{k}" for k in swept_keys]
    for r in rows:
        columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r.get(k, "") for k in columns})
    return buf.getvalue()


def write_results(out_dir: Path, sweep) -> int:
    """Rebuild results.csv of a `sweep.Sweep` from its points' row.json files (in sweep order); atomic. Returns the
    row count."""
    rows = [point_row(out_dir / "points" / p.id / "row.json", p.id, p.overrides) for p in sweep.points]
    rows = [r for r in rows if r is not None]
    write_atomic(out_dir / "results.csv", results_text(rows, sweep.swept_keys))
    return len(rows)


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a results.csv, with numbers, booleans and empty cells turned back into int/float/bool/None."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.csv"
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: _parse_cell(v) for k, v in r.items()} for r in csv.DictReader(f)]


def _parse_cell(text: str) -> Any:
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
