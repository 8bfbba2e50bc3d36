"""Planned device bytes per state (from shapes) equal the bytes of the arrays the engine really lands."""

import pytest

from vorch_jax.tiers.engine import MovementEngine
from vorch_jax.tiers.footprint import state_bytes
from vorch_jax.tiers.state import State


@pytest.mark.parametrize("block", ["layers.7.attn", "layers.7.mlp", "final_norm"])
@pytest.mark.parametrize("state", [State.S0, State.S1, State.S2, State.S6])
def test_footprint_equals_landed_arrays(smollm2_source, tmp_path, block, state):
    with MovementEngine(smollm2_source, tmp_path, int4_group_size=128, lowrank_rank=16) as engine:
        engine.register(block, state)
        planned = state_bytes(smollm2_source.block_shapes(block), state, int4_group_size=128, lowrank_rank=16)
        assert planned == engine.bytes_in("device") == engine.representation(block).nbytes
