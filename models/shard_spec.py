"""What one device of a mesh holds and runs: a model's spec seen through tensor and expert parallelism.

`ShardSpec(base, tp, ep, device)` is `base` as device `device` of a mesh with `tp`-way tensor parallelism and
`ep`-way expert parallelism (Megatron-LM's split; Mixtral-style expert parallelism):
  * tp: every 2-D weight is split `tp` ways (column-parallel `wq`/`wk`/`wv`/`w_gate`/`w_up` and the vocabulary of
    the embedding along their output axis, row-parallel `wo`/`w_down` along their input axis); norms are
    replicated. A block is still one residency unit per device, of 1/tp of its bytes; attention runs 1/tp of the
    heads and keeps 1/tp of the KV cache. After attention and after the MLP the partial results are summed across
    the tp devices (an all-reduce of the residual stream), after the embedding too, and the head's logits are
    gathered;
  * ep: the device holds the experts e with e mod ep == device (attention, routers and the embedding are
    replicated), runs those its routers select, and exchanges the tokens with the other devices around each routed
    layer (an all-to-all to dispatch, one to combine).
The plan, the cost model and the block table are the base model's with those changes; `collective_bytes` says what
each device sends after a position, which the simulator prices on the mesh's interconnect. A device of a mesh is
simulated (`vorch_jax/simulation/mesh.py`); real runs on a mesh are not built yet.
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


def split_shape(leaf: str, shape: tuple, tp: int) -> tuple:
    """A leaf's shape on one of `tp` devices (1-D leaves are replicated)."""
    if len(shape) != 2 or tp == 1:
        return tuple(shape)
    axis = 0 if leaf in ROW_PARALLEL else 1
    out = list(shape)
    out[axis] //= tp
    return tuple(out)


class ShardSpec(ModelSpec):
    """Device `device` of a (tp x ep) mesh running `base` (see the module docstring)."""

    def __init__(self, base: ModelSpec, tp: int = 1, ep: int = 1, device: int = 0):
        cfg = base.config
        if tp > 1 and base.n_experts:
            raise ModelError(f"{base.name}: tensor parallelism of a routed model is not modelled; use ep")
        for what, n in (("attention heads", cfg.n_heads), ("KV heads", cfg.n_kv_heads), ("MLP width", cfg.d_ff),
                        ("vocabulary", cfg.vocab_size)):
            if n % tp:
                raise ModelError(f"tp={tp} does not divide {base.name}'s {n} {what}")
        if ep > 1 and (not base.n_experts or base.n_experts % ep):
            raise ModelError(f"ep={ep} must divide {base.name}'s experts ({base.n_experts or 'none: a dense model'})")
        if not 0 <= device < ep * tp:
            raise ModelError(f"device {device} is not one of the mesh's {ep * tp}")
        self.base, self.tp, self.ep, self.device = base, tp, ep, device
        self.name = f"{base.name}@tp{tp}ep{ep}/{device}"
        self.has_weights, self.top_k, self.n_experts = False, base.top_k, base.n_experts
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
        return {b: {k: jax.ShapeDtypeStruct(split_shape(k, s.shape, self.tp), s.dtype) for k, s in leaves.items()}
                for b, leaves in self.base.leaf_shapes.items() if self.holds(self.base.block_info[b])}

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

    def new_cache(self, batch: int, max_len: int, dtype):
        raise ModelError(f"{self.name} is one device of a mesh: it is simulated only (executor: sim)")

    # -- the cost model
    def cost(self, position: Position, tokens: int, context: int, weight_bytes: float, itemsize: int
             ) -> tuple[float, float]:
        """The base cost on this device's weights (`matmul_params` of its split leaves), attention on 1/tp of the
        heads and of the KV cache."""
        flops, nbytes = ModelSpec.cost(self, position, tokens, context, weight_bytes, itemsize)
        if position.op == "attn" and self.tp > 1:
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
        if self.tp > 1 and position.op in ("embed", "attn", "mlp"):
            return 2.0 * (self.tp - 1) / self.tp * x
        if self.tp > 1 and position.op == "head":
            return (self.tp - 1) / self.tp * tokens * self.config.vocab_size * 4
        if self.ep > 1 and position.op == "route":
            return 2.0 * (self.ep - 1) / self.ep * x * self.top_k
        return 0.0
