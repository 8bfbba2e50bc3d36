"""Refit each layer's w_down of the routed MoE by least squares: the neurons a token keeps take over what it drops.

At top-k < E a token runs the shared neurons and its k experts' neurons, so the MLP output loses the dropped
neurons' share. Those contributions correlate with the kept neurons' activations, and the output is linear in
w_down, so one closed-form solve per layer recovers much of the loss: with act [N, F] the dense SwiGLU activations
on calibration tokens, keep [N, F] each token's kept neurons (shared ∪ its routed top-k experts, as the routers
choose at run time) and y = act @ w_down the dense MLP's output,

    w_down' = argmin_W ‖(act ⊙ keep) W - y‖² + λ·s·‖W - w_down‖²,   s = trace(G) / F,  G = (act ⊙ keep)ᵀ(act ⊙ keep)
            = (G + λ·s·I)⁻¹ ((act ⊙ keep)ᵀ y + λ·s·w_down)

The ridge pulls toward the dense w_down (λ → ∞ gives it back; λ scales with the activations' energy, so one λ
fits every layer). Layers are solved in order on the MoE's own residual stream: layer l's inputs come from the
refitted layers before it, so each solve sees the errors that reach it. Each row of w_down belongs to one neuron,
hence to one expert or the shared part: a refitted MoE keeps every block's shape, bytes and compute.

It costs minutes where the distillation costs most of an hour on this CPU; what it recovers is measured in
experiments/results/moe_quality_coact_refit.txt. A low-rank truncation of the change keeps little of it (measured
while choosing the design), so the refit is stored whole: 106 MB float32 in the cache store, nothing ships.

Shapes: L layers, B batch, T tokens, D model width, F MLP width, E experts.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from . import llama_layers as Lay
from .block_ids import layer_block_id, parse_block_id
from .errors import MoEError
from .moe_distill import MLPDeltas, kept_activations, neuron_masks

SEQS_PER_BATCH = 8  # calibration sequences run at once (memory: activations of 8 x T x F float32)


@dataclasses.dataclass(frozen=True)
class DownRefit:
    """Every layer's refitted w_down [F, D], float32; an MLP edit as `moe_distill.MLPDeltas` is (`MoESource`)."""

    w_down_LxFxD: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.w_down_LxFxD.nbytes

    def tree(self) -> dict:
        return {"w_down": self.w_down_LxFxD}

    @classmethod
    def from_tree(cls, tree: dict) -> "DownRefit":
        return cls(np.asarray(tree["w_down"], np.float32))

    def check(self, n_layers: int, d_model: int, d_ff: int) -> "DownRefit":
        if self.w_down_LxFxD.shape != (n_layers, d_ff, d_model):
            raise MoEError(f"refitted w_down of shape {self.w_down_LxFxD.shape} does not fit a model of {n_layers} "
                           f"layers, F = {d_ff}, D = {d_model}")
        return self

    def merged(self, layer: int, mlp: dict) -> dict:
        """A dense MLP block's leaves with this layer's w_down replaced (the other leaves as they are)."""
        return dict(mlp, w_down=self.w_down_LxFxD[layer])


@dataclasses.dataclass(frozen=True)
class RefitThenDeltas:
    """The refit, then low-rank corrections distilled on top of it: one MLP edit (`MoESource`), applied in order."""

    refit: DownRefit
    deltas: MLPDeltas

    @property
    def nbytes(self) -> int:
        return self.refit.nbytes + self.deltas.nbytes

    def check(self, n_layers: int, d_model: int, d_ff: int) -> "RefitThenDeltas":
        self.refit.check(n_layers, d_model, d_ff)
        self.deltas.check(n_layers, d_model, d_ff)
        return self

    def merged(self, layer: int, mlp: dict) -> dict:
        return self.deltas.merged(layer, self.refit.merged(layer, mlp))


class RefitSource:
    """A dense block source with each layer's w_down refitted: what a distillation on top of a refit starts from
    (`moe_distill.distill` reads `config` and blocks; nothing else)."""

    def __init__(self, dense_source, refit: DownRefit):
        self.dense, self.config = dense_source, dense_source.config
        self.refit = refit.check(self.config.n_layers, self.config.d_model, self.config.d_ff)

    def __call__(self, block_id: str) -> dict:
        part, layer, _ = parse_block_id(block_id)
        out = self.dense(block_id)
        return self.refit.merged(layer, out) if part == "mlp" else out


def ridge_solve(gram_FxF, cross_FxD, w0_FxD, lam: float):
    """(G + λ·s·I)⁻¹ (C + λ·s·w0), s = trace(G) / F: the least-squares w_down pulled toward w0."""
    s = lam * jnp.trace(gram_FxF) / gram_FxF.shape[0]
    eye = jnp.eye(gram_FxF.shape[0], dtype=gram_FxF.dtype)
    return jnp.linalg.solve(gram_FxF + s * eye, cross_FxD + s * w0_FxD)


def _kept(mlp, router_w, router_b, shared_F, experts_ExF, x_BxTxD, top_k: int, eps: float):
    """(act ⊙ keep [B, T, F], act [B, T, F]) of the dense MLP on the residual x: what each token keeps at run time."""
    h = Lay.rms_norm(x_BxTxD, mlp["ffn_norm"], eps)
    return kept_activations(h, mlp["w_gate"], mlp["w_up"], router_w, router_b, shared_F, experts_ExF, top_k)


def refit_down(dense_source, partition, routers, ids_NxT: np.ndarray, *, top_k: int, lam: float,
               say=print) -> tuple[DownRefit, dict]:
    """Solve every layer's w_down in order on the calibration sequences ids_NxT (see the module docstring).
    Returns (refit, stats: per-layer relative output error before and after, seconds)."""
    cfg = dense_source.config
    if lam <= 0:
        raise MoEError(f"the refit's ridge must be > 0, got {lam}")
    shared_LxF, experts_LxExF = neuron_masks(partition, cfg.d_ff)
    eps = cfg.norm_eps

    @jax.jit
    def attend(attn, x):
        B, T, _ = x.shape
        kv = jnp.zeros((B, T, cfg.n_kv_heads, cfg.head_dim), jnp.float32)
        return Lay.attention_block(cfg, attn, x, kv, kv, 0)[0]

    @jax.jit
    def moments(mlp, rw, rb, shared_F, experts_ExF, x):
        kept, act = _kept(mlp, rw, rb, shared_F, experts_ExF, x, top_k, eps)
        kept, y = kept.reshape(-1, kept.shape[-1]), act.reshape(-1, act.shape[-1]) @ mlp["w_down"]
        return kept.T @ kept, kept.T @ y, (y * y).sum()

    @jax.jit
    def advance(mlp, rw, rb, shared_F, experts_ExF, x, w_down):
        kept, _ = _kept(mlp, rw, rb, shared_F, experts_ExF, x, top_k, eps)
        return x + kept @ w_down

    embed = {k: jnp.asarray(v) for k, v in dense_source("embed").items()}
    xs = [Lay.embed_tokens(embed, jnp.asarray(ids_NxT[r:r + SEQS_PER_BATCH]), jnp.float32)
          for r in range(0, len(ids_NxT), SEQS_PER_BATCH)]
    t0, out, err_before, err_after = time.perf_counter(), [], [], []
    for i in range(cfg.n_layers):
        attn = {k: jnp.asarray(v) for k, v in dense_source(layer_block_id(i, "attn")).items()}
        mlp = {k: jnp.asarray(v) for k, v in dense_source(layer_block_id(i, "mlp")).items()}
        masks = (jnp.asarray(routers.w_LxDxE[i]), jnp.asarray(routers.b_LxE[i]), jnp.asarray(shared_LxF[i]),
                 jnp.asarray(experts_LxExF[i]))
        xs = [attend(attn, x) for x in xs]
        gram, cross, yy = 0.0, 0.0, 0.0
        for x in xs:
            g, c, e = moments(mlp, *masks, x)
            gram, cross, yy = gram + g, cross + c, yy + e
        w_down = ridge_solve(gram, cross, mlp["w_down"], lam)
        # ‖kept W - y‖² = tr(Wᵀ G W) - 2 tr(Wᵀ C) + ‖y‖², relative to ‖y‖²
        rel = lambda w: float((jnp.sum(w * (gram @ w)) - 2 * jnp.sum(w * cross) + yy) / yy)
        err_before.append(rel(mlp["w_down"]))
        err_after.append(rel(w_down))
        out.append(np.asarray(w_down, np.float32))
        xs = [advance(mlp, *masks, x, w_down) for x in xs]
    seconds = time.perf_counter() - t0
    say(f"refit w_down of {cfg.n_layers} layers on {ids_NxT.size} tokens, λ {lam:g}: relative MLP output error "
        f"mean {np.mean(err_before):.3f} -> {np.mean(err_after):.3f} ({seconds:.0f} s)")
    return DownRefit(np.stack(out)), {"refit_error_before_L": err_before, "refit_error_after_L": err_after,
                                      "refit_seconds": seconds}
