"""Policies side by side on a dense model, lossless: bytes moved over the lower bound and decode tok/s, per budget.

Run:   .venv/bin/python experiments/bench_policies.py [--model smollm2-135m] [--budgets 0.3 0.5 0.8] [--rounds 3]
                                                      [--policies static static-prefetch lru scored belady]
                                                      [--bytes-weights 0 4]
Takes: about 6 minutes for SmolLM2 with the defaults on 2 CPU cores (Gemma 3: about 20, two optimum rows included).

Every run is a real `vorch run` (the demo config with `--tokens` decode tokens: prefetch depth 2 for
static-prefetch, scored and belady; static and lru load on a miss), in one process, the policies interleaved round
by round so that the machine's drift falls on all of them alike. Per budget and policy it prints the median decode
tok/s over the rounds and every round's figure (this CPU's noise, beside it), the bytes moved host->device over the
LP lower bound of the same access stream (`policies/lower_bound.py`; a run's bytes do not vary between rounds),
misses, the controller's share of wall time (its ticks during the decode), the seconds the scored policy spent
choosing its rule before the first pass (`plan s`: replays and the plans' integral problems), the share of the link's busy time with two or more loads under way
(`2 lanes`: the engine runs loads on two threads, and on this CPU a copy beside another runs at 75-85% of its rate
alone, so a schedule that keeps two loads going moves about 1.6x the bytes per second; a GPU's host->device copies
share one copy engine), the scored policy's prefetch window and the steady-state plan it
follows (`pass_plan`: '1-pass', '1-pass+s' streaming the small blocks, '3-pass', '16-pass to the end' the optimum of
the run's own passes; 'by time' priced in the loads' measured seconds), and whether every run's tokens
match the resident reference. Then, per budget, scored against the targets of the controller issue: bytes within
1.03x the lower bound, tok/s at least static-prefetch's (medians; each round's ratio beside them), controller <= 1%.
The lower bound is the LP's; where scored's bytes exceed 1.03x of it, the integral problem of the same passes
(`lower_bound.integral_optimum`, HiGHS for `--optimum-s` seconds) gives a tighter one: the bound its branch and
bound proved (no schedule of these passes loads fewer bytes, prefetching or not). The verdict takes the tighter lower
bound and prints both, with the best schedule HiGHS found (an upper bound on the optimum). Run it with the Makefile's
GLIBC_TUNABLES exported (README, "Huge pages on CPU"): its header says whether the heap used huge pages.

`--bytes-weights` runs scored once per weight of a load's bytes beside its link seconds (`score.bytes_weight`; rows
'scored b=W' beside 'scored', weight 0), each with its own verdict: the trade between the bytes target and the speed
target, measured in one command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax.numpy as jnp  # noqa: E402

from vorch_jax.config import load_config  # noqa: E402
from vorch_jax.errors import ConfigError, VorchError  # noqa: E402
from vorch_jax.runtime.reference import resident_reference  # noqa: E402
from vorch_jax.runtime.run import run  # noqa: E402
from vorch_jax.runtime.setup import build_setup  # noqa: E402
from vorch_jax.versions import environment  # noqa: E402

POLICIES = ("static", "static-prefetch", "lru", "scored", "belady")


def measure(base, policies, budgets, rounds, out: Path) -> dict:
    """(budget, row) -> list of the rounds' summaries; `policies` names the rows (`row_config`)."""
    setup = build_setup(base)
    reference = resident_reference(setup, jnp.float32, base.new_tokens)
    runs: dict = {}
    for b in budgets:
        for r in range(rounds):
            for row in policies:
                cfg = dataclasses.replace(row_config(base, row), hbm_budget=b)
                where = out / f"{b}" / row.replace(" ", "_") / f"round{r}"
                s = run(cfg, where, reference=reference)
                s["two_lanes_share"] = two_lanes_share(where / "trace.jsonl")
                s["reference_stream"] = reference.stream  # the blocks the generation reads, for `integral_bound`
                runs.setdefault((b, row), []).append(s)
    return runs


def weighted_rows(weights) -> list[str]:
    """The scored rows of `--bytes-weights`: 'scored' for weight 0, 'scored b=W' for the others."""
    return ["scored" if w == 0 else f"scored b={w:g}" for w in weights]


def row_config(base, row: str):
    """The config of a bench row: a policy, or 'scored b=W' (scored with `score.bytes_weight` W)."""
    if row.startswith("scored b="):
        score = dataclasses.replace(base.score, bytes_weight=float(row.split("=", 1)[1]))
        return dataclasses.replace(base, policy="scored", score=score)
    return dataclasses.replace(base, policy=row)


def two_lanes_share(trace_path: Path) -> float:
    """Of the time the host->device link was busy during generation (the trace's t >= 0), the share with at least
    two loads under way."""
    from vorch_jax.runtime.telemetry import covered_seconds

    spans = [(r["t"], r["t"] + r["dur_s"]) for r in map(json.loads, trace_path.read_text().splitlines())
             if r.get("event") == "transition" and r.get("link") == "host->device" and r["t"] >= 0]
    busy = covered_seconds(spans)
    return covered_seconds(spans, at_least=2) / busy if busy > 0 else 0.0


def integral_bound(base, budget: float, summary: dict, time_limit_s: float) -> tuple[float | None, str]:
    """The integral problem's proven lower bound over the LP bound of the run's passes (the runs' access stream: the
    resident reference's generation, which every run of the bench matched), None where HiGHS proved none; and a line on it with
    scored's bytes over the best schedule HiGHS found."""
    from vorch_jax.policies.lower_bound import integral_optimum, lower_bound

    st = build_setup(dataclasses.replace(base, hbm_budget=budget), simulated=True)
    if not summary.get("stream_matches_resident") or "reference_stream" not in summary:
        return None, "integral bound: not computed (the run's access stream is not the resident reference's)"
    stream = list(summary["reference_stream"])[:summary["lower_bound"]["of"]]  # the generation's (then: quality)
    lb = lower_bound(stream, st.device_bytes, st.hbm_budget, pinned=st.protected).bytes
    if lb != summary["lower_bound_bytes"]:
        return None, "integral bound: not computed (the stream's LP bound differs from the run's)"
    io = integral_optimum(stream, st.device_bytes, st.hbm_budget, pinned=st.protected, time_limit_s=time_limit_s)
    if io.proven_bytes is None or io.bytes is None:
        return None, f"integral bound: none proven (HiGHS {io.solver_s:.0f} s, {io.status})"
    return io.proven_bytes / lb, (
        f"integral problem of these passes (HiGHS {io.solver_s:.0f} s, {io.status}): no schedule loads fewer than "
        f"{io.proven_bytes / lb:.3f}x the LP bound, the best found loads {io.bytes / lb:.3f}x; scored moves "
        f"{summary['bytes_moved'] / io.bytes:.3f}x the best found")


def report(runs: dict, policies, budgets, base=None, optimum_s: float = 0.0) -> list[str]:
    lines = [f"{'budget':>6s} {'policy':16s} {'tok/s':>7s} {'bytes/bound':>11s} {'link s/bound':>12s} {'misses':>6s} "
             f"{'ctrl %':>6s} {'plan s':>6s} {'2 lanes':>7s} {'window':>6s} {'plan':>36s} {'match':>5s}   rounds tok/s"]
    verdicts = []
    for b in budgets:
        med = {}
        for pol in policies:
            rs = runs[(b, pol)]
            tok = [s["decode_tok_s"] for s in rs]
            med[pol] = statistics.median(tok)
            ctrl = max(s["controller_s"] / s["wall_s"] for s in rs)
            window = rs[0]["prefetch"].get("victims_read_within", 0)
            plan = rs[0]["prefetch"].get("follows_plan", "")
            plan = plan.split(",")[0] + ("+s" if "streams" in plan else "") if plan else "-"
            match = all(s["tokens_match_resident"] for s in rs)
            lanes = statistics.median(s.get("two_lanes_share", float("nan")) for s in rs)
            choice_s = statistics.median(s["prefetch"].get("choice_s", 0.0) for s in rs)  # before the first pass
            lines.append(f"{b:6.2f} {pol:16s} {med[pol]:7.2f} {rs[0]['moved_over_lower_bound']:11.3f} "
                         f"{link_over_bound(rs):12.3f} {rs[0]['misses']:6d} {100 * ctrl:6.2f} {choice_s:6.1f} {100 * lanes:6.0f}% "
                         f"{window or '-':>6} {plan:>36s} {str(match):>5s}   "
                         + " ".join(f"{t:.2f}" for t in tok))
        for row in (p for p in policies if p.startswith("scored")):
            paired = ([x["decode_tok_s"] / y["decode_tok_s"] for x, y in zip(runs[(b, row)],
                                                                           runs[(b, "static-prefetch")])]
                      if "static-prefetch" in med else [])
            verdicts += scored_verdict(b, runs[(b, row)], med, base, optimum_s, paired, row)
    return lines + [""] + verdicts


def link_over_bound(rs: list) -> float:
    """The median over rounds of a run's link seconds over the LP bound priced the same way (`link_seconds`: each
    run prices its loads by the load times it probed at its start, so the ratio, not the seconds, compares)."""
    return statistics.median(float("nan") if (s.get("link_seconds") or {}).get("over_bound") is None
                             else s["link_seconds"]["over_bound"] for s in rs)


def scored_verdict(b: float, scored_runs: list, med: dict, base, optimum_s: float, paired=(),
                   row: str = "scored") -> list[str]:
    """Scored at budget `b` against the controller issue's targets: bytes within 1.03x the tightest lower bound
    (the LP's, or the integral problem's proven one where the LP's is not met), tok/s at least static-prefetch's
    (medians), controller <= 1%. `paired`: scored's tok/s over static-prefetch's in each round, printed beside the
    verdict (a round runs the policies one after the other, so the machine's drift cancels in its ratio)."""
    ratio = scored_runs[0]["moved_over_lower_bound"]
    bytes_part, note = f"scored bytes {ratio:.3f}x the LP bound", []
    if ratio > 1.03 and base is not None and optimum_s > 0:
        proven, line = integral_bound(base, b, scored_runs[0], optimum_s)
        note = ["  " + line]
        if proven is not None and proven > 1:
            ratio /= proven
            bytes_part += f", {ratio:.3f}x the integral problem's proven bound"
    ctrl = max(x["controller_s"] / x["wall_s"] for x in scored_runs)
    vs = med[row] / med["static-prefetch"] if "static-prefetch" in med else float("nan")
    bytes_part = bytes_part.replace("scored", row, 1)
    return [f"budget {b}: {bytes_part} ({'ok' if ratio <= 1.03 else 'over 1.03'}), link seconds "
            f"{link_over_bound(scored_runs):.3f}x their LP bound, "
            f"tok/s {vs:.3f}x static-prefetch's ({'ok' if vs >= 1 else 'below'}"
            + (f"; by round {' '.join(f'{r:.3f}' for r in paired)}" if paired else "") + "), controller "
            f"{100 * ctrl:.2f}% ({'ok' if ctrl <= 0.01 else 'over 1%'})"] + note


def noise(runs: dict) -> str:
    """The machine's noise: the median over (budget, policy) of (max - min) / median of the rounds' tok/s."""
    spreads = []
    for rs in runs.values():
        tok = [s["decode_tok_s"] for s in rs]
        if len(tok) > 1:
            spreads.append((max(tok) - min(tok)) / statistics.median(tok))
    return (f"noise: the rounds of one (budget, policy) spread by a median {100 * statistics.median(spreads):.0f}% "
            f"(max - min over median), max {100 * max(spreads):.0f}%" if spreads else "noise: one round only")


def machine_line() -> str:
    """What ran a bench: the backend and device, jax, whether the heap used huge pages, and the glibc tunables (as
    every summary's `versions` records them)."""
    env = environment()
    return (f"{env['backend']} ({', '.join(env['devices'])}), jax {env['jax']}, huge-page heap "
            f"{'on' if env['huge_page_heap'] else 'off'}, GLIBC_TUNABLES {env['glibc_tunables'] or '(none)'}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.3, 0.5, 0.8])
    ap.add_argument("--policies", nargs="+", default=["static", "static-prefetch", "lru", "scored", "belady"])
    ap.add_argument("--bytes-weights", nargs="+", type=float, default=[0.0],
                    help="scored once per weight of a load's bytes beside its link seconds (score.bytes_weight)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--optimum-s", type=float, default=60.0,
                    help="HiGHS seconds for the integral problem's bound where scored's bytes exceed 1.03x the "
                         "LP's (0: skip)")
    args = ap.parse_args(argv)
    over = [f"model={args.model}", f"new_tokens={args.tokens}", "eval_tokens=32"]
    if args.model != "smollm2-135m":
        over.append("placement=[]")  # the demo's placement names SmolLM2's blocks
    try:
        base = load_config("configs/demo.yaml", over)
        if not set(args.policies) <= set(POLICIES) or min(args.budgets) <= 0 or max(args.budgets) > 1:
            raise ConfigError(f"--policies must be among {', '.join(POLICIES)} and --budgets in (0, 1]")
        if min(args.bytes_weights) < 0 or len(set(args.bytes_weights)) < len(args.bytes_weights):
            raise ConfigError("--bytes-weights must be distinct numbers >= 0")
        if "scored" in args.policies:
            i = args.policies.index("scored")
            args.policies[i:i + 1] = weighted_rows(args.bytes_weights)
    except VorchError as e:
        print(f"bench_policies: {e}", file=sys.stderr)
        return 2
    print(f"{machine_line()}; {args.model}, lossless, {args.tokens} decode tokens, {args.rounds} rounds, medians")
    with tempfile.TemporaryDirectory() as d:
        runs = measure(base, args.policies, args.budgets, args.rounds, Path(d))
    for line in report(runs, args.policies, args.budgets, base, args.optimum_s):
        print(line)
    print(noise(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
