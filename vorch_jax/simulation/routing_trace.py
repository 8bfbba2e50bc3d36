"""Routing traces: which experts each pass of an MoE run read, and what speculation predicted, as a file.

A real run of a routed model (`runtime.run.run`) writes `routing.json` beside its `summary.json`; the simulator replays it
(`simulate(..., routing=, speculation=)`, or `vorch run CONFIG executor=sim routing_trace=RUN/routing.json`), so a
simulated run of the same model meets the same routing as the measured one.

Format (JSON): {"model": str, "n_layers": L, "n_experts": E, "passes": [pass][layer] -> expert ids,
"speculation": null | [pass][layer] -> null | [predicted expert ids, mean probabilities [E]]} (layer l's entry is
the prediction made after layer l - 1 routed; null where none was made).
"""

from __future__ import annotations

import json
from pathlib import Path

from vorch_jax.errors import RoutingTraceError

FILE = "routing.json"


def write_routing_trace(out_dir, *, model: str, n_layers: int, n_experts: int, passes, speculation=None) -> Path:
    path = Path(out_dir) / FILE
    data = {"model": model, "n_layers": n_layers, "n_experts": n_experts, "passes": passes,
            "speculation": speculation}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)
    return path


def read_routing_trace(path, *, n_layers: int, n_experts: int, passes: int) -> tuple[list, list | None]:
    """(routing [pass][layer] -> ids, speculation or None) of the first `passes` passes; each problem is one line
    naming the file."""
    path = Path(path)
    if path.is_dir():
        path = path / FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise RoutingTraceError(f"routing trace {path} does not exist (a real MoE run writes one as {FILE})") from None
    except (OSError, ValueError) as err:
        raise RoutingTraceError(f"routing trace {path} is not readable JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("passes"), list):
        raise RoutingTraceError(f"routing trace {path} has no 'passes' list")
    if data.get("n_layers") != n_layers or data.get("n_experts") != n_experts:
        raise RoutingTraceError(f"routing trace {path} is for {data.get('n_layers')} layers x {data.get('n_experts')} "
                                f"experts ({data.get('model')}); the simulated model has {n_layers} x {n_experts}")
    routing = data["passes"]
    if len(routing) < passes:
        raise RoutingTraceError(f"routing trace {path} has {len(routing)} passes; the run needs {passes} "
                                f"(new_tokens)")
    for j, p in enumerate(routing[:passes]):
        if len(p) != n_layers or any(not ids or not all(0 <= e < n_experts for e in ids) for ids in p):
            raise RoutingTraceError(f"routing trace {path}: pass {j} does not list 1..{n_experts} valid expert ids "
                                    f"for each of {n_layers} layers")
    spec = data.get("speculation")
    return routing[:passes], (spec[:passes] if spec else None)


def stretch_layers(routing: list, n_layers: int) -> list:
    """[pass][layer] -> ids of a trace recorded on a model of another depth, replayed on `n_layers` layers: layer l
    takes the recorded layer nearest its relative depth, round(l · (L_trace - 1) / (n_layers - 1)). Each pass keeps
    its recorded order of layers, so reuse across tokens and the skew of each layer are the recorded ones; where
    `n_layers` exceeds the trace's depth some recorded layers appear twice (their routing then repeats within a
    pass, which a deeper real model's would not)."""
    if not routing:
        return []
    depth = len(routing[0])
    if n_layers == depth:
        return [list(p) for p in routing]
    pick = [round(l * (depth - 1) / max(1, n_layers - 1)) for l in range(n_layers)]
    return [[list(p[j]) for j in pick] for p in routing]
