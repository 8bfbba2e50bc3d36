"""The Llama family as `ModelSpec`s: SmolLM2-135M (real, from its GGUF) and Llama-2-70B / Llama-3-8B (shape-only).

A pass: `embed` (lookup), per layer `layers.i.attn` then `layers.i.mlp`, `final_norm`, and the head: the tied
`embed` read again (SmolLM2) or the untied `lm_head`. Shape-only models are the same NNX model built under
`nnx.eval_shape` from their published configs (the models' config.json on the Hugging Face hub); the simulator
runs them.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from .gguf_source import LlamaConfig
from .llama import HEAD, KVCache, LlamaModel
from .spec import ModelSpec, Position
from .block_ids import layer_block_id, parse_block_id

LLAMA2_70B = LlamaConfig(vocab_size=32000, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, d_ff=28672,
                         rope_base=10000.0, norm_eps=1e-5, context_length=4096)
LLAMA3_8B = LlamaConfig(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
                        rope_base=500000.0, norm_eps=1e-5, context_length=8192)


def llama_leaf_shapes(cfg: LlamaConfig) -> dict[str, dict[str, tuple]]:
    """{block kind: {leaf: shape}} in the runtime's layout ([in, out]; the embedding in head layout [D, V])."""
    D, F, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return {"embed": {"embedding": (D, V)},
            "attn": {"attn_norm": (D,), "wq": (D, q), "wk": (D, kv), "wv": (D, kv), "wo": (q, D)},
            "mlp": {"ffn_norm": (D,), "w_gate": (D, F), "w_up": (D, F), "w_down": (F, D)},
            "norm": {"norm": (D,)}}


def kind_of(block: str) -> str:
    """The kind of a Llama block id (`layers.3.attn` -> attn): the layout's one parse, used by shape sources."""
    if block in ("embed", HEAD):
        return "embed"
    if block == "final_norm":
        return "norm"
    return parse_block_id(block)[0]


def shape_source(shapes_of_kind: dict, dtype=jnp.float32):
    """A source for `nnx.eval_shape`: zeros of each block's leaf shapes (traced, never allocated)."""
    return lambda block: {k: jnp.zeros(s, dtype) for k, s in shapes_of_kind[kind_of(block)].items()}


class LlamaSpec(ModelSpec):
    """A Llama decoder. `gguf`: a zero-argument loader of its GGUF source (None: shape-only from `cfg`)."""

    ops = "llama"
    in_place_ops = ("mlp",)

    def __init__(self, name: str, cfg: LlamaConfig | None = None, *, tied: bool = True, gguf=None,
                 note: str = "", requirements: tuple = ()):
        self.name, self.tied, self._gguf, self.note, self.requirements = name, tied, gguf, note, requirements
        self.has_weights = gguf is not None
        self._cfg = cfg

    @property
    def config(self) -> LlamaConfig:
        return self._cfg if self._cfg is not None else self.source().config

    @property
    def n_layers(self) -> int:
        return self.config.n_layers

    def source(self):
        if self._gguf is None:
            return None
        if not hasattr(self, "_source"):
            self._source = self._gguf()
        return self._source

    def abstract_model(self):
        cfg = self.config
        if self.has_weights:
            src = self.source()
            make = lambda: LlamaModel(cfg, lambda b: {k: jnp.zeros(s.shape, s.dtype)  # noqa: E731
                                                      for k, s in src.block_shapes(b).items()}, self.tied)
        else:
            make = lambda: LlamaModel(cfg, shape_source(llama_leaf_shapes(cfg)), self.tied)  # noqa: E731
        return nnx.eval_shape(make)

    def tokenizer(self):
        from .tokenizer import tokenizer_from_gguf_metadata

        if not self.has_weights:
            return super().tokenizer()
        if not hasattr(self, "_tokenizer"):
            self._tokenizer = tokenizer_from_gguf_metadata(self.source().tokenizer_metadata())
        return self._tokenizer

    def bos_id(self) -> int:
        from .smollm2 import bos_id

        return bos_id(self.tokenizer())

    def skeleton(self) -> list[Position]:
        L = self.n_layers
        out = [Position("embed", "embed", -1)]
        for i in range(L):
            out += [Position(layer_block_id(i, "attn"), "attn", i), Position(layer_block_id(i, "mlp"), "mlp", i)]
        head = "embed" if self.tied else HEAD
        return out + [Position("final_norm", "norm", L), Position(head, "head", self.block_info[head].layer)]

    def compute(self, dtype):
        from .llama_compute import LlamaCompute

        if not self.has_weights:
            return super().compute(dtype)
        return LlamaCompute(self.config, dtype)

    def new_cache(self, batch: int, max_len: int, dtype):
        return KVCache.zeros(self.config, batch, max_len, dtype)


def smollm2_spec() -> LlamaSpec:
    from .gguf_source import SMOLLM2_REQUIREMENT, load_smollm2_source

    return LlamaSpec("smollm2-135m", gguf=load_smollm2_source, tied=True, requirements=(
        (SMOLLM2_REQUIREMENT, "SmolLM2-135M-Instruct, GGUF Q4_1"),),
        note="SmolLM2 weights were 4-bit (Q4_1) to begin with; 'resident' is that model in float32")

