"""S1 / S2: the block quantized on device. 2-D `[K, N]` leaves become `Int8Weight` (S1) or `Int4Weight`
(S2, group size 32 / 64 / 128 along K); 1-D leaves (norm weights) stay float32 on device.

Invariant: `leaves[name].dequantize() ≈ source[name]` within the format's bound (|err| <= scale / 2).
Quantization runs on the device, from an S0 block (`device:convert`).
"""

from __future__ import annotations

import jax

from vorch_jax.tiers.full_precision import DeviceBlock
from vorch_jax.tiers.state import State


def _quantizer(bits: int, group_size: int):
    if bits == 8:
        from vorch_jax.tiers.quant_int8 import quantize_int8

        return quantize_int8
    if bits == 4:
        from vorch_jax.tiers.quant_int4 import check_group_size, quantize_int4

        check_group_size(group_size)
        return lambda w_KxN: quantize_int4(w_KxN, group_size)
    raise ValueError(f"low-bit block supports bits 8 (S1) or 4 (S2), got {bits}")


class LowBitBlock(DeviceBlock):
    """S1 (bits=8) or S2 (bits=4). `leaves: {name: Int8Weight | Int4Weight | f32[D]}` on device."""


    def __init__(self, leaves: dict, bits: int, group_size: int | None):
        self.leaves, self.bits, self.group_size = leaves, bits, group_size
        self.state = State.S1 if bits == 8 else State.S2

    @classmethod
    def from_full_precision(cls, block, bits: int, group_size: int = 64) -> "LowBitBlock":
        """Quantize an S0 block's 2-D leaves on device; 1-D leaves are copied (the S0 block is freed by the
        caller, so nothing is shared with it)."""
        quantize = _quantizer(bits, group_size)
        leaves = {
            k: quantize(v) if v.ndim == 2 else v.copy()
            for k, v in block.leaves.items()
        }
        jax.block_until_ready(leaves)
        return cls(leaves, bits, group_size if bits == 4 else None)
