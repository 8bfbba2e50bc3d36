"""MoE SmolLM2 under a budget: lru, lfu, scored (speculative prefetch, router λ) and belady side by side.

    .venv/bin/python experiments/moe_policies.py [--new-tokens 24] [--fractions 0.25 0.5] [--out runs/moe_policies]

Budgets hold every dense block (embedding, attention, router gates, final norm: protected by placement rules) plus a
fraction of all expert bytes plus a streaming reserve of `--reserve` experts; the computation is printed. One
resident reference (its recorded access stream feeds Belady) is shared by all runs; every run is lossless and must
reproduce its tokens. Per run: expert hit rate, bytes moved host->device (initial placement and generation),
bytes / belady_bytes, decode tok/s, and for scored the speculative prefetch as measured (precision = speculative
loads read by their layer / loads issued, each issued load matched to an engine transition).
Takes: about 1 min per run on 2 busy CPU cores at the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax.numpy as jnp

from vorch_jax import moe_run as M
from vorch_jax.config import RunConfig


def replay_bounds(stream, n_slots: int, horizons=(1, 4, 8)) -> dict:
    """Expert loads of a cache of `n_slots` experts replaying the recorded expert stream (generation only), for LRU,
    Belady, and `lookahead{d}`: LRU steered by a *perfect* router prediction of the next `d` layers (experts those
    layers will not use are evicted first, those they will use last). Pure bookkeeping, no timing: how much of the
    gap to Belady even an error-free speculation of that horizon closes (a heuristic, not a bound)."""
    from vorch_jax.belady import NextUse

    layer = [int(b.split(".")[1]) for b in stream]
    visit, p = [], 0
    for t, lay in enumerate(layer):
        p += t > 0 and lay < layer[t - 1]
        visit.append(p)
    chosen = {}
    for t, b in enumerate(stream):
        chosen.setdefault((visit[t], layer[t]), set()).add(b)

    def run(victim):
        cache, last, loads = set(), {}, 0
        for t, b in enumerate(stream):
            last[b] = t
            if b in cache:
                continue
            loads += 1
            if len(cache) >= n_slots:
                cache.remove(min(cache - {b}, key=lambda c: victim(c, t, last)))
            cache.add(b)
        return loads

    def lookahead(d):
        def key(c, t, last):
            ahead = int(c.split(".")[1]) - layer[t]
            if 0 < ahead <= d:
                return (0 if c not in chosen.get((visit[t], layer[t] + ahead), ()) else 2, last[c])
            return (1, last[c])
        return key

    nu = NextUse(stream)
    out = {"lru": run(lambda c, t, last: last[c]), "belady": run(lambda c, t, last: -nu.after(c, t))}
    out.update({f"lookahead{d}": run(lookahead(d)) for d in horizons})
    return out


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--prompt-tokens", type=int, default=8)
    ap.add_argument("--eval-tokens", type=int, default=16)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--policies", nargs="+", default=["lru", "lfu", "scored", "scored-nospec", "belady"],
                    help="'scored-nospec': scored without speculative prefetch (to show what speculation costs)")
    ap.add_argument("--reserve", type=int, default=5, help="streaming reserve, in experts")
    ap.add_argument("--out", default="runs/moe_policies")
    args = ap.parse_args(argv)

    base = RunConfig(model=M.MOE_MODEL, policy="lru", hbm_budget=1.0, new_tokens=args.new_tokens,
                     prompt_tokens=args.prompt_tokens, eval_tokens=args.eval_tokens,
                     placement=M.dense_protect_rules())
    setup = M.prepare_moe(base)
    print(f"MoE: E={setup.n_experts}, top_k={setup.top_k} (router config target_top_k), model {setup.model_bytes} "
          f"bytes; prompt {len(setup.prompt_ids)} tokens, {args.new_tokens} new tokens")
    t0 = time.perf_counter()
    ref = M.moe_reference(setup, jnp.float32, args.new_tokens)
    print(f"resident reference: {time.perf_counter() - t0:.1f} s, {len(ref.stream)} positions recorded "
          f"({ref.gen_positions} in generation), resident decode step {ref.step_s * 1e3:.1f} ms")
    rows = []
    for frac in args.fractions:
        budget, how = M.expert_budget(setup, frac, args.reserve)
        print(f"\nbudget at {frac:.0%} of experts: {how}")
        for pol in args.policies:
            cfg = dataclasses.replace(base, policy=pol.removesuffix("-nospec"), hbm_budget=str(budget))
            s = M.run_moe(cfg, Path(args.out) / f"f{int(frac * 100)}" / pol, reference=ref,
                          speculative=False if pol.endswith("-nospec") else None)
            m = s["moe"]
            hit = s["hits"] / max(1, s["hits"] + s["misses"])
            rows.append({"fraction": frac, "policy": pol, "budget": budget, "hit_rate": hit,
                         "expert_hit_rate": m["expert_hit_rate"], "bytes_moved": s["bytes_moved"],
                         "expert_bytes_moved": m["expert_bytes_moved"], "belady_bytes": s["belady_bytes"],
                         "ratio": s["bytes_moved"] / s["belady_bytes"], "decode_tok_s": s["decode_tok_s"],
                         "stall_s": s["stall_s"], "tokens_match": s["tokens_match_resident"],
                         "stream_match": s["stream_matches_resident"], "speculative": m["speculative"]})
            print(f"  {pol} done: {rows[-1]['ratio']:.2f} x belady, tokens match {s['tokens_match_resident']}",
                  flush=True)
    print(f"\n{'experts':>7} {'policy':>13} {'hit':>5} {'exp hit':>7} {'MB moved':>9} {'expert MB':>9} "
          f"{'belady MB':>9} {'/belady':>7} {'tok/s':>6} {'stall s':>7} {'lossless':>8}")
    for r in rows:
        print(f"{r['fraction']:>7.0%} {r['policy']:>13} {r['hit_rate']:>5.2f} {r['expert_hit_rate']:>7.2f} "
              f"{r['bytes_moved'] / 1e6:>9.1f} {r['expert_bytes_moved'] / 1e6:>9.1f} {r['belady_bytes'] / 1e6:>9.1f} "
              f"{r['ratio']:>7.2f} {r['decode_tok_s']:>6.2f} {r['stall_s']:>7.2f} "
              f"{str(r['tokens_match'] and r['stream_match']):>8}")
    for frac in args.fractions:
        by = {r["policy"]: r for r in rows if r["fraction"] == frac}
        if "scored" in by and "lru" in by:
            sc, lru = by["scored"], by["lru"]
            sp = sc["speculative"]
            print(f"{frac:.0%}: scored bytes {sc['bytes_moved'] / lru['bytes_moved'] - 1:+.1%} vs lru, "
                  f"{sc['ratio']:.2f} x belady; speculative prefetch: {sp['issued']} loads issued "
                  f"({sp['issued_with_engine_event']} seen as engine transitions), precision {sp['precision']:.2f}, "
                  f"recall {sp['recall']:.2f} (prediction alone: precision {sp['prediction_precision']:.2f}, "
                  f"recall {sp['prediction_recall']:.2f})")
    experts = [b for b in ref.stream[: ref.gen_positions] if ".expert." in b]
    print(f"\nreplay of the recorded expert stream ({len(experts)} expert reads in generation): expert loads of a "
          "cache of n experts; lookahead-d = LRU that also knows exactly which experts the next d layers will use")
    for frac in args.fractions:
        slots = int(frac * setup.model_cfg.n_layers * setup.n_experts) + args.reserve
        r = replay_bounds(experts, slots)
        print(f"{frac:.0%} ({slots} slots): " + ", ".join(f"{k} {v} ({v / r['belady']:.2f} x belady)"
                                                          for k, v in r.items()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "moe_policies.json").write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
