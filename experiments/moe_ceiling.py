"""How much an expert cache's eviction rule can save, by what it knows: the MoE SmolLM2's routing on held-out text.

    .venv/bin/python experiments/moe_ceiling.py configs/moe/router_shared.yaml [--tokens 512] [--fractions 0.25 0.5]

The MoE issue asks the scored policy to move at least 15% fewer expert bytes than the better of lru and lfu. Every
expert of one model has the same size, so bytes are loads. This replays one long stream of expert reads under rules
that know more and more (`moe_policies.replay_bounds`): lru and lfu; `expected` (Belady's rule on online router
frequencies: what the scored policy evicts by); `expected-oracle` (true frequencies, and the current pass's routing
known exactly: more than any speculation supplies); `lookahead-j` (also the next j tokens' routing known exactly);
Belady (the whole future). The stream: the model's own top-k routing, teacher-forced on `--tokens` tokens of KJV
from the start of the book (text the routers never trained on), each token a pass reading every layer's chosen
experts in layer order; a cache of a fraction of all experts. The first row whose loads lie 15% under the better of
lru and lfu shows how much of the future such a target asks a policy to know.
Takes: about a minute on 2 CPU cores (the stored or shipped MoE loads; see models/moe_store.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments.moe_policies import TARGET_UNDER_SIMPLE, replay_bounds  # noqa: E402
from vorch_jax.errors import VorchError  # noqa: E402
from vorch_jax.models.errors import ModelError  # noqa: E402
from vorch_jax.models import llama_layers as Lay  # noqa: E402
from vorch_jax.models import moe  # noqa: E402
from vorch_jax.models import moe_build as mb  # noqa: E402
from vorch_jax.models.moe_store import build_or_load  # noqa: E402
from vorch_jax.models.corpus import kjv_text  # noqa: E402
from vorch_jax.models.gguf_source import load_smollm2_source  # noqa: E402
from vorch_jax.models.smollm2 import bos_id  # noqa: E402
from vorch_jax.models.tokenizer import tokenizer_from_gguf_metadata  # noqa: E402

LOOKAHEADS = (0, 1, 2, 4, 8)


def routed_stream(rcfg, n_tokens: int) -> tuple[list[str], int, int]:
    """(expert block ids in read order, layers, experts): top-k routing of the MoE on BOS + `n_tokens` KJV tokens."""
    src = load_smollm2_source()
    cfg = src.config
    tok = tokenizer_from_gguf_metadata(src.tokenizer_metadata())
    bos = bos_id(tok)
    ms = moe.moe_source(src, *build_or_load(src, tok, lambda n: kjv_text(max_chars=n), bos, rcfg))
    blocks = {b: ms(b) for b in ms.block_ids}
    ids = tok.encode(kjv_text(max_chars=16 * n_tokens + 1000)).ids[:n_tokens]
    ids_BxT = jnp.asarray(np.asarray([bos] + ids, np.int32)[None])
    forward = jax.jit(moe.moe_forward, static_argnames=("cfg", "top_k", "collect"))
    _, moe_in, _ = forward(cfg, blocks, ids_BxT, top_k=rcfg.target_top_k, collect=True)
    E, L = rcfg.n_experts, cfg.n_layers
    chosen_LxTxE = []
    for i in range(L):
        gw = blocks[moe.gate_block_id(i)]
        probs = moe.moe_router_probs(gw, Lay.rms_norm(moe_in[i], gw["ffn_norm"], cfg.norm_eps)).reshape(-1, E)
        chosen_LxTxE.append(np.asarray(moe.topk_mask(probs, rcfg.target_top_k)))
    T = chosen_LxTxE[0].shape[0]
    return [moe.expert_block_id(i, int(e)) for t in range(T) for i in range(L)
            for e in np.flatnonzero(chosen_LxTxE[i][t])], L, E


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", help="router config, e.g. configs/moe/router_shared.yaml")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5])
    args = ap.parse_args(argv)
    try:
        rcfg = mb.load_router_config(args.config)
        if args.tokens < 2 or not all(0 < f < 1 for f in args.fractions):
            raise VorchError("--tokens must be at least 2 and --fractions in (0, 1)")
        if 16 * args.tokens + 1000 > rcfg.calib_char_offset:
            raise VorchError(f"--tokens {args.tokens} would read KJV past character {rcfg.calib_char_offset}, where "
                             "the routers' training text begins: ask for fewer")
    except (VorchError, ModelError) as e:
        print(f"moe_ceiling: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    stream, L, E = routed_stream(rcfg, args.tokens)
    print(f"{args.config}: E={E}, top-{rcfg.target_top_k}, {L} layers; {len(stream)} expert reads over "
          f"{args.tokens + 1} tokens (BOS + KJV from its start), routed in {time.perf_counter() - t0:.1f} s")
    for frac in args.fractions:
        slots = int(round(frac * L * E))
        t0 = time.perf_counter()
        loads = replay_bounds(stream, slots, L, E, lookaheads=LOOKAHEADS)
        simple = min(loads["lru"], loads["lfu"])
        print(f"\n{frac:.0%} of the experts ({slots} slots; replayed in {time.perf_counter() - t0:.1f} s): loads, "
              f"and against the better of lru and lfu ({simple})")
        order = ["lru", "lfu", "expected", "expected-oracle"] + [f"lookahead-{j}" for j in LOOKAHEADS] + ["belady"]
        for rule in order:
            print(f"  {rule:16s} {loads[rule]:7d} {loads[rule] / simple - 1:+8.1%}  "
                  f"{loads[rule] / loads['belady']:5.2f}x belady")
        first = next((r for r in order if loads[r] <= (1 - TARGET_UNDER_SIMPLE) * simple), None)
        print(f"  first rule {TARGET_UNDER_SIMPLE:.0%} under the better of lru and lfu: {first}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
