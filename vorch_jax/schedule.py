"""The access schedule: which block each position of a forward pass touches, in order.

For a dense Llama one token step reads `embed` (lookup), then `layers.i.attn`, `layers.i.mlp` for every layer,
`final_norm`, and `embed` again (the tied head). Every policy, the Belady oracle and the simulator read the same
schedule, so "the future" the oracle sees is exactly the stream the executor will produce.
"""

from __future__ import annotations


def dense_schedule(n_layers: int) -> list[str]:
    order = ["embed"]
    for i in range(n_layers):
        order += [f"layers.{i}.attn", f"layers.{i}.mlp"]
    return order + ["final_norm", "embed"]


def future_stream(schedule: list[str], passes: int) -> list[str]:
    """The whole access stream of `passes` forward passes (prefill counts as one pass)."""
    return [b for _ in range(passes) for b in schedule]
