"""The block-id format, written and read here only: 'embed', 'final_norm', 'lm_head' (an untied head),
'layers.{L}.{part}' (part: attn, mlp, moe_gate) and 'layers.{L}.expert.{E}'.

Every model, spec and tool that names a block builds its id with `layer_block_id` / `expert_block_id` and takes one
apart with `parse_block_id`, so the format cannot drift between them.
"""

from __future__ import annotations

EMBED = "embed"
FINAL_NORM = "final_norm"


def layer_block_id(layer: int, part: str) -> str:
    """A layer's block: `layer_block_id(3, "attn")` -> 'layers.3.attn'."""
    return f"layers.{layer}.{part}"


def expert_block_id(layer: int, expert: int) -> str:
    """An expert's block: `expert_block_id(3, 5)` -> 'layers.3.expert.5'."""
    return f"layers.{layer}.expert.{expert}"


def parse_block_id(block: str) -> tuple[str, int | None, int]:
    """(part, layer, expert): 'layers.3.attn' -> ('attn', 3, -1), 'layers.3.expert.5' -> ('expert', 3, 5); an id
    outside the layers (embed, final_norm, lm_head) -> (the id, None, -1)."""
    parts = block.split(".")
    if parts[0] == "layers" and len(parts) == 3 and parts[1].isdigit():
        return parts[2], int(parts[1]), -1
    if parts[0] == "layers" and len(parts) == 4 and parts[2] == "expert" and parts[1].isdigit() and parts[3].isdigit():
        return "expert", int(parts[1]), int(parts[3])
    return block, None, -1
