"""The weight protocol the model's layers compute with, so models stay ignorant of how a block is held.

A weight leaf is either a plain array (full precision) or any object that offers the same operations:
`w.matmul(x)` for `x @ W`, `w.take_columns(ids)` for an embedding lookup in head layout. The tiers' int8, int4 and
low-rank formats implement them; this module only dispatches.
"""

from __future__ import annotations

import jax.numpy as jnp


def matmul(x_xK, w_KxN):
    """`x @ W` for x of shape [..., K]; the result keeps x's dtype, accumulating in float32."""
    if hasattr(w_KxN, "matmul"):
        return w_KxN.matmul(x_xK)
    y = jnp.matmul(x_xK, w_KxN.astype(x_xK.dtype), preferred_element_type=jnp.float32)
    return y.astype(x_xK.dtype)


def take_columns(w_DxV, ids):
    """Columns `ids` of a head-layout embedding [D, V], as rows [..., D] (the embedding lookup)."""
    if hasattr(w_DxV, "take_columns"):
        flat = w_DxV.take_columns(ids.reshape(-1))
        return flat.reshape(*ids.shape, flat.shape[-1])
    return jnp.moveaxis(jnp.take(w_DxV, ids, axis=1), 0, -1)  # [D, ...ids] -> [...ids, D]
