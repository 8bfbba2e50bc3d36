"""Access terms of the score from what the executor saw: ρ (decayed frequency) and λ (lookahead need).

Both are jittable and shape-stable: a batch of accessed block indices is a fixed-size int32 array padded with -1,
so the runtime can call `update_rho` every step without recompiling.

- ρ: rho' = decay·rho + count(accesses of b in this batch). With a steady stream of c accesses per step it converges
  to c / (1 - decay); the score max-normalises it, so only ratios between blocks matter.
- λ: layers follow models/: -1 is the embedding, 0..num_layers-1 the decoder layers, num_layers the final norm /
  head, so one decode step visits num_layers + 2 positions. When the executor is about to run layer
  `current_layer`, a block of layer l is needed after distance = (l - current_layer) mod (num_layers + 2) positions
  (wrapping into the next decode step); within the lookahead window it gets λ = decay**distance (1 for the layer
  about to run), else 0. MoE experts are not all needed: the router supplies their λ through `lam_override` where
  `override_mask` is set.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.jit
def update_rho(rho_B, accessed_N, decay):
    """float32[B]: decayed access counts. accessed_N int32[N] block indices, -1 (or out of range) = padding."""
    B = rho_B.shape[0]
    idx = jnp.asarray(accessed_N, jnp.int32)
    valid = (idx >= 0) & (idx < B)
    counts = jnp.zeros((B,), jnp.float32).at[jnp.where(valid, idx, B)].add(1.0, mode="drop")
    return jnp.asarray(decay, jnp.float32) * rho_B + counts


def pad_accesses(accessed, size):
    """Host helper: a Python list of block indices -> int32[size] padded with -1 (truncates beyond `size`)."""
    import numpy as np

    out = np.full(size, -1, np.int32)
    acc = np.asarray(accessed, np.int32)[:size]
    out[: acc.size] = acc
    return jnp.asarray(out)


@jax.jit
def lookahead_lambda(layer_B, current_layer, num_layers, window, decay, lam_override_B=None, override_mask_B=None):
    """float32[B]: decay**distance for blocks within `window` positions ahead of `current_layer` (wrapping), else 0.

    layer_B int32[B] in -1..num_layers (embedding -1, final norm num_layers). lam_override_B float32[B] replaces the
    dense λ where override_mask_B is True (everywhere if no mask is given).
    """
    period = jnp.maximum(jnp.asarray(num_layers, jnp.int32), 0) + 2
    dist = jnp.mod(jnp.asarray(layer_B, jnp.int32) - jnp.asarray(current_layer, jnp.int32), period)
    lam = jnp.where(dist < window, jnp.power(jnp.asarray(decay, jnp.float32), dist.astype(jnp.float32)), 0.0)
    if lam_override_B is not None:
        ov = jnp.asarray(lam_override_B, jnp.float32)
        ov = jnp.where(jnp.isfinite(ov), jnp.maximum(ov, 0.0), 0.0)
        mask = jnp.ones_like(lam, bool) if override_mask_B is None else jnp.asarray(override_mask_B, bool)
        lam = jnp.where(mask, ov, lam)
    return lam
