"""The LP lower bound beside Belady and every policy's bytes: SmolLM2 at three budgets, the MoE at two expert shares.

    .venv/bin/python experiments/lower_bound.py [--new-tokens 16] [--out runs/lower_bound]
        [--json experiments/results/lower_bound.json]

Every run is real and lossless; each (model, budget) shares one resident reference, so every policy sees the same
access stream and the same bound. Per row: bytes moved host->device (initial placement and generation), Belady's
bytes, the LP bound (`vorch_jax/policies/lower_bound.py`) and both ratios, and the solver's time for that run's
stream. The MoE budgets are those of `moe_policies.py`: every dense block protected, plus a share of the expert
bytes plus a streaming reserve of 5 experts.
Takes: about 6 minutes at the defaults (28 runs) on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp

from vorch_jax.config import load_config
from vorch_jax.models.registry import get as get_spec
from vorch_jax.runtime.reference import resident_reference
from vorch_jax.runtime.run import run
from vorch_jax.runtime.setup import build_setup, expert_budget, protect_all_but

ROOT = Path(__file__).resolve().parents[1]
DENSE_POLICIES = ("static", "static-prefetch", "lru", "lfu", "scored", "belady")
MOE_POLICIES = ("static", "lru", "lfu", "scored", "belady")


def _row(label: str, policy: str, s: dict) -> dict:
    lb = s["lower_bound"]
    return {"case": label, "policy": policy, "bytes_moved": s["bytes_moved"], "belady_bytes": s["belady_bytes"],
            "lower_bound_bytes": s["lower_bound_bytes"], "moved_over_belady": s["moved_over_belady"],
            "moved_over_lower_bound": s["moved_over_lower_bound"], "solver_s": lb["solver_s"],
            "bound_status": lb["status"], "accesses": lb["of"], "tokens_match": s["tokens_match_resident"]}


def _cases(new_tokens: int):
    """(label, base config, [(budget label, hbm_budget)], policies)."""
    dense = load_config(ROOT / "configs" / "demo.yaml", [f"new_tokens={new_tokens}", "eval_tokens=32"])
    yield "smollm2-135m", dense, [(f"{b}", b) for b in (0.3, 0.5, 0.8)], DENSE_POLICIES
    model = "smollm2-135m-moe"
    moe = dataclasses.replace(dense, model=model, prompt_tokens=8, placement=protect_all_but(get_spec(model), "expert"))
    setup = build_setup(moe)
    yield model, moe, [(f"{f:.0%} experts", str(expert_budget(setup, f, 5)[0])) for f in (0.25, 0.5)], MOE_POLICIES


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--out", default="runs/lower_bound")
    ap.add_argument("--json", default=None, help="write the rows here too")
    args = ap.parse_args(argv)
    rows = []
    for model, base, budgets, policies in _cases(args.new_tokens):
        setup = build_setup(base)
        ref = resident_reference(setup, jnp.float32, base.new_tokens)
        for label, budget in budgets:
            for policy in policies:
                cfg = dataclasses.replace(base, policy=policy, hbm_budget=budget)
                s = run(cfg, Path(args.out) / model / label.split()[0] / policy, reference=ref)
                rows.append(_row(f"{model} {label}", policy, s))
                r = rows[-1]
                print(f"  {r['case']} {policy}: {r['moved_over_lower_bound']:.3f} x bound, "
                      f"{r['moved_over_belady']:.3f} x belady, solver {r['solver_s']:.2f} s", flush=True)
    print(f"\n{'case':<30} {'policy':<16} {'moved MB':>9} {'belady MB':>9} {'bound MB':>9} {'/belady':>8} "
          f"{'/bound':>7} {'solver s':>8} {'accesses':>8} {'bound':>8} {'lossless':>8}")
    for r in rows:
        print(f"{r['case']:<30} {r['policy']:<16} {r['bytes_moved'] / 1e6:>9.1f} {r['belady_bytes'] / 1e6:>9.1f} "
              f"{r['lower_bound_bytes'] / 1e6:>9.1f} {r['moved_over_belady']:>8.3f} "
              f"{r['moved_over_lower_bound']:>7.3f} {r['solver_s']:>8.3f} {r['accesses']:>8} "
              f"{r['bound_status']:>8} {str(r['tokens_match']):>8}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
