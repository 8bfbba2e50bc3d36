"""S2: int4 weights, asymmetric, one (scale, zero) per group of ``g`` rows along K and per output column.

A weight is 2-D ``[K, N]`` used as ``x[..., K] @ W[K, N]``. K is padded up to ``K_pad = G * g`` by repeating
the last true row (edge padding), so the padded rows never widen the last group's range; the true K is kept
as a static field and every consumer slices back to it (the matmul pads x with zeros, so padded rows add 0).

Per group (GPTQ-style range that always contains 0):

    lo = min(0, min W_g),  hi = max(0, max W_g)
    scale = (hi - lo) / 15          (1.0 for an all-zero group)
    zero  = round(-lo / scale)      in [0, 15], an integer
    q     = clip(round(W / scale) + zero, 0, 15)

so ``|W - (q - zero) * scale| <= scale / 2`` elementwise (up to float32 rounding).

Why ``zero`` is stored as uint8 (an integer code) rather than float32: it is 4x smaller, and ``q - zero`` is
then a small integer in [-15, 15], exactly representable in bfloat16, so the kernel can run the tile dot on
integer-valued bf16 operands and apply the float32 scale once per group to the float32 accumulator. The price
is the range-includes-0 rule above (an all-positive group wastes part of its 16 levels).

Packing: two K-adjacent codes per byte, ``packed[i, n] = q[2i, n] | (q[2i + 1, n] << 4)`` (low nibble = even k).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from vorch_jax.tiers.kernels import select
from vorch_jax.tiers.kernels.int4_matmul import check_group_size

_QMAX = 15


def pack_nibbles(q_KxN: jax.Array) -> jax.Array:
    """Pack codes in [0, 15] ``[K, N]`` (K even) to uint8 ``[K/2, N]``; low nibble = even k."""
    q_K2x2xN = q_KxN.astype(jnp.uint8).reshape(q_KxN.shape[0] // 2, 2, q_KxN.shape[1])
    return q_K2x2xN[:, 0, :] | (q_K2x2xN[:, 1, :] << 4)


def unpack_nibbles(packed_K2xN: jax.Array) -> jax.Array:
    """Inverse of :func:`pack_nibbles`: uint8 ``[K/2, N]`` -> uint8 codes ``[K, N]``."""
    lo_K2xN = packed_K2xN & 0xF
    hi_K2xN = packed_K2xN >> 4
    k2, n = packed_K2xN.shape
    return jnp.stack([lo_K2xN, hi_K2xN], axis=1).reshape(2 * k2, n)


@struct.dataclass
class Int4Weight:
    """Group-wise asymmetric int4 weight, two codes per byte along K.

    Invariant: ``W[k, n] ≈ (q[k, n] - zero[k // g, n]) * scale[k // g, n]`` for ``k < k_true``, with
    ``q = unpack_nibbles(packed_K2xN)`` and ``|W - deq| <= scale / 2`` elementwise.

    Leaves: ``packed_K2xN`` (uint8 ``[K_pad/2, N]``), ``scale_GxN`` (float32), ``zero_GxN`` (uint8 codes in
    [0, 15]). Static: ``group_size`` (g) and ``k_true`` (K before padding to ``K_pad = G * g``).
    """

    packed_K2xN: jax.Array
    scale_GxN: jax.Array
    zero_GxN: jax.Array
    group_size: int = struct.field(pytree_node=False)
    k_true: int = struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, int]:
        """``(K, N)`` of the weight this stands for (true K, not padded)."""
        return (self.k_true, self.packed_K2xN.shape[1])

    @property
    def k_padded(self) -> int:
        """Rows actually stored: ``G * group_size``."""
        return 2 * self.packed_K2xN.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held by the leaves (packed codes incl. padding rows + scales + zeros)."""
        return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(self))

    def _dequantize_padded(self, packed_K2xI, scale_GxI, zero_GxI) -> jax.Array:
        q_KpxI = unpack_nibbles(packed_K2xI).astype(jnp.float32)
        g = self.group_size
        n_groups, n_cols = scale_GxI.shape
        q_GxgxI = q_KpxI.reshape(n_groups, g, n_cols)
        w_GxgxI = (q_GxgxI - zero_GxI.astype(jnp.float32)[:, None, :]) * scale_GxI[:, None, :]
        return w_GxgxI.reshape(n_groups * g, n_cols)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """``[k_true, N]`` weight ``(q - zero) * scale``, computed in float32, returned in ``dtype``."""
        w_KpxN = self._dequantize_padded(self.packed_K2xN, self.scale_GxN, self.zero_GxN)
        return w_KpxN[: self.k_true].astype(dtype)

    def take_columns(self, ids_I: jax.Array, dtype=jnp.float32) -> jax.Array:
        """Dequantize only output columns ``ids``: returns ``[len(ids), K]`` = ``dequantize()[:, ids].T``."""
        ids_I = jnp.asarray(ids_I)
        w_KpxI = self._dequantize_padded(
            jnp.take(self.packed_K2xN, ids_I, axis=1),
            jnp.take(self.scale_GxN, ids_I, axis=1),
            jnp.take(self.zero_GxN, ids_I, axis=1),
        )
        return w_KpxI[: self.k_true].T.astype(dtype)

    def matmul(self, x_xK: jax.Array) -> jax.Array:
        """``x[..., K] @ W`` -> ``[..., N]`` in x's dtype, float32 accumulation (path chosen by ``select``)."""
        return select.matmul_int4(x_xK, self)


def _quantize_int4_impl(w_KxN: jax.Array, group_size: int) -> Int4Weight:
    k, n = w_KxN.shape
    n_groups = -(-k // group_size)
    k_pad = n_groups * group_size
    w_KxN = w_KxN.astype(jnp.float32)
    w_KpxN = jnp.pad(w_KxN, ((0, k_pad - k), (0, 0)), mode="edge")
    w_GxgxN = w_KpxN.reshape(n_groups, group_size, n)
    lo_GxN = jnp.minimum(jnp.min(w_GxgxN, axis=1), 0.0)
    hi_GxN = jnp.maximum(jnp.max(w_GxgxN, axis=1), 0.0)
    span_GxN = hi_GxN - lo_GxN
    scale_GxN = jnp.where(span_GxN > 0, span_GxN / _QMAX, 1.0).astype(jnp.float32)
    zero_GxN = jnp.clip(jnp.round(-lo_GxN / scale_GxN), 0, _QMAX)
    q_GxgxN = jnp.clip(jnp.round(w_GxgxN / scale_GxN[:, None, :]) + zero_GxN[:, None, :], 0, _QMAX)
    packed_K2xN = pack_nibbles(q_GxgxN.reshape(k_pad, n))
    return Int4Weight(
        packed_K2xN=packed_K2xN,
        scale_GxN=scale_GxN,
        zero_GxN=zero_GxN.astype(jnp.uint8),
        group_size=group_size,
        k_true=k,
    )


_quantize_int4_jit = jax.jit(_quantize_int4_impl, static_argnames=("group_size",))


def quantize_int4(w_KxN: jax.Array, group_size: int = 128) -> Int4Weight:
    """Quantize a float ``[K, N]`` weight to :class:`Int4Weight` (jitted; runs where ``w`` lives).

    K need not be a multiple of ``group_size`` (the last group is edge-padded); K must be even.
    Raises ValueError for an unsupported group size, an odd K, a non-2-D or non-float input.
    """
    check_group_size(group_size, "quantize_int4")
    if w_KxN.ndim != 2:
        raise ValueError(f"quantize_int4 expects a 2-D [K, N] weight, got shape {tuple(w_KxN.shape)}")
    if not jnp.issubdtype(w_KxN.dtype, jnp.floating):
        raise ValueError(f"quantize_int4 expects a float weight, got dtype {w_KxN.dtype}")
    if w_KxN.shape[0] % 2:
        raise ValueError(f"quantize_int4 needs an even K (two codes per byte), got K={w_KxN.shape[0]}")
    return _quantize_int4_jit(w_KxN, group_size=group_size)
