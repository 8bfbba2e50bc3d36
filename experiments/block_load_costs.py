"""What a load of each kind of block takes, as the scored policy prices it: seconds, and bytes per second.

Run:   .venv/bin/python experiments/block_load_costs.py [--models smollm2-135m gemma3-270m] [--repeats 5] [--probes 3]
Takes: about 10 s on 2 CPU cores (Make's GLIBC_TUNABLES exported, as every run has them).

Every real run probes, per distinct set of leaf shapes, the seconds a block's load from pinned host memory takes
alone (`tiers/link_probe.probe_block_loads`: the engine's own landing, into the previous load's memory where the
runtime holds dropped memory), and the scored policy's plans and every summary's `link_seconds` price loads by
them. This prints those probes `--probes` times for each model's blocks (one row per shape class: its first block,
its bytes, leaves, the median seconds over the probes, the spread of the probes, GB/s), so that what the plans are
priced by, and how much it varies from run to run, is on record. Bytes do not price a load alone where a block of
many small leaves lands slower per byte than one large array.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.bench_policies import machine_line  # noqa: E402
from vorch_jax.config import load_config  # noqa: E402
from vorch_jax.errors import ConfigError, VorchError  # noqa: E402
from vorch_jax.runtime.setup import build_setup  # noqa: E402
from vorch_jax.tiers.link_probe import probe_block_loads  # noqa: E402


def shape_classes(leaf_shapes: dict) -> dict:
    """{first block of each set of leaf shapes: its leaf shapes}."""
    seen, out = set(), {}
    for block, leaves in leaf_shapes.items():
        key = tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in leaves.items()))
        if key not in seen:
            seen.add(key)
            out[block] = leaves
    return out


def rows(model: str, repeats: int, probes: int) -> list[str]:
    setup = build_setup(load_config("configs/demo.yaml", [f"model={model}", "placement=[]"]))
    classes = shape_classes(setup.spec.leaf_shapes)
    seconds = [probe_block_loads(classes, repeats=repeats) for _ in range(probes)]
    out = []
    for block, leaves in classes.items():
        s = [p[block] for p in seconds]
        med, nbytes = statistics.median(s), setup.device_bytes[block]
        out.append(f"{model:14s} {block:16s} {nbytes / 1e6:9.3f} {len(leaves):6d} {1e3 * med:9.3f} "
                   f"{100 * (max(s) - min(s)) / med:7.0f}% {nbytes / med / 1e9:7.2f}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--probes", type=int, default=3)
    args = ap.parse_args(argv)
    try:
        if args.repeats < 1 or args.probes < 1:
            raise ConfigError("--repeats and --probes must be at least 1")
        lines = [r for m in args.models for r in rows(m, args.repeats, args.probes)]
    except VorchError as e:
        print(f"block_load_costs: {e}", file=sys.stderr)
        return 2
    print(f"{machine_line()}; pinned_host -> device, each probe the median of {args.repeats} loads, "
          f"{args.probes} probes")
    print(f"{'model':14s} {'block':16s} {'MB':>9s} {'leaves':>6s} {'ms':>9s} {'spread':>8s} {'GB/s':>7s}")
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
