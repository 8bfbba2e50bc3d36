"""How far the LP lower bound lies below what any schedule can achieve: the exact integral optimum per model and budget.

Run:   .venv/bin/python experiments/offline_optimum.py [--models smollm2-135m gemma3-270m] [--budgets 0.3 0.5 0.8]
                                                        [--passes 16] [--time-limit 60]
Takes: up to `--time-limit` seconds per (model, budget), about 5 minutes at the defaults on 2 CPU cores.

The stream is the demo's lossless run (`--passes` passes of the model's pass order: the prompt's and the decode
steps'; the positions every pass runs, `ModelSpec.every_pass`: without Gemma's one token-routed lookup), the
blocks' device bytes and the budget as `vorch run` sets them up (SmolLM2 with the demo's placement,
its embedding protected; other models with none). Per row: the LP bound (`policies/lower_bound.py`, what every
summary's `moved_over_lower_bound` divides by), the integral optimum (`integral_optimum`: HiGHS's branch and bound;
at a time limit the optimum lies between the proven bound and the best schedule found) and both over the LP. A
target of "within 1.03x the LP bound" cannot be met where the optimum itself lies above 1.03x.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vorch_jax.config import load_config  # noqa: E402
from vorch_jax.errors import VorchError  # noqa: E402
from vorch_jax.policies.lower_bound import integral_optimum, lower_bound  # noqa: E402
from vorch_jax.runtime.setup import build_setup  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.3, 0.5, 0.8])
    ap.add_argument("--passes", type=int, default=16)
    ap.add_argument("--time-limit", type=float, default=60.0)
    args = ap.parse_args(argv)
    print(f"{args.passes} passes of each model's pass order, lossless; integral optimum by HiGHS, "
          f"{args.time_limit:.0f} s at most per row")
    print(f"{'model':14s} {'budget':>6s} {'accesses':>8s} {'LP MB':>9s} {'optimum MB':>10s} {'proven MB':>9s} "
          f"{'opt/LP':>7s} {'proven/LP':>9s} {'solver s':>8s}  status")
    for model in args.models:
        for budget in args.budgets:
            over = [f"model={model}", f"hbm_budget={budget}"] + ([] if model == "smollm2-135m" else ["placement=[]"])
            try:
                setup = build_setup(load_config("configs/demo.yaml", over), simulated=True)
            except VorchError as e:
                print(f"offline_optimum: {e}", file=sys.stderr)
                return 2
            stream = [p.block for p in setup.spec.every_pass()] * args.passes
            lb = lower_bound(stream, setup.device_bytes, setup.hbm_budget, pinned=setup.protected)
            io = integral_optimum(stream, setup.device_bytes, setup.hbm_budget, pinned=setup.protected,
                                  time_limit_s=args.time_limit)
            ratio = lambda x: f"{x / lb.bytes:.4f}" if x else "-"  # noqa: E731
            mb = lambda x: f"{x / 1e6:.1f}" if x else "-"  # noqa: E731
            print(f"{model:14s} {budget:6.2f} {len(stream):8d} {lb.bytes / 1e6:9.1f} {mb(io.bytes):>10s} "
                  f"{mb(io.proven_bytes):>9s} {ratio(io.bytes):>7s} {ratio(io.proven_bytes):>9s} "
                  f"{io.solver_s:8.1f}  {io.status}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
