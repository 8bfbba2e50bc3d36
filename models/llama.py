"""A Llama-architecture decoder (SmolLM2) as Flax NNX modules whose parameters are tagged residency blocks.

The modules only hold parameters; the computation lives in `llama_layers` (pure functions over a block's weight
dict), so the all-resident model and the layer-by-layer executor run the same code.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from . import llama_layers as L
from .blocks import block_param
from .gguf_source import LlamaConfig
from .block_ids import layer_block_id, parse_block_id

BlockSource = Callable[[str], dict]  # block id -> {leaf name: array}


class Block(nnx.Module):
    """The parameters of one residency block, as attributes named by leaf."""

    def __init__(self, block: str, kind: str, layer: int, weights: dict, expert: int = -1):
        self.leaf_names = tuple(weights)
        for name, value in weights.items():
            setattr(self, name, block_param(jnp.asarray(value), block, kind, layer, expert))

    def weights(self) -> dict:
        return {name: getattr(self, name).get_value() for name in self.leaf_names}


@dataclasses.dataclass
class KVCache:
    """Per-layer key/value caches, each [B, S, KV, Dh]; a pytree."""

    k: list
    v: list

    @classmethod
    def zeros(cls, cfg: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        shape = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)
        return cls([jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)], [jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)])


jax.tree_util.register_dataclass(KVCache, data_fields=["k", "v"], meta_fields=[])


def block_ids(cfg: LlamaConfig) -> list[str]:
    """Block ids in execution order."""
    ids = ["embed"]
    for i in range(cfg.n_layers):
        ids += [layer_block_id(i, "attn"), layer_block_id(i, "mlp")]
    return ids + ["final_norm"]


HEAD = "lm_head"  # an untied head's block (kind embed: the same [D, V] shape as the embedding)


def block_kind_layer(cfg: LlamaConfig, block: str) -> tuple[str, int]:
    if block == "embed":
        return "embed", -1
    if block == HEAD:
        return "embed", cfg.n_layers + 1
    if block == "final_norm":
        return "norm", cfg.n_layers
    kind, layer, _ = parse_block_id(block)
    if layer is None:
        raise KeyError(f"'{block}' is not a block id of a Llama model")
    return kind, layer


class LlamaModel(nnx.Module):
    """Llama-style decoder: embedding, n_layers × (attention, SwiGLU MLP), final RMSNorm, and the head: the embedding
    itself when `tied` (SmolLM2), else its own block `lm_head` (Llama-2/3, the simulator's shape-only models)."""

    def __init__(self, cfg: LlamaConfig, source: BlockSource, tied: bool = True):
        self.cfg = cfg

        def make(block: str) -> Block:
            kind, layer = block_kind_layer(cfg, block)
            return Block(block, kind, layer, source(block))

        self.embed = make("embed")
        self.attn = nnx.List([make(layer_block_id(i, "attn")) for i in range(cfg.n_layers)])
        self.mlp = nnx.List([make(layer_block_id(i, "mlp")) for i in range(cfg.n_layers)])
        self.final_norm = make("final_norm")
        self.head = None if tied else Block(HEAD, "embed", cfg.n_layers + 1, source(HEAD))

    def block_weights(self) -> dict[str, dict]:
        """{block id: weight dict}: what the tiers hold and move."""
        out = {"embed": self.embed.weights()}
        for i in range(self.cfg.n_layers):
            out[layer_block_id(i, "attn")] = self.attn[i].weights()
            out[layer_block_id(i, "mlp")] = self.mlp[i].weights()
        out["final_norm"] = self.final_norm.weights()
        return out

    def __call__(self, ids_BxT, cache: KVCache, pos, dtype=jnp.float32):
        """Logits [B, T, V] (float32) for tokens ids_BxT at positions pos.., and the updated cache."""
        cfg = self.cfg
        x = L.embed_tokens(self.embed.weights(), ids_BxT, dtype)
        ks, vs = [], []
        for i in range(cfg.n_layers):
            x, k, v = L.attention_block(cfg, self.attn[i].weights(), x, cache.k[i], cache.v[i], pos)
            x = L.mlp_block(cfg, self.mlp[i].weights(), x)
            ks.append(k)
            vs.append(v)
        head = self.embed if self.head is None else self.head
        return L.lm_head(cfg, self.final_norm.weights(), head.weights(), x), KVCache(ks, vs)
