"""Validate the simulator against real runs of SmolLM2, dense and MoE: measured vs simulated decode time per token.

Run:   .venv/bin/python experiments/sim_validate.py [--repeats 3] [--tokens 6] [--models dense moe] [--save REC]
       .venv/bin/python experiments/sim_validate.py --replay experiments/results/sim_validation.json
Takes: about repeats x (3 + 9 + 9) real runs of 5-20 s on 2 CPU cores (about 12 minutes at 5 repeats); a
replay (no real run: today's simulator on a saved record's measurements and calibration) about 85 s.

Dense rows: policies static, lru, scored at hbm budgets 0.3 / 0.5 / 0.8 of the model, `vorch_jax.runtime.run.run`
(new_tokens 6, prompt_tokens 16, eval_tokens 16), `--repeats` times, the median decode step; then
`runtime.run.simulate` with the same config on the `this-machine` profile.
MoE rows: the MoE SmolLM2 (`model: smollm2-135m-moe`, E = 8, top-2), policies static, lru, scored with every dense block
protected and 30 / 50 / 80% of the expert bytes (+ 5 experts of streaming room, `runtime.setup.expert_budget`); the
simulator replays the routing the real run recorded (the reference's routing: same experts per pass and layer) on the
model's shape `smollm2-135m-moe` through the same driver and ledger (the real routed run's bookkeeping:
the scored policy's expected-next-use eviction, λ from router statistics, and the speculative predictions the
resident reference recorded, so the scored row speculates as the real one does).

Calibration (the "calibrated cost model"): other engineers share these 2 cores, so the machine's speed drifts by
2x over minutes and a profile measured at another time misses. Each repeat round therefore first measures, beside
the rows: the fresh-allocation and free rates (`calibrate_hardware.fresh_alloc_rate`, `fresh_free_rate`), loads of
1-12 MiB through the runtime's engine with nothing else running (`link_probe`), the calibration points of
`calibrate_hardware.CALIBRATION_POINTS` (dense resident at 1.0, static and static-prefetch at 0.4: not rows of the
grid) and, with MoE rows, the resident MoE. `calibrate_hardware.fit_from_runs` takes from them, pooled over rounds:
the host seconds per position (hit-to-hit gaps of the runs that prefetch nothing), the load alone (least squares
over the probe loads), a waited-for copy's extra time with compute beside it (the mean over the static runs' misses
of what is left after the two before), a prefetch's (the same over the static-prefetch runs' prefetches), the device
memory bandwidth and per-block overhead (the dense and the MoE resident steps: two points, two unknowns), the copy
contention (the static-prefetch step), the fresh-allocation rate (the runs' own embedding placements; the probe only
where a run has none) and the rate at which such a block is freed (`fresh_free_rate`, a probe each round: the
calibration points evict no embedding). Those parameters replace the profile's; the other fields stay as measured
by `calibrate_hardware.py`. No factor is fitted per row, per policy, per model or per budget; the rows are never
calibration inputs. Under every table: how far the rows' own runs agree (`measurement_noise`).
`--no-calibrate` simulates with the profile file as it is.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from experiments.calibrate_hardware import (CALIBRATION_POINTS, apply_calibration, fit_from_runs,  # noqa: E402
                                            fit_with_simulator, fresh_alloc_rate, fresh_free_rate, link_probe,
                                            real_run, sim_step)
from vorch_jax.simulation.hardware import load_profile  # noqa: E402
from vorch_jax.models.registry import get as get_spec  # noqa: E402

POLICIES = ("static", "lru", "scored")
BUDGETS = (0.3, 0.5, 0.8)
MOE_RESERVE = 5  # experts of streaming room beside the expert cache (as experiments/moe_policies.py)


class MoERows:
    """Real and simulated runs of the MoE SmolLM2 at validation size (one resident reference shared by all)."""

    def __init__(self, tokens: int):
        import jax.numpy as jnp

        from vorch_jax.runtime.reference import resident_reference
        from vorch_jax.runtime.setup import build_setup

        self.tokens = tokens
        self.base = moe_config("lru", 1.0, tokens)
        self.setup = build_setup(self.base)
        self.ref = resident_reference(self.setup, jnp.float32, tokens, speculation=True)
        self.routing = [list(map(list, p)) for p in self.ref.routing]

    def budget(self, fraction: float) -> int:
        from vorch_jax.runtime.setup import expert_budget

        return expert_budget(self.setup, fraction, MOE_RESERVE)[0]

    def real(self, policy: str, fraction: float, out_dir) -> dict:
        import dataclasses

        cfg = dataclasses.replace(self.base, policy=policy, hbm_budget=str(self.budget(fraction)))
        from vorch_jax.runtime.run import run

        s = run(cfg, out_dir, reference=self.ref)
        assert s["stream_matches_resident"], "a lossless MoE run must read the reference's routing"
        return s


def measure(rows, *, repeats: int, tokens: int, profile="this-machine", calibrate: bool = True, say=print,
            keep: Path | None = None) -> dict:
    """The measured half of the validation, as a JSON-able record: every row's real decode steps (`repeats` runs
    each), the calibration fitted from the calibration points run beside them, and for MoE rows the routing and
    speculation the real runs read (so `simulate_rows` can replay the record without the model).
    `rows`: (model "dense" | "moe", policy, budget fraction); `keep`: a folder to keep every run's summary and trace
    in (for comparing traces with the simulator's), else they go with a temporary folder."""
    import datetime

    base = load_profile(profile)
    measured = {row: [] for row in rows}
    cal_runs: dict = {}
    fresh_rates, free_rates, link_points, moe_resident = [], [], [], []
    moe = MoERows(tokens) if any(m == "moe" for m, _, _ in rows) else None
    with tempfile.TemporaryDirectory() as tmp:
        d = keep or tmp
        for r in range(repeats):
            if calibrate:
                fresh_rates.append(fresh_alloc_rate(jax.devices()[0]))
                free_rates.append(fresh_free_rate(jax.devices()[0]))
                link_points += link_probe()
                for policy, budget in CALIBRATION_POINTS:
                    cal_runs.setdefault((policy, budget), []).append(
                        real_run(policy, budget, Path(d) / f"cal-{policy}-{budget}-{r}", tokens))
                if moe:
                    moe_resident.append(moe.real("resident", 1.0, Path(d) / f"cal-moe-resident-{r}")["decode_step_s"])
            for model, policy, budget in rows:
                out = Path(d) / f"{model}-{policy}-{budget}-{r}"
                s = moe.real(policy, budget, out) if model == "moe" else real_run(policy, budget, out, tokens)[0]
                measured[(model, policy, budget)].append(s["decode_step_s"])
                say(f"  round {r + 1}/{repeats} {model:5s} {policy:7s} {budget}: "
                    f"{s['decode_step_s'] * 1e3:.1f} ms/token")
        cal = None
        if calibrate:
            sim_moe = moe_resident_sim(tokens, moe.budget(1.0), moe.routing, moe.ref.speculation) if moe else None
            cal = fit_from_runs(cal_runs, get_spec("smollm2-135m"), base, tokens, fresh_rates, link_points,
                                (moe_resident, sim_moe) if moe else None, free_rates=free_rates)
            if moe:
                cal["moe_resident_budget"] = moe.budget(1.0)
    return {"when": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": f"{jax.devices()[0].platform} ({len(jax.devices())} device(s)), jax {jax.__version__}",
            "profile": profile, "tokens": tokens, "repeats": repeats, "calibration": cal,
            "rows": [{"model": m, "policy": p, "budget": b, "runs": measured[(m, p, b)],
                      "hbm_budget": str(moe.budget(b)) if m == "moe" else str(b)} for m, p, b in rows],
            "moe_routing": moe.routing if moe else None,
            "moe_speculation": _jsonable(moe.ref.speculation) if moe else None}


def _jsonable(x):
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "tolist"):
        return x.tolist()
    return x


def simulate_rows(record: dict, *, refit: bool = True, say=lambda msg: None) -> dict:
    """The simulated half: every row of a `measure` record on the record's profile, calibrated by the record's
    calibration and as the profile file is; {"rows": {(model, policy, budget): {measured (median of the runs),
    runs, simulated, rel_err, uncalibrated}}, "calibration": ...}."""
    base = load_profile(record["profile"])
    cal = record["calibration"]
    if cal and refit:  # overhead and contention are the simulator's own fits: refit them under today's simulator
        sim_moe = (moe_resident_sim(record["tokens"], cal["moe_resident_budget"], record["moe_routing"],
                                    record["moe_speculation"]) if "moe_resident_budget" in cal else None)
        cal = {**fit_with_simulator(cal, base, record["tokens"], sim_moe), "recorded_overhead": cal["overhead"],
               "recorded_contention": cal["contention"]}
    prof = apply_calibration(base, cal) if cal else base
    tokens = record["tokens"]
    out = {}
    with tempfile.TemporaryDirectory() as d:
        for row in record["rows"]:
            model, policy, budget = row["model"], row["policy"], row["budget"]
            if model == "moe":
                sims = [moe_sim(policy, row["hbm_budget"], tokens, p, record["moe_routing"],
                                record["moe_speculation"], Path(d) / f"sim-moe-{policy}-{budget}-{i}")
                        for i, p in enumerate((prof, base))]
            else:
                sims = [sim_step(policy, budget, tokens, p, Path(d) / f"sim-{policy}-{budget}-{i}")
                        for i, p in enumerate((prof, base))]
            m = statistics.median(row["runs"])
            out[(model, policy, budget)] = {"measured": m, "runs": row["runs"], "simulated": sims[0],
                                            "rel_err": (sims[0] - m) / m, "uncalibrated": sims[1]}
            say(f"  simulated {model:5s} {policy:7s} {budget}: {sims[0] * 1e3:.1f} ms/token")
    return {"rows": out, "calibration": cal}


def moe_sim(policy: str, hbm_budget: str, tokens: int, profile, routing, speculation, out_dir) -> float:
    """Simulated decode step of the validation-size MoE run: the real run's config (dense blocks protected, budget
    in bytes) on the model's shape, replaying `routing` and `speculation`."""
    import dataclasses

    from vorch_jax.runtime.run import simulate

    cfg = dataclasses.replace(moe_config(policy, hbm_budget, tokens), executor="sim", hardware="this-machine")
    return simulate(cfg, out_dir, hardware=profile, routing=routing, speculation=speculation)["decode_step_s"]


def moe_config(policy: str, hbm_budget, tokens: int):
    """The validation's MoE run: every block but the experts protected, 16 prompt and evaluation tokens."""
    from vorch_jax.config import MoEConfig, RunConfig
    from vorch_jax.runtime.setup import protect_all_but

    # speculation on outright: the real run measures whether it pays, the simulated one models it, and the two
    # must make the same moves for the timing to be compared
    return RunConfig(model="smollm2-135m-moe", policy=policy, hbm_budget=hbm_budget, new_tokens=tokens,
                     prompt_tokens=16, eval_tokens=16, placement=protect_all_but(get_spec("smollm2-135m-moe"),
                                                                                  "expert"),
                     moe=MoEConfig(speculative="on"))


def moe_resident_sim(tokens: int, budget_bytes: int, routing, speculation):
    """profile -> the simulated decode step of the resident MoE (the calibration's second resident point)."""
    def run(profile):
        with tempfile.TemporaryDirectory() as d:
            return moe_sim("resident", str(budget_bytes), tokens, profile, routing, speculation, d)
    return run


def validate(rows, *, repeats: int, tokens: int, profile="this-machine", calibrate: bool = True, say=print) -> dict:
    """`measure` then `simulate_rows`."""
    return simulate_rows(measure(rows, repeats=repeats, tokens=tokens, profile=profile, calibrate=calibrate,
                                 say=say), refit=False)  # measure just fitted them with this simulator


def measurement_noise(result: dict) -> list[float]:
    """Per row with >= 4 runs: |median(runs of even rounds) - median(runs of odd rounds)| / median(all runs), the
    measurement's reproducibility on this machine (rounds alternate, so a slow spell of minutes falls in both)."""
    out = []
    for r in result["rows"].values():
        runs = r["runs"]
        if len(runs) >= 4:
            out.append(abs(statistics.median(runs[0::2]) - statistics.median(runs[1::2])) / r["measured"])
    return out


def table(result: dict) -> str:
    lines = [f"{'model':5s} {'policy':8s} {'budget':>6s} {'measured ms/tok':>16s} {'simulated':>10s} {'rel err':>8s} "
             f"{'(profile file as is)':>20s}  runs (ms)"]
    errs = []
    for (model, policy, budget), r in result["rows"].items():
        errs.append(abs(r["rel_err"]))
        lines.append(f"{model:5s} {policy:8s} {budget:6.1f} {r['measured'] * 1e3:16.1f} {r['simulated'] * 1e3:10.1f} "
                     f"{r['rel_err'] * 100:+7.1f}% {r['uncalibrated'] * 1e3:20.1f}  "
                     + " ".join(f"{x * 1e3:.0f}" for x in r["runs"]))
    lines.append(f"median |rel err| {statistics.median(errs) * 100:.1f}%   max {max(errs) * 100:.1f}%   "
                 f"(targets: every row within 15%, median within 7%)")
    noise = measurement_noise(result)
    if noise:
        lines.append(f"the measurement against itself: each row's runs of even and of odd rounds, medians differ by "
                     f"median {statistics.median(noise) * 100:.1f}%, max {max(noise) * 100:.1f}% (no simulator can be "
                     f"held closer to a row than its own runs agree)")
    cal = result["calibration"]
    if cal:
        moe = (f", MoE resident step {cal['moe_resident_step_s'] * 1e3:.1f} ms" if "moe_resident_step_s" in cal else "")
        lines.append(f"calibration: host {cal['dispatch'] * 1e3:.3f} ms/position ({cal['gaps']} gaps); load alone "
                     f"{cal['h2d_lat'] * 1e3:.2f} ms + bytes / {cal['h2d'] / 1e9:.2f} GB/s ({cal['link_points']} probe "
                     f"loads), +{cal['beside'] * 1e3:.2f} ms beside compute ({cal['transfers']} misses"
                     + ("" if "beside_median" in cal else ", a median: the record predates the mean") + "), "
                     + (f"+{cal['prefetch_beside'] * 1e3:.2f} ms a prefetch ({cal['prefetches']}); "
                        if "prefetch_beside" in cal else "a prefetch's wait: the profile file's (not in this record); ")
                     + f"memory "
                     f"{cal['hbm_bw'] / 1e9:.1f} GB/s + {cal['overhead'] * 1e3:.3f} ms/block (dense resident step "
                     f"{cal['resident_step_s'] * 1e3:.1f} ms{moe}); copy contention {cal['contention']:.2f} "
                     f"(static-prefetch step {cal['static_prefetch_step_s'] * 1e3:.1f} ms); fresh allocation "
                     f"{cal.get('fresh', float('nan')) / 1e9:.2f} GB/s ({cal.get('fresh_loads', 0)} in-run loads), "
                     + (f"freed at {cal['fresh_free'] / 1e9:.2f} GB/s ("
                        + (f"{cal['fresh_frees']} in-run evictions)" if cal["fresh_frees"] else "probes)")
                        if "fresh_free" in cal else "free rate: the profile file's (not in this record)"))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=6)
    ap.add_argument("--profile", default="this-machine")
    ap.add_argument("--no-calibrate", action="store_true")
    ap.add_argument("--models", nargs="+", default=["dense", "moe"], choices=["dense", "moe"])
    ap.add_argument("--save", type=Path, help="write the measured record (runs, calibration, MoE routing) as JSON")
    ap.add_argument("--replay", type=Path, help="no real runs: simulate the rows of a record --save wrote")
    ap.add_argument("--keep", type=Path, help="keep every real run's summary and trace under this folder")
    args = ap.parse_args(argv)
    if args.replay:
        record = json.loads(args.replay.read_text())
        print(f"replaying {args.replay}: measured {record['when']} on {record['device']}")
    else:
        rows = [(m, p, b) for m in args.models for p in POLICIES for b in BUDGETS]
        record = measure(rows, repeats=args.repeats, tokens=args.tokens, profile=args.profile,
                         calibrate=not args.no_calibrate, keep=args.keep)
        if args.save:
            args.save.parent.mkdir(parents=True, exist_ok=True)
            args.save.write_text(json.dumps(record, indent=1) + "\n")
            print(f"record written to {args.save}")
    print(table(simulate_rows(record, refit=bool(args.replay))))  # a fresh record was fitted by this simulator


if __name__ == "__main__":
    main()
