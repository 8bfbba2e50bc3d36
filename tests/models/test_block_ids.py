"""The block-id format's one writer and reader agree, and every registered model's blocks are in that format."""

import pytest

from vorch_jax.models import registry
from vorch_jax.models.block_ids import expert_block_id, layer_block_id, parse_block_id


def test_written_ids_read_back():
    assert parse_block_id(layer_block_id(3, "attn")) == ("attn", 3, -1)
    assert parse_block_id(layer_block_id(0, "moe_gate")) == ("moe_gate", 0, -1)
    assert parse_block_id(expert_block_id(7, 5)) == ("expert", 7, 5)
    for outside in ("embed", "final_norm", "lm_head", "embed.2", "layers.x.attn"):
        assert parse_block_id(outside) == (outside, None, -1)


@pytest.mark.parametrize("name", ["smollm2-135m", "smollm2-135m-moe", "gemma3-270m", "llama-3-8b"])
def test_every_layer_block_of_a_registered_model_parses_to_its_kind_and_layer(name):
    spec = registry.get(name)
    for info in spec.blocks():
        part, layer, expert = parse_block_id(info.id)
        if layer is None:
            continue  # embed (or its shards), final_norm, an untied head
        assert layer == info.layer and expert == info.expert
        assert part == info.kind or (part, info.kind) == ("moe_gate", "norm"), info
