"""Per-block ΔKL of int8 and int4 on the evaluation text beside the calibration text: why mixed precision cannot beat
uniform int8 at equal bytes on SmolLM2.

Run:   .venv/bin/python experiments/eval_text_sensitivity.py [--eval-tokens 256] [--tokens 64]
Takes: about 4 minutes on 2 CPU cores (two lossy forwards per block and text, 62 blocks, two texts).

For each block of SmolLM2 (whose weights were 4-bit Q4_1 to begin with; "resident" is that model in float32), the
mean KL to the resident logits when that block alone is held in S1 (int8) or S2 (int4, group 64), on the run's
evaluation text (the KJV from its start, what every run's quality pass reads) and on the calibration text (64
tokens, 200k characters further on, what `vorch calibrate` measures and the quality budget allocates by). Then the
KL of every layer block in int8 at once on the evaluation text (what streaming all of them from int8 homes does).
A lossy plan beats uniform int8 at equal link bytes only by holding some blocks in full precision (4x the bytes)
paid for by others in int4 (half): it can, only if some block's int4 costs less KL than the int8 it replaces gains.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from vorch_jax.config import load_config  # noqa: E402
from vorch_jax.controller import sensitivity as S  # noqa: E402
from vorch_jax.controller.calibrate import model_block_ids  # noqa: E402
from vorch_jax.runtime.setup import build_setup  # noqa: E402


def block_kl(cfg, W, order, ids, blocks, states, quant):
    """{block: {state: ΔKL}} on `ids`, and the KL of `blocks` all in S1 at once."""
    inp = jnp.asarray(np.asarray(ids)[None, :-1])
    ref = S.run_from(cfg, W, order, inp)[0]
    out = {}
    for b in blocks:
        out[b] = {}
        for s in states:
            ws = S.convert(W[b], s, **quant)
            out[b][s] = float(S.kl_mean(ref, S.run_from(cfg, {**W, b: ws}, order, inp)[0]))
    all8 = {**W, **{b: S.convert(W[b], "S1", **quant) for b in blocks}}
    return out, float(S.kl_mean(ref, S.run_from(cfg, all8, order, inp)[0]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval-tokens", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=64, help="calibration tokens")
    args = ap.parse_args(argv)
    setup = build_setup(load_config("configs/demo.yaml", [f"eval_tokens={args.eval_tokens}"]))
    src = setup.source
    order = model_block_ids(src.config)
    W = {b: {k: jnp.asarray(v) for k, v in src(b).items()} for b in order}
    blocks = [b for b in order if b.startswith("layers.")]
    quant = dict(int4_group_size=64, lowrank_rank=32)
    texts = {"evaluation": setup.eval_ids, "calibration": S.calibration_ids(src, args.tokens)}
    kl, all8 = {}, {}
    for name, ids in texts.items():
        kl[name], all8[name] = block_kl(src.config, W, order, ids, blocks, ("S1", "S2"), quant)
    print(f"{jax.default_backend()}, jax {jax.__version__}; smollm2-135m (Q4_1 to begin with), {len(blocks)} layer "
          f"blocks; evaluation text {len(setup.eval_ids) - 1} tokens, calibration text {args.tokens} tokens")
    print(f"{'block':16s} {'S1 eval':>9s} {'S1 calib':>9s} {'S2 eval':>9s} {'S2 calib':>9s} {'S2 eval/calib':>13s}")
    for b in blocks:
        e, c = kl["evaluation"][b], kl["calibration"][b]
        print(f"{b:16s} {e['S1']:9.5f} {c['S1']:9.5f} {e['S2']:9.5f} {c['S2']:9.5f} {e['S2'] / c['S2']:13.1f}")
    for name in texts:
        s1 = sum(kl[name][b]["S1"] for b in blocks)
        s2 = sorted((kl[name][b]["S2"], b) for b in blocks)
        print(f"{name}: every layer block int8 at once {all8[name]:.5f} nats (sum of single-block ΔKL {s1:.5f}); "
              f"smallest single-block int4 ΔKL {s2[0][0]:.5f} ({s2[0][1]}), median "
              f"{s2[len(s2) // 2][0]:.5f}, largest {s2[-1][0]:.5f} ({s2[-1][1]})")
    e = kl["evaluation"]
    cheap = [b for b in blocks if e[b]["S2"] - e[b]["S1"] < all8["evaluation"] / len(blocks)]
    print(f"blocks whose int4 costs, over their int8, less than an average block's share of the all-int8 KL "
          f"({all8['evaluation'] / len(blocks):.5f}): {len(cheap)} {cheap[:8]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
