"""Measured decompression cost δ: extra seconds one decode-shaped use of a block pays in each lossy state.

For a representative block of each kind, every 2-D leaf is converted on the device (int8, int4, low-rank) and
`x[1, K] @ W` is timed through the format's own `matmul` (the kernel path the runtime uses), against full
precision. δ(s) = Σ_leaves (t_s − t_S0), clipped at 0: the controller's α·δ term.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from vorch_jax.tiers.low_rank import factorize
from vorch_jax.tiers.quant_int4 import quantize_int4
from vorch_jax.tiers.quant_int8 import quantize_int8
from vorch_jax.tiers.state import State


@jax.jit
def _apply(w, x):
    return w.matmul(x) if hasattr(w, "matmul") else x @ w


def _seconds(w, x, repeats: int) -> float:
    _apply(w, x).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _apply(w, x).block_until_ready()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_dequant_seconds(leaves: dict, *, int4_group_size: int = 64, lowrank_rank: int = 32,
                            repeats: int = 20) -> dict:
    """{State: extra seconds per use} for S1, S2, S6 (and 0.0 for S0) of one block's leaves `{name: ndarray}`."""
    convert = {
        State.S1: quantize_int8,
        State.S2: lambda w: quantize_int4(w, int4_group_size),
        State.S6: lambda w: factorize(w, lowrank_rank),
    }
    extra = {State.S0: 0.0, State.S1: 0.0, State.S2: 0.0, State.S6: 0.0}
    for w_np in leaves.values():
        if np.ndim(w_np) != 2:
            continue
        w = jnp.asarray(w_np)
        x = jnp.asarray(np.random.default_rng(0).standard_normal((1, w.shape[0]), dtype=np.float32))
        base = _seconds(w, x, repeats)
        for s, fn in convert.items():
            q = fn(w)
            extra[s] += max(0.0, _seconds(q, x, repeats) - base)
            jax.tree_util.tree_map(lambda a: a.delete(), q)
        w.delete()
    return extra
