"""Print the stored calibration of SmolLM2 on this machine: the ψ table (ΔKL per block and lossy state, with the
gradient estimate), Spearman, lossy_loss, link bandwidths and δ. Reads the cache; computes nothing unless asked.

    .venv/bin/python -m vorch_jax.experiments.calibration_report                 # top/bottom 10 by ψ (instant)
    .venv/bin/python -m vorch_jax.experiments.calibration_report --all --json runs/calibration.json
    .venv/bin/python -m vorch_jax.experiments.calibration_report --calibrate     # run it if none is stored (~3 min)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from vorch_jax.controller import calibrate as K
from vorch_jax.models.gguf_source import load_smollm2_source


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default=None, help="cache directory (default as `vorch calibrate`)")
    p.add_argument("--all", action="store_true", help="every block, ranked by ψ (default: top and bottom 10)")
    p.add_argument("--json", default=None, help="also write the calibration as JSON to this file")
    p.add_argument("--calibrate", action="store_true", help="calibrate (64 tokens) when nothing is stored")
    args = p.parse_args(argv)

    source = load_smollm2_source()
    if args.calibrate:
        cal = K.load_or_calibrate(source, args.dir, progress=lambda m: print(f"[calibrate] {m}", file=sys.stderr))
    else:
        cal = K.load_calibration(K.calibration_dir(args.dir), K.model_key(source), K.machine_key(), source=source)
    if cal is None:
        print("no calibration stored for this model and machine: run `vorch calibrate` (or pass --calibrate)",
              file=sys.stderr)
        return 1
    print(K.format_table(cal, n=len(cal.psi) if args.all else 10))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({k: v for k, v in dataclasses.asdict(cal).items() if k != "reused"}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
