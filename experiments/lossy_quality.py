"""Quality of lossy residency: the scored controller (lossy=true) against everything int4 (S2), from one command.

    python -m vorch_jax.experiments.lossy_quality [--budget 0.5] [--new-tokens 8] [--eval-tokens 256]

Both runs share one resident reference (same prompt, same evaluation text) and print ppl, its delta to resident,
mean KL(resident ‖ run) and top-1 agreement, plus the traffic each paid. SmolLM2's weights were 4-bit (Q4_1) to
begin with: "resident" is that model in float32, and every delta is relative to it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import jax.numpy as jnp

from vorch_jax.config import load_config
from vorch_jax.runtime.reference import resident_reference
from vorch_jax.runtime.run import run
from vorch_jax.runtime.setup import build_setup

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
ALL_INT4 = "placement=[{path: embed, state: S0, protect: true}, {path: final_norm, state: S0, protect: true}, " \
           "{path: 'layers\\.\\d+\\.(attn|mlp)', state: S2}]"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="0.5")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--eval-tokens", type=int, default=256)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="lossy-quality-"))
    common = [f"hbm_budget={args.budget}", f"new_tokens={args.new_tokens}", f"eval_tokens={args.eval_tokens}",
              "lossy=true"]
    variants = {
        "scored (lossy)": common + ["policy=scored"],
        "all int4 (S2)": common + ["policy=static", ALL_INT4],
    }
    base = load_config(CONFIG, common)
    reference = resident_reference(build_setup(base), jnp.float32, base.new_tokens)
    print(f"{'run':<16} {'ppl':>8} {'ppl delta':>9} {'KL mean':>8} {'top1':>6} {'moved MB':>9} {'device MB':>9}")
    for name, overrides in variants.items():
        s = run(load_config(CONFIG, overrides), out / name.split()[0].replace("(", ""), reference=reference)
        q = s["quality"]
        print(f"{name:<16} {q['ppl']:>8.3f} {q['ppl'] - q['ppl_resident']:>+9.3f} {q['kl_mean']:>8.4f} "
              f"{q['top1_agree']:>6.3f} {s['bytes_moved'] / 1e6:>9.1f} {s['peak_device_bytes'] / 1e6:>9.1f}")
    print(f"resident ppl {q['ppl_resident']:.3f} on {q['eval_tokens']} tokens (weights Q4_1 to begin with)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
