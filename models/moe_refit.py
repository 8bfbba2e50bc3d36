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

With `router_steps` > 0, each layer's router is trained again before its solve, on the same stream: the routers were
trained on the dense model's hidden states, and the MoE's own states, which the routers see at run time, drift from
them layer by layer. Each router learns each token's top-k experts by the dense MLP's activation mass at the MoE's
own hidden state (`moe_build.train_routers`, on up to ROUTER_TOKENS of the refit's tokens), then the layer's keep
masks and w_down follow from it.

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
from .moe import Routers
from .moe_build import expert_mass, train_routers
from .moe_distill import MLPDeltas, kept_activations, neuron_masks

SEQS_PER_BATCH = 8  # calibration sequences run at once (memory: activations of 8 x T x F float32)
ROUTER_TOKENS = 8192  # tokens of the MoE's own stream a router is trained on again (`router_steps`), drawn at random


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


def refit_down(dense_source, partition, routers: Routers, ids_NxT: np.ndarray, *, top_k: int, lam: float,
               router_steps: int = 0, router_learning_rate: float = 3e-3, seed: int = 0,
               say=print) -> tuple[DownRefit, Routers, dict]:
    """Solve every layer's w_down in order on the calibration sequences ids_NxT (see the module docstring), each
    layer's router first trained again on the MoE's own stream where `router_steps` > 0. Returns (refit, the
    routers the keep masks came from: `routers` or the retrained ones, stats: per-layer relative output error
    before and after, the retrained routers' top-k recall on their tokens, seconds)."""
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
    t0, out, err_before, err_after, recall = time.perf_counter(), [], [], [], []
    w_LxDxE, b_LxE = np.array(routers.w_LxDxE, np.float32), np.array(routers.b_LxE, np.float32)
    for i in range(cfg.n_layers):
        attn = {k: jnp.asarray(v) for k, v in dense_source(layer_block_id(i, "attn")).items()}
        mlp = {k: jnp.asarray(v) for k, v in dense_source(layer_block_id(i, "mlp")).items()}
        xs = [attend(attn, x) for x in xs]
        if router_steps:
            w_LxDxE[i], b_LxE[i], r = _router_on_stream(mlp, partition.neurons_LxExFe[i], xs, eps, top_k,
                                                        router_steps, router_learning_rate, seed + i)
            recall.append(r)
        masks = (jnp.asarray(w_LxDxE[i]), jnp.asarray(b_LxE[i]), jnp.asarray(shared_LxF[i]),
                 jnp.asarray(experts_LxExF[i]))
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
        f"mean {np.mean(err_before):.3f} -> {np.mean(err_after):.3f}"
        + (f"; routers trained again on the MoE's own stream, top-{top_k} recall mean {np.mean(recall):.3f}"
           if recall else "") + f" ({seconds:.0f} s)")
    stats = {"refit_error_before_L": err_before, "refit_error_after_L": err_after, "refit_seconds": seconds}
    if recall:
        stats["refit_router_recall_L"] = recall
    return DownRefit(np.stack(out)), Routers(w_LxDxE, b_LxE) if recall else routers, stats


def _router_on_stream(mlp, neurons_ExFe, xs: list, eps: float, top_k: int, steps: int, learning_rate: float,
                      seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(w [D, E], b [E], top-k recall) of a router trained on up to ROUTER_TOKENS of the residual stream `xs`
    (the MoE's own, at this layer's MLP), toward each token's top-k experts by the dense MLP's activation mass."""
    h_NxD = jnp.concatenate([Lay.rms_norm(x, mlp["ffn_norm"], eps).reshape(-1, x.shape[-1]) for x in xs])
    rows = np.random.default_rng(seed).permutation(h_NxD.shape[0])[:ROUTER_TOKENS]
    h_NxD = h_NxD[jnp.asarray(np.sort(rows))]
    mass_NxE = expert_mass(mlp, neurons_ExFe, h_NxD)
    r, st = train_routers(np.asarray(h_NxD)[None], np.asarray(mass_NxE)[None], top_k=top_k, steps=steps,
                          learning_rate=learning_rate, seed=seed, log_every=steps, say=lambda _: None)
    return r.w_LxDxE[0], r.b_LxE[0], float(st["recall_L"][0])
