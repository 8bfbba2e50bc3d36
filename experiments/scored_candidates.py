"""Every eviction rule the scored policy weighs, forced one at a time in real runs: bytes over the LP bound and tok/s.

    .venv/bin/python experiments/scored_candidates.py [--model gemma3-270m] [--budget 0.5] [--rounds 2]
        [--within 1.06] [--tokens 16]

Before a dense run the scored policy replays a few passes under each candidate rule (prefetch windows, size
weights, the steady-state plans: `controller/prefetch_window.py`) and follows the quickest by its modelled clock
within its bytes allowance. This measures what each candidate really does: one real lossless run per candidate
and round (`--rounds`, interleaved with static-prefetch so the machine's drift falls on all alike), for every
candidate whose replay moves within `--within` of the fewest replayed bytes, one per distinct replay outcome
(bytes, misses, plan: rules that replay alike run alike). Per candidate: its replay (bytes over the fewest, modelled
seconds, misses), then the runs' median tok/s, bytes over the run's LP bound and misses; the rule the policy chose
is marked. A candidate is forced by wrapping `choose_eviction_rule` where the scored policy calls it: the replays
are the policy's own, only the pick differs. Run it with the Makefile's GLIBC_TUNABLES exported.
Takes: about 4 minutes for Gemma 3 at one budget on 2 CPU cores at the defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax.numpy as jnp  # noqa: E402

from experiments.bench_policies import machine_line  # noqa: E402
from vorch_jax.config import load_config  # noqa: E402
from vorch_jax.controller import scored_policy  # noqa: E402
from vorch_jax.controller.pass_plan import horizon_plan, pass_plans  # noqa: E402
from vorch_jax.errors import ConfigError, VorchError  # noqa: E402
from vorch_jax.runtime.reference import resident_reference  # noqa: E402
from vorch_jax.runtime.run import run  # noqa: E402
from vorch_jax.runtime.setup import build_setup  # noqa: E402


def rule_of(replay) -> tuple:
    """What identifies a candidate rule: window, what it counts, size power, plan name."""
    return replay.window, replay.counts, replay.size_power, replay.plan


@contextlib.contextmanager
def forcing():
    """Within it, the scored policy picks `state["force"]` (a `rule_of` key; None: its own choice) from its replays,
    and `state` records its replays and its own choice."""
    own = scored_policy.choose_eviction_rule
    state = {"force": None}

    def pick(pass_blocks, device_bytes, budget, protected, initial, depth, passes, timing=None):
        best, replays, plan = own(pass_blocks, device_bytes, budget, protected, initial, depth, passes, timing)
        state["replays"], state["chosen"] = replays, rule_of(best)
        if state["force"] is None:
            return best, replays, plan
        forced = next(r for r in replays if rule_of(r) == state["force"])
        load_cost = timing.load_s if timing is not None else None  # the plans priced in link seconds too
        plans = {p.name: p for n in (1, 3)
                 for p in pass_plans(pass_blocks, device_bytes, budget, protected, passes=n, load_cost=load_cost)}
        if "to the end" in forced.plan:
            to_end = horizon_plan(pass_blocks, device_bytes, budget, protected, passes, load_cost)
            plans[to_end.name] = to_end
        return forced, replays, plans.get(forced.plan)

    scored_policy.choose_eviction_rule = pick
    try:
        yield state
    finally:
        scored_policy.choose_eviction_rule = own


def distinct_candidates(replays, within: float) -> list:
    """The replays within `within` of the fewest bytes, one per (bytes, misses, plan), fewest bytes first."""
    fewest = min(r.bytes_moved for r in replays)
    out = {}
    for r in sorted(replays, key=lambda r: (r.bytes_moved, r.misses)):
        if r.bytes_moved <= within * fewest:
            out.setdefault((r.bytes_moved, r.misses, r.plan), r)
    return list(out.values())


def measure(base, rounds: int, within: float, out: Path) -> list[str]:
    reference = resident_reference(build_setup(base), jnp.float32, base.new_tokens)
    runs: dict = {}
    with forcing() as state:
        run(base, out / "chosen", reference=reference)
        replays, chosen = state["replays"], state["chosen"]
        candidates = distinct_candidates(replays, within)
        for rnd in range(rounds):
            for i, r in enumerate(candidates):
                state["force"] = rule_of(r)
                runs.setdefault(i, []).append(run(base, out / f"{rnd}-{i}", reference=reference))
            state["force"] = None
            runs.setdefault("static-prefetch", []).append(
                run(dataclasses.replace(base, policy="static-prefetch"), out / f"{rnd}-sp", reference=reference))
    fewest = min(r.bytes_moved for r in replays)
    lines = [f"{len(replays)} candidates replayed, {len(candidates)} distinct within {within}x the fewest bytes; "
             f"* the policy's own choice",
             f"  {'window counts power plan':58s} {'replay: bytes/fewest':>20s} {'modelled s':>10s} {'misses':>6s} | "
             f"{'tok/s':>6s} {'bytes/LP':>8s} {'misses':>6s} {'match':>5s}   rounds tok/s"]
    for i, r in enumerate(candidates):
        lines.append(_row(("* " if rule_of(r) == chosen else "  ") + str(rule_of(r)),
                          f"{r.bytes_moved / fewest:20.3f} {r.modelled_s or 0.0:10.3f} {r.misses:6d}", runs[i]))
    lines.append(_row("  static-prefetch", f"{'':20s} {'':10s} {'':6s}", runs["static-prefetch"]))
    return lines


def _row(label: str, replay: str, rs: list) -> str:
    tok = [s["decode_tok_s"] for s in rs]
    return (f"{label:60s} {replay} | {statistics.median(tok):6.2f} {rs[0]['moved_over_lower_bound']:8.3f} "
            f"{rs[0]['misses']:6d} {str(all(s['tokens_match_resident'] for s in rs)):>5s}   "
            + " ".join(f"{t:.2f}" for t in tok))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--within", type=float, default=1.06)
    ap.add_argument("--tokens", type=int, default=16)
    args = ap.parse_args(argv)
    over = [f"model={args.model}", f"new_tokens={args.tokens}", "eval_tokens=32", "policy=scored",
            f"hbm_budget={args.budget}"] + (["placement=[]"] if args.model != "smollm2-135m" else [])
    try:
        if not 0 < args.budget <= 1 or args.rounds < 1 or args.within < 1:
            raise ConfigError("--budget must lie in (0, 1], --rounds be at least 1 and --within at least 1")
        base = load_config("configs/demo.yaml", over)
    except VorchError as e:
        print(f"scored_candidates: {e}", file=sys.stderr)
        return 2
    print(f"{machine_line()}; {args.model} at {args.budget}, lossless, {args.tokens} decode tokens, {args.rounds} "
          f"rounds, medians")
    with tempfile.TemporaryDirectory() as d:
        for line in measure(base, args.rounds, args.within, Path(d)):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
