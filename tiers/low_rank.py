"""S6: the block as low-rank factors on device. `LowRankWeight(a_KxR, b_RxN)` from a truncated SVD.

The truncated SVD runs ON DEVICE (jnp: `eigh` of the m x m Gram matrix of the short side, float32, HIGHEST
matmul precision), from an S0 block (`device:convert`).
The rank is clamped to min(K, N) (then the factorisation is exact up to float32 rounding).
1-D leaves (norm weights) stay float32 on device.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from vorch_jax.tiers.full_precision import DeviceBlock
from vorch_jax.tiers.state import State


_HI = jax.lax.Precision.HIGHEST  # no TF32 on GPU: products with the factors are float32-accurate


@struct.dataclass
class LowRankWeight:
    """Rank-R factorisation of a `[K, N]` weight.

    Invariant: `W ≈ a_KxR @ b_RxN`, the best rank-R approximation in Frobenius norm (Eckart–Young) up to
    float32 error. For K <= N, `a = U_r` (orthonormal columns) and `b = U_r.T @ W`; for K > N, `b = V_r.T`
    (orthonormal rows) and `a = W @ V_r`.
    Leaves: `a_KxR`, `b_RxN` (float32). Rank is `a_KxR.shape[1]` (no static fields).
    """

    a_KxR: jax.Array
    b_RxN: jax.Array

    @property
    def shape(self) -> tuple[int, int]:
        return (self.a_KxR.shape[0], self.b_RxN.shape[1])

    @property
    def rank(self) -> int:
        return self.a_KxR.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(self))

    def matmul(self, x_xK: jax.Array) -> jax.Array:
        """`x[..., K] @ W` as `(x @ a) @ b` -> `[..., N]` in x's dtype, float32 accumulation."""
        h_xR = jnp.matmul(x_xK, self.a_KxR.astype(x_xK.dtype), preferred_element_type=jnp.float32, precision=_HI)
        y_xN = jnp.matmul(h_xR, self.b_RxN, preferred_element_type=jnp.float32, precision=_HI)
        return y_xN.astype(x_xK.dtype)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """`[K, N]` = `a @ b` in float32, returned in `dtype`."""
        return jnp.matmul(self.a_KxR, self.b_RxN, preferred_element_type=jnp.float32, precision=_HI).astype(dtype)

    def take_columns(self, ids_I: jax.Array, dtype=jnp.float32) -> jax.Array:
        """Only output columns `ids`: `[len(ids), K]` = `dequantize()[:, ids].T` (same contract as Int8Weight)."""
        b_RxI = jnp.take(self.b_RxN, jnp.asarray(ids_I), axis=1)
        return jnp.matmul(self.a_KxR, b_RxI, preferred_element_type=jnp.float32, precision=_HI).T.astype(dtype)


@functools.partial(jax.jit, static_argnames=("rank",))
def _factorize(w_KxN: jax.Array, rank: int) -> LowRankWeight:
    # Truncated SVD through the Gram matrix of the short side (eigh of an m x m matrix, m = min(K, N)): the
    # full SVD of the 576 x 49152 embedding takes ~20 s on a CPU, this ~1 s. The result is the orthogonal
    # projection of W on its top-r singular subspace, which is the optimal rank-r approximation.
    w_KxN = w_KxN.astype(jnp.float32)
    k, n = w_KxN.shape
    if k <= n:
        _, v_KxK = jnp.linalg.eigh(jnp.matmul(w_KxN, w_KxN.T, precision=_HI))  # ascending eigenvalues
        a_KxR = v_KxK[:, ::-1][:, :rank]                                          # top-r left singular vectors
        b_RxN = jnp.matmul(a_KxR.T, w_KxN, precision=_HI)
    else:
        _, v_NxN = jnp.linalg.eigh(jnp.matmul(w_KxN.T, w_KxN, precision=_HI))
        b_RxN = v_NxN[:, ::-1][:, :rank].T                                        # top-r right singular vectors
        a_KxR = jnp.matmul(w_KxN, b_RxN.T, precision=_HI)
    return LowRankWeight(a_KxR=a_KxR, b_RxN=b_RxN)


def factorize(w_KxN: jax.Array, rank: int) -> LowRankWeight:
    """Truncated SVD of a 2-D float weight, on the device where `w` lives; rank clamped to min(K, N)."""
    if w_KxN.ndim != 2:
        raise ValueError(f"factorize expects a 2-D [K, N] weight, got shape {tuple(w_KxN.shape)}")
    if rank < 1:
        raise ValueError(f"low-rank rank must be >= 1, got {rank}")
    return _factorize(w_KxN, rank=min(rank, *w_KxN.shape))


class LowRankBlock(DeviceBlock):
    """S6. `leaves: {name: LowRankWeight | f32[D]}` on device."""

    state = State.S6

    def __init__(self, leaves: dict, rank: int):
        self.leaves, self.rank = leaves, rank

    @classmethod
    def from_full_precision(cls, block, rank: int = 32) -> "LowRankBlock":
        """Factorise an S0 block's 2-D leaves on device; 1-D leaves are copied (the caller frees the S0 block)."""
        leaves = {k: factorize(v, rank) if v.ndim == 2 else v.copy() for k, v in block.leaves.items()}
        jax.block_until_ready(leaves)
        return cls(leaves, rank)
