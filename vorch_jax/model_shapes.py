"""Block tables of models from their configuration alone: the real model code under `nnx.eval_shape`, no weights.

`model_shape("llama-2-70b")` builds `models.llama.LlamaModel` (and, for what it lacks, the same `models.llama.Block`
modules: an untied LM head, MoE routers and experts) inside `nnx.eval_shape`, whose source hands out
`jnp.zeros(shape, dtype)` under tracing: every parameter is a `ShapeDtypeStruct`, nothing is allocated. Blocks,
kinds and layers are read back from the parameters' residency metadata (`models.blocks.block_param`), so the table is
the one the runtime would see.

Block ids: `embed`, `layers.{i}.attn`, `layers.{i}.mlp` (dense), `layers.{i}.moe_gate` and `layers.{i}.expert.{e}`
(MoE: the router holds the FFN norm and the gate [D, E]; each expert its SwiGLU), `final_norm`, `lm_head` (untied).

A forward pass is a list of positions `(block, op)`: op is `lookup` (embedding rows), `attn`, `mlp`, `router`,
`expert`, `norm` or `head`. The simulator prices each with `flops` and `bytes_read`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vorch_jax.models.gguf_source import LlamaConfig
from vorch_jax.models.llama import Block, LlamaModel

# SmolLM2-135M-Instruct as its GGUF metadata states it (a test checks these against the file).
SMOLLM2_135M = LlamaConfig(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_ff=1536,
                           rope_base=100000.0, norm_eps=9.999999747378752e-06, context_length=8192)
# Published configs (the models' config.json on the Hugging Face hub).
LLAMA2_70B = LlamaConfig(vocab_size=32000, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, d_ff=28672,
                         rope_base=10000.0, norm_eps=1e-5, context_length=4096)
LLAMA3_8B = LlamaConfig(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
                        rope_base=500000.0, norm_eps=1e-5, context_length=8192)
# The MoE SmolLM2 built here (models/moe_build.py, configs/moe/router.yaml): each layer's 1536 neurons in 8 experts
# of 192; d_ff below is one expert's.
SMOLLM2_135M_MOE = dataclasses.replace(SMOLLM2_135M, d_ff=1536 // 8)
MIXTRAL_8X7B = LlamaConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
                           rope_base=1e6, norm_eps=1e-5, context_length=32768)

# name -> (config, tied embedding?, experts, experts per token)
MODELS = {
    "smollm2-135m": (SMOLLM2_135M, True, 0, 0),
    "smollm2-135m-moe": (SMOLLM2_135M_MOE, True, 8, 2),
    "llama-2-70b": (LLAMA2_70B, False, 0, 0),
    "llama-3-8b": (LLAMA3_8B, False, 0, 0),
    "mixtral-8x7b": (MIXTRAL_8X7B, False, 8, 2),
}
# MoE models whose routers carry a bias [E] (models/moe.py's trained routers do; Mixtral's router is a bare linear).
ROUTER_BIAS = frozenset({"smollm2-135m-moe"})


def _leaf_shapes(cfg: LlamaConfig, n_experts: int, router_bias: bool = False) -> dict[str, dict[str, tuple]]:
    """{block kind: {leaf: shape}} in the runtime's layout ([in, out]; the embedding in head layout [D, V])."""
    D, F, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return {
        "embed": {"embedding": (D, V)},
        "attn": {"attn_norm": (D,), "wq": (D, q), "wk": (D, kv), "wv": (D, kv), "wo": (q, D)},
        "mlp": {"ffn_norm": (D,), "w_gate": (D, F), "w_up": (D, F), "w_down": (F, D)},
        "moe_gate": {"ffn_norm": (D,), "router_w": (D, max(1, n_experts)),
                     **({"router_b": (max(1, n_experts),)} if router_bias else {})},
        "expert": {"w_gate": (D, F), "w_up": (D, F), "w_down": (F, D)},
        "norm": {"norm": (D,)},
        "lm_head": {"embedding": (D, V)},
    }


class _Extra(nnx.Module):
    """What LlamaModel does not hold for these models: an untied head, MoE routers and experts (same Block class)."""

    def __init__(self, cfg: LlamaConfig, source, tied: bool, n_experts: int):
        self.head = None if tied else Block("lm_head", "embed", cfg.n_layers + 1, source("lm_head"))
        self.routers = nnx.List([Block(f"layers.{i}.moe_gate", "mlp", i, source(f"layers.{i}.moe_gate"))
                                 for i in range(cfg.n_layers)] if n_experts else [])
        self.experts = nnx.List([Block(f"layers.{i}.expert.{e}", "expert", i, source(f"layers.{i}.expert.{e}"))
                                 for i in range(cfg.n_layers) for e in range(n_experts)])


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """A model's block table and per-position cost inputs, from its config alone."""

    name: str
    cfg: LlamaConfig
    dtype: str
    tied: bool
    n_experts: int
    top_k: int
    block_ids: tuple  # table order
    leaves: dict  # block -> {leaf: ShapeDtypeStruct}
    kinds: dict  # block -> kind (embed, attn, mlp, expert, norm)
    layers: dict  # block -> layer (-1 embed, n_layers final norm, n_layers + 1 untied head)

    @functools.cached_property
    def device_bytes(self) -> dict:
        return {b: sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in self.leaves[b].values())
                for b in self.block_ids}

    @property
    def model_bytes(self) -> int:
        return sum(self.device_bytes.values())

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize

    def head_block(self) -> str:
        return "embed" if self.tied else "lm_head"

    def pass_positions(self, experts_per_layer=None) -> list[tuple[str, str]]:
        """One forward pass as (block, op); `experts_per_layer[i]` lists the experts layer i runs (MoE only)."""
        out = [("embed", "lookup")]
        for i in range(self.cfg.n_layers):
            out.append((f"layers.{i}.attn", "attn"))
            if self.n_experts:
                if experts_per_layer is None:
                    raise ValueError(f"{self.name} is a mixture of experts: a pass needs the experts each layer runs")
                out.append((f"layers.{i}.moe_gate", "router"))
                out += [(f"layers.{i}.expert.{e}", "expert") for e in sorted(experts_per_layer[i])]
            else:
                out.append((f"layers.{i}.mlp", "mlp"))
        return out + [("final_norm", "norm"), (self.head_block(), "head")]

    @functools.cached_property
    def _matmul_params(self) -> dict:
        return {b: sum(int(np.prod(s.shape)) for s in self.leaves[b].values() if len(s.shape) == 2)
                for b in self.block_ids}

    def matmul_params(self, block: str) -> int:
        """Parameters of the block's 2-D (matmul) leaves."""
        return self._matmul_params[block]

    def flops(self, block: str, op: str, tokens: int, context: int) -> float:
        """FLOPs of one position for `tokens` new tokens attending to `context` cached positions."""
        if op in ("lookup", "norm"):
            return 0.0
        f = 2.0 * tokens * self.matmul_params(block)
        if op == "attn":  # scores and weighted sum over the cache
            f += 4.0 * tokens * context * self.cfg.n_heads * self.cfg.head_dim
        return f

    def bytes_read(self, block: str, op: str, tokens: int, context: int, weight_bytes: int | None = None) -> float:
        """Device-memory bytes one position streams: its weights (rows only for a lookup) and the KV cache."""
        w = self.device_bytes[block] if weight_bytes is None else weight_bytes
        if op == "lookup":
            return float(tokens * self.cfg.d_model * self.itemsize)
        if op == "attn":
            return w + 2.0 * context * self.cfg.n_kv_heads * self.cfg.head_dim * self.itemsize
        return float(w)


def _shapes_of(cfg: LlamaConfig, tied: bool, n_experts: int, dtype, router_bias: bool = False
               ) -> tuple[dict, dict, dict, list]:
    kinds_leaves = _leaf_shapes(cfg, n_experts, router_bias)

    def kind_of(block: str) -> str:
        if block in ("embed", "lm_head"):
            return block
        if block == "final_norm":
            return "norm"
        return block.split(".")[2]

    def source(block: str) -> dict:
        return {k: jnp.zeros(s, dtype) for k, s in kinds_leaves[kind_of(block)].items()}

    def build():
        model = LlamaModel(cfg, source) if not n_experts else _DenseFree(cfg, source)
        return model, _Extra(cfg, source, tied, n_experts)

    model, extra = nnx.eval_shape(build)
    leaves, kinds, layers, order = {}, {}, {}, []
    for tree in (model, extra):
        for path, param in nnx.iter_graph(tree):
            if not isinstance(param, nnx.Param):
                continue
            meta = param.get_metadata()
            b = meta["block"]
            if b not in leaves:
                leaves[b], kinds[b], layers[b] = {}, meta["kind"], meta["layer"]
                order.append(b)
            v = param.get_value()
            leaves[b][str(path[-1])] = jax.ShapeDtypeStruct(v.shape, v.dtype)
    return leaves, kinds, layers, order


class _DenseFree(nnx.Module):
    """LlamaModel without the dense MLPs (an MoE layer's FFN is its router and experts): embed, attn, final norm."""

    def __init__(self, cfg: LlamaConfig, source):
        self.embed = Block("embed", "embed", -1, source("embed"))
        self.attn = nnx.List([Block(f"layers.{i}.attn", "attn", i, source(f"layers.{i}.attn"))
                              for i in range(cfg.n_layers)])
        self.final_norm = Block("final_norm", "norm", cfg.n_layers, source("final_norm"))


def _natural(block: str):
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", block)]


@functools.lru_cache(maxsize=16)
def model_shape(name: str, dtype: str = "float32") -> ModelShape:
    """The block table of `name` (one of MODELS) with weights in `dtype` ("float32" | "bfloat16")."""
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}' (known: {', '.join(MODELS)})")
    cfg, tied, n_experts, top_k = MODELS[name]
    return shape_from_config(name, cfg, dtype=dtype, tied=tied, n_experts=n_experts, top_k=top_k,
                             router_bias=name in ROUTER_BIAS)


def shape_from_config(name: str, cfg: LlamaConfig, *, dtype: str = "float32", tied: bool = True, n_experts: int = 0,
                      top_k: int = 0, router_bias: bool = False) -> ModelShape:
    leaves, kinds, layers, order = _shapes_of(cfg, tied, n_experts, jnp.dtype(dtype), router_bias)
    rank = {"embed": 0, "attn": 1, "mlp": 2, "expert": 3, "norm": 4}
    order = sorted(order, key=lambda b: (layers[b], rank[kinds[b]] - (b.endswith("moe_gate")), _natural(b)))
    return ModelShape(name, cfg, jnp.dtype(dtype).name, tied, n_experts, top_k, tuple(order), leaves, kinds, layers)
