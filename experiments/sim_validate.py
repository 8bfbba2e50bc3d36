"""Validate the simulator against the real runner on SmolLM2: measured vs simulated decode time per token.

Run:   .venv/bin/python experiments/sim_validate.py [--repeats 3] [--tokens 6]
Takes: about (repeats x 11) real runs of ~10 s each on 2 idle CPU cores (3 to 6 minutes; longer under load).

For policies static, lru, scored at hbm budgets 0.3 / 0.5 / 0.8 it runs `vorch_jax.runner.run` (new_tokens 6,
prompt_tokens 16, eval_tokens 16) `--repeats` times and takes the median decode step; then `simulator.simulate`
with the same config on the `this-machine` profile.

Calibration (the "calibrated cost model"): other engineers share these 2 cores, so the machine's speed drifts by
2x over minutes and a profile measured at another time misses. Each repeat round therefore first runs the
calibration points of `calibrate_hardware.CALIBRATION_POINTS` (resident at 1.0 and static at 0.4: not rows of
the grid), and `calibrate_hardware.fit_from_runs` takes, pooled over all calibration runs, the host->device
bandwidth and latency, the host seconds per schedule position and the device memory bandwidth (from the measured
resident decode step). Those four machine parameters replace the profile's; the other fields stay as measured by
`calibrate_hardware.py`. No factor is fitted per row, per policy or per budget. `--no-calibrate` simulates with the
profile file as it is.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.calibrate_hardware import CALIBRATION_POINTS, fit_from_runs, real_run  # noqa: E402
from vorch_jax.config import load_config  # noqa: E402
from vorch_jax.hardware import Link, load_profile  # noqa: E402
from vorch_jax.model_shapes import model_shape  # noqa: E402
from vorch_jax.simulator import simulate  # noqa: E402

POLICIES = ("static", "lru", "scored")
BUDGETS = (0.3, 0.5, 0.8)


def calibrated(profile, cal: dict):
    return profile.replace(
        host_to_device=Link(cal["h2d"], cal["h2d_lat"]), dispatch_s_per_block=cal["dispatch"],
        hbm_bandwidth_bytes_per_s=cal["hbm_bw"], block_overhead_s=0.0)


def sim_step(policy: str, budget, tokens: int, profile, out_dir) -> float:
    cfg = load_config(None, [f"policy={policy}", f"hbm_budget={budget}", f"new_tokens={tokens}", "prompt_tokens=16",
                             "eval_tokens=16", "executor=sim", "hardware=this-machine"])
    return simulate(cfg, out_dir, hardware=profile)["decode_step_s"]


def validate(rows, *, repeats: int, tokens: int, profile="this-machine", calibrate: bool = True, say=print) -> dict:
    """{(policy, budget): {measured, simulated, rel_err, ...}} and the calibration, measured then simulated."""
    base = load_profile(profile)
    measured = {row: [] for row in rows}
    cal_runs = []
    with tempfile.TemporaryDirectory() as d:
        for r in range(repeats):
            if calibrate:
                for policy, budget in CALIBRATION_POINTS:
                    cal_runs.append(real_run(policy, budget, Path(d) / f"cal-{policy}-{budget}-{r}", tokens))
            for policy, budget in rows:
                s, _ = real_run(policy, budget, Path(d) / f"{policy}-{budget}-{r}", tokens)
                measured[(policy, budget)].append(s["decode_step_s"])
                say(f"  round {r + 1}/{repeats} {policy:7s} {budget}: {s['decode_step_s'] * 1e3:.1f} ms/token")
        cal = fit_from_runs(cal_runs, model_shape("smollm2-135m")) if calibrate else None
        prof = calibrated(base, cal) if cal else base
        out = {}
        for policy, budget in rows:
            m = statistics.median(measured[(policy, budget)])
            sim = sim_step(policy, budget, tokens, prof, Path(d) / f"sim-{policy}-{budget}")
            raw = sim_step(policy, budget, tokens, base, Path(d) / f"raw-{policy}-{budget}")
            out[(policy, budget)] = {"measured": m, "runs": measured[(policy, budget)], "simulated": sim,
                                     "rel_err": (sim - m) / m, "uncalibrated": raw}
    return {"rows": out, "calibration": cal}


def table(result: dict) -> str:
    lines = [f"{'policy':8s} {'budget':>6s} {'measured ms/tok':>16s} {'simulated':>10s} {'rel err':>8s} "
             f"{'(profile file as is)':>20s}  runs (ms)"]
    errs = []
    for (policy, budget), r in result["rows"].items():
        errs.append(abs(r["rel_err"]))
        lines.append(f"{policy:8s} {budget:6.1f} {r['measured'] * 1e3:16.1f} {r['simulated'] * 1e3:10.1f} "
                     f"{r['rel_err'] * 100:+7.1f}% {r['uncalibrated'] * 1e3:20.1f}  "
                     + " ".join(f"{x * 1e3:.0f}" for x in r["runs"]))
    lines.append(f"median |rel err| {statistics.median(errs) * 100:.1f}%   max {max(errs) * 100:.1f}%   "
                 f"(targets: every row within 15%, median within 7%)")
    cal = result["calibration"]
    if cal:
        lines.append(f"calibration (pooled over {cal['transfers']} transfers, {cal['gaps']} host gaps): host->device "
                     f"{cal['h2d'] / 1e9:.2f} GB/s + {cal['h2d_lat'] * 1e3:.2f} ms, host {cal['dispatch'] * 1e3:.3f} "
                     f"ms/position, memory {cal['hbm_bw'] / 1e9:.1f} GB/s (resident step "
                     f"{cal['resident_step_s'] * 1e3:.1f} ms)")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=6)
    ap.add_argument("--profile", default="this-machine")
    ap.add_argument("--no-calibrate", action="store_true")
    args = ap.parse_args(argv)
    rows = [(p, b) for p in POLICIES for b in BUDGETS]
    result = validate(rows, repeats=args.repeats, tokens=args.tokens, profile=args.profile,
                      calibrate=not args.no_calibrate)
    print(table(result))


if __name__ == "__main__":
    main()
