"""The routed Llama family as `ModelSpec`s: the MoE SmolLM2 (real, built by MoEfication, `moe.py` / `moe_build.py`)
and Mixtral-8x7B (shape-only, its published config).

Blocks per layer i: `layers.i.attn`, `layers.i.moe_gate` (kind `norm`: the FFN norm and the router [D, E], tiny and
read by every token; `moe.py` says why not `mlp`; kind `mlp` where it also holds a shared part) and
`layers.i.expert.e` (kind `expert`, tagged with e). A pass:
`embed`, per layer attn then the router (`route`), then the experts its router chose (ascending), `final_norm`, the
head (the tied `embed`, or Mixtral's `lm_head`).
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from .gguf_source import LlamaConfig
from .llama import HEAD, Block, KVCache
from .llama_spec import kind_of, llama_leaf_shapes
from .moe import gate_block_id, gate_kind
from .spec import ModelSpec, Position
from .block_ids import expert_block_id, layer_block_id

MIXTRAL_8X7B = LlamaConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
                           rope_base=1e6, norm_eps=1e-5, context_length=32768)
ROUTER_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "moe" / "router.yaml"
SHARED_ROUTER_CONFIG = ROUTER_CONFIG.with_name("router_shared.yaml")  # the shared-expert variant's


class MoELlamaModel(nnx.Module):
    """A routed Llama decoder's parameters: embedding, per layer attention, router and E experts, final norm, head."""

    def __init__(self, cfg: LlamaConfig, source, n_experts: int, tied: bool = True, shared: bool = False):
        L = cfg.n_layers
        self.embed = Block("embed", "embed", -1, source("embed"))
        self.attn = nnx.List([Block(layer_block_id(i, "attn"), "attn", i, source(layer_block_id(i, "attn")))
                              for i in range(L)])
        self.gates = nnx.List([Block(gate_block_id(i), gate_kind(shared), i, source(gate_block_id(i)))
                               for i in range(L)])
        self.experts = nnx.List([Block(expert_block_id(i, e), "expert", i, source(expert_block_id(i, e)), expert=e)
                                 for i in range(L) for e in range(n_experts)])
        self.final_norm = Block("final_norm", "norm", L, source("final_norm"))
        self.head = None if tied else Block(HEAD, "embed", L + 1, source(HEAD))


def moe_leaf_shapes(cfg: LlamaConfig, n_experts: int, expert_d_ff: int, router_bias: bool,
                    shared_d_ff: int = 0) -> dict:
    """{block kind: {leaf: shape}}: the Llama shapes with the router (and a shared part of `shared_d_ff` neurons)
    and one expert of `expert_d_ff` neurons."""
    D, F, Fs = cfg.d_model, expert_d_ff, shared_d_ff
    shapes = llama_leaf_shapes(cfg)
    shared = {"shared_w_gate": (D, Fs), "shared_w_up": (D, Fs), "shared_w_down": (Fs, D)} if Fs else {}
    shapes["moe_gate"] = {"ffn_norm": (D,), "router_w": (D, n_experts), **({"router_b": (n_experts,)}
                                                                           if router_bias else {}), **shared}
    shapes["expert"] = {"w_gate": (D, F), "w_up": (D, F), "w_down": (F, D)}
    return shapes




class MoESpec(ModelSpec):
    """A routed Llama. `config`: its (dense) config or a zero-argument loader of it; `build`: a zero-argument loader
    of (block source, tokenizer) (None: shape-only). The block table needs only the config: the MoE is built the
    first time its weights are read."""

    in_place_ops = ("expert",)

    def __init__(self, name: str, config, n_experts: int, top_k: int, expert_d_ff: int | None = None, *, tied: bool,
                 router_bias: bool, build=None, note: str = "", requirements: tuple = (), shared_d_ff: int = 0):
        self.name, self._config, self.n_experts, self.top_k, self.tied = name, config, n_experts, top_k, tied
        self._expert_d_ff, self._shared_d_ff = expert_d_ff, shared_d_ff
        self.router_bias, self._build, self.note, self.requirements = router_bias, build, note, requirements
        self.has_weights = build is not None

    @property
    def config(self) -> LlamaConfig:
        if callable(self._config):
            self._config = self._config()
        return self._config

    @property
    def shared_d_ff(self) -> int:
        """Neurons per layer every token runs (0: no shared part); may be given as a function of the config."""
        if callable(self._shared_d_ff):
            self._shared_d_ff = self._shared_d_ff(self.config)
        return self._shared_d_ff

    @property
    def expert_d_ff(self) -> int:
        return self._expert_d_ff or (self.config.d_ff - self.shared_d_ff) // self.n_experts

    @property
    def n_layers(self) -> int:
        return self.config.n_layers

    def source(self):
        if self._build is None:
            return None
        if not hasattr(self, "_source"):
            self._source, self._tokenizer = self._build()
        return self._source

    def abstract_model(self):
        cfg = self.config
        shapes = moe_leaf_shapes(cfg, self.n_experts, self.expert_d_ff, self.router_bias, self.shared_d_ff)
        fn = lambda b: {k: jnp.zeros(s, jnp.float32) for k, s in shapes[kind_of(b)].items()}  # noqa: E731
        return nnx.eval_shape(lambda: MoELlamaModel(cfg, fn, self.n_experts, self.tied, self.shared_d_ff > 0))

    def tokenizer(self):
        if not self.has_weights:
            return super().tokenizer()
        self.source()
        return self._tokenizer

    def bos_id(self) -> int:
        from .smollm2 import bos_id

        return bos_id(self.tokenizer())

    def skeleton(self) -> list[Position]:
        L = self.n_layers
        out = [Position("embed", "embed", -1)]
        for i in range(L):
            out += [Position(layer_block_id(i, "attn"), "attn", i), Position(gate_block_id(i), "route", i)]
        head = "embed" if self.tied else HEAD
        return out + [Position("final_norm", "norm", L), Position(head, "head", self.block_info[head].layer)]

    def experts(self, layer: int, selected_E) -> list[Position]:
        return [Position(expert_block_id(layer, int(e)), "expert", layer, int(e))
                for e in np.flatnonzero(np.asarray(selected_E))]

    def compute(self, dtype):
        from .moe_compute import MoECompute

        if not self.has_weights:
            return super().compute(dtype)
        return MoECompute(self.config, dtype, self.n_experts, self.top_k)

    def new_cache(self, batch: int, max_len: int, dtype):
        return KVCache.zeros(self.config, batch, max_len, dtype)


def smollm2_moe_spec(router_config: str = "", top_k: int = 0, name: str = "smollm2-135m-moe") -> MoESpec:
    """The MoE SmolLM2 of `router_config` (default `default_config`): E, the shared part and the trained top_k from
    it, `top_k` > 0 overriding the k a run routes with. Built on first use (about 2 minutes; a distilled config loads
    the store shipped in models/shipped/moe, or trains for about 50 minutes) and cached on disk.
    `name`: smollm2-135m-moe (no shared part, configs/moe/router.yaml) or smollm2-135m-moe-shared (a shared part,
    configs/moe/router_shared.yaml)."""
    from . import moe_build as mb
    from .errors import MoEError

    default_config = SHARED_ROUTER_CONFIG if name.endswith("-shared") else ROUTER_CONFIG
    from .gguf_source import SMOLLM2_REQUIREMENT, load_smollm2_source

    rcfg = mb.load_router_config(router_config or default_config)
    if rcfg.model != name:
        raise MoEError(f"moe.router_config {router_config} builds {rcfg.model}, not {name}: set model: {rcfg.model} "
                       f"or choose that model's router config")
    k = top_k or rcfg.target_top_k
    if not 1 <= k <= rcfg.n_experts:
        raise MoEError(f"moe.top_k must lie in [1, {rcfg.n_experts}], got {k}")

    def build():
        from .corpus import kjv_text
        from .moe import moe_source
        from .moe_store import build_or_load
        from .smollm2 import bos_id
        from .tokenizer import tokenizer_from_gguf_metadata

        dense = load_smollm2_source()
        tok = tokenizer_from_gguf_metadata(dense.tokenizer_metadata())
        partition, routers, deltas = build_or_load(dense, tok, lambda n: kjv_text(max_chars=n), bos_id(tok), rcfg,
                                                   say=lambda m: None)
        return moe_source(dense, partition, routers, deltas), tok

    return MoESpec(rcfg.model, lambda: load_smollm2_source().config, rcfg.n_experts, k, tied=True, router_bias=True,
                   build=build, shared_d_ff=lambda c: mb.shared_neurons(rcfg, c.d_ff),
                   requirements=((SMOLLM2_REQUIREMENT, "SmolLM2-135M-Instruct, GGUF Q4_1 (the MoE is built from it)"),),
                   note="SmolLM2 weights were 4-bit (Q4_1) to begin with; its MoE is made of the dense MLPs' neurons")


def mixtral_spec(**_options) -> MoESpec:
    return MoESpec("mixtral-8x7b", MIXTRAL_8X7B, 8, 2, MIXTRAL_8X7B.d_ff, tied=False, router_bias=False)
