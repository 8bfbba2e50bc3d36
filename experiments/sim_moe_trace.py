"""Mixtral-8x7B simulated under the routing a working MoE really produced, beside the Zipf routing the simulator assumes.

Run:   .venv/bin/python experiments/sim_moe_trace.py [--tokens 32] [--profile h100-sxm] [--write]
Takes: about 3 minutes on 2 CPU cores (one real run of the shared-expert MoE SmolLM2 to record its routing, then
16 simulated Mixtral runs).

1. A real run of `smollm2-135m-moe-shared` (top-2 of 8 routed experts beside a shared part; every block fits, so
   the run only records) writes `routing.json`: the experts each pass read, per layer. Its prompt is KJV text.
2. That trace, its 30 layers stretched to Mixtral's 32 (`routing_trace.stretch_layers`: each Mixtral layer takes
   the recorded layer at its relative depth), is replayed by the simulator on Mixtral-8x7B (bf16, shape only) on
   the `--profile` hardware; so is the simulator's default, Zipf(1.0) routing over each layer's 8 experts
   (`simulation.backend.zipf_routing`, seeded).
3. Budgets hold every non-expert block (protected) plus 25% and 50% of the expert bytes plus a reserve of 5
   experts (`setup.expert_budget`); policies lru, lfu, scored, belady. Per (routing, budget, policy): decode tok/s,
   GB moved host->device over the run, over Belady's, and each policy's rank by bytes.

What it says: how the policies' ranking and their distance to Belady change when the routing has a real MoE's
reuse and skew rather than Zipf's independent draws. The stretched trace is an approximation (two of Mixtral's 32
layers repeat a recorded layer), and SmolLM2's experts are not Mixtral's: the trace carries reuse and skew, not
Mixtral's own routing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vorch_jax.config import load_config  # noqa: E402
from vorch_jax.models.registry import get as get_spec  # noqa: E402
from vorch_jax.runtime.run import run, simulate  # noqa: E402
from vorch_jax.runtime.setup import build_setup, expert_budget, protect_all_but  # noqa: E402
from vorch_jax.simulation.hardware import load_profile  # noqa: E402
from vorch_jax.simulation.routing_trace import FILE, read_routing_trace, stretch_layers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECORDED = "smollm2-135m-moe-shared"
TARGET = "mixtral-8x7b"
POLICIES = ("lru", "lfu", "scored", "belady")
FRACTIONS = (0.25, 0.5)
RESERVE = 5


def record(tokens: int, out: Path) -> Path:
    """A real run of the shared-expert MoE that records its routing: `tokens` passes (the prefill's and the
    decode steps')."""
    cfg = load_config(None, [f"model={RECORDED}", "policy=lru", "hbm_budget=1.0", f"new_tokens={tokens}",
                             "prompt_tokens=16", "eval_tokens=16"])
    cfg = dataclasses.replace(cfg, placement=protect_all_but(get_spec(RECORDED), "expert"))
    run(cfg, out)
    return out / FILE


def simulated(tokens: int, hw, fraction: float, policy: str, routing, out: Path) -> dict:
    cfg = load_config(None, [f"model={TARGET}", f"policy={policy}", f"new_tokens={tokens}", "prompt_tokens=16",
                             "executor=sim", f"hardware={hw.name}", "dtype=bfloat16", "hbm_budget=1.0"])
    cfg = dataclasses.replace(cfg, placement=protect_all_but(get_spec(TARGET), "expert"))
    budget, _ = expert_budget(build_setup(cfg, simulated=True), fraction, RESERVE)
    return simulate(dataclasses.replace(cfg, hbm_budget=str(budget)), out, hardware=hw, routing=routing,
                    write_traces=False)


def compare(tokens: int, hw, trace: Path | None = None) -> tuple[list[str], dict]:
    """(report lines, {(routing, fraction, policy): summary}): the recorded trace (recorded now if None) and Zipf
    routing, each policy at each budget."""
    work = Path(tempfile.mkdtemp(prefix="sim_moe_trace-"))
    trace = trace or record(tokens, work / "recorded")
    recorded_spec = get_spec(RECORDED)
    passes, _ = read_routing_trace(trace, n_layers=recorded_spec.n_layers, n_experts=recorded_spec.n_experts,
                                   passes=tokens)
    target = get_spec(TARGET)
    stretched = stretch_layers(passes, target.n_layers)
    lines = [f"# python experiments/sim_moe_trace.py --tokens {tokens} --profile {hw.name}  "
             "(simulated; the trace recorded on this project's 2-core CPU)",
             f"{TARGET} (bf16, shape only) on {hw.name}; routing: zipf = Zipf(1.0) per layer, seeded; trace = "
             f"{RECORDED}'s recorded routing ({len(passes)} passes, {recorded_spec.n_layers} layers stretched to "
             f"{target.n_layers}); budget = non-expert blocks + a fraction of expert bytes + {RESERVE} experts",
             f"{'routing':>7} {'experts':>7} {'policy':>7} {'tok/s':>7} {'GB moved':>9} {'/belady':>8} {'rank':>4}"]
    results = {}
    for name, routing in (("zipf", None), ("trace", stretched)):
        for frac in FRACTIONS:
            rows = {p: simulated(tokens, hw, frac, p, routing, work / name / f"{frac}" / p) for p in POLICIES}
            rank = {p: i + 1 for i, p in enumerate(sorted(POLICIES, key=lambda p: rows[p]["bytes_moved"]))}
            for p in POLICIES:
                s = rows[p]
                results[(name, frac, p)] = s
                lines.append(f"{name:>7} {frac:>7.0%} {p:>7} {s['decode_tok_s']:>7.2f} {s['bytes_moved'] / 1e9:>9.1f} "
                             f"{s['moved_over_belady']:>8.3f} {rank[p]:>4}")
            print("\n".join(lines[-len(POLICIES):]), flush=True)
    for frac in FRACTIONS:
        order = {n: sorted(POLICIES, key=lambda p: results[(n, frac, p)]["bytes_moved"]) for n in ("zipf", "trace")}
        same = order["zipf"] == order["trace"]
        lines.append(f"{frac:.0%} of experts, by bytes: zipf {' < '.join(order['zipf'])}; trace "
                     f"{' < '.join(order['trace'])} ({'same ranking' if same else 'ranking changes'})")
    reuse = [sum(len(set(a[l]) & set(b[l])) for l in range(len(a))) / sum(len(b[l]) for l in range(len(b)))
             for a, b in zip(stretched[1:], stretched[2:])]  # decode passes only
    lines.append(f"trace: next-token reuse (share of a pass's experts its layer also read the pass before) "
                 f"{sum(reuse) / max(1, len(reuse)):.3f}")
    return lines, results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32, help="passes: the prefill's and tokens - 1 decode steps")
    ap.add_argument("--profile", default="h100-sxm")
    ap.add_argument("--trace", help="a routing.json of the shared-expert MoE to replay (default: record one now)")
    ap.add_argument("--write", action="store_true", help="write experiments/results/sim_moe_trace.txt")
    args = ap.parse_args(argv)
    lines, results = compare(args.tokens, load_profile(args.profile), Path(args.trace) if args.trace else None)
    text = "\n".join(lines)
    print(text)
    if args.write:
        (ROOT / "experiments" / "results" / "sim_moe_trace.txt").write_text(text + "\n")
        (ROOT / "experiments" / "results" / "sim_moe_trace.json").write_text(json.dumps(
            {f"{n}/{f}/{p}": {k: s[k] for k in ("decode_tok_s", "bytes_moved", "belady_bytes", "moved_over_belady")}
             for (n, f, p), s in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
