"""Distil the dense SmolLM2 into its routed MoE: low-rank MLP corrections trained on the dense model's logits.

The MoE's experts are slices of the dense MLP (`moe.py`), so at top-k < E each token loses the neurons of the
experts it did not choose. Measured on the book's opening, a top-2 of 8 shared MoE reaches 4.9x the dense perplexity
and no router over those experts gets below 4.4x (`experiments/moe_shared_oracle.py`; each token's own neurons at the
same compute would: `experiments/moe_granularity.py`). This module changes the weights:
per layer, one low-rank correction of each dense MLP matrix,

    w_gate + ga @ gb,   w_up + ua @ ub,   w_down + da @ db        (ga [D, r], gb [r, F], da [F, r], db [r, D])

trained so the routed model's next-token distribution matches the dense model's (KL(dense || MoE), the routers
fixed, each token's top-k chosen as at run time). The corrections merge into the dense weights before the experts
are sliced (`MLPDeltas.merged`), so every expert keeps its shape, bytes and compute: a neuron's correction travels
with the expert that holds it, and the MLP compute per token is what it was. b-factors start at zero, so step 0 is
the undistilled MoE.

Deterministic for a fixed seed on one machine (numpy batch order, a jax PRNG init, XLA on CPU). Training runs the
whole model per step, about 9 s a step of 4 x 256 tokens on this project's 2-core CPU: a build of hundreds of steps
runs once, outside the test suite, and its result ships (`moe_store.SHIPPED_DIR`).

Shapes: L layers, B batch, T tokens, D model width, F MLP width, E experts, r the correction's rank.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from . import llama_layers as Lay
from .block_ids import layer_block_id
from .errors import MoEError
from .moe import topk_mask

DELTA_LEAVES = ("ga", "gb", "ua", "ub", "da", "db")


@dataclasses.dataclass(frozen=True)
class MLPDeltas:
    """Per-layer low-rank corrections of the dense MLP matrices, float32, stacked over layers."""

    ga_LxDxR: np.ndarray
    gb_LxRxF: np.ndarray
    ua_LxDxR: np.ndarray
    ub_LxRxF: np.ndarray
    da_LxFxR: np.ndarray
    db_LxRxD: np.ndarray

    @classmethod
    def from_tree(cls, tree: dict) -> "MLPDeltas":
        return cls(*(np.asarray(tree[k], np.float32) for k in DELTA_LEAVES))

    def tree(self) -> dict:
        """{leaf: array} in DELTA_LEAVES order (the arrays themselves, not copies)."""
        return {k: getattr(self, f.name) for k, f in zip(DELTA_LEAVES, dataclasses.fields(self))}

    @property
    def rank(self) -> int:
        return self.ga_LxDxR.shape[-1]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.tree().values())

    def check(self, n_layers: int, d_model: int, d_ff: int) -> "MLPDeltas":
        r = self.rank
        want = [(n_layers, d_model, r), (n_layers, r, d_ff)] * 2 + [(n_layers, d_ff, r), (n_layers, r, d_model)]
        got = [a.shape for a in self.tree().values()]
        if got != want:
            raise MoEError(f"MLP corrections of shapes {got} do not fit a model of {n_layers} layers, D = {d_model}, "
                           f"F = {d_ff} (want {want})")
        return self

    def merged(self, layer: int, mlp: dict) -> dict:
        """A dense MLP block's leaves with this layer's corrections added (new float32 arrays)."""
        out = dict(mlp)
        for leaf, a, b in (("w_gate", self.ga_LxDxR, self.gb_LxRxF), ("w_up", self.ua_LxDxR, self.ub_LxRxF),
                           ("w_down", self.da_LxFxR, self.db_LxRxD)):
            out[leaf] = np.asarray(mlp[leaf], np.float32) + a[layer] @ b[layer]
        return out


def neuron_masks(partition, d_ff: int) -> tuple[np.ndarray, np.ndarray]:
    """(shared float32 [L, F]: 1 on the shared part's neurons, experts float32 [L, E, F]: 1 on expert e's)."""
    L, E, _ = partition.neurons_LxExFe.shape
    shared_LxF = np.zeros((L, d_ff), np.float32)
    experts_LxExF = np.zeros((L, E, d_ff), np.float32)
    for i in range(L):
        if partition.n_shared:
            shared_LxF[i, partition.shared_LxFs[i]] = 1
        for e in range(E):
            experts_LxExF[i, e, partition.neurons_LxExFe[i, e]] = 1
    return shared_LxF, experts_LxExF


def stacked_weights(dense_source, partition, routers) -> dict:
    """Everything `routed_logits` reads, as jnp arrays: attention and MLP leaves stacked over layers, the embedding,
    the final norm, the routers and the neuron masks."""
    cfg = dense_source.config
    per_layer = [(dense_source(layer_block_id(i, "attn")), dense_source(layer_block_id(i, "mlp")))
                 for i in range(cfg.n_layers)]
    shared_LxF, experts_LxExF = neuron_masks(partition, cfg.d_ff)
    stack = lambda dicts: {k: jnp.stack([jnp.asarray(d[k], jnp.float32) for d in dicts]) for k in dicts[0]}
    return {"attn": stack([a for a, _ in per_layer]), "mlp": stack([m for _, m in per_layer]),
            "embed": {k: jnp.asarray(v) for k, v in dense_source("embed").items()},
            "final_norm": {k: jnp.asarray(v) for k, v in dense_source("final_norm").items()},
            "router_w": jnp.asarray(routers.w_LxDxE), "router_b": jnp.asarray(routers.b_LxE),
            "shared": jnp.asarray(shared_LxF), "experts": jnp.asarray(experts_LxExF)}


def kept_activations(h_BxTxD, w_gate, w_up, router_w, router_b, shared_F, experts_ExF, top_k: int):
    """(act ⊙ keep, act), [B, T, F]: the SwiGLU activations and those each token keeps at run time, the shared
    neurons and its top_k experts' by the runtime's rule (top_k of the router's probabilities, `moe.moe_route`);
    top_k = 0 keeps every neuron."""
    act_BxTxF = jax.nn.silu(h_BxTxD @ w_gate) * (h_BxTxD @ w_up)
    if not top_k:
        return act_BxTxF, act_BxTxF
    chose_BxTxE = topk_mask(jax.nn.softmax(h_BxTxD @ router_w + router_b, axis=-1), top_k).astype(jnp.float32)
    return act_BxTxF * jnp.maximum(chose_BxTxE @ experts_ExF, shared_F), act_BxTxF


def routed_logits(cfg, weights: dict, delta: dict | None, ids_BxT, top_k: int):
    """float32 [B, T, V]: the MoE model (dense MLPs plus `delta`, each token running the shared neurons and its
    top_k experts' neurons) on a fresh sequence; `top_k` = 0 runs every neuron (the dense model when `delta` is
    None). The same function as `moe.moe_forward`, written as a neuron mask so it trains as one scan."""
    B, T = ids_BxT.shape
    x = Lay.embed_tokens(weights["embed"], ids_BxT, jnp.float32)
    kv = jnp.zeros((B, T, cfg.n_kv_heads, cfg.head_dim), jnp.float32)

    def layer(x, p):
        attn, mlp, rw, rb, shared_F, experts_ExF, d = p
        x = Lay.attention_block(cfg, attn, x, kv, kv, 0)[0]
        h = Lay.rms_norm(x, mlp["ffn_norm"], cfg.norm_eps)
        wg, wu, wd = mlp["w_gate"], mlp["w_up"], mlp["w_down"]
        if d is not None:
            wg, wu, wd = wg + d["ga"] @ d["gb"], wu + d["ua"] @ d["ub"], wd + d["da"] @ d["db"]
        kept_BxTxF, _ = kept_activations(h, wg, wu, rw, rb, shared_F, experts_ExF, top_k)
        return x + kept_BxTxF @ wd, None

    xs = (weights["attn"], weights["mlp"], weights["router_w"], weights["router_b"], weights["shared"],
          weights["experts"], delta)
    x, _ = jax.lax.scan(layer, x, xs)
    return Lay.lm_head(cfg, weights["final_norm"], weights["embed"], x)


def initial_delta(n_layers: int, d_model: int, d_ff: int, rank: int, seed: int) -> dict:
    """a-factors small random, b-factors zero (LoRA's start: the product is zero, the gradient is not)."""
    kg, ku, kd = jax.random.split(jax.random.PRNGKey(seed), 3)
    small = lambda k, *s: 0.01 * jax.random.normal(k, (n_layers,) + s, jnp.float32)
    zero = lambda *s: jnp.zeros((n_layers,) + s, jnp.float32)
    return {"ga": small(kg, d_model, rank), "gb": zero(rank, d_ff), "ua": small(ku, d_model, rank),
            "ub": zero(rank, d_ff), "da": small(kd, d_ff, rank), "db": zero(rank, d_model)}


def kl_dense_moe(cfg, weights, delta, ids_BxT, top_k: int):
    """Mean over tokens of KL(dense || MoE) of the next-token distributions."""
    teacher = jax.lax.stop_gradient(jax.nn.log_softmax(routed_logits(cfg, weights, None, ids_BxT, 0), -1))
    student = jax.nn.log_softmax(routed_logits(cfg, weights, delta, ids_BxT, top_k), -1)
    return (jnp.exp(teacher) * (teacher - student)).sum(-1).mean()


def distill(dense_source, partition, routers, ids_NxT: np.ndarray, *, top_k: int, steps: int, rank: int,
            batch: int, learning_rate: float, seed: int, eval_fn=None, log_every: int = 25,
            say=print) -> tuple[MLPDeltas, dict]:
    """Train the corrections for `steps` adam steps (warm-up then cosine decay) on random batches of `batch` rows
    of ids_NxT. `eval_fn(delta_tree) -> str`, if given, is reported every `log_every` steps (a held-out ppl).
    Returns (deltas, stats: KL per logged step, seconds)."""
    import optax

    cfg = dense_source.config
    if batch > len(ids_NxT):
        raise MoEError(f"distillation batch {batch} exceeds the {len(ids_NxT)} calibration sequences: lower "
                       "distill_batch or raise distill_seqs")
    weights = stacked_weights(dense_source, partition, routers)
    delta = initial_delta(cfg.n_layers, cfg.d_model, cfg.d_ff, rank, seed)
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(1, min(10, steps // 10)), steps + 1)
    opt = optax.adam(schedule)
    state = opt.init(delta)

    @jax.jit
    def step(weights, delta, state, ids):  # weights an argument: closed over, jit would bake them in as constants
        loss, grad = jax.value_and_grad(lambda d: kl_dense_moe(cfg, weights, d, ids, top_k))(delta)
        update, state = opt.update(grad, state, delta)
        return optax.apply_updates(delta, update), state, loss

    rng = np.random.default_rng(seed)
    t0, logged, recent = time.perf_counter(), [], []
    for s in range(1, steps + 1):
        rows = np.sort(rng.choice(len(ids_NxT), batch, replace=False))
        delta, state, loss = step(weights, delta, state, jnp.asarray(ids_NxT[rows]))
        recent.append(float(loss))
        if s % log_every == 0 or s == steps:
            logged.append((s, float(np.mean(recent))))
            extra = f", {eval_fn(delta)}" if eval_fn else ""
            say(f"  distill step {s:4d}/{steps}: KL(dense || MoE) {np.mean(recent):.4f} over the last {len(recent)} "
                f"steps{extra} ({time.perf_counter() - t0:.0f} s)")
            recent = []
    deltas = MLPDeltas.from_tree({k: np.asarray(v) for k, v in delta.items()})
    return deltas, {"distill_kl": logged, "distill_seconds": time.perf_counter() - t0}
