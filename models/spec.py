"""One interface for every model the runtime runs: what the blocks are, how a pass runs, what it costs.

A `ModelSpec` says everything the runtime needs and nothing about where a block lives:
  * `blocks()`: the block table, read from the tagged NNX parameters (`blocks.block_param`) of the model built
    under `nnx.eval_shape` (no weights are read or allocated);
  * `source()`: `block id -> {leaf: float32 ndarray}`, the authoritative copy the tiers load from (None for a
    shape-only model, which only the simulator runs);
  * `skeleton()`: the positions of one forward pass, `Position(block, op, layer)`. A routed layer has one
    `route` position; the experts its router chooses are the positions `experts(layer, selected)` the runtime
    inserts after it once the choice is known. A token-routed position (`token_routed`) runs only in a pass
    whose tokens it reads (`pass_positions(ids)`): a lookup shard of a vocabulary. `pass_order()` is one pass
    touching every block (every expert), the order a static placement fills in;
  * `compute(dtype)`: the jitted functions of the ops over a carry (`start`, `run(position, weights, carry)`,
    `finish`), for the real and the resident runs; `cost(position, ...)`: FLOPs and bytes of a position, for the
    simulated run;
  * `new_cache(batch, max_len, dtype)`, `tokenizer()`, `bos_id()`.

Specs are named in `registry.py`: `get(name)` builds one once per process, `names()` lists them (what the config
validates `model` against). A user's own NNX model joins the same way: tag its parameters with `block_param`,
subclass `ModelSpec`, `registry.register("my-model")(factory)`; no runtime file changes (README).
"""

from __future__ import annotations

import dataclasses
import functools
import numpy as np

from .blocks import BlockInfo, block_table, leaf_name
from .errors import ModelError

OPS = ("embed", "attn", "mlp", "route", "expert", "norm", "head")  # what a position computes (cost model keys)


@dataclasses.dataclass(frozen=True)
class Position:
    """One step of a pass: compute `op` with `block`'s weights (layer -1: before the first layer)."""

    block: str
    op: str
    layer: int
    expert: int = -1  # for op 'expert': the expert's index in its layer
    part: int = -1  # for a block that is one shard of a tensor (a vocabulary shard of the embedding): its index


class ModelSpec:
    """The interface (see the module docstring). Subclasses set `name` and implement the abstract parts."""

    name: str = ""
    note: str = ""  # what a quality figure of this model is relative to (e.g. weights 4-bit to begin with)
    requirements: tuple = ()  # (pip requirement, what it provides) of the data packages holding its file
    has_weights: bool = True  # False: shape-only (the simulator's models at scale)
    ops: str = ""  # whose layer functions compute a pass ('llama', 'gemma', ...): what op-level tools key on
    top_k: int = 0  # experts per token (0: dense)
    in_place_ops: tuple = ()  # ops that may run where their block's weights live, in host memory (`compute(dtype)`
    # has `run_in_place` for them; an op that reads device state, like attention's KV cache, cannot)
    n_experts: int = 0

    # -- what the blocks are
    def abstract_model(self):
        """The NNX model built under `nnx.eval_shape`: parameters are ShapeDtypeStructs, tagged by block."""
        raise NotImplementedError

    @functools.cached_property
    def _table(self) -> list[BlockInfo]:
        return block_table(self.abstract_model())

    def blocks(self) -> list[BlockInfo]:
        return list(self._table)

    @functools.cached_property
    def block_info(self) -> dict:
        return {b.id: b for b in self._table}

    @functools.cached_property
    def leaf_shapes(self) -> dict:
        """{block: {leaf: ShapeDtypeStruct}} as the source returns them (float32), from the abstract model."""
        import jax
        from flax import nnx

        out: dict = {}
        for path, param in nnx.iter_graph(self.abstract_model()):
            if isinstance(param, nnx.Param):
                v = param.get_value()
                out.setdefault(param.get_metadata()["block"], {})[leaf_name(path)] = jax.ShapeDtypeStruct(v.shape,
                                                                                                         v.dtype)
        return out

    def block_shapes(self, block: str) -> dict:
        return self.leaf_shapes[block]

    def device_bytes(self, block: str) -> int:
        return self.block_info[block].nbytes

    @property
    def model_bytes(self) -> int:
        return sum(b.nbytes for b in self._table)

    # -- the weights and the text
    def source(self):
        """`block -> {leaf: ndarray}`; None for a shape-only model."""
        return None

    def tokenizer(self):
        raise ModelError(f"{self.name} has no tokenizer here (a shape-only model: run it with executor=sim)")

    def bos_id(self) -> int:
        raise ModelError(f"{self.name} has no tokenizer here (a shape-only model: run it with executor=sim)")

    def text(self, max_chars: int) -> str:
        """The text a real run's prompt and evaluation are taken from (its first `max_chars` characters): the KJV,
        unless a model says otherwise (a model without a language, e.g. random weights, gives its own)."""
        from .corpus import kjv_text

        return kjv_text(max_chars=max_chars)

    # -- a pass
    def skeleton(self) -> list[Position]:
        raise NotImplementedError

    def experts(self, layer: int, selected_E) -> list[Position]:
        """The expert positions of `layer` for its router's choice (bool [E]), ascending; dense models have none."""
        return []

    def token_routed(self, position: Position) -> bool:
        """Whether a pass runs `position` only for some tokens (`reads_tokens`): Gemma's vocabulary shards' lookups.
        Such a position is not known before its pass's tokens are; where another position of the pass reads its
        block it is left out of `every_pass`, what prefetching and placement plan on, and the runtime reads it
        where its block is, never as a read of the access stream (`Ledger._gather`)."""
        return False

    def reads_tokens(self, position: Position, ids_BxT) -> bool:
        """Whether a pass over the token ids `ids_BxT` runs `position` (a token-routed one only where it adds
        something: a lookup shard holding one of the ids)."""
        return True

    def pass_positions(self, ids_BxT) -> list[Position]:
        """The skeleton positions a pass over `ids_BxT` runs, in order (a routed layer's experts come at run time)."""
        return [p for p in self.skeleton() if not self.token_routed(p) or self.reads_tokens(p, ids_BxT)]

    def every_pass(self) -> list[Position]:
        """The skeleton positions every pass runs: all but the token-routed ones whose block another position of
        the pass reads (Gemma's tied embedding shards, read by the head each pass); what is known of a pass before
        its tokens are, and what a placement plans on."""
        skeleton = self.skeleton()
        certain = {p.block for p in skeleton if not self.token_routed(p)}
        return [p for p in skeleton if not self.token_routed(p) or p.block not in certain]

    def pass_order(self) -> list[str]:
        """One pass touching every block once per read position (each expert of every layer), in pass order: the
        positions of `every_pass`."""
        out = []
        for p in self.every_pass():
            out.append(p.block)
            if p.op == "route":
                out += [q.block for q in self.experts(p.layer, np.ones(self.n_experts, bool))]
        return out

    @functools.cached_property
    def block_op(self) -> dict:
        """{block: the op its positions compute} over one pass reading every block."""
        out = {}
        for p in self.skeleton():
            out.setdefault(p.block, p.op)
            if p.op == "route":
                out.update({q.block: q.op for q in self.experts(p.layer, np.ones(self.n_experts, bool))})
        return out

    def compile_positions(self) -> list[Position]:
        """A pass that runs every op at least once (each routed layer with its expert 0): what compiles a model."""
        out = []
        for p in self.skeleton():
            out.append(p)
            if p.op == "route":
                out += self.experts(p.layer, np.arange(self.n_experts) == 0)
        return out

    @property
    def n_layers(self) -> int:
        raise NotImplementedError

    # -- compute
    def compute(self, dtype):
        """The ops' jitted functions for real runs: an object with start / run / finish (and speculate, if routed)."""
        raise ModelError(f"{self.name} is shape-only: it has no weights here, run it with executor=sim")

    def new_cache(self, batch: int, max_len: int, dtype):
        raise NotImplementedError

    # -- the simulator's cost model
    def attention_context(self, layer: int, context: int) -> int:
        """Cached positions a query of `layer` attends to (a sliding window caps it)."""
        return context

    def cost(self, position: Position, tokens: int, context: int, weight_bytes: float, itemsize: int
             ) -> tuple[float, float]:
        """(FLOPs, device bytes read) of one position for `tokens` new tokens over `context` cached ones."""
        op, cfg = position.op, self.config
        if op in ("embed", "norm"):
            return 0.0, float(tokens * cfg.d_model * itemsize) if op == "embed" else float(weight_bytes)
        flops = 2.0 * tokens * self.matmul_params(position.block)
        if op != "attn":
            return flops, float(weight_bytes)
        ctx = self.attention_context(position.layer, context)
        flops += 4.0 * tokens * ctx * cfg.n_heads * cfg.head_dim
        return flops, weight_bytes + 2.0 * ctx * cfg.n_kv_heads * cfg.head_dim * itemsize

    def activation_bytes(self, position: Position, tokens: int, itemsize: int) -> tuple[int, int]:
        """(to the host, back to the device) bytes an op computed in place moves: the residual stream x in and
        out; an expert also takes its normed input h, the routing mask (bool [T, E]) and its index (int32), a
        lookup the token ids and its shard's first id (int32)."""
        x = tokens * self.config.d_model * itemsize
        if position.op == "expert":
            return 2 * x + tokens * self.n_experts + 4, x
        if position.op == "embed":
            return x + 4 * tokens + 4, x
        return x, x

    def collective_bytes(self, position: Position, tokens: int, itemsize: int) -> float:
        """Bytes each device sends in the collective after `position` on a mesh (`shard_spec.ShardSpec`); one device
        sends none."""
        return 0.0

    @functools.cached_property
    def _matmul_params(self) -> dict:
        return {b: sum(int(np.prod(s.shape)) for s in leaves.values() if len(s.shape) == 2)
                for b, leaves in self.leaf_shapes.items()}

    def matmul_params(self, block: str) -> int:
        return self._matmul_params[block]
