"""Offloading on a mesh, simulated: Llama-2-70B at tp=8 and Mixtral-8x7B at ep=8 under per-device budgets (issue 17).

Run:   .venv/bin/python experiments/sim_mesh.py [--tokens 16]
Takes: a few minutes on this 2-core CPU (Mixtral's eight devices are each a run of their own).

Each row is one policy on a mesh profile (`configs/hardware/8x-h100-sxm.yaml`: DGX H100, each GPU its own host link;
`8x-h100-pcie-shared.yaml`: two GPUs behind each PCIe switch uplink), every device with `hbm_budget` = 30%, 50% or
80% of its own shard's bf16 bytes (`simulation/mesh.py`, `models/shard_spec.py`). Columns: decode tok/s and ms per
step of the mesh (its devices meeting at every layer's end), the floor (the slowest device's: its resident compute
step, or its decode bytes over its host link), GB the first device moves per decode step, bytes / Belady summed over
the devices. Beside each budget, one H100 (`h100-sxm`) holding the same fraction of the
whole model behind its one link, where its 80 GB hold that ("what changes against one device"). Mixtral replays a
Zipf(1.0) routing trace, top-2 of 8, seeded; the same trace on every device.
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
from vorch_jax.runtime.run import run  # noqa: E402

POLICIES = ("static", "static-prefetch", "lru", "scored", "belady")
FRACTIONS = (0.3, 0.5, 0.8)
MESHES = (("llama-2-70b", "mesh.tp=8"), ("mixtral-8x7b", "mesh.ep=8"))
PROFILES = ("8x-h100-sxm", "8x-h100-pcie-shared")
RESULTS = Path(__file__).resolve().parent / "results" / "sim_mesh.txt"


def one(model: str, mesh: str | None, hardware: str, fraction: float, policy: str, tokens: int) -> dict | str:
    over = [f"model={model}", f"policy={policy}", f"hbm_budget={fraction}", f"new_tokens={tokens + 1}",
            "prompt_tokens=16", "executor=sim", f"hardware={hardware}", "dtype=bfloat16"] + ([mesh] if mesh else [])
    try:
        with tempfile.TemporaryDirectory() as d:
            return run(load_config(None, over), d)
    except BudgetError as err:
        return str(err)


def row(label: str, s: dict | str) -> str:
    if isinstance(s, str):
        return f"  {label:28s} -- {s[:100]}"
    m = s.get("mesh")
    per_device = (m["per_device"][0]["decode_h2d_bytes_per_step"] if m else s["decode_h2d_bytes_per_step"]) / 1e9
    return (f"  {label:28s} {s['decode_tok_s']:7.2f} {s['decode_step_s'] * 1e3:8.1f} "
            f"{s['floor_step_s'] * 1e3:8.1f} {per_device:9.2f} {s['moved_over_belady']:8.3f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16, help="decode tokens after a 16-token prompt")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.tokens < 2:
        ap.error("--tokens must be >= 2")
    t0 = time.perf_counter()
    out = [f"# {Path(__file__).name} --tokens {args.tokens}  ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
           f"simulated on the profiles, computed on this CPU)"]
    hdr = (f"  {'policy':28s} {'tok/s':>7s} {'ms/step':>8s} {'floor ms':>8s} {'GB/dev/tok':>9s} "
           f"{'/belady':>8s}")
    print(out[0])
    for model, mesh in MESHES:
        for fraction in FRACTIONS:
            for hardware in PROFILES:
                out += [f"\n{model} {mesh} on {hardware}, each device's budget {fraction:.0%} of its shard", hdr]
                print("\n".join(out[-2:]))
                for policy in POLICIES:
                    out.append(row(policy, one(model, mesh, hardware, fraction, policy, args.tokens)))
                    print(out[-1])
            out += [f"\n{model} on one h100-sxm, budget {fraction:.0%} of the whole model", hdr]
            print("\n".join(out[-2:]))
            for policy in POLICIES:
                out.append(row(policy, one(model, None, "h100-sxm", fraction, policy, args.tokens)))
                print(out[-1])
    out.append(f"\n(wall {time.perf_counter() - t0:.0f} s)")
    args.out.write_text("\n".join(out) + "\n")
    print(out[-1], f"-> {args.out}")


if __name__ == "__main__":
    main()
