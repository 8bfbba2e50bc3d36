"""Simulated offloading at scale: Llama-2-70B and Mixtral-8x7B (bf16 weights) on one H100 SXM.

Run:   .venv/bin/python experiments/sim_scale.py [--tokens 32] [--profile h100-sxm]
Takes: well under a minute on 2 CPU cores (a few thousand simulated positions per run, 40-odd runs).

Budgets are given two ways, and the table says which: `frac` = a fraction 0.3 / 0.5 / 0.8 of the model's bf16 bytes
(70B: 138 GB, so 0.8 = 110 GB exceeds the 80 GB of HBM and is reported as such); `abs` = 40 / 60 / 75 GB.
Policies static, lru, scored, belady; `--tokens` decode tokens after a 16-token prompt (prefill is one pass).
Mixtral replays a Zipf(1.0) routing trace over each layer's 8 experts, top-2, seeded (`simulation.backend.zipf_routing`).

Columns: decode tok/s; GB moved host->device per decode step (decode window only); the run's whole traffic (initial
fill and prefill included, the real runner's `bytes_moved`) over the Belady oracle's for the same stream, budget and
guardrails; the floor `decode bytes per step / link bandwidth` beside the simulated ms per decode step; the stall
share of the run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vorch_jax.config import load_config  # noqa: E402
from vorch_jax.errors import BudgetError  # noqa: E402
from vorch_jax.simulation.hardware import load_profile  # noqa: E402
from vorch_jax.models.registry import get as get_spec  # noqa: E402
from vorch_jax.runtime.run import simulate  # noqa: E402
from vorch_jax.simulation.backend import zipf_routing  # noqa: E402

MODELS = ("llama-2-70b", "mixtral-8x7b")
POLICIES = ("static", "lru", "scored", "belady")
FRACTIONS = (0.3, 0.5, 0.8)
ABSOLUTE_GB = (40, 60, 75)


def budgets():
    return [("frac", f) for f in FRACTIONS] + [("abs", f"{g}GB") for g in ABSOLUTE_GB]


def run_one(name: str, budget, policy: str, tokens: int, hw, out_dir, routing=None) -> dict | str:
    cfg = load_config(None, [f"model={name}", f"policy={policy}", f"hbm_budget={budget}", f"new_tokens={tokens + 1}",
                             "prompt_tokens=16", "executor=sim", f"hardware={hw.name}", "dtype=bfloat16"])
    try:
        return simulate(cfg, out_dir, hardware=hw, routing=routing, write_traces=False)
    except BudgetError as e:
        return str(e)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--profile", default="h100-sxm")
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args(argv)
    hw = load_profile(args.profile)
    bw = hw.host_to_device.bandwidth_bytes_per_s
    t_all = time.perf_counter()
    print(f"profile {hw.name}: HBM {hw.hbm_capacity_bytes / 1e9:.0f} GB at {hw.hbm_bandwidth_bytes_per_s / 1e12:.2f} "
          f"TB/s, host->device {bw / 1e9:.1f} GB/s; {args.tokens} decode tokens after a 16-token prompt")
    hdr = (f"{'model':13s} {'budget':>17s} {'policy':7s} {'tok/s':>7s} {'GB/tok':>7s} {'/belady':>7s} "
           f"{'floor ms/tok':>12s} {'sim ms/tok':>10s} {'stall%':>6s}")
    with tempfile.TemporaryDirectory() as d:
        for name in args.models.split(","):
            shape = get_spec(name)
            bf16_bytes = shape.model_bytes // 2  # the spec's blocks are float32; the simulated device holds bf16
            routing = None
            if shape.n_experts:
                routing = zipf_routing(shape, args.tokens + 1, seed=0, tokens_per_pass=[17] + [1] * args.tokens)
            print(f"\n{name}: {bf16_bytes / 1e9:.1f} GB bf16, {len(shape.blocks())} blocks" +
                  (f", {shape.n_experts} experts top-{shape.top_k} (Zipf routing, seed 0)" if shape.n_experts else ""))
            print(hdr)
            for kind, budget in budgets():
                gb = (budget * bf16_bytes if kind == "frac" else float(budget[:-2]) * 1e9) / 1e9
                label = f"abs {gb:5.1f}GB" if kind == "abs" else f"frac {budget:.1f}={gb:5.1f}GB"
                for policy in POLICIES:
                    s = run_one(name, budget, policy, args.tokens, hw, Path(d) / f"{name}-{kind}-{budget}-{policy}",
                                routing)
                    if isinstance(s, str):
                        print(f"{name:13s} {label:>17s} {policy:7s}  -- {s[:90]}")
                        continue
                    per_tok = s["decode_h2d_bytes_per_step"]
                    ratio = s["bytes_moved"] / s["belady_bytes"] if s["belady_bytes"] else float("nan")
                    print(f"{name:13s} {label:>17s} {policy:7s} {s['decode_tok_s']:7.2f} {per_tok / 1e9:7.1f} "
                          f"{ratio:7.2f} {per_tok / bw * 1e3:12.1f} {s['decode_step_s'] * 1e3:10.1f} "
                          f"{100 * s['stall_s'] / s['wall_s']:6.0f}")
    print(f"\n(wall {time.perf_counter() - t_all:.1f} s)")


if __name__ == "__main__":
    main()
