"""What one device of a mesh holds and runs: a model's spec seen through tensor and expert parallelism.

`ShardSpec(base, tp, ep, device)` is `base` as device `device` of a mesh with `tp`-way tensor parallelism and
`ep`-way expert parallelism (Megatron-LM's split; Mixtral-style expert parallelism):
  * tp: every 2-D weight of the MLP and the embedding is split `tp` ways (column-parallel `w_gate`/`w_up` and the
    vocabulary of the embedding along their output axis, row-parallel `w_down` along its input axis); norms are
    replicated. Attention is split the same way (`wq`/`wk`/`wv` by heads, `wo` by its input rows) when `tp` divides
    both the query and the key/value heads, and replicated otherwise (each device holds and runs all of it: SmolLM2's
    9 heads at tp=4). A block is still one residency unit per device, of its share of the bytes; split attention
    runs 1/tp of the heads and keeps 1/tp of the KV cache. After split attention and after the MLP the partial
    results are summed across the tp devices (an all-reduce of the residual stream), after the embedding too, and
    the head's logits are gathered;
  * ep: the device holds the experts e with e mod ep == device (attention, routers and the embedding are
    replicated), runs those its routers select, and the devices' expert outputs are summed at the layer's end.
The plan, the cost model and the block table are the base model's with those changes; `collective_bytes` says what
each device sends after a position, which the simulator prices on the mesh's interconnect. On a real mesh a shard
has weights (`source`: slices of the base's) and ops (`compute(dtype, collectives)`, `shard_compute.py`), the
collectives handed in by the runtime that runs the devices (`vorch_jax/runtime/mesh_run.py`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from .blocks import BlockInfo
from .errors import ModelError
from .spec import ModelSpec, Position

ROW_PARALLEL = ("wo", "w_down")  # split along their input axis; every other 2-D leaf along its output axis
ATTENTION_LEAVES = ("wq", "wk", "wv", "wo")


@dataclasses.dataclass(frozen=True)
class HeadShard:
    """What attention reads of a config, for one device's share of the heads (`llama_layers.attention_delta`)."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    norm_eps: float
    rope_base: float


def split_axis(leaf: str, ndim: int, split_attention: bool) -> int | None:
    """The axis `leaf` is split along on a tensor-parallel device, None where it is replicated."""
    if ndim != 2 or (leaf in ATTENTION_LEAVES and not split_attention):
        return None
    return 0 if leaf in ROW_PARALLEL else 1


def split_shape(leaf: str, shape: tuple, tp: int, split_attention: bool = True) -> tuple:
    """A leaf's shape on one of `tp` devices."""
    axis = split_axis(leaf, len(shape), split_attention) if tp > 1 else None
    out = list(shape)
    if axis is not None:
        out[axis] //= tp
    return tuple(out)


class ShardSpec(ModelSpec):
    """Device `device` of a (tp x ep) mesh running `base` (see the module docstring)."""

    def __init__(self, base: ModelSpec, tp: int = 1, ep: int = 1, device: int = 0):
        cfg = base.config
        if tp > 1 and base.n_experts:
            raise ModelError(f"{base.name}: tensor parallelism of a routed model is not modelled; use ep")
        for what, n in (("MLP width", cfg.d_ff), ("vocabulary", cfg.vocab_size)):
            if n % tp:
                raise ModelError(f"tp={tp} does not divide {base.name}'s {n} {what}")
        if ep > 1 and (not base.n_experts or base.n_experts % ep):
            raise ModelError(f"ep={ep} must divide {base.name}'s experts ({base.n_experts or 'none: a dense model'})")
        if not 0 <= device < ep * tp:
            raise ModelError(f"device {device} is not one of the mesh's {ep * tp}")
        self.base, self.tp, self.ep, self.device = base, tp, ep, device
        self.split_attention = tp > 1 and cfg.n_heads % tp == 0 and cfg.n_kv_heads % tp == 0
        self.name = f"{base.name}@tp{tp}ep{ep}/{device}"
        self.has_weights, self.top_k, self.n_experts = base.has_weights, base.top_k, base.n_experts
        self.in_place_ops, self.ops, self.note = base.in_place_ops, base.ops, base.note

    # -- what the device holds
    @property
    def config(self):
        return self.base.config

    @property
    def n_layers(self) -> int:
        return self.base.n_layers

    def holds(self, info: BlockInfo) -> bool:
        return info.kind != "expert" or info.expert % self.ep == self.device % self.ep

    @functools.cached_property
    def leaf_shapes(self) -> dict:
        return {b: {k: jax.ShapeDtypeStruct(split_shape(k, s.shape, self.tp, self.split_attention), s.dtype)
                    for k, s in leaves.items()}
                for b, leaves in self.base.leaf_shapes.items() if self.holds(self.base.block_info[b])}

    def head_shard(self) -> HeadShard | None:
        """This device's share of the attention heads; None where attention is replicated."""
        if not self.split_attention:
            return None
        cfg = self.config
        return HeadShard(cfg.n_heads // self.tp, cfg.n_kv_heads // self.tp, cfg.head_dim, cfg.norm_eps, cfg.rope_base)

    # -- the weights and ops of a real mesh's device
    def source(self):
        """`block -> {leaf: ndarray}`: this device's slices of the base's weights; None for a shape-only model."""
        base = self.base.source()
        if base is None:
            return None
        return lambda block: {k: self.slice_leaf(k, a) for k, a in base(block).items()}

    def slice_leaf(self, leaf: str, array):
        """This device's part of one leaf of the base's weights (the split of `split_axis`)."""
        axis = split_axis(leaf, np.ndim(array), self.split_attention) if self.tp > 1 else None
        if axis is None:
            return array
        n = array.shape[axis] // self.tp
        index = [slice(None)] * np.ndim(array)
        index[axis] = slice(self.device * n, (self.device + 1) * n)
        return np.ascontiguousarray(np.asarray(array)[tuple(index)])

    def tokenizer(self):
        return self.base.tokenizer()

    def bos_id(self) -> int:
        return self.base.bos_id()

    def text(self, max_chars: int) -> str:
        return self.base.text(max_chars)

    def compute(self, dtype, collectives=None):
        """The device's ops (`shard_compute.ShardCompute`), joined to the others' by `collectives` (the runtime's:
        `all_reduce(x)`, `all_gather(x)` along the last axis, each returning this device's copy of the result)."""
        from .shard_compute import ShardCompute

        if collectives is None or not self.has_weights:
            raise ModelError(f"{self.name} is one device of a mesh: it runs on a real mesh (collectives to join the "
                             f"devices) or simulated (executor: sim)")
        return ShardCompute(self, dtype, collectives)

    @functools.cached_property
    def _table(self) -> list[BlockInfo]:
        def nbytes(b):
            return sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in self.leaf_shapes[b].values())

        return [dataclasses.replace(b, nbytes=nbytes(b.id)) for b in self.base.blocks() if self.holds(b)]

    # -- the plan: the base's, with this device's experts only
    def skeleton(self) -> list[Position]:
        return self.base.skeleton()

    def experts(self, layer: int, selected_E) -> list[Position]:
        return [p for p in self.base.experts(layer, selected_E) if p.expert % self.ep == self.device % self.ep]

    def attention_context(self, layer: int, context: int) -> int:
        return self.base.attention_context(layer, context)

    def compile_positions(self) -> list[Position]:
        """The base's, each routed layer with this device's first expert."""
        out = []
        for p in self.skeleton():
            out.append(p)
            if p.op == "route":
                out += self.experts(p.layer, np.ones(self.n_experts, bool))[:1]
        return out

    def new_cache(self, batch: int, max_len: int, dtype):
        """The KV cache of this device's heads (all of them where attention is replicated)."""
        from .llama import KVCache

        heads = self.head_shard()
        if heads is None:
            return self.base.new_cache(batch, max_len, dtype)
        cfg = dataclasses.replace(self.config, n_heads=heads.n_heads, n_kv_heads=heads.n_kv_heads,
                                  d_model=heads.n_heads * heads.head_dim)
        return KVCache.zeros(cfg, batch, max_len, dtype)

    # -- the cost model
    def cost(self, position: Position, tokens: int, context: int, weight_bytes: float, itemsize: int
             ) -> tuple[float, float]:
        """The base cost on this device's weights (`matmul_params` of its split leaves), attention on 1/tp of the
        heads and of the KV cache."""
        flops, nbytes = ModelSpec.cost(self, position, tokens, context, weight_bytes, itemsize)
        if position.op == "attn" and self.split_attention:
            cfg, ctx = self.config, self.attention_context(position.layer, context)
            share = 1 - 1 / self.tp
            flops -= share * 4.0 * tokens * ctx * cfg.n_heads * cfg.head_dim
            nbytes -= share * 2.0 * ctx * cfg.n_kv_heads * cfg.head_dim * itemsize
        return flops, nbytes

    def collective_bytes(self, position: Position, tokens: int, itemsize: int) -> float:
        """Bytes this device sends in the collective after `position`: a ring all-reduce of the residual stream
        (2 (tp-1)/tp of it) after the embedding, attention and the MLP; the gathered logits after the head; an
        all-to-all of the routed tokens' copies to the other devices and back around a routed layer (charged at
        its router)."""
        x = tokens * self.config.d_model * itemsize
        if self.tp > 1 and (position.op in ("embed", "mlp") or (position.op == "attn" and self.split_attention)):
            return 2.0 * (self.tp - 1) / self.tp * x
        if self.tp > 1 and position.op == "head":
            return (self.tp - 1) / self.tp * tokens * self.config.vocab_size * 4
        if self.ep > 1 and position.op == "route":
            return 2.0 * (self.ep - 1) / self.ep * x * self.top_k
        return 0.0
