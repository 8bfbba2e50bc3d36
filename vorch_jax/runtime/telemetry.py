"""Traces and the measured summary: every figure is computed from recorded events, never from the plan.

Sources: the engine's events (transitions with bytes per link, stalls, recoveries) and the executor's accesses
(one per schedule position: hit or miss, when the weights were ready).
"""

from __future__ import annotations

import bisect
import json
import os
from collections import Counter
from pathlib import Path


def window(events, t_start: float, t_end: float):
    """Engine events that started inside [t_start, t_end)."""
    return [e for e in events if t_start <= e.start < t_end]


def link_bytes(events, kinds=("transition", "recovered")) -> dict[str, int]:
    """Bytes per link of the events of `kinds`: weights moved (the default), or `("in_place",)`: activations."""
    out: Counter = Counter()
    for e in events:
        if e.kind in kinds:
            out.update(dict(e.link_bytes))
    return dict(sorted(out.items()))


def transition_counts(events) -> dict[str, int]:
    c = Counter(f"{e.src.name if e.src is not None else 'source'}->{e.dst.name}" for e in events if e.kind == "transition")
    return dict(sorted(c.items()))


def transition_reasons(events) -> dict[str, int]:
    c = Counter(e.reason or "unspecified" for e in events if e.kind == "transition")
    return dict(sorted(c.items()))


def stall_seconds(events) -> float:
    return sum(e.duration for e in events if e.kind == "stall")


def covered_seconds(spans, at_least: int = 1) -> float:
    """Seconds during which at least `at_least` of the (start, end) spans are under way: with 1 their union
    (overlapping spans counted once), with 2 the time two run at once."""
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    total, n, prev = 0.0, 0, None
    for t, d in edges:
        if prev is not None and n >= at_least:
            total += t - prev
        n, prev = n + d, t
    return total


def link_seconds(events, link: str) -> float:
    """Wall seconds during which at least one transition used `link` (overlapping transfers counted once)."""
    return covered_seconds([(e.start, e.end) for e in events if e.kind == "transition" and e.link_bytes.get(link)])


def link_rate(events, link: str, t_start: float, t_end: float) -> float | None:
    """Bytes per second `link` carried while busy: the bytes of the transitions that started in [t_start, t_end)
    over the time at least one of them was under way, clipped to the window (overlapping copies counted once, so
    two copies at once do not halve the rate). None when nothing crossed the link."""
    moved = [e for e in window(events, t_start, t_end) if e.kind == "transition" and e.link_bytes.get(link)]
    busy = covered_seconds([(max(e.start, t_start), min(e.end, t_end)) for e in moved])
    return sum(e.link_bytes[link] for e in moved) / busy if busy > 0 else None


def trace_records(accesses, events, t0: float, scores=()) -> list[dict]:
    """One JSON-able record per access, per transition link, per stall and per sampled score, ordered by time.

    `scores`: (time, step, layer, {block: score}) per controller tick (`Executor.score_samples`)."""
    starts = [a.start for a in accesses]

    def locate(t):
        i = max(0, bisect.bisect_right(starts, t) - 1)
        return (accesses[i].step, accesses[i].layer) if accesses else (None, None)

    recs = []
    for a in accesses:
        recs.append({"t": a.start - t0, "step": a.step, "layer": a.layer, "block": a.block, "event": "access",
                     "from": None, "to": a.state, "bytes": 0, "link": None, "dur_s": a.end - a.start,
                     "hit": a.hit})
    for e in events:
        step, layer = locate(e.start)
        base = {"t": e.start - t0, "step": step, "layer": layer, "block": e.block,
                "from": e.src.name if e.src is not None else "source", "to": e.dst.name if e.dst is not None else None,
                "dur_s": e.duration, "reason": e.reason}
        if e.kind == "stall":
            recs.append({**base, "event": "stall", "bytes": 0, "link": None})
        elif e.kind in ("transition", "recovered"):
            links = dict(e.link_bytes) or {None: 0}
            for link, n in links.items():
                recs.append({**base, "event": "transition" if e.kind == "transition" else "recovered",
                             "bytes": n, "link": link})
        elif e.kind == "in_place":  # an op computed where the block lives: activations moved, no weight bytes
            recs.append({**base, "event": "in_place", "bytes": 0, "link": None,
                         "activation_bytes": dict(e.link_bytes)})
        else:
            recs.append({**base, "event": e.kind, "bytes": 0, "link": None, "detail": e.detail})
    for t, step, layer, per_block in scores:
        for b, s in per_block.items():
            recs.append({"t": t - t0, "step": step, "layer": layer, "block": b, "event": "score", "from": None,
                         "to": None, "bytes": 0, "link": None, "dur_s": 0.0, "score": s})
    return sorted(recs, key=lambda r: r["t"])


def perfetto(records: list[dict]) -> dict:
    """Chrome/Perfetto trace: one track per link, one for stalls, one for the compute schedule, one for ops computed
    in place on the host, and a counter per sampled block's controller score."""
    tracks = {"compute": 1, "stall": 2}
    events = []
    for r in records:
        if r["event"] == "score":
            events.append({"name": f"score {r['block']}", "ph": "C", "ts": r["t"] * 1e6, "pid": 1,
                           "args": {"score": r["score"]}})
            continue
        if r["event"] == "access":
            track, name = "compute", r["block"]
        elif r["event"] == "stall":
            track, name = "stall", f"stall {r['block']}"
        elif r["event"] == "in_place":
            track, name = "host compute", f"{r['block']} in place"
        else:
            track, name = (r["link"] or "drop"), f"{r['block']} {r['from']}->{r['to']}"
        tid = tracks.setdefault(track, len(tracks) + 1)
        events.append({"name": name, "ph": "X", "ts": r["t"] * 1e6, "dur": max(r["dur_s"], 0.0) * 1e6, "pid": 1,
                       "tid": tid, "args": {k: r[k] for k in ("step", "layer", "bytes") if r.get(k) is not None}})
    meta = [{"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": name}} for name, tid in tracks.items()]
    return {"traceEvents": meta + events, "displayTimeUnit": "ms"}


def write_json_atomic(path: Path, obj) -> None:
    """Write to a temporary name and rename: a reader never sees a half-written file."""
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_trace(out_dir: Path, records: list[dict]) -> None:
    tmp = out_dir / "trace.jsonl.tmp"
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, out_dir / "trace.jsonl")
    write_json_atomic(out_dir / "trace.perfetto.json", perfetto(records))
