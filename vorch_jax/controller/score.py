"""The score R(b, s): how much block b is worth holding in state s, and the value V(b, s) the knapsack maximises.

    R(b, s) = [(w1·ρ̂ + w2·λ̂ + w3·κ̂ + w4·ψ̂) / (w1 + w2 + w3 + w4)] / (c0 + α·δ̂(b, s) + β·τ̂(b, s))
    V(b, s) = R(b, s)·q(b, s),  q = 1 for S0/S3/S4,  q = 1 - loss(s)·(1 + ψ̂)/2 for lossy s

Normalisation (so no term silently dominates):
- Each numerator term is divided by its max over the blocks (0 when the max is 0), so ρ̂, λ̂, κ̂, ψ̂ ∈ [0, 1]
  whatever their units, and the weighted mean keeps the numerator in [0, 1]. Max, not rank: it is O(B), keeps ratios
  (a block accessed twice as often stays twice as hot) and is monotone in each block's own term.
- δ and τ are both seconds, so they share ONE scale: the *mean* transfer time over the allowed (block, state)
  entries with τ > 0 (the typical cost of fetching a block; the max of δ when nothing needs a transfer).
  Normalising them separately would make the slowest dequant (microseconds) count as much as the slowest NVMe read
  (milliseconds) and rank S3 above S2. With the shared scale δ̂, τ̂ keep their measured ratio, and a typical
  transfer costs exactly 1.
  Why the mean and not the max: over the max, every block but the largest has τ̂ << 1, so beside c0 = 1 the cost
  of streaming a typical block all but vanished (SmolLM2's embedding is 10x its MLP blocks: streaming an MLP block
  cost 9% of its value, less than the hysteresis margin, and cheaper-looking than holding it int4 on device).
- The constant c0 (default 1) replaces the original "+ eps": S0 has δ = τ = 0, so with a tiny eps its score was
  ~1/eps and every other cost term vanished beside it. With c0 = 1 a typical transfer halves a block's value
  (at α = β = 1), a block twice as slow to fetch loses two thirds; nothing explodes.
The score is NaN-free by construction: non-finite or negative inputs count as 0, every division is guarded, and the
denominator is >= c0 > 0 (ScoreWeights.validate). Host-side NaN inputs are rejected earlier by BlockTable.from_rows.

Shapes: B blocks, 7 states.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp

from vorch_jax.controller import state_ids as sid
from vorch_jax.controller.block_table import BlockTable

# Default value lost by a lossy state, before scaling by sensitivity: loss(s)·(1 + ψ̂)/2 ∈ [loss/2, loss].
DEFAULT_LOSSY_LOSS = {sid.S1: 0.05, sid.S2: 0.2, sid.S6: 0.5}


@flax.struct.dataclass
class ScoreWeights:
    """Weights of the score, a pytree of float scalars so that changing them does not recompile the tick.

    Build with `ScoreWeights.make(...)`, which validates; the bare constructor does not (jit rebuilds it from leaves).
    """

    w1: jax.Array  # ρ   access frequency
    w2: jax.Array  # λ   lookahead need
    w3: jax.Array  # κ   structural importance
    w4: jax.Array  # ψ   quantisation sensitivity
    alpha: jax.Array  # δ   dequant seconds
    beta: jax.Array  # τ   transfer seconds
    c0: jax.Array  # base cost; keeps the denominator > 0 when δ = τ = 0

    @classmethod
    def make(cls, w1=1.0, w2=1.0, w3=1.0, w4=1.0, alpha=1.0, beta=1.0, c0=1.0) -> "ScoreWeights":
        vals = dict(w1=w1, w2=w2, w3=w3, w4=w4, alpha=alpha, beta=beta, c0=c0)
        for name, v in vals.items():
            try:
                f = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"ScoreWeights.{name} must be a number, got {v!r}") from None
            if math.isnan(f) or math.isinf(f):
                raise ValueError(f"ScoreWeights.{name} is {f}; weights must be finite")
            if f < 0:
                raise ValueError(f"ScoreWeights.{name} is negative ({f}); weights must be >= 0")
        if float(alpha) == 0 and float(beta) == 0:
            raise ValueError("ScoreWeights: alpha = beta = 0 zeroes the cost denominator (α·δ + β·τ): the score "
                             "would ignore dequant and transfer costs entirely; set alpha or beta > 0")
        if float(c0) <= 0:
            raise ValueError(f"ScoreWeights.c0 is {float(c0)}; it must be > 0 or the denominator can be 0 where "
                             "δ = τ = 0 (S0)")
        if float(w1) + float(w2) + float(w3) + float(w4) == 0:
            raise ValueError("ScoreWeights: w1..w4 are all 0, so every block scores 0; set at least one > 0")
        return cls(**{k: jnp.asarray(float(v), jnp.float32) for k, v in vals.items()})


def _clean(x):
    """Non-finite or negative -> 0: the jitted score must never see or make NaN."""
    return jnp.where(jnp.isfinite(x), jnp.maximum(x, 0.0), 0.0)


def _by_max(x_B):
    m = jnp.max(x_B, initial=0.0)
    return jnp.where(m > 0, x_B / jnp.where(m > 0, m, 1.0), 0.0)


def _inverse_cost_scale(delta, tau):
    """1 / (mean τ over entries with τ > 0), or 1 / max δ when no entry needs a transfer; 0 when all costs are 0."""
    n_tau = jnp.sum(tau > 0)
    scale = jnp.where(n_tau > 0, jnp.sum(tau) / jnp.maximum(n_tau, 1), jnp.max(delta, initial=0.0))
    return jnp.where(scale > 0, 1.0 / jnp.where(scale > 0, scale, 1.0), 0.0)


def numerator(table: BlockTable, w: ScoreWeights) -> jax.Array:
    """float32[B] in [0, 1]: weighted mean of the max-normalised access terms."""
    ws = (_clean(w.w1), _clean(w.w2), _clean(w.w3), _clean(w.w4))
    terms = (table.rho, table.lam, table.kappa, table.psi)
    total = sum(wi * _by_max(_clean(t)) for wi, t in zip(ws, terms))
    wsum = sum(ws)
    return jnp.where(wsum > 0, total / jnp.where(wsum > 0, wsum, 1.0), 0.0)


def denominator_SB(table: BlockTable, w: ScoreWeights) -> jax.Array:
    """float32[7,B] >= c0: c0 + α·δ̂ + β·τ̂ with δ and τ on one shared seconds scale (state-major layout)."""
    allowed_SB = table.allowed.T
    delta_SB = jnp.where(allowed_SB, _clean(table.delta.T), 0.0)
    tau_SB = jnp.where(allowed_SB, _clean(table.tau.T), 0.0)
    inv = _inverse_cost_scale(delta_SB, tau_SB)
    c0 = jnp.where(jnp.isfinite(w.c0) & (w.c0 > 0), w.c0, 1.0)
    return c0 + _clean(w.alpha) * inv * delta_SB + _clean(w.beta) * inv * tau_SB


def quality_SB(table: BlockTable, lossy_loss=None) -> jax.Array:
    """float32[7,B] in (0, 1]: 1 for lossless states, 1 - loss(s)·(1 + ψ̂)/2 for lossy ones (high ψ loses more)."""
    loss = dict(DEFAULT_LOSSY_LOSS if lossy_loss is None else lossy_loss)
    loss_S = jnp.asarray([loss.get(s, 0.0) for s in range(sid.NUM_STATES)], jnp.float32)
    psi_hat = _by_max(_clean(table.psi))
    return 1.0 - loss_S[:, None] * (0.5 + 0.5 * psi_hat[None, :])


def value_SB(table: BlockTable, w: ScoreWeights, lossy_loss=None) -> jax.Array:
    """float32[7,B]: V(b, s) = R(b, s)·q(b, s), state-major (the layout the tick works in)."""
    return numerator(table, w)[None, :] / denominator_SB(table, w) * quality_SB(table, lossy_loss)


def value_columns(table: BlockTable, w: ScoreWeights, lossy_loss=None) -> list:
    """V(b, s) as 7 columns float32[B] (one per state): the layout the tick works in. XLA:CPU fuses elementwise
    work on [B] columns far better than small reductions over a [B,7] or [7,B] state axis (measured ~5x)."""
    loss = dict(DEFAULT_LOSSY_LOSS if lossy_loss is None else lossy_loss)
    num = numerator(table, w)
    delta = jnp.where(table.allowed, _clean(table.delta), 0.0)  # full-array reductions stay cheap
    tau = jnp.where(table.allowed, _clean(table.tau), 0.0)
    inv = _inverse_cost_scale(delta, tau)
    c0 = jnp.where(jnp.isfinite(w.c0) & (w.c0 > 0), w.c0, 1.0)
    a, b = _clean(w.alpha) * inv, _clean(w.beta) * inv
    psi_hat = _by_max(_clean(table.psi))
    cols = []
    for s in range(sid.NUM_STATES):
        den = c0 + a * delta[:, s] + b * tau[:, s]
        q = 1.0 - loss.get(s, 0.0) * (0.5 + 0.5 * psi_hat) if s in loss else 1.0
        cols.append(num / den * q)
    return cols


def denominator(table: BlockTable, w: ScoreWeights) -> jax.Array:
    """float32[B,7] >= c0: c0 + α·δ̂ + β·τ̂."""
    return denominator_SB(table, w).T


def score(table: BlockTable, w: ScoreWeights) -> jax.Array:
    """float32[B,7]: R(b, s). Defined for every state; the ladder (`allowed`) is applied by the caller."""
    return (numerator(table, w)[None, :] / denominator_SB(table, w)).T


def quality(table: BlockTable, lossy_loss=None) -> jax.Array:
    """float32[B,7]: the quality factor q(b, s)."""
    return quality_SB(table, lossy_loss).T


def value(table: BlockTable, w: ScoreWeights, lossy_loss=None) -> jax.Array:
    """float32[B,7]: V(b, s) = R(b, s)·q(b, s), the quantity the state update maximises."""
    return value_SB(table, w, lossy_loss).T


def default_weights() -> ScoreWeights:
    return ScoreWeights.make()


__all__ = ["ScoreWeights", "score", "value", "value_SB", "quality", "numerator", "denominator", "default_weights",
           "DEFAULT_LOSSY_LOSS"]
