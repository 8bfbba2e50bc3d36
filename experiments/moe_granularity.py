"""What bounds the MoE SmolLM2's quality at a fixed MLP compute: how finely the routed neurons are grouped.

No training and an oracle router, so that neither weights nor router error enter: each layer keeps the shared part of
the router config's MoE (its stored partition's shared neurons) and splits the other neurons into E equal experts
(balanced spherical k-means on [w_gate; w_up] columns, `moe_build.partition_layer`); each token runs the shared part
and the k experts carrying the most activation mass for that token. E = 8, 16, then experts of 32 and 16 neurons
(`groupings`) at k = E/8, E/4, E/2, then the finest grouping, one neuron per expert: each token keeps
the routed neurons of largest |silu(h·g_n)·(h·u_n)|·‖w_down[n]‖, with the shared part fixed, and with no shared part
at all (any neurons, as many as the E = 8, top-2 MoE runs).

Perplexity over the router config's held-out windows (`moe_build.held_out_windows`: spread over the KJV text after all
the training text) beside the dense model. SmolLM2 was 4-bit (Q4_1) to begin with; every figure is that model in
float32. Results: experiments/results/moe_granularity.txt.

Run: .venv/bin/python experiments/moe_granularity.py [configs/moe/router_shared.yaml]   (about 3 min on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from experiments.moe_quality import window_nlls  # noqa: E402
from vorch_jax.models import llama_layers as Lay  # noqa: E402
from vorch_jax.models import moe_build as mb  # noqa: E402
from vorch_jax.models import moe_distill as md  # noqa: E402
from vorch_jax.models import moe_store as store  # noqa: E402
from vorch_jax.models.corpus import kjv_text  # noqa: E402
from vorch_jax.models.errors import ModelError  # noqa: E402
from vorch_jax.models.gguf_source import load_smollm2_source  # noqa: E402
from vorch_jax.models.moe import topk_mask  # noqa: E402
from vorch_jax.models.smollm2 import bos_id  # noqa: E402
from vorch_jax.models.tokenizer import tokenizer_from_gguf_metadata  # noqa: E402

GROUPINGS = (8, 16)  # experts per layer, then as many as give experts of 32 and of 16 neurons


def groupings(routed: int) -> list[int]:
    """Experts per layer to try for `routed` neurons outside the shared part: GROUPINGS, then experts of 32 and 16
    neurons (608 shared of 1536: E = 8, 16, 29, 58; 704: 8, 16, 26, 52); only those that divide `routed`."""
    return [E for E in dict.fromkeys(GROUPINGS + (routed // 32, routed // 16)) if E and routed % E == 0]


def oracle_logits(cfg, weights, shared_LxF, experts_LxExF, ids_BxT, k: int, per_neuron: int = 0):
    """float32 [B, T, V]: each token runs the shared neurons and its k experts of most activation mass; with
    `per_neuron` > 0 instead its `per_neuron` routed neurons of largest |act|·‖w_down row‖ (experts unused)."""
    B, T = ids_BxT.shape
    x = Lay.embed_tokens(weights["embed"], ids_BxT, jnp.float32)
    kv = jnp.zeros((B, T, cfg.n_kv_heads, cfg.head_dim), jnp.float32)

    def layer(x, p):
        attn, mlp, shared_F, experts_ExF = p
        x = Lay.attention_block(cfg, attn, x, kv, kv, 0)[0]
        h = Lay.rms_norm(x, mlp["ffn_norm"], cfg.norm_eps)
        act_BxTxF = jax.nn.silu(h @ mlp["w_gate"]) * (h @ mlp["w_up"])
        if per_neuron:
            score_BxTxF = jnp.abs(act_BxTxF) * jnp.linalg.norm(mlp["w_down"], axis=-1) * (1 - shared_F)
            keep_BxTxF = (score_BxTxF >= jax.lax.top_k(score_BxTxF, per_neuron)[0][..., -1:]).astype(jnp.float32)
        else:
            keep_BxTxF = topk_mask(jnp.abs(act_BxTxF) @ experts_ExF.T, k).astype(jnp.float32) @ experts_ExF
        return x + (act_BxTxF * jnp.maximum(keep_BxTxF, shared_F)) @ mlp["w_down"], None

    x, _ = jax.lax.scan(layer, x, (weights["attn"], weights["mlp"], shared_LxF, experts_LxExF))
    return Lay.lm_head(cfg, weights["final_norm"], weights["embed"], x)


oracle_logits_jit = jax.jit(oracle_logits, static_argnames=("cfg", "k", "per_neuron"))


def _mean_nll(logits_fn, windows_NxT) -> float:
    return float(window_nlls(logits_fn, windows_NxT).mean())  # moe_quality's per-window nll


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default="configs/moe/router_shared.yaml", help="a router config with a "
                    "shared part (its stored MoE supplies the shared neurons)")
    args = ap.parse_args(argv)
    rcfg = mb.load_router_config(args.config)
    if not rcfg.shared_fraction or not rcfg.eval_windows:
        raise mb.RouterConfigError(f"{args.config}: needs shared_fraction > 0 and eval_windows > 0")
    src = load_smollm2_source()
    cfg, tok = src.config, tokenizer_from_gguf_metadata(src.tokenizer_metadata())
    partition, routers, _ = store.build_or_load(src, tok, lambda n: kjv_text(max_chars=n), bos_id(tok), rcfg,
                                                say=lambda m: None)
    text = kjv_text()
    windows, start = mb.held_out_windows(tok, text, bos_id(tok), rcfg)
    weights = md.stacked_weights(src, partition, routers)
    fs, F = partition.n_shared, cfg.d_ff
    dense = _mean_nll(lambda i: md.routed_logits(cfg, weights, None, i, 0), windows)
    print(f"{args.config}: {len(windows)} held-out windows of {windows.shape[1] - 1} tokens from KJV character "
          f"{start:,} on; dense ppl {math.exp(dense):.3f}; shared part {fs} of {F} neurons; oracle routing, no training")
    print(f"{'experts':>8} {'neurons':>7} {'top-k':>5} {'MLP compute':>11} {'ppl':>8} {'x dense':>7}")
    for E in groupings(F - fs):
        part = mb.build_partition(src, E, rcfg.seed, rcfg.kmeans_iters, None, partition.shared_LxFs)
        shared_LxF, experts_LxExF = (jnp.asarray(a) for a in md.neuron_masks(part, F))
        fe = part.neurons_LxExFe.shape[2]
        for k in sorted({max(1, E // 8), E // 4, E // 2}):
            v = _mean_nll(lambda i: oracle_logits_jit(cfg, weights, shared_LxF, experts_LxExF, i, k=k), windows)
            print(f"{E:>8} {fe:>7} {k:>5} {(fs + k * fe) / F:>11.3f} {math.exp(v):>8.3f} {math.exp(v - dense):>7.3f}",
                  flush=True)
    fe8 = (F - fs) // rcfg.n_experts
    routed = rcfg.target_top_k * fe8
    for label, shared_LxF, n in (("neuron", weights["shared"], routed),
                                 ("neuron*", jnp.zeros_like(weights["shared"]), fs + routed)):
        v = _mean_nll(lambda i: oracle_logits_jit(cfg, weights, shared_LxF, weights["experts"], i, k=1,
                                                 per_neuron=n), windows)
        print(f"{label:>8} {1:>7} {n:>5} {(fs + routed) / F:>11.3f} {math.exp(v):>8.3f} {math.exp(v - dense):>7.3f}")
    print("neuron: each token's own routed neurons beside the shared part; neuron*: its own neurons, no shared part")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ModelError as e:
        print(f"moe_granularity: {e}", file=sys.stderr)
        sys.exit(2)
