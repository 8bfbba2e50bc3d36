"""S1: int8 weights, symmetric, one scale per output channel.

A weight is 2-D ``[K, N]`` (K = input features, contracted; N = output features) and is used as
``x[..., K] @ W[K, N]``. Quantization is round-to-nearest with the scale taken from each column's absmax:

    scale[n] = max_k |W[k, n]| / 127        (1.0 for an all-zero column)
    q[k, n]  = clip(round(W[k, n] / scale[n]), -127, 127)

so ``|W - q * scale[None, :]| <= scale / 2`` elementwise (up to float32 rounding of the division).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from vorch_jax.tiers.kernels import select

_QMAX = 127


@struct.dataclass
class Int8Weight:
    """Per-output-channel symmetric int8 weight.

    Invariant: ``W ≈ q_KxN * scale_N[None, :]`` with ``|W - q * scale| <= scale / 2`` elementwise.

    Leaves: ``q_KxN`` (int8, ``[K, N]``) and ``scale_N`` (float32, ``[N]``). No static fields.
    """

    q_KxN: jax.Array
    scale_N: jax.Array

    @property
    def shape(self) -> tuple[int, int]:
        """``(K, N)`` of the weight this stands for."""
        return tuple(self.q_KxN.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held by the leaves (int8 codes + float32 scales)."""
        return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(self))

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """``[K, N]`` weight ``q * scale[None, :]``, computed in float32, returned in ``dtype``."""
        w_KxN = self.q_KxN.astype(jnp.float32) * self.scale_N[None, :]
        return w_KxN.astype(dtype)

    def take_columns(self, ids_I: jax.Array, dtype=jnp.float32) -> jax.Array:
        """Dequantize only output columns ``ids``: returns ``[len(ids), K]`` = ``dequantize()[:, ids].T``.

        Used for embedding lookup when the embedding is stored in head layout ``[D, V]``.
        """
        ids_I = jnp.asarray(ids_I)
        q_IxK = jnp.take(self.q_KxN, ids_I, axis=1).T
        scale_I = jnp.take(self.scale_N, ids_I)
        return (q_IxK.astype(jnp.float32) * scale_I[:, None]).astype(dtype)

    def matmul(self, x_xK: jax.Array) -> jax.Array:
        """``x[..., K] @ W`` -> ``[..., N]`` in x's dtype, float32 accumulation.

        The path (compiled Pallas, interpret-mode Pallas, or jnp reference) is chosen by
        ``vorch_jax.tiers.kernels.select`` (see ``kernel_mode``).
        """
        return select.matmul_int8(x_xK, self)


@jax.jit
def _quantize_int8(w_KxN: jax.Array) -> Int8Weight:
    w_KxN = w_KxN.astype(jnp.float32)
    absmax_N = jnp.max(jnp.abs(w_KxN), axis=0)
    scale_N = jnp.where(absmax_N > 0, absmax_N / _QMAX, 1.0).astype(jnp.float32)
    q_KxN = jnp.clip(jnp.round(w_KxN / scale_N[None, :]), -_QMAX, _QMAX).astype(jnp.int8)
    return Int8Weight(q_KxN=q_KxN, scale_N=scale_N)


def quantize_int8(w_KxN: jax.Array) -> Int8Weight:
    """Quantize a float ``[K, N]`` weight to :class:`Int8Weight` (jitted; runs where ``w`` lives).

    Raises ValueError for a non-2-D or non-float input.
    """
    if w_KxN.ndim != 2:
        raise ValueError(f"quantize_int8 expects a 2-D [K, N] weight, got shape {tuple(w_KxN.shape)}")
    if not jnp.issubdtype(w_KxN.dtype, jnp.floating):
        raise ValueError(f"quantize_int8 expects a float weight, got dtype {w_KxN.dtype}")
    return _quantize_int8(w_KxN)
