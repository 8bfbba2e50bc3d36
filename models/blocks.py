"""Residency blocks: the one helper that tags a parameter with its block, and the block table derived from a model.

A block is the unit the tiers move: the embedding, one layer's attention, one layer's MLP, one MoE expert, the final
norm. Every parameter belongs to exactly one block; the table is derived from the parameters, never listed by hand.
Tied weights are one parameter and so one block, counted once.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
from flax import nnx

BLOCK_KINDS = ("embed", "attn", "mlp", "norm", "expert")


def block_param(value, block: str, kind: str, layer: int, expert: int = -1) -> nnx.Param:
    """The single place that attaches residency metadata to a parameter (a flax API change touches only this).

    `expert`: the expert's index within its layer for kind `expert`, else -1."""
    if kind not in BLOCK_KINDS:
        raise ValueError(f"unknown block kind '{kind}' (expected one of {BLOCK_KINDS})")
    if (kind == "expert") != (expert >= 0):
        raise ValueError(f"block '{block}' of kind '{kind}' has expert index {expert}: experts, and only they, have one")
    return nnx.Param(value, block=block, kind=kind, layer=layer, expert=expert)


@dataclasses.dataclass(frozen=True)
class BlockInfo:
    id: str  # e.g. "layers.3.attn"
    kind: str  # one of BLOCK_KINDS
    layer: int  # -1 for the embedding; n_layers for the final norm
    nbytes: int  # full-precision (S0) bytes of all its parameters
    leaves: tuple[str, ...]  # leaf names, in the order the model declares them
    expert: int = -1  # index within its layer for an expert, else -1


def leaf_name(path) -> str:
    """A parameter's leaf name within its block: the last attribute of its path (list indices skipped), so a block's
    `wq` in `attn[3].wq` and a user's `w1[0]` are `wq` and `w1`."""
    return next(str(p) for p in reversed(path) if not isinstance(p, int))


def _natural_key(block_id: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", block_id)]


def block_table(model: nnx.Module) -> list[BlockInfo]:
    """One row per block, in execution order (embedding first, then layer by layer, final norm last)."""
    rows: dict[str, dict] = {}
    for path, param in nnx.iter_graph(model):
        if not isinstance(param, nnx.Param):
            continue
        meta = param.get_metadata()
        if "block" not in meta:
            raise ValueError(f"parameter {'.'.join(map(str, path))} has no block: tag it with block_param()")
        expert = meta.get("expert", -1)
        row = rows.setdefault(meta["block"], {"kind": meta["kind"], "layer": meta["layer"], "expert": expert,
                                              "nbytes": 0, "leaves": []})
        if (row["kind"], row["layer"], row["expert"]) != (meta["kind"], meta["layer"], expert):
            raise ValueError(f"block {meta['block']} has parameters of different kinds, layers or experts")
        value = param.get_value()
        row["nbytes"] += int(np.prod(value.shape)) * np.dtype(value.dtype).itemsize  # arrays or ShapeDtypeStructs
        row["leaves"].append(leaf_name(path))
    table = [BlockInfo(b, r["kind"], r["layer"], r["nbytes"], tuple(r["leaves"]), r["expert"]) for b, r in rows.items()]
    return sorted(table, key=lambda b: (b.layer, _natural_key(b.id)))


def summarize_blocks(table: list[BlockInfo]) -> dict:
    """Count and bytes per kind, and the total: the golden JSON checked in for each shipped model."""
    per_kind: dict[str, dict[str, int]] = {}
    for b in table:
        k = per_kind.setdefault(b.kind, {"count": 0, "bytes": 0})
        k["count"] += 1
        k["bytes"] += b.nbytes
    return {
        "blocks": len(table),
        "total_bytes": sum(b.nbytes for b in table),
        "per_kind": dict(sorted(per_kind.items())),
    }
