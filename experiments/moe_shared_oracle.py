"""How far a shared part plus routed experts gets SmolLM2 without training: the MoE issue's quality target, bounded.

Each layer's MLP neurons are split, with no training at all, into a shared part (the fraction `f` of neurons with the
most mean activation mass |silu(h·g_n)·(h·u_n)|·‖w_down[n]‖ on calibration text, always computed) and E = 8 routed
experts made from the rest (balanced spherical k-means on [w_gate; w_up] columns, as `models/moe_build.py` does).
Each token then runs the shared part and the k experts carrying the most activation mass *for that token*: an oracle
router (it computes the whole MLP to choose), so no trained router can route better on this partition. Perplexity
on held-out KJV text (the evaluation text, BOS + 256 tokens; calibration uses 1,023 tokens from character 200,000
on), beside the dense model. SmolLM2 was 4-bit (Q4_1) to begin with; every figure here is that model in float32.

What it shows: the issue's target (top-2 within 1.3x of dense perplexity at no more than 60% of the dense MLP's
compute) is out of reach of any router over these 8 experts on this model; it needs training that changes the
weights (distillation into the experts, or corrections), which this script does not do. A selection of each token's own
neurons at the same compute would reach it without training (experiments/moe_granularity.py): the limit is the
grouping into 8 experts, not the compute.

Run: python experiments/moe_shared_oracle.py [--shared 0 0.25 0.4] [--write]   (about 40 s on this 2-core CPU)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EXPERTS = 8


def main() -> int:
    from vorch_jax.models import llama_layers as L
    from vorch_jax.models.block_ids import layer_block_id
    from vorch_jax.models.corpus import kjv_text
    from vorch_jax.models.moe_build import activation_mass, most_massive, partition_layer
    from vorch_jax.models.registry import get

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=float, nargs="+", default=[0.0, 0.25, 0.4])
    ap.add_argument("--write", action="store_true", help="write experiments/results/moe_shared_oracle.txt")
    a = ap.parse_args()
    spec = get("smollm2-135m")
    src, cfg, tok = spec.source(), spec.config, spec.tokenizer()
    text = kjv_text(max_chars=260_000)
    eval_ids = np.asarray([spec.bos_id()] + tok.encode(text[:4000]).ids[:256], np.int32)
    cal_ids = np.asarray([spec.bos_id()] + tok.encode(text[200_000:]).ids[:1023], np.int32)
    W = {b.id: {k: jnp.asarray(v) for k, v in src(b.id).items()} for b in spec.blocks()}
    mlp = [W[layer_block_id(i, "mlp")] for i in range(cfg.n_layers)]

    def forward(ids_T, mlp_acts):
        """(logits [T, V], each layer's SwiGLU activations [T, F]) with `mlp_acts(layer, act_TxF)` choosing which
        activations reach w_down."""
        T = ids_T.shape[0]
        x = L.embed_tokens(W["embed"], jnp.asarray(ids_T)[None], jnp.float32)
        kv = jnp.zeros((1, T, cfg.n_kv_heads, cfg.head_dim), jnp.float32)
        acts = []
        for i in range(cfg.n_layers):
            x, _, _ = L.attention_block(cfg, W[layer_block_id(i, "attn")], x, kv, kv, 0)
            h = L.rms_norm(x, mlp[i]["ffn_norm"], cfg.norm_eps)
            act_TxF = (jax.nn.silu(h @ mlp[i]["w_gate"]) * (h @ mlp[i]["w_up"]))[0]
            acts.append(act_TxF)
            x = x + (mlp_acts(i, act_TxF) @ mlp[i]["w_down"])[None]
        return L.lm_head(cfg, W["final_norm"], W["embed"], x)[0], acts

    def ppl(logits_TxV, ids_T) -> float:
        lp = jax.nn.log_softmax(logits_TxV[:-1], -1)
        return float(jnp.exp(-jnp.take_along_axis(lp, jnp.asarray(ids_T[1:])[:, None], 1).mean()))

    dense = ppl(forward(eval_ids, lambda i, act: act)[0], eval_ids)
    _, cal_acts = forward(cal_ids, lambda i, act: act)
    lines = [f"# python experiments/moe_shared_oracle.py --shared {' '.join(map(str, a.shared))}  (this CPU)",
             f"SmolLM2-135M (Q4_1 to begin with), float32; held-out KJV, 256 tokens: dense ppl {dense:.2f}",
             f"{'shared':>6} {'k':>2} {'MLP compute':>11} {'oracle-routed ppl':>17} {'x dense':>8}"]
    for f in a.shared:
        n_shared = int(round(f * cfg.d_ff / EXPERTS)) * EXPERTS  # the rest splits into equal experts
        shared, experts = [], []
        for i in range(cfg.n_layers):
            mlp_np = {k: np.asarray(v) for k, v in mlp[i].items()}
            shared_Fs = most_massive(activation_mass(cal_acts[i], mlp_np["w_down"]), n_shared)
            keep_F = np.zeros(cfg.d_ff, np.float32)
            keep_F[shared_Fs] = 1
            shared.append(jnp.asarray(keep_F))
            experts.append(jnp.asarray(partition_layer(mlp_np, EXPERTS, seed=i, iters=20, shared_Fs=shared_Fs)))
        for k in (1, 2, 4):
            def routed(i, act_TxF, k=k):
                ex = experts[i]  # [E, Fe]
                mass_TxE = jnp.abs(act_TxF)[:, ex].sum(-1)
                chose_TxE = jax.nn.one_hot(jax.lax.top_k(mass_TxE, k)[1], EXPERTS).sum(1)
                keep_TxF = jnp.zeros_like(act_TxF).at[:, ex.reshape(-1)].set(
                    jnp.repeat(chose_TxE, ex.shape[1], axis=1))
                return act_TxF * jnp.maximum(keep_TxF, shared[i][None])
            p = ppl(forward(eval_ids, routed)[0], eval_ids)
            lines.append(f"{f:6.3f} {k:2d} {f + (1 - f) * k / EXPERTS:11.3f} {p:17.2f} {p / dense:8.2f}")
    text_out = "\n".join(lines)
    print(text_out)
    if a.write:
        (ROOT / "experiments" / "results" / "moe_shared_oracle.txt").write_text(text_out + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
