"""Sweeps across machines: one share of a sweep's grid per process (`vorch sweep ... --shard I/N`, for job arrays),
and the merge of several sweep folders into one results table (`vorch report DIR1 DIR2 ... --out MERGED`).

The I-th of N shares (I counts from 1) holds the points whose index in sweep order is I-1 modulo N: the shares are
disjoint, cover the grid, depend on the sweep file alone (no machine, clock or file system), and deal a group of
costly points round-robin across the shares instead of giving it all to one. A shard folder is an ordinary sweep
folder with its own points, results.csv and `--resume`; its sweep.json records ``shard`` (index, count and the ids
of the whole grid in sweep order), so a merge knows the grid without the sweep file.

A merge reads each folder's sweep.json and its points' row.json files and writes one results.csv through the same
function a one-process sweep uses (`sweep_results.results_text`), in the grid's order: it equals, row for row and
column for column, the table the whole sweep in one process writes. Folders of different sweeps, and a point whose
rows differ between two folders, are refused before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

from vorch_jax.errors import ConfigError, ReportError
from vorch_jax.tooling.sweep_results import point_row, results_text, write_atomic

__all__ = ["parse_shard", "shard_indices", "shard_of", "shard_manifest", "check_resumed_shard", "merge_sweeps"]

_SLURM = "--shard $((SLURM_ARRAY_TASK_ID+1))/$SLURM_ARRAY_TASK_COUNT"


# -------------------------------------------------------------------------------------------------------- sharing


def parse_shard(text: str) -> tuple[int, int]:
    """`--shard I/N` as (I, N), with 1 <= I <= N; anything else is a one-line ConfigError saying what to give."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match:
        raise ConfigError(f"--shard expects I/N, two whole numbers such as 2/3 (the 2nd of 3 shares of the grid), "
                          f"got '{text}'")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1:
        raise ConfigError(f"--shard {text}: N, the number of shares, must be at least 1; give I/N with 1 <= I <= N, "
                          f"e.g. --shard 1/3")
    if not 1 <= index <= count:
        raise ConfigError(f"--shard {text}: I must be from 1 to {count} (it counts from 1; in a SLURM array give "
                          f"{_SLURM})")
    return index, count


def shard_indices(n_points: int, index: int, count: int) -> list[int]:
    """Indices (in sweep order) of the points in share `index` of `count`: those equal to index-1 modulo count."""
    return list(range(index - 1, n_points, count))


def shard_of(sweep, index: int, count: int):
    """The `sweep.Sweep` that runs only share `index` of `count` of `sweep`'s points; it keeps the whole grid, so its
    results table has the whole sweep's columns and its manifest the whole grid's ids."""
    points = tuple(sweep.points[i] for i in shard_indices(len(sweep.points), index, count))
    return dataclasses.replace(sweep, points=points, grid=tuple(sweep.points), shard=(index, count))


def shard_manifest(sweep) -> dict:
    """The ``shard`` entry of a sharded sweep's sweep.json ({} for a whole sweep)."""
    if sweep.shard is None:
        return {}
    index, count = sweep.shard
    return {"shard": {"index": index, "count": count, "grid": [p.id for p in sweep.grid]}}


def check_resumed_shard(out_dir: Path, sweep) -> None:
    """Refuse to resume a folder with another share than it holds (it would run other points into it)."""
    try:
        held = json.loads((Path(out_dir) / "sweep.json").read_text()).get("shard")
    except (OSError, ValueError, AttributeError):
        return  # no readable manifest: nothing recorded to contradict
    held = (held["index"], held["count"]) if isinstance(held, dict) and "index" in held and "count" in held else None
    if held == sweep.shard:
        return
    what = lambda s: f"shard {s[0]}/{s[1]}" if s else "the whole sweep"  # noqa: E731
    again = f"--shard {held[0]}/{held[1]}" if held else "no --shard"
    raise ConfigError(f"{out_dir} holds {what(held)}, not {what(sweep.shard)}: resume it with {again}, or give "
                      f"this share its own --out")


# -------------------------------------------------------------------------------------------------------- merging


@dataclasses.dataclass(frozen=True)
class _Folder:
    path: Path
    manifest: dict
    grid: tuple[str, ...]   # the whole sweep's point ids, in sweep order
    points: dict            # id -> overrides of the points this folder ran


def _read_folder(path: Path) -> _Folder:
    """A sweep folder's manifest, grid and points, or a ReportError saying why it is not one."""
    if not path.is_dir():
        raise ReportError(f"{path} is not a folder: give the --out folders of `vorch sweep` (e.g. its shards)")
    try:
        manifest = json.loads((path / "sweep.json").read_text())
        points = {p["id"]: p.get("overrides", {}) for p in manifest["points"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ReportError(f"{path} is not a sweep folder (no readable sweep.json): give the --out folders of "
                          f"`vorch sweep`") from None
    if not (path / "points").is_dir():
        raise ReportError(f"{path} has no points/ folder: a merge reads each point's row.json; copy the whole "
                          f"sweep folder")
    shard = manifest.get("shard")
    grid = tuple(shard["grid"]) if isinstance(shard, dict) and isinstance(shard.get("grid"), list) else tuple(points)
    return _Folder(path, manifest, grid, points)


def _check_one_sweep(folders: list[_Folder]) -> None:
    """Every folder must be a share of the same sweep: the same name and the same grid of point ids."""
    first = folders[0]
    for f in folders[1:]:
        if f.manifest.get("name") != first.manifest.get("name"):
            raise ReportError(f"{first.path} holds sweep '{first.manifest.get('name')}' but {f.path} holds sweep "
                              f"'{f.manifest.get('name')}': merge only the folders (shards) of one sweep")
        if f.grid != first.grid:
            raise ReportError(f"{first.path} and {f.path} hold different grids of sweep '{f.manifest.get('name')}' "
                              f"(their point ids differ: the sweep file, its base or the code changed between them): "
                              f"merge only shards run from the same sweep file")


def _rows(folders: list[_Folder]) -> tuple[dict, dict]:
    """{point id: row} over all folders, and {point id: overrides}; a point with different rows in two folders (it
    ran twice, or the folders are shards of different splits that overlap and disagree) is refused."""
    rows, owner, overrides = {}, {}, {}
    for f in folders:
        for pid, over in f.points.items():
            overrides.setdefault(pid, over)
            row = point_row(f.path / "points" / pid / "row.json", pid, tuple(over.items()))
            if row is None:
                continue
            if pid in rows and json.dumps(rows[pid], sort_keys=True) != json.dumps(row, sort_keys=True):  # NaN-safe
                raise ReportError(f"point {pid} has different rows in {owner[pid]} and {f.path} (overlapping shards "
                                  f"that disagree): give each point's folder once, e.g. the shards of one --shard I/N "
                                  f"split")
            rows[pid], owner[pid] = row, f.path
    return rows, overrides


def _source(f: _Folder) -> dict:
    """What the merged manifest says of one source folder: where it is, its share, the code it ran."""
    shard = f.manifest.get("shard")
    share = {"index": shard.get("index"), "count": shard.get("count")} if isinstance(shard, dict) else None
    return {"dir": str(f.path), "shard": share, "code": f.manifest.get("code")}


def merge_sweeps(dirs: list[str | Path], out_dir: str | Path, stream=None) -> Path:
    """Merge sweep folders (the shards of one sweep) into `out_dir`: results.csv in the sweep's order and a sweep.json
    that names its sources (the sweep report is then drawn from them like any sweep folder's). Returns `out_dir`."""
    stream = stream or sys.stderr
    out_dir = Path(out_dir)
    folders = [_read_folder(d) for d in dict.fromkeys(Path(d).resolve() for d in dirs)]
    if out_dir.resolve() in {f.path for f in folders} or (out_dir / "points").exists():
        raise ReportError(f"--out {out_dir} is a sweep folder: the merged report goes to a folder of its own")
    _check_one_sweep(folders)
    rows, overrides = _rows(folders)
    grid = folders[0].grid
    ordered = [pid for pid in grid if pid in overrides]
    swept = list(dict.fromkeys(k for pid in ordered for k in overrides[pid]))
    table = [rows[pid] for pid in ordered if pid in rows]
    name = folders[0].manifest.get("name")
    manifest = {"name": name, "sweep_file": folders[0].manifest.get("sweep_file"),
                "merged_from": [_source(f) for f in folders],
                "points": [{"id": pid, "overrides": overrides[pid]} for pid in ordered]}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(out_dir / "sweep.json", json.dumps(manifest, indent=2))
        write_atomic(out_dir / "results.csv", results_text(table, swept))
    except OSError as err:
        raise ReportError(f"cannot write the merged results to {out_dir}: {err.strerror or err}") from None
    missing = len(grid) - len(table)
    print(f"[report] merged {len(folders)} folder(s) of sweep '{name}': {len(table)} of {len(grid)} points have a "
          f"row{f' ({missing} not run or not finished yet)' if missing else ''}; results in {out_dir / 'results.csv'}",
          file=stream, flush=True)
    return out_dir
