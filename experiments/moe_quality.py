"""MoE SmolLM2 quality and routing: ppl vs dense per top-k, expert usage per layer, speculative next-layer routing.

    .venv/bin/python experiments/moe_quality.py configs/moe/router.yaml [--rebuild]

Builds (or loads) the MoE model of the router config (with `distill_steps`, the distillation reports the held-out
top-k ppl as it trains), then on BOS + the first `eval_tokens` tokens of KJV (the book's opening, which the dense
model partly recites: its ppl there is far below its ppl elsewhere) and on `eval_windows` windows spread over the
text after all the training text (`moe_build.held_out_windows`):
  1. ppl of the MoE model for each k in `eval_top_ks` beside the dense model's (k = E equals dense unless the
     model is distilled: then it is the dense model plus its corrections), with the
     relative logit error vs dense, top-1 agreement, and the ppl under oracle routing (top-k by activation mass);
  2. router recall on the evaluation text, on the dense model's hidden states: the router's top-k vs the experts
     with most activation mass (oracle);
  3. per-layer expert usage under top-`target_top_k` routing: entropy / log E, max and min share;
  4. speculative routing: layer l+1's router on layer l's residual state vs the experts layer l+1 actually picks.
  3 and 4 are measured twice: in the top-`target_top_k` model, and with every expert run (k = E).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from vorch_jax.models.corpus import kjv_text
from vorch_jax.models import llama_layers as Lay
from vorch_jax.models import moe
from vorch_jax.models import moe_build as mb
from vorch_jax.models.errors import ModelError, RouterConfigError
from vorch_jax.models import moe_distill
from vorch_jax.models import moe_store as store
from vorch_jax.models.gguf_source import load_smollm2_source
from vorch_jax.models.llama import KVCache, LlamaModel
from vorch_jax.models.smollm2 import bos_id
from vorch_jax.models.tokenizer import tokenizer_from_gguf_metadata

moe_forward = jax.jit(moe.moe_forward, static_argnames=("cfg", "top_k", "collect"))


def nll(logits_TxV: np.ndarray, ids_T: np.ndarray) -> float:
    """Mean negative log-likelihood of ids[1:] given the logits at positions [:-1]."""
    z = logits_TxV[:-1].astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(ids_T) - 1), ids_T[1:]].mean())


def window_nlls(logits_fn, windows_NxT: np.ndarray, batch: int = 4) -> np.ndarray:
    """float64 [N]: `nll` of each window under `logits_fn(ids [b, T]) -> logits [b, T, V]`, `batch` at a time."""
    out = []
    for i in range(0, len(windows_NxT), batch):
        rows = windows_NxT[i:i + batch]
        out += [nll(lg, ids_T) for lg, ids_T in zip(np.asarray(logits_fn(jnp.asarray(rows))), rows)]
    return np.asarray(out)


def held_out_table(cfg, dense_logits_fn, blocks, windows_NxT: np.ndarray, top_ks, mlp_compute) -> dict:
    """ppl of the dense model and of the MoE at each top-k (router- and oracle-routed) over the held-out windows,
    with the range of the windows' own ppl ratios (how much the text moves it)."""
    dense_N = window_nlls(dense_logits_fn, windows_NxT)
    dense = math.exp(dense_N.mean())
    print(f"dense ppl {dense:.3f}")
    print(f"{'top_k':>5} {'MLP compute':>11} {'ppl':>9} {'ppl/dense':>9} {'windows min-max':>15} "
          f"{'oracle-routed ppl':>17} {'x dense':>7}")
    rows = []
    for k in top_ks:
        moe_N = window_nlls(lambda i: moe_forward(cfg, blocks, i, top_k=k), windows_NxT)
        oracle = math.exp(window_nlls(lambda i: oracle_forward_jit(cfg, blocks, i, top_k=k), windows_NxT).mean())
        ppl, lo, hi = math.exp(moe_N.mean()), *np.exp([(moe_N - dense_N).min(), (moe_N - dense_N).max()])
        rows.append({"top_k": k, "mlp_compute": mlp_compute(k), "ppl": ppl, "ppl_oracle_routing": oracle,
                     "window_ratio_min": float(lo), "window_ratio_max": float(hi)})
        print(f"{k:>5} {mlp_compute(k):>11.3f} {ppl:>9.3f} {ppl / dense:>9.3f} {f'{lo:.2f}-{hi:.2f}':>15} "
              f"{oracle:>17.3f} {oracle / dense:>7.3f}")
    return {"dense_ppl": dense, "windows": int(len(windows_NxT)), "rows": rows}


def topk_np(scores_NxE: np.ndarray, k: int) -> np.ndarray:
    """bool [N, E] of each row's top-k (same tie order as `moe.topk_mask`)."""
    return np.asarray(moe.topk_mask(jnp.asarray(scores_NxE), k))


def oracle_forward(cfg, blocks, ids_BxT, top_k: int):
    """Logits of the MoE model routed by an oracle: each token's top-k experts by their activation mass
    Σ_n |silu(h·g_n)·(h·u_n)| at the model's own hidden state. Separates the partition's limit from router error."""
    E = blocks[moe.gate_block_id(0)]["router_b"].shape[-1]
    B, T = ids_BxT.shape
    x = Lay.embed_tokens(blocks["embed"], ids_BxT, jnp.float32)
    kv = jnp.zeros((B, T, cfg.n_kv_heads, cfg.head_dim), jnp.float32)
    for i in range(cfg.n_layers):
        x, _, _ = Lay.attention_block(cfg, blocks[f"layers.{i}.attn"], x, kv, kv, 0)
        gw, ews = blocks[moe.gate_block_id(i)], [blocks[moe.expert_block_id(i, e)] for e in range(E)]
        h = Lay.rms_norm(x, gw["ffn_norm"], cfg.norm_eps)
        mass_BxTxE = jnp.stack([jnp.abs(jax.nn.silu(h @ w["w_gate"]) * (h @ w["w_up"])).sum(-1) for w in ews], -1)
        x = moe.moe_combine(moe.add_shared(gw, x, h), h, ews, moe.topk_mask(mass_BxTxE, top_k))
    return Lay.lm_head(cfg, blocks["final_norm"], blocks["embed"], x)


oracle_forward_jit = jax.jit(oracle_forward, static_argnames=("cfg", "top_k"))


def distill_progress(rcfg, ids_T: np.ndarray):
    """`build_or_load`'s eval_fn: during a distillation, the top-`target_top_k` ppl on the evaluation text."""

    def for_moe(source, partition, routers):
        weights = moe_distill.stacked_weights(source, partition, routers)
        run = jax.jit(lambda w, d, ids: moe_distill.routed_logits(source.config, w, d, ids, rcfg.target_top_k))

        def report(delta) -> str:
            logits = np.asarray(run(weights, delta, jnp.asarray(ids_T[None]))[0])
            return f"held-out top-{rcfg.target_top_k} ppl {math.exp(nll(logits, ids_T)):.3f}"

        return report

    return for_moe


def routed_masks(cfg, blocks, moe_in: list, k: int) -> list:
    """Per layer, bool [B*T, E]: each token's top-k experts by the router at that layer's MoE input."""
    masks = []
    for i, x in enumerate(moe_in):
        gw = blocks[moe.gate_block_id(i)]
        h = Lay.rms_norm(x, gw["ffn_norm"], cfg.norm_eps)
        mask = moe.topk_mask(moe.moe_router_probs(gw, h), k)
        masks.append(np.asarray(mask).reshape(-1, mask.shape[-1]))
    return masks


def usage_table(masks: list, k: int, run_k: int, verbose: bool) -> list:
    """Per-layer share of token-slots per expert: entropy / log E, max, min; printed per layer when verbose."""
    E = masks[0].shape[-1]
    print(f"\n== expert usage, top-{k} routing, hidden states of the top-{run_k} model "
          f"(uniform share = {1 / E:.3f}) ==")
    if verbose:
        print(f"{'layer':>5} {'H/logE':>6} {'max':>6} {'min':>6} {'reuse':>6}  shares e0..e{E - 1}")
    usage = []
    for i, m in enumerate(masks):
        share = m.sum(0) / m.sum()
        p = share[share > 0]
        ent = float(-(p * np.log(p)).sum() / math.log(E))
        reuse = float((m[1:] & m[:-1]).sum() / max(1, m[1:].sum()))  # of token t+1's experts, chosen at t too
        usage.append({"layer": i, "entropy_over_logE": ent, "max": float(share.max()), "min": float(share.min()),
                      "next_token_reuse": reuse, "shares": share.round(4).tolist()})
        if verbose:
            print(f"{i:>5} {ent:>6.3f} {share.max():>6.3f} {share.min():>6.3f} {reuse:>6.3f}  "
                  + " ".join(f"{s:.2f}" for s in share))
    ents = [u["entropy_over_logE"] for u in usage]
    print(f"next-token reuse mean {np.mean([u['next_token_reuse'] for u in usage]):.3f} (uniform random routing: "
          f"{k / E:.3f})")
    print(f"entropy/logE mean {np.mean(ents):.3f} (min {np.min(ents):.3f}); max share mean "
          f"{np.mean([u['max'] for u in usage]):.3f}, min share mean {np.mean([u['min'] for u in usage]):.3f}; "
          f"max/min ratio median {np.median([u['max'] / max(u['min'], 1e-9) for u in usage]):.1f}")
    return usage


# Mixtral of Experts (Jiang et al. 2024, arXiv 2401.04088), Table 5: consecutive tokens routed to the same expert, at
# layers 0 / 15 / 31, the range over its eight datasets; with random routing 1/8 = 12.5% (first choice) and
# 1 - (6/8)(5/7) = 46% (first or second choice: the two tokens' top-2 sets share an expert).
MIXTRAL_REPETITION = {"first": ("13.6-14.9%", "23.6-28.4%", "19.7-26.3%"),
                      "either": ("44.9-49.9%", "61.6-67.0%", "44.5-53.6%")}


def repetition_table(cfg, blocks, moe_in: list, k: int) -> dict:
    """Per layer, the share of consecutive tokens whose first choice is the same expert, and whose top-k sets share
    an expert: Mixtral's Table 5 measured here, at the first, middle and last layer beside Mixtral's."""
    first, either = [], []
    for i, x in enumerate(moe_in):
        gw = blocks[moe.gate_block_id(i)]
        probs = np.asarray(moe.moe_router_probs(gw, Lay.rms_norm(x, gw["ffn_norm"], cfg.norm_eps)))
        probs = probs.reshape(-1, probs.shape[-1])
        top1, mask = probs.argmax(-1), topk_np(probs, k)
        first.append(float((top1[1:] == top1[:-1]).mean()))
        either.append(float((mask[1:] & mask[:-1]).any(-1).mean()))
    E, L = probs.shape[-1], len(moe_in)
    rand_either = 1 - math.comb(E - k, k) / math.comb(E, k)
    print(f"\n== consecutive tokens routed to the same expert (Mixtral's Table 5; random: first {1 / E:.1%}, "
          f"either {rand_either:.1%}) ==")
    print(f"{'layer':>12} {'first here':>10} {'Mixtral':>11} {'either here':>11} {'Mixtral':>11}")
    for name, i in (("first", 0), ("middle", L // 2), ("last", L - 1)):
        j = ("first", "middle", "last").index(name)
        print(f"{name + ' ' + str(i):>12} {first[i]:>10.1%} {MIXTRAL_REPETITION['first'][j]:>11} {either[i]:>11.1%} "
              f"{MIXTRAL_REPETITION['either'][j]:>11}")
    print(f"{'mean':>12} {np.mean(first):>10.1%} {'':>11} {np.mean(either):>11.1%}")
    return {"first_choice_L": first, "either_choice_L": either}


def speculative_table(cfg, blocks, moe_in, moe_out, masks, k: int, run_k: int) -> list:
    """Layer l+1's router on a layer-l state, its top-kp vs layer l+1's actual top-k: recall and precision."""
    E, L = masks[0].shape[-1], len(masks)
    print(f"\n== speculative routing (top-{run_k} model): layer l+1's router on layer l's state "
          f"vs its actual top-{k} ==")
    print(f"{'state used':>28} {'predicted':>9} {'recall':>7} {'precision':>9}")
    spec = []
    for name, states in (("input of layer l's MoE", moe_in), ("output of layer l's MoE", moe_out)):
        for kp in (k, k + 1, 2 * k):
            hit = n_act = n_pred = 0
            for i in range(L - 1):
                probs = moe.speculative_expert_probs(blocks[moe.gate_block_id(i + 1)], states[i], cfg.norm_eps)
                pred = topk_np(np.asarray(probs).reshape(-1, E), kp)
                hit += int((pred & masks[i + 1]).sum())
                n_act += int(masks[i + 1].sum())
                n_pred += int(pred.sum())
            spec.append({"state": name, "predicted_k": kp, "recall": hit / n_act, "precision": hit / n_pred})
            print(f"{name:>28} {kp:>9} {hit / n_act:>7.3f} {hit / n_pred:>9.3f}")
    return spec


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", help="router config, e.g. configs/moe/router.yaml")
    ap.add_argument("--rebuild", action="store_true", help="rebuild even if a stored result exists")
    ap.add_argument("--json", help="also write the numbers to this JSON file")
    ap.add_argument("--eval-tokens", type=int, help="evaluate on BOS + this many KJV tokens (default: the config's)")
    ap.add_argument("--no-distill", action="store_true",
                    help="the same partition and routers without the distilled corrections (distill_steps: 0)")
    ap.add_argument("--no-refit", action="store_true",
                    help="the same partition and routers without the refitted w_down (refit_lambda: 0)")
    args = ap.parse_args(argv)
    rcfg = mb.load_router_config(args.config)
    if args.eval_tokens is not None:
        if args.eval_tokens < 1:
            raise RouterConfigError(f"--eval-tokens must be >= 1, got {args.eval_tokens}")
        rcfg = dataclasses.replace(rcfg, eval_tokens=args.eval_tokens)
    window_cfg = rcfg  # the held-out windows lie after the full build's training text, --no-distill/refit or not
    if args.no_distill or args.no_refit:
        plain = {"distill_steps": 0} if args.no_distill else {}
        if args.no_refit:
            plain["refit_lambda"] = 0.0
        out_dir = rcfg.out_dir and rcfg.out_dir.rstrip("/") + "-plain"  # a config's own store keeps the full build
        rcfg = dataclasses.replace(rcfg, out_dir=out_dir, **plain)

    src = load_smollm2_source()
    cfg = src.config
    tok = tokenizer_from_gguf_metadata(src.tokenizer_metadata())
    bos = bos_id(tok)
    t0 = time.perf_counter()
    text_ids = tok.encode(kjv_text(max_chars=16 * rcfg.eval_tokens + 1000)).ids
    ids_T = np.asarray([bos] + text_ids[: rcfg.eval_tokens], np.int32)
    ids = jnp.asarray(ids_T[None])
    partition, routers, deltas = store.build_or_load(src, tok, lambda n: kjv_text(max_chars=n), bos, rcfg,
                                                     rebuild=args.rebuild, eval_fn=distill_progress(rcfg, ids_T))
    print(f"build/load: {time.perf_counter() - t0:.1f} s")
    meta = json.loads((store.store_in_use(rcfg) / "meta.json").read_text())
    if "stats" in meta:
        s = meta["stats"]
        print(f"stored build: partition {s['partition_seconds']:.1f} s, calibration {s['calibration_seconds']:.1f} s,"
              f" router training {s['seconds']:.1f} s; train top-{rcfg.target_top_k} recall mean "
              f"{np.mean(s['recall_L']):.3f}")
        if "distill_kl" in s:
            kl = s["distill_kl"]
            corrections = getattr(deltas, "deltas", deltas)  # the distilled part of a refit-then-distilled edit
            print(f"distillation: {rcfg.distill_steps} steps, rank {rcfg.distill_rank} "
                  f"({corrections.nbytes / 2**20:.1f} MiB of corrections), KL(dense || MoE) {kl[0][1]:.3f} at step "
                  f"{kl[0][0]} -> {kl[-1][1]:.3f} at step {kl[-1][0]}, {s['distill_seconds']:.0f} s")
        if "refit_error_after_L" in s:
            print(f"refit w_down: λ {rcfg.refit_lambda:g} on {rcfg.refit_seqs} x {rcfg.calib_seq_len} tokens, relative"
                  f" MLP output error at top-{rcfg.target_top_k} mean {np.mean(s['refit_error_before_L']):.3f} -> "
                  f"{np.mean(s['refit_error_after_L']):.3f}, {s['refit_seconds']:.0f} s")

    E, L = rcfg.n_experts, cfg.n_layers
    ms = moe.moe_source(src, partition, routers, deltas)
    blocks = {b: ms(b) for b in ms.block_ids}

    dense_blocks = {b: src(b) for b in ["embed", "final_norm"] + [f"layers.{i}.{k}" for i in range(L)
                                                                 for k in ("attn", "mlp")]}
    model = LlamaModel(cfg, lambda b: dense_blocks[b])
    dense_logits, _ = jax.jit(lambda m, i: m(i, KVCache.zeros(cfg, 1, i.shape[1]), 0))(model, ids)
    dense_logits = np.asarray(dense_logits[0])
    nll_dense = nll(dense_logits, ids_T)
    out = {"dense_ppl": math.exp(nll_dense), "eval_tokens": int(len(ids_T) - 1), "n_experts": E, "rows": []}

    print(f"\n== ppl on BOS + {len(ids_T) - 1} KJV tokens (dense: {math.exp(nll_dense):.3f}) ==")
    fs, fe = partition.n_shared, partition.neurons_LxExFe.shape[2]
    print(f"MLP compute per token at top-k: (shared {fs} + k x {fe} routed neurons) / {cfg.d_ff}")
    print(f"{'top_k':>5} {'MLP compute':>11} {'ppl':>9} {'ppl/dense':>9} {'rel logit err':>13} {'top1 agree':>10}"
          f" {'oracle-routed ppl':>17}")
    collected = {}
    for k in rcfg.eval_top_ks:
        logits, moe_in, moe_out = moe_forward(cfg, blocks, ids, top_k=k, collect=True)
        lg = np.asarray(logits[0])
        collected[k] = (moe_in, moe_out)
        rel = float(np.linalg.norm(lg - dense_logits) / np.linalg.norm(dense_logits))
        agree = float((lg.argmax(-1) == dense_logits.argmax(-1)).mean())
        ppl = math.exp(nll(lg, ids_T))
        ppl_oracle = math.exp(nll(np.asarray(oracle_forward_jit(cfg, blocks, ids, top_k=k)[0]), ids_T))
        out["rows"].append({"top_k": k, "mlp_compute": (fs + k * fe) / cfg.d_ff, "ppl": ppl, "rel_logit_err": rel, "top1_agree": agree,
                            "ppl_oracle_routing": ppl_oracle})
        print(f"{k:>5} {(fs + k * fe) / cfg.d_ff:>11.3f} {ppl:>9.3f} {ppl / out['dense_ppl']:>9.3f} {rel:>13.2e} {agree:>10.3f}"
              f" {ppl_oracle:>17.3f}")

    if rcfg.eval_windows:
        text = kjv_text()
        windows, start = mb.held_out_windows(tok, text, bos, window_cfg)
        dense_fn = jax.jit(lambda m, i: m(i, KVCache.zeros(cfg, i.shape[0], i.shape[1]), 0)[0])
        print(f"\n== ppl on {len(windows)} windows of {windows.shape[1] - 1} tokens spread over KJV characters "
              f"{start:,}-{len(text):,}, after all the training text ==")
        out["held_out_windows"] = held_out_table(cfg, lambda i: dense_fn(model, i), blocks, windows, rcfg.eval_top_ks,
                                                 lambda k: (fs + k * fe) / cfg.d_ff)
        out["held_out_windows"]["first_char"] = start

    kr = rcfg.target_top_k
    # Router vs oracle on the evaluation text, on the dense model's hidden states (what the routers trained on; a
    # distilled model's k = E run is the dense model plus its corrections, so it is not used here).
    dense_h = mb.dense_mlp_inputs(cfg, dense_blocks, ids)
    rec = []
    for i in range(L):
        gw = blocks[moe.gate_block_id(i)]
        h = dense_h[i].reshape(-1, cfg.d_model)
        mass = np.asarray(mb.expert_mass(dense_blocks[f"layers.{i}.mlp"], partition.neurons_LxExFe[i], h))
        pred = topk_np(np.asarray(moe.moe_router_probs(gw, h)), kr)
        rec.append(float((pred & topk_np(mass, kr)).sum() / (kr * len(h))))
    out["router_eval_recall_L"] = rec
    print(f"\n== router top-{kr} vs activation-mass top-{kr} on the evaluation text (dense hidden states) ==")
    print(f"recall mean {np.mean(rec):.3f}, min {np.min(rec):.3f} (layer {int(np.argmin(rec))}), max {np.max(rec):.3f}")

    # Usage and speculative routing in the top-kr routed model, and with every expert run (k = E: the dense model,
    # plus its corrections where distilled; what a runtime that keeps quality would see).
    for run_k in dict.fromkeys((kr, E)):
        moe_in, moe_out = collected[run_k] if run_k in collected else \
            moe_forward(cfg, blocks, ids, top_k=run_k, collect=True)[1:]
        masks = routed_masks(cfg, blocks, moe_in, kr)
        out[f"usage_run_k{run_k}"] = usage_table(masks, kr, run_k, verbose=run_k == kr)
        out[f"repetition_run_k{run_k}"] = repetition_table(cfg, blocks, moe_in, kr)
        out[f"speculative_run_k{run_k}"] = speculative_table(cfg, blocks, moe_in, moe_out, masks, kr, run_k)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    try:
        main()
    except ModelError as e:  # a bad router config or flag: one line, exit 2
        print(f"moe_quality: {e}", file=sys.stderr)
        sys.exit(2)
