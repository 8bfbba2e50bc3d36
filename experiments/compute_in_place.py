"""Compute where the weight lives: move the activations instead of the weights, priced per read (issue 20).

Run:   .venv/bin/python experiments/compute_in_place.py [--tokens 32] [--seeds 3] [--real]
Takes: about a minute on this 2-core CPU for the simulated tables; `--real` adds about two minutes.

Simulated (the profile's `host_compute` section and links; Mixtral-8x7B bf16, Zipf(1.0) routing top-2 of 8, seeded;
the dense blocks protected on device, the experts compete for the rest of the budget):
  * all-move: lru, lfu, scored, static, belady load every expert they read (the best of them is "best all-move");
  * all-host: every expert computed on the host (`compute: host`: llama.cpp's `--n-cpu-moe`);
  * mix: `in_place: auto` under lru, lfu, scored: a miss runs on the host when that beats waiting for its load, and
    the block loads in the background when the link is idle and the policy ranks it above what it evicts.
Budgets hold 25% and 50% of the experts (`setup.expert_budget`, one expert of streaming room); a budget the
profile's HBM cannot hold is reported with the one-line error the run gives, and the profile is also run at the
largest such fraction that fits. Columns: decode tok/s (median over seeds), weight GB host->device per decode
token, activation KB per decode token to the host (a few KB back per read), host compute share of the decode time,
share of the generation's expert reads run in place.

`--real` adds SmolLM2 on this CPU (hbm_budget 0.3, lossless): static and lru, each all-move, with `in_place: auto`
and with every MLP on the host; tokens checked against the resident run. Here host and device are the same cores
and DRAM, so it shows the option runs and is traced, not what a GPU would gain.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vorch_jax.config import PlacementRule, load_config  # noqa: E402
from vorch_jax.errors import BudgetError  # noqa: E402
from vorch_jax.models.registry import get as get_spec  # noqa: E402
from vorch_jax.runtime.run import simulate  # noqa: E402
from vorch_jax.runtime.setup import build_setup, expert_budget, protect_all_but  # noqa: E402
from vorch_jax.simulation.backend import zipf_routing  # noqa: E402
from vorch_jax.simulation.hardware import load_profile  # noqa: E402

MODEL = "mixtral-8x7b"
ALL_MOVE = ("lru", "lfu", "scored", "static", "belady")
MIX = ("lru", "lfu", "scored")
EXPERTS_ON_HOST = PlacementRule(path=r"layers\.\d+\.expert\.\d+", compute="host")
RESULTS = Path(__file__).resolve().parent / "results" / "compute_in_place.txt"


def variants():
    """(row label, policy, in_place, experts on host)."""
    return ([(p, p, "off", False) for p in ALL_MOVE] + [("all-host", "static", "off", True)]
            + [(f"mix {p}", p, "auto", False) for p in MIX])


def simulate_row(hw, budget: int, policy: str, in_place: str, on_host: bool, tokens: int, routing) -> dict:
    spec = get_spec(MODEL)
    rules = protect_all_but(spec, "expert") + ((EXPERTS_ON_HOST,) if on_host else ())
    cfg = load_config(None, [f"model={MODEL}", f"policy={policy}", f"hbm_budget={budget}B", f"in_place={in_place}",
                             f"new_tokens={tokens + 1}", "prompt_tokens=16", "executor=sim", f"hardware={hw.name}",
                             "dtype=bfloat16"])
    with tempfile.TemporaryDirectory() as d:
        return simulate(dataclasses.replace(cfg, placement=rules), d, hardware=hw, routing=routing,
                        write_traces=False)


def row_figures(s: dict, tokens: int, routing) -> dict:
    ip = s.get("in_place") or {}
    act = ip.get("decode_activation_bytes_per_step", {})
    experts = sum(len(layer) for one_pass in routing for layer in one_pass)  # expert reads of the generation
    return {"tok_s": s["decode_tok_s"], "gb_tok": s["decode_h2d_bytes_per_step"] / 1e9,
            "act_kb_tok": act.get("device->host", 0) / 1e3,
            "host_share": ip.get("decode_host_compute_share", 0.0),
            "in_place_share": ip.get("reads", 0) / experts if experts else 0.0}


def budget_for(hw, fraction: float) -> tuple[int, str]:
    spec = get_spec(MODEL)
    base = load_config(None, [f"model={MODEL}", "executor=sim", f"hardware={hw.name}", "dtype=bfloat16"])
    return expert_budget(build_setup(dataclasses.replace(base, placement=protect_all_but(spec, "expert"))),
                         fraction, 1)


def largest_fraction(hw) -> float:
    """The largest expert fraction, in steps of 1/16, whose budget the profile's HBM holds."""
    fits = [k / 16 for k in range(1, 16) if budget_for(hw, k / 16)[0] <= hw.hbm_capacity_bytes]
    return fits[-1] if fits else 0.0


def table(hw, fraction: float, tokens: int, seeds: int, say) -> list[str]:
    budget, how = budget_for(hw, fraction)
    lines = [f"\n{hw.name} ({hw.device}), experts {fraction:.1%}: hbm_budget = {how}"]
    if budget > hw.hbm_capacity_bytes:
        try:
            simulate_row(hw, budget, "lru", "off", False, 2, zipf_routing(get_spec(MODEL), 3, seed=0))
        except BudgetError as err:
            return lines + [f"  not run: {err}"]
    spec = get_spec(MODEL)
    routings = [zipf_routing(spec, tokens + 1, seed=s, tokens_per_pass=[17] + [1] * tokens) for s in range(seeds)]
    lines.append(f"  {'row':12s} {'tok/s':>7s} {'(min-max)':>13s} {'weights GB/tok':>14s} {'act KB/tok to host':>18s} "
                 f"{'host share':>10s} {'reads in place':>14s}")
    rows = {}
    for label, policy, in_place, on_host in variants():
        figs = [row_figures(simulate_row(hw, budget, policy, in_place, on_host, tokens, r), tokens, r)
                for r in routings]
        med = {k: statistics.median(f[k] for f in figs) for k in figs[0]}
        rows[label] = med
        lo, hi = min(f["tok_s"] for f in figs), max(f["tok_s"] for f in figs)
        lines.append(f"  {label:12s} {med['tok_s']:7.2f} {f'({lo:.2f}-{hi:.2f})':>13s} {med['gb_tok']:14.2f} "
                     f"{med['act_kb_tok']:18.1f} {med['host_share']:10.2f} {med['in_place_share']:14.2f}")
        say(lines[-1])
    move = max((r for r in ALL_MOVE if r != "belady"), key=lambda r: rows[r]["tok_s"])
    mix = max((f"mix {p}" for p in MIX), key=lambda r: rows[r]["tok_s"])
    best_pure = max(rows[move]["tok_s"], rows["all-host"]["tok_s"])
    lines.append(f"  best all-move (online): {move} {rows[move]['tok_s']:.2f} tok/s (belady, offline: "
                 f"{rows['belady']['tok_s']:.2f}); all-host {rows['all-host']['tok_s']:.2f}; best mix: {mix} "
                 f"{rows[mix]['tok_s']:.2f} = {rows[mix]['tok_s'] / best_pure:.2f}x the better pure strategy, "
                 f"{rows[mix]['tok_s'] / rows[move]['tok_s']:.2f}x all-move, "
                 f"{rows[mix]['tok_s'] / rows['all-host']['tok_s']:.2f}x all-host; every mix >= both pure: "
                 f"{all(rows[f'mix {p}']['tok_s'] >= best_pure for p in MIX)}")
    return lines


def real_rows(say) -> list[str]:
    """SmolLM2 on this CPU: all-move, auto and MLPs on the host, tokens against the resident run."""
    from vorch_jax.runtime.run import run

    protect = "{path: embed, state: S0, protect: true}, {path: final_norm, state: S0, protect: true}"
    host = f"placement=[{protect}, {{path: 'layers\\.[0-9]+\\.mlp', compute: host}}]"
    lines = ["\nsmollm2-135m on this CPU (real, float32, hbm_budget 0.3, 16 new tokens, median of 3 runs; host and "
             "device are the same 2 cores and DRAM)",
             f"  {'row':22s} {'tok/s':>7s} {'weights MB moved':>16s} {'reads in place':>14s} {'host share':>10s} "
             f"{'tokens = resident':>17s}"]
    for label, over in (("static", ["policy=static"]), ("static + auto", ["policy=static", "in_place=auto"]),
                        ("lru", ["policy=lru"]), ("lru + auto", ["policy=lru", "in_place=auto"]),
                        ("static, MLPs on host", ["policy=static", host])):
        runs = []
        for _ in range(3):
            with tempfile.TemporaryDirectory() as d:
                runs.append(run(load_config("configs/demo.yaml", over + ["hbm_budget=0.3", "new_tokens=16"]), d))
        s = sorted(runs, key=lambda r: r["decode_tok_s"])[1]
        ip = s["in_place"] or {}
        lines.append(f"  {label:22s} {s['decode_tok_s']:7.2f} {s['bytes_moved'] / 1e6:16.1f} {ip.get('reads', 0):14d} "
                     f"{ip.get('decode_host_compute_share', 0.0):10.2f} "
                     f"{str(all(r['tokens_match_resident'] for r in runs)):>17s}")
        say(lines[-1])
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32, help="decode tokens after a 16-token prompt")
    ap.add_argument("--seeds", type=int, default=3, help="Zipf routing seeds; tok/s is their median")
    ap.add_argument("--profiles", default="t4,h100-sxm,h100-pcie")
    ap.add_argument("--real", action="store_true", help="also the SmolLM2 runs on this CPU")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.tokens < 2 or args.seeds < 1:
        ap.error("--tokens must be >= 2 and --seeds >= 1")
    t0 = time.perf_counter()
    out = [f"# {Path(__file__).name} --tokens {args.tokens} --seeds {args.seeds} --profiles {args.profiles}"
           f"{' --real' if args.real else ''}  ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; simulated "
           f"rows from the profiles, real rows measured on this CPU)",
           f"{MODEL} bf16, Zipf(1.0) routing top-2 of 8, {args.seeds} seeds; {args.tokens} decode tokens after a "
           f"16-token prompt"]
    for line in out:
        print(line)
    for name in args.profiles.split(","):
        hw = load_profile(name)
        fractions = [0.25, 0.5]
        largest = largest_fraction(hw)
        if largest < fractions[0]:  # the profile's HBM holds neither: the largest share it does hold, too
            fractions.append(largest)
        for fraction in fractions:
            if fraction:
                out += table(hw, fraction, args.tokens, args.seeds, print)
            if out[-1].startswith("  not run"):
                print(out[-2] + "\n" + out[-1])
    if args.real:
        out += real_rows(print)
    out.append(f"\n(wall {time.perf_counter() - t0:.0f} s)")
    args.out.write_text("\n".join(out) + "\n")
    print(out[-1], f"-> {args.out}")


if __name__ == "__main__":
    main()
