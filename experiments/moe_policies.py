"""MoE SmolLM2 under a budget: lru, lfu, scored (router λ, speculation where measured to pay), belady side by side.

    .venv/bin/python experiments/moe_policies.py [--model smollm2-135m-moe-shared] [--new-tokens 24]
                                                 [--fractions 0.25 0.5] [--out runs/moe_policies]

Budgets hold every dense block (embedding, attention, router gates with the shared part where the model has one,
final norm: protected by placement rules) plus a
fraction of all expert bytes plus a streaming reserve of `--reserve` experts; the computation is printed. One
resident reference (its recorded access stream feeds Belady) is shared by all runs; every run is lossless and must
reproduce its tokens. Per run: expert hit rate, bytes moved host->device (initial placement and generation),
bytes / belady_bytes, decode tok/s, and for scored the speculative prefetch as measured (precision = speculative
loads read by their layer / loads issued, each issued load matched to an engine transition), then the MoE issue's
targets: scored's expert bytes against the better of lru and lfu, its decode speed against lru's, and what its
`moe.speculative: auto` read (an expert's load time, a layer's resident compute time).
Takes: about 6 minutes at the defaults (3 rounds of 10 runs of 24 tokens) on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from vorch_jax.models.block_ids import parse_block_id
from vorch_jax.models.registry import get as get_spec
from vorch_jax.runtime.reference import resident_reference
from vorch_jax.runtime.run import run
from vorch_jax.runtime.setup import build_setup, expert_budget, protect_all_but
from vorch_jax.config import RunConfig

TARGET_UNDER_SIMPLE = 0.15  # the MoE issue's: scored's expert bytes this much under the better of lru and lfu


def replay_bounds(stream, n_slots: int, n_layers: int, n_experts: int, ema: float = 0.4,
                  lookaheads: tuple = ()) -> dict:
    """Expert loads of a cache of `n_slots` experts replaying the recorded expert stream (generation only). Pure
    bookkeeping, no timing; each rule evicts the cached expert with the largest (estimated) wait until its next read:
      * `lru`: the longest unused;  `lfu`: the fewest reads so far (ties: the longest unused);
      * `belady`: the true next read (the recorded future);
      * `expected`: Belady's rule on an estimate, the rule the scored policy follows: layer distance to the
        expert's next visit plus (1/q - 1) passes, q = its selection frequency at that layer so far (an EMA of
        weight `ema`; the executor's estimate uses 0.2 and also folds in the speculative router probabilities);
      * `expected-oracle`: the same with q = the expert's true frequency over the whole stream *and* exact knowledge
        of which experts the rest of the current pass selects: knowledge no online policy has. A heuristic ceiling
        for rules that know later tokens only by frequency, not a proof of optimality;
      * `lookahead-j` (each j of `lookaheads`): expected-oracle that also knows the routing of the next j passes
        exactly: how much of Belady's advantage is knowing the coming tokens' routing.
    Each pass reads every layer's selected experts in layer order."""
    from vorch_jax.policies.belady import NextUse

    L, E = n_layers, n_experts
    layer = [parse_block_id(b)[1] for b in stream]
    expert = [parse_block_id(b)[2] for b in stream]
    visit, p = [], 0
    for t, lay in enumerate(layer):
        p += t > 0 and lay < layer[t - 1]
        visit.append(p)
    chosen = {}
    for t, b in enumerate(stream):
        chosen.setdefault((visit[t], layer[t]), set()).add(expert[t])
    true_q = {b: n / (visit[-1] + 1) for b, n in collections.Counter(stream).items()}
    nu = NextUse(stream)

    def run(wait, observe=lambda t: None):
        cache, loads = set(), 0
        for t, b in enumerate(stream):
            observe(t)
            if b in cache:
                continue
            loads += 1
            if len(cache) >= n_slots:
                cache.remove(max(sorted(cache - {b}), key=lambda c: wait(c, t)))  # ties: the same on every run
            cache.add(b)
        return loads

    last = {}

    def lru_wait(c, t):
        return t - last[c]

    def lru_observe(t):
        last[stream[t]] = t

    def estimated(c, t, q, oracle):
        _, lc, ec = parse_block_id(c)
        if lc == layer[t] and ec in chosen[(visit[t], lc)]:
            return -1.0  # read later in this very layer (known once the router ran)
        dist = (lc - layer[t]) % L or L
        if oracle and lc > layer[t]:  # the rest of this pass is known
            return dist if ec in chosen.get((visit[t], lc), ()) else dist + L / max(q, 1e-3)
        return dist + L * (1 / max(q, 1e-3) - 1)

    q_LxE = np.full((L, E), 1.0 / E)
    current = []

    def freq_observe(t):
        key = (visit[t], layer[t])
        if current and current[0] != key:  # a layer visit ended: fold its routing into that layer's q
            sel = np.zeros(E)
            sel[list(chosen[current[0]])] = 1
            q_LxE[current[0][1]] = (1 - ema) * q_LxE[current[0][1]] + ema * sel
        current[:] = [key]

    count = collections.Counter()

    def lfu_observe(t):
        lru_observe(t)
        count[stream[t]] += 1

    def ahead(c, t, j):  # (wait in layers, then reads): exact within the next j passes, else expected-oracle's
        u = nu.after(c, t)
        if u != float("inf") and visit[u] <= visit[t] + j:
            return (visit[u] - visit[t]) * L + layer[u] - layer[t], u - t
        lc = parse_block_id(c)[1]
        return (j + 1) * L + lc - layer[t] + L * (1 / max(true_q[c], 1e-3) - 1), float("inf")

    out = {"lru": run(lru_wait, lru_observe), "lfu": run(lambda c, t: (-count[c], t - last[c]), lfu_observe),
           "belady": run(lambda c, t: nu.after(c, t))}
    out["expected"] = run(lambda c, t: estimated(c, t, q_LxE[parse_block_id(c)[1:]], False), freq_observe)
    out["expected-oracle"] = run(lambda c, t: estimated(c, t, true_q[c], True))
    for j in lookaheads:
        out[f"lookahead-{j}"] = run(lambda c, t, j=j: ahead(c, t, j))
    return out


def policy_row(frac: float, pol: str, budget: int, summaries: list) -> dict:
    """One (budget, policy)'s row over its rounds: bytes and hits from the first run (every later round must move the
    same bytes: the runs are deterministic), decode tok/s and stall the medians."""
    s = summaries[0]
    if any(x["bytes_moved"] != s["bytes_moved"] for x in summaries):
        raise RuntimeError(f"{pol} at {frac:.0%}: bytes moved differ between rounds "
                           f"{[x['bytes_moved'] for x in summaries]}: the runs are not deterministic")
    m = s["routing"]
    toks = [x["decode_tok_s"] for x in summaries]
    return {"fraction": frac, "policy": pol, "budget": budget, "hit_rate": s["hits"] / max(1, s["hits"] + s["misses"]),
            "expert_hit_rate": m["expert_hit_rate"], "bytes_moved": s["bytes_moved"],
            "expert_bytes_moved": m["expert_bytes_moved"], "belady_bytes": s["belady_bytes"],
            "ratio": s["bytes_moved"] / s["belady_bytes"], "decode_tok_s": float(np.median(toks)),
            "decode_tok_s_rounds": toks, "stall_s": float(np.median([x["stall_s"] for x in summaries])),
            "tokens_match": all(x["tokens_match_resident"] for x in summaries),
            "stream_match": all(x["stream_matches_resident"] for x in summaries), "speculative": m["speculative"]}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-moe", choices=["smollm2-135m-moe", "smollm2-135m-moe-shared"])
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--prompt-tokens", type=int, default=8)
    ap.add_argument("--eval-tokens", type=int, default=16)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--policies", nargs="+", default=["lru", "lfu", "scored", "scored-spec", "belady"],
                    help="scored speculates as `moe.speculative: auto` decides; 'scored-spec' / 'scored-nospec' force "
                         "speculative prefetch on / off (what it gains or costs)")
    ap.add_argument("--reserve", type=int, default=5, help="streaming reserve, in experts")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each (budget, policy), interleaved round by round; "
                    "tok/s and stall are medians (this CPU's noise is about +-25%%), bytes must repeat exactly")
    ap.add_argument("--out", default="runs/moe_policies")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        print(f"moe_policies: --rounds must be >= 1, got {args.rounds}", file=sys.stderr)
        sys.exit(2)

    model = args.model
    base = RunConfig(model=model, policy="lru", hbm_budget=1.0, new_tokens=args.new_tokens,
                     prompt_tokens=args.prompt_tokens, eval_tokens=args.eval_tokens,
                     placement=protect_all_but(get_spec(model), "expert"))
    setup = build_setup(base)
    E, L = setup.spec.n_experts, setup.spec.n_layers
    print(f"MoE: E={E}, top_k={setup.spec.top_k} (router config target_top_k), model {setup.model_bytes} "
          f"bytes; prompt {len(setup.prompt_ids)} tokens, {args.new_tokens} new tokens")
    t0 = time.perf_counter()
    ref = resident_reference(setup, jnp.float32, args.new_tokens)
    print(f"resident reference: {time.perf_counter() - t0:.1f} s, {len(ref.stream)} positions recorded "
          f"({ref.gen_positions} in generation), resident decode step {ref.step_s * 1e3:.1f} ms")
    rows = []
    for frac in args.fractions:
        budget, how = expert_budget(setup, frac, args.reserve)
        print(f"\nbudget at {frac:.0%} of experts: {how}")
        runs = {pol: [] for pol in args.policies}
        for rnd in range(args.rounds):  # round by round, so that drift in the machine's speed hits every policy
            for pol in args.policies:
                mode = "off" if pol.endswith("-nospec") else "on" if pol.endswith("-spec") else "auto"
                cfg = dataclasses.replace(base, policy=pol.removesuffix("-nospec").removesuffix("-spec"),
                                          hbm_budget=str(budget), moe=dataclasses.replace(base.moe, speculative=mode))
                runs[pol].append(run(cfg, Path(args.out) / f"f{int(frac * 100)}" / pol / f"r{rnd}", reference=ref))
        for pol, summaries in runs.items():
            rows.append(policy_row(frac, pol, budget, summaries))
            print(f"  {pol} done: {rows[-1]['ratio']:.2f} x belady, tokens match {rows[-1]['tokens_match']}, "
                  f"tok/s over {args.rounds} rounds {' '.join(f'{t:.2f}' for t in rows[-1]['decode_tok_s_rounds'])}",
                  flush=True)
    print(f"\n{'experts':>7} {'policy':>13} {'hit':>5} {'exp hit':>7} {'MB moved':>9} {'expert MB':>9} "
          f"{'belady MB':>9} {'/belady':>7} {'tok/s':>6} {'stall s':>7} {'lossless':>8}   rounds tok/s")
    for r in rows:
        print(f"{r['fraction']:>7.0%} {r['policy']:>13} {r['hit_rate']:>5.2f} {r['expert_hit_rate']:>7.2f} "
              f"{r['bytes_moved'] / 1e6:>9.1f} {r['expert_bytes_moved'] / 1e6:>9.1f} {r['belady_bytes'] / 1e6:>9.1f} "
              f"{r['ratio']:>7.2f} {r['decode_tok_s']:>6.2f} {r['stall_s']:>7.2f} "
              f"{str(r['tokens_match'] and r['stream_match']):>8}   "
              f"{' '.join(f'{t:.2f}' for t in r['decode_tok_s_rounds'])}")
    for frac in args.fractions:
        by = {r["policy"]: r for r in rows if r["fraction"] == frac}
        if "scored" in by and "lru" in by:
            sc, lru = by["scored"], by["lru"]
            sp = sc["speculative"]
            simple = min((by[p] for p in ("lru", "lfu") if p in by), key=lambda r: r["expert_bytes_moved"])
            print(f"{frac:.0%}: scored expert bytes {sc['expert_bytes_moved'] / simple['expert_bytes_moved'] - 1:+.1%} "
                  f"vs the better of lru and lfu ({simple['policy']}; target {-TARGET_UNDER_SIMPLE:+.0%}), decode "
                  f"{sc['decode_tok_s'] / lru['decode_tok_s']:.2f}x lru's tok/s (target >= 1); speculation "
                  f"{'on' if sp['enabled'] else 'off'} (auto: an expert loads in {1e3 * sp['expert_load_s']:.3f} ms, "
                  f"a layer computes in {1e3 * sp['layer_s']:.3f} ms)")
            print(f"{frac:.0%}: scored bytes {sc['bytes_moved'] / lru['bytes_moved'] - 1:+.1%} vs lru, "
                  f"{sc['ratio']:.2f} x belady; speculative prefetch: {sp['issued']} loads issued "
                  f"({sp['issued_with_engine_event']} seen as engine transitions), precision {sp['precision']:.2f}, "
                  f"recall {sp['recall']:.2f} (prediction alone: precision {sp['prediction_precision']:.2f}, "
                  f"recall {sp['prediction_recall']:.2f})")
    experts = [b for b in ref.stream[: ref.gen_positions] if ".expert." in b]
    print(f"\nreplay of the recorded expert stream ({len(experts)} expert reads in generation): expert loads of a "
          "cache of n experts (see replay_bounds: expected = Belady's rule on online router frequencies, as scored "
          "evicts; expected-oracle = true frequencies and the current pass's routing known exactly; lookahead-1 = "
          "also the next token's routing known)")
    for frac in args.fractions:
        slots = int(frac * L * E) + args.reserve
        r = replay_bounds(experts, slots, L, E, lookaheads=(1,))
        print(f"{frac:.0%} ({slots} slots): " + ", ".join(f"{k} {v} ({v / r['belady']:.2f} x belady)"
                                                          for k, v in r.items()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "moe_policies.json").write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
