"""Simulator throughput: simulated tokens per second of wall time, Llama-2-70B (bf16) on h100-sxm.

Run:   .venv/bin/python experiments/bench_sim.py [--tokens 64] [--budget 60GB]
Takes: a few seconds per policy on one CPU core.

Wall time covers the simulated run only (placement, prefill, decode, summary; traces not written, as in a sweep);
the block table is built once before timing. The scored policy's ticks run the real jitted controller, so its
figure includes that controller's wall time; its compile happens in the policy's constructor and is included too
(reported separately by a warm second run).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vorch_jax.config import load_config  # noqa: E402
from vorch_jax.simulation.hardware import load_profile  # noqa: E402
from vorch_jax.models.registry import get as get_spec  # noqa: E402
from vorch_jax.runtime.run import simulate  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--budget", default="60GB")
    ap.add_argument("--profile", default="h100-sxm")
    ap.add_argument("--policies", default="static,lru,belady,scored")
    args = ap.parse_args(argv)
    hw = load_profile(args.profile)
    shape = get_spec("llama-2-70b")
    print(f"llama-2-70b bf16 on {hw.name}, budget {args.budget}, {args.tokens} decode tokens "
          f"({len(shape.skeleton())} positions per token)")
    print(f"{'policy':8s} {'run':>5s} {'wall s':>7s} {'sim tok / wall s':>16s} {'positions / wall s':>18s} "
          f"{'simulated tok/s':>15s}")
    with tempfile.TemporaryDirectory() as d:
        for policy in args.policies.split(","):
            cfg = load_config(None, ["model=llama-2-70b", f"policy={policy}", f"hbm_budget={args.budget}",
                                     f"new_tokens={args.tokens + 1}", "prompt_tokens=16", "executor=sim",
                                     f"hardware={hw.name}", "dtype=bfloat16"])
            for run in ("cold", "warm"):
                t0 = time.perf_counter()
                s = simulate(cfg, Path(d) / f"{policy}-{run}", hardware=hw, write_traces=False)
                wall = time.perf_counter() - t0
                n = args.tokens + 1
                per_pass = len(shape.skeleton())
                print(f"{policy:8s} {run:>5s} {wall:7.2f} {n / wall:16.1f} {n * per_pass / wall:18.0f} "
                      f"{s['decode_tok_s']:15.2f}")


if __name__ == "__main__":
    main()
