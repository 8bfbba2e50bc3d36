"""Sweeps: a grid of run configs, each point run in its own process, resumable, with progress and a results table.

A sweep file (YAML, strict like run configs: unknown keys, wrong types, empty axes and keys set twice fail with a
`ConfigError` naming the key and the file)::

    name: budget_policy               # optional; defaults to the file's stem
    base: ../demo.yaml                # a run config, relative to this file; or an inline mapping {policy: lru, ...}
    fixed: {new_tokens: 8}            # optional: dotted overrides applied to every point
    product: {hbm_budget: [0.3, 0.5], policy: [static, lru]}     # every combination
    zip: {score.w1: [0.5, 1.0], score.w2: [1.0, 0.5]}            # optional: lists walked together (equal lengths)

Points are `product x zip` (the cartesian product of the product axes, times the rows of the zipped lists). Instead
of one top-level `product`/`zip`, a sweep may list `groups`, each with its own `product`, `zip` and `fixed`; the
points are the groups' points in order (e.g. lossless policies at every budget, plus the scored policy with lossy
states). Keys are dotted RunConfig keys (``policy``, ``score.w1``). Every point is validated as a RunConfig before
anything runs; a bad value fails the sweep at start, naming the point.

Running (`vorch sweep SWEEP.yaml --out DIR [--resume] [--jobs N] [--shard I/N]`):
  * each point runs as ``python -m vorch_jax.cli run DIR/points/<id>/config.yaml --out DIR/points/<id>`` in its
    own process; its stdout and stderr go to ``DIR/points/<id>/log.txt``;
  * a point id is a readable slug of the point's swept values plus a short hash of its whole resolved config, so
    changing the base or the fixed overrides gives new ids and `--resume` never reuses results of another config;
  * a point is complete only when its ``summary.json`` exists with ``"complete": true``;
  * every finished point (complete or failed) gets a ``row.json`` written atomically, and ``DIR/results.csv`` is
    rebuilt from all rows (temporary file, fsync, rename) each time a point finishes: it gains one row per finished
    point, a kill never leaves a half row, and a failed point that is re-run replaces its row instead of adding one;
  * a failing point is recorded (``status=failed``, the last line of its output in the ``error`` column and in
    ``DIR/points/<id>/error.txt``) and the sweep goes on; the sweep then exits with status 1;
  * `--resume` skips complete points, deletes the partial outputs of half-finished ones and re-runs them, and
    re-runs failed points; without it an existing non-empty sweep directory is refused;
  * SIGINT/SIGTERM: no new point starts, running children are terminated, no row is written for them; the sweep
    exits with status 130 and says how to resume. Children die with the sweep process (Linux PDEATHSIG), so a
    SIGKILLed sweep leaves no orphan writing into DIR;
  * `--shard I/N` runs only the I-th of N disjoint shares of the grid (job arrays across machines), in a folder of
    its own that resumes like a whole sweep; `vorch report DIR1 DIR2 ... --out MERGED` merges the shards into the
    table the whole sweep writes (`sweep_shards.py`).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from vorch_jax.config import ConfigError, RunConfig, config_from_dict, config_to_dict, load_config
from vorch_jax.strict_yaml import read_yaml
from vorch_jax.tooling.sweep_shards import check_resumed_shard, parse_shard, shard_manifest, shard_of
from vorch_jax.tooling.sweep_results import (make_row, point_status, readable_json, value_text, write_atomic,
                                              write_results)

__all__ = ["Point", "Sweep", "load_sweep", "run_sweep", "add_cli"]

_TOP_KEYS = ("name", "base", "fixed", "product", "zip", "groups")
_GROUP_KEYS = ("name", "fixed", "product", "zip")


@dataclasses.dataclass(frozen=True)
class Point:
    """One run of the sweep: its id, the overrides that make it (dotted key -> value) and its validated config."""

    id: str
    overrides: tuple[tuple[str, Any], ...]
    config: RunConfig

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={value_text(v)}" for k, v in self.overrides)


@dataclasses.dataclass(frozen=True)
class Sweep:
    """The points to run; a shard (`shard_of`) runs share `shard` = (I, N) of the whole `grid`."""

    name: str
    path: Path | None
    points: tuple[Point, ...]
    grid: tuple[Point, ...] = ()
    shard: tuple[int, int] | None = None

    @property
    def swept_keys(self) -> list[str]:
        """Keys swept over the whole grid (a shard's table has the whole sweep's cfg columns)."""
        return list(dict.fromkeys(k for p in (self.grid or self.points) for k, _ in p.overrides))


# ------------------------------------------------------------------------------------------------------- loading


def _fail(source: str, key: str | None, detail: str) -> ConfigError:
    where = f"key '{key}' " if key else ""
    return ConfigError(f"{source}: {where}{detail}", key=key)


def _mapping(value: Any, source: str, key: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(source, key, f"expects a mapping, got {type(value).__name__} ({value!r:.60})")
    for k in value:
        if not isinstance(k, str) or not k:
            raise _fail(source, key, f"has a key that is not a non-empty string: {k!r}")
    return dict(value)


def _axes(value: Any, source: str, key: str) -> dict[str, list]:
    axes = _mapping(value, source, key)
    for k, values in axes.items():
        if not isinstance(values, list):
            raise _fail(source, f"{key}.{k}", f"expects a list of values, got {type(values).__name__} ({values!r:.60})")
        if not values:
            raise _fail(source, f"{key}.{k}", "is an empty axis: give at least one value")
    return axes


def _group_points(group: Mapping, fixed: dict, source: str, where: str) -> list[tuple[dict, list[str]]]:
    """[(overrides, swept keys)] of one group: its fixed keys, product combinations and zip rows."""
    for k in group:
        if k not in _GROUP_KEYS:
            raise _fail(source, f"{where}{k}", f"is unknown (valid keys: {', '.join(_GROUP_KEYS)})")
    own_fixed = _mapping(group.get("fixed"), source, f"{where}fixed")
    product = _axes(group.get("product"), source, f"{where}product")
    zipped = _axes(group.get("zip"), source, f"{where}zip")
    if not product and not zipped:
        raise _fail(source, where.rstrip(".") or None, "needs a 'product' or a 'zip' with at least one axis")
    lengths = {k: len(v) for k, v in zipped.items()}
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{k}: {n}" for k, n in lengths.items())
        raise _fail(source, f"{where}zip", f"lists must have equal lengths, got {shown}")
    owners: dict[str, str] = {}
    for section, keys in (("fixed", fixed), (f"{where}fixed", own_fixed), (f"{where}product", product),
                          (f"{where}zip", zipped)):
        for k in keys:
            if k in owners:
                raise _fail(source, k, f"is set twice: in '{owners[k]}' and in '{section}'")
            owners[k] = section
    rows = list(zip(*zipped.values())) if zipped else [()]
    points = []
    for combo in itertools.product(*product.values()):
        for row in rows:
            varying = dict(zip(product, combo)) | dict(zip(zipped, row))
            points.append(({**fixed, **own_fixed, **varying}, list(varying)))
    return points


def _set_dotted(data: dict, key: str, value: Any, source: str) -> None:
    *parents, leaf = key.split(".")
    node = data
    for depth, part in enumerate(parents):
        child = node.get(part)
        if not isinstance(child, dict):
            raise _fail(source, key, f"'{'.'.join(parents[:depth + 1])}' is not a section of the run config")
        node = child
    if isinstance(node.get(leaf), dict):
        raise _fail(source, key, "is a section; set one of its keys, e.g. 'score.w1'")
    node[leaf] = value


def _slug(overrides: Mapping[str, Any], swept: list[str]) -> str:
    parts = []
    for k in swept:
        v = overrides[k]
        leaf = k.split(".")[-1]
        parts.append(v if isinstance(v, str) and k == "policy" else f"{leaf}-{value_text(v)}")
    slug = re.sub(r"[^A-Za-z0-9.+-]+", "_", "_".join(parts)).strip("_")
    return slug[:60] or "point"


def _point_id(cfg: RunConfig, overrides: Mapping[str, Any], swept: list[str]) -> str:
    digest = hashlib.sha1(json.dumps(config_to_dict(cfg), sort_keys=True).encode()).hexdigest()[:8]
    return f"{_slug(overrides, swept)}-{digest}"


def load_sweep(path: str | Path | None = None, data: Mapping | None = None) -> Sweep:
    """Read and validate a sweep: every point becomes a RunConfig here, before anything runs.

    Give a file `path`, or a `data` mapping (then a relative `base` path is taken relative to `path`'s folder if
    given, else to the working directory).
    """
    source = str(path) if path is not None else "<sweep>"
    folder = Path(path).parent if path is not None else Path.cwd()
    if data is None:
        data = read_yaml(Path(path), "sweep")
    if data is not None and not isinstance(data, Mapping):
        raise _fail(source, None, f"a sweep must be a mapping, got {type(data).__name__}")
    top = _mapping(data, source, None)
    for k in top:
        if k not in _TOP_KEYS:
            raise _fail(source, k, f"is unknown (valid keys: {', '.join(_TOP_KEYS)})")
    name = top.get("name", Path(path).stem if path is not None else "sweep")
    if not isinstance(name, str) or not name:
        raise _fail(source, "name", f"expects a non-empty string, got {name!r}")
    if "base" not in top:
        raise _fail(source, "base", "is required: a run config path (relative to this file) or a mapping")
    base = top["base"]
    if isinstance(base, str):
        base_cfg = load_config(folder / base)
    elif isinstance(base, Mapping) or base is None:
        base_cfg = config_from_dict(base, source=f"{source}: base")
    else:
        raise _fail(source, "base", f"expects a path or a mapping, got {type(base).__name__}")
    fixed = _mapping(top.get("fixed"), source, "fixed")
    if "groups" in top:
        if "product" in top or "zip" in top:
            raise _fail(source, "groups", "cannot be combined with a top-level 'product' or 'zip'")
        groups = top["groups"]
        if not isinstance(groups, list) or not groups:
            raise _fail(source, "groups", "expects a non-empty list of groups")
        raw = []
        for i, g in enumerate(groups):
            raw += _group_points(_mapping(g, source, f"groups[{i}]"), fixed, source, f"groups[{i}].")
    else:
        raw = _group_points({k: top[k] for k in ("product", "zip") if k in top}, fixed, source, "")
    base_dict = config_to_dict(base_cfg)
    points, seen = [], {}
    for i, (overrides, swept) in enumerate(raw):
        label = ", ".join(f"{k}={value_text(overrides[k])}" for k in swept)
        where = f"{source}: point {i + 1} ({label})"
        cfg_dict = json.loads(json.dumps(base_dict))
        for k, v in overrides.items():
            _set_dotted(cfg_dict, k, v, where)
        cfg = config_from_dict(cfg_dict, source=where)
        pid = _point_id(cfg, overrides, swept)
        if pid in seen:
            raise _fail(source, None, f"points {seen[pid]} and {i + 1} ({label}) are the same run")
        seen[pid] = i + 1
        points.append(Point(pid, tuple((k, overrides[k]) for k in swept), cfg))
    return Sweep(name, Path(path) if path is not None else None, tuple(points))


# ------------------------------------------------------------------------------------------------------- running


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to SIGKILL this child if the sweep process dies (a SIGKILLed sweep must leave no orphans)."""
    os.setsid()  # a terminal's Ctrl-C goes to the sweep, which decides what its children do
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@dataclasses.dataclass
class _Running:
    point: Point
    proc: subprocess.Popen
    log: Any
    started: float


def _launch(point: Point, out_dir: Path) -> _Running:
    pdir = out_dir / "points" / point.id
    if pdir.exists():
        shutil.rmtree(pdir)  # half-finished or failed: start clean
    pdir.mkdir(parents=True)
    cfg_path = pdir / "config.yaml"
    header = f"# sweep point {point.id}: {point.label}\n"
    cfg_path.write_text(header + yaml.safe_dump(config_to_dict(point.config), sort_keys=False))
    log = open(pdir / "log.txt", "w", encoding="utf-8")
    cmd = [sys.executable, "-m", "vorch_jax.cli", "run", str(cfg_path), "--out", str(pdir)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            preexec_fn=_die_with_parent)
    return _Running(point, proc, log, time.monotonic())


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def _finish(r: _Running, out_dir: Path) -> str:
    """Record a child that exited: row.json (and error.txt when it failed). Returns the point's status."""
    r.log.close()
    pdir = out_dir / "points" / r.point.id
    elapsed = time.monotonic() - r.started
    summary = None
    if point_status(pdir) == "complete":
        summary = json.loads((pdir / "summary.json").read_text())
    if summary is not None and r.proc.returncode == 0:
        status, error = "complete", ""
    else:
        status = "failed"
        error = _last_line(pdir / "log.txt") or f"exit status {r.proc.returncode}"
        if r.proc.returncode < 0:  # e.g. the OOM killer: the log's last line is only where it got to
            error = f"killed by {signal.Signals(-r.proc.returncode).name}; last output: {error}"
        elif summary is not None:
            error = f"exit status {r.proc.returncode} after writing its summary: {error}"
        summary = None
        (pdir / "error.txt").write_text(error + "\n")
    write_atomic(pdir / "row.json", json.dumps(make_row(r.point, status, elapsed, error, summary)))
    return status


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


class _Progress:
    """Text progress on stderr: a bar, points done / total, elapsed, estimated remaining, what is running."""

    def __init__(self, total: int, skipped: int, stream=None):
        self.total, self.done, self.ran, self.failed = total, skipped, 0, 0
        self.t0 = time.monotonic()
        self.stream = stream or sys.stderr

    def show(self, what: str) -> None:
        elapsed = time.monotonic() - self.t0
        left = self.total - self.done
        eta = elapsed / self.ran * left if self.ran else float("nan")
        width = 24
        filled = int(width * self.done / self.total) if self.total else width
        bar = "#" * filled + "-" * (width - filled)
        failed = f" {self.failed} failed" if self.failed else ""
        print(f"[sweep] [{bar}] {self.done}/{self.total}{failed} elapsed {_clock(elapsed)} "
              f"eta {_clock(eta) if left else '0m00s'} | {what}", file=self.stream, flush=True)


def run_sweep(sweep: Sweep, out_dir: str | Path, *, resume: bool = False, jobs: int = 1,
              stream=None, sweep_arg: str | None = None) -> int:
    """Run every point not yet complete; return 0 if all are complete, 1 if some failed, 130 if interrupted."""
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    out_dir = Path(out_dir)
    stream = stream or sys.stderr
    points_dir = out_dir / "points"
    if points_dir.exists() and any(points_dir.iterdir()) and not resume:
        raise ConfigError(f"{out_dir} already holds a sweep; pass --resume to continue it or choose another --out")
    if resume:
        check_resumed_shard(out_dir, sweep)
    points_dir.mkdir(parents=True, exist_ok=True)
    lock = open(out_dir / ".sweep.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ConfigError(f"another sweep is running in {out_dir}") from None
    try:
        return _run_locked(sweep, out_dir, resume, jobs, stream, sweep_arg)
    finally:
        lock.close()


def _code_version() -> dict:
    """The git commit the points run (and whether the working tree had changes), when there is a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if head.returncode != 0:
        return {}
    return {"commit": head.stdout.strip(), "modified": dirty.stdout.split()[1::2]}


def _run_locked(sweep: Sweep, out_dir: Path, resume: bool, jobs: int, stream, sweep_arg: str | None) -> int:
    manifest = {"name": sweep.name, "sweep_file": str(sweep.path) if sweep.path else None, "code": _code_version(),
                **shard_manifest(sweep),
                "points": [{"id": p.id, "overrides": dict(p.overrides)} for p in sweep.points]}
    write_atomic(out_dir / "sweep.json", json.dumps(manifest, indent=2))
    todo = []
    for p in sweep.points:
        status = point_status(out_dir / "points" / p.id)
        if status == "complete":
            if not readable_json(out_dir / "points" / p.id / "row.json"):  # killed between summary and row, or
                # the row was damaged afterwards: rebuilt from the complete summary
                summary = json.loads((out_dir / "points" / p.id / "summary.json").read_text())
                write_atomic(out_dir / "points" / p.id / "row.json",
                              json.dumps(make_row(p, "complete", float("nan"), "", summary)))
        else:
            todo.append(p)
    known = {p.id for p in sweep.points}
    stale = [d.name for d in (out_dir / "points").iterdir() if d.is_dir() and d.name not in known]
    if stale:
        print(f"[sweep] ignoring {len(stale)} point folder(s) not in this sweep (another config): "
              f"{', '.join(sorted(stale)[:3])}{' ...' if len(stale) > 3 else ''}", file=stream, flush=True)
    write_results(out_dir, sweep)
    progress = _Progress(len(sweep.points), len(sweep.points) - len(todo), stream)
    if resume and len(todo) < len(sweep.points):
        progress.show(f"resuming: {len(sweep.points) - len(todo)} complete, {len(todo)} to run")
    if sweep.shard:
        progress.show(f"shard {sweep.shard[0]}/{sweep.shard[1]}: {len(sweep.points)} of the grid's "
                      f"{len(sweep.grid)} points")

    stop: list[int] = []
    old = {s: signal.signal(s, lambda signum, _frame: stop.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    running: list[_Running] = []
    try:
        queue = list(todo)
        while (queue or running) and not stop:
            while queue and len(running) < jobs and not stop:
                r = _launch(queue.pop(0), out_dir)
                running.append(r)
                progress.show(f"started {r.point.id} ({r.point.label})")
            time.sleep(0.1)
            for r in [r for r in running if r.proc.poll() is not None]:
                running.remove(r)
                status = _finish(r, out_dir)
                write_results(out_dir, sweep)
                progress.done += 1
                progress.ran += 1
                progress.failed += status == "failed"
                tail = "" if status == "complete" else f": {_last_line(out_dir / 'points' / r.point.id / 'error.txt')}"
                progress.show(f"{status} {r.point.id} in {_clock(time.monotonic() - r.started)}{tail}")
    finally:
        for r in running:  # interrupted (or an unexpected error): no row for these, --resume re-runs them
            if r.proc.poll() is None:
                r.proc.terminate()
        for r in running:
            try:
                r.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                r.proc.kill()
                r.proc.wait()
            r.log.close()
        for s, handler in old.items():
            signal.signal(s, handler)
    if stop:
        share = f" --shard {sweep.shard[0]}/{sweep.shard[1]}" if sweep.shard else ""
        again = f"vorch sweep {sweep_arg or sweep.path or 'SWEEP.yaml'} --out {out_dir}{share} --resume"
        print(f"[sweep] interrupted ({signal.Signals(stop[0]).name}): {progress.done}/{progress.total} points "
              f"complete, {len(running)} stopped mid-run; continue with: {again}", file=stream, flush=True)
        return 130
    print(f"[sweep] done: {progress.done - progress.failed}/{progress.total} complete, {progress.failed} failed; "
          f"results in {out_dir / 'results.csv'}", file=stream, flush=True)
    return 1 if progress.failed else 0


# ----------------------------------------------------------------------------------------------------------- CLI


def _cmd_sweep(args) -> int:
    shard = parse_shard(args.shard) if args.shard is not None else None
    sweep = load_sweep(args.sweep)
    if shard:
        sweep = shard_of(sweep, *shard)
    return run_sweep(sweep, args.out, resume=args.resume, jobs=args.jobs, sweep_arg=args.sweep)


def add_cli(subparsers) -> None:
    """`vorch sweep SWEEP.yaml --out DIR [--resume] [--jobs N] [--shard I/N]`."""
    p = subparsers.add_parser("sweep", help="run a grid of configs, one process per point; resumable")
    p.add_argument("sweep", help="a sweep YAML file (see configs/sweeps/)")
    p.add_argument("--out", required=True, help="output directory (points/, results.csv)")
    p.add_argument("--resume", action="store_true", help="skip complete points, re-run unfinished and failed ones")
    p.add_argument("--jobs", type=int, default=1, help="points run in parallel (default 1)")
    p.add_argument("--shard", metavar="I/N", help="run only the I-th (from 1) of N disjoint shares of the grid, "
                                                   "e.g. one per job of an array; merge with `vorch report ... --out`")
    p.set_defaults(func=_cmd_sweep)
