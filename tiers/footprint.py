"""Device bytes a block would occupy in each on-device state, from its leaf shapes alone.

Computed by `jax.eval_shape` of the very conversion each state runs (int8, int4, low-rank), so the figure is the
bytes the real arrays will have, known before anything moves (the controller plans with it; the engine then
measures the arrays that land).
"""

from __future__ import annotations

import jax
import numpy as np

from vorch_jax.tiers.low_rank import factorize
from vorch_jax.tiers.quant_int4 import quantize_int4
from vorch_jax.tiers.quant_int8 import quantize_int8
from vorch_jax.tiers.state import State


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def state_bytes(leaf_shapes: dict, state: State, *, int4_group_size: int = 64, lowrank_rank: int = 32) -> int:
    """Bytes on device of a block with leaves `{name: ShapeDtypeStruct}` in `state` (0 for off-device states)."""
    state = State.parse(state)
    if not state.on_device:
        return 0
    convert = {
        State.S0: lambda w: w,
        State.S1: quantize_int8,
        State.S2: lambda w: quantize_int4(w, int4_group_size),
        State.S6: lambda w: factorize(w, lowrank_rank),
    }[state]
    total = 0
    for leaf in leaf_shapes.values():
        if len(leaf.shape) == 2 and state != State.S0:
            total += _nbytes(jax.eval_shape(convert, leaf))
        else:
            total += _nbytes(leaf)
    return total
