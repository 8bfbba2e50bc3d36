"""Build the MoE SmolLM2: balanced k-means expert partition, routers trained with optax (`moe_store` keeps it).

Partition (`partition_by`): per layer, balanced spherical k-means over the neurons, on either
- "weights": each neuron's weight vector [w_gate[:, n]; w_up[:, n]] (2D floats), a function of the weights and the
  seed alone; or
- "coactivation": each neuron's activation mass profile over the calibration tokens, |act_n(t)|·‖w_down[n]‖, so
  neurons that fire on the same tokens share an expert (MoEfication's grouping; the issue's ask).
Co-activation groups better on SmolLM2 (its routers learn their targets more surely, and the routed model's
ppl is lower: experiments/results/moe_quality_coact_refit.txt beside moe_quality_shared60.txt). SwiGLU activations
here are dense, so any k < E drops much of each MLP's output (see experiments/moe_quality.py).
Balance: each Lloyd step assigns greedily by decreasing cosine similarity under a capacity of F/E per expert, so
every expert has exactly F/E neurons. Deterministic for a fixed seed (numpy RNG, stable sorts).

Shared part (`shared_fraction` f > 0, the DeepSeek-MoE / Qwen-MoE shape): per layer, the Fs = round(f·F/E)·E neurons
with the most mean activation mass |silu(h·g_n)·(h·u_n)|·‖w_down[n]‖ on the calibration text run for every token;
the experts are made from the other F - Fs neurons as above, and the routers learn those experts' masses. So the
shared variant's partition needs the calibration pass (the no-shared one does not). Measured without any training,
with an oracle router (experiments/moe_shared_oracle.py): f = 0.4, top-2 of 8 reaches 4.4x the dense ppl, against
4,194x with no shared part.

Routers: per layer, a linear map [D, E] (+ bias [E]) on the dense model's normed MLP input h, trained to predict
the `target_top_k` experts carrying the most activation mass Σ_{n in e} |silu(h·g_n)·(h·u_n)| (soft cross-entropy
against the multi-hot target / k). All layers train at once (vmap), full batch, adam; fixed seed ⇒ identical
routers.

Where the config asks, `moe_store.build_or_load` then refits each layer's w_down by least squares
(`refit_lambda` > 0, `moe_refit.py`, about two minutes; with `refit_routers`, each layer's router trained again on
the MoE's own hidden states first) and/or distils the dense model's logits into
low-rank MLP corrections (`moe_distill.py`, on top of the refit where both are asked); storing and loading a
built MoE is `moe_store.py`'s.

The router config (`configs/moe/router.yaml`) has its own small schema, validated as strictly as `RunConfig`:
unknown keys, keys set twice and wrong types fail with one line naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import typing
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from . import llama_layers as Lay
from .block_ids import layer_block_id
from .errors import MoEError, RouterConfigError
from .moe import ExpertPartition, Routers

PARTITIONS = ("weights", "coactivation")  # RouterConfig.partition_by: what k-means clusters the neurons by
MOE_MODELS = {"smollm2-135m-moe": "smollm2-135m",  # MoE model key -> the dense model it is built from
              "smollm2-135m-moe-shared": "smollm2-135m"}


# ------------------------------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """How to build and measure the MoE model (see configs/moe/router.yaml for what each key means)."""

    model: str = "smollm2-135m-moe"
    n_experts: int = 8
    shared_fraction: float = 0.0  # of each layer's neurons, run by every token (0: no shared part)
    seed: int = 0
    kmeans_iters: int = 20
    target_top_k: int = 2
    calib_tokens: int = 2048
    calib_seq_len: int = 256
    calib_char_offset: int = 200_000
    steps: int = 300
    learning_rate: float = 3.0e-3
    log_every: int = 50
    out_dir: str = ""
    eval_tokens: int = 256
    eval_top_ks: tuple[int, ...] = (1, 2, 4, 8)
    eval_windows: int = 16  # evaluation: windows of calib_seq_len tokens spread over the text after the training text
    distill_steps: int = 0  # 0: the experts are the dense MLP's neurons as they are (models/moe_distill.py)
    distill_rank: int = 16
    distill_batch: int = 4
    distill_seqs: int = 256  # calibration sequences of calib_seq_len the distillation draws its batches from
    distill_learning_rate: float = 2.0e-3
    partition_by: str = "weights"  # "weights" (k-means on [w_gate; w_up] columns) or "coactivation" (on activations)
    refit_lambda: float = 0.0  # > 0: refit each layer's w_down by least squares, this ridge (models/moe_refit.py);
    # a distillation (distill_steps > 0) then starts from the refitted weights
    refit_seqs: int = 96  # calibration sequences of calib_seq_len the refit solves over (from the distillation's pool)
    refit_routers: bool = False  # with the refit: each layer's router trained again on the MoE's own stream first

    def training_key(self) -> dict:
        """What a stored result must agree on to be reused (evaluation keys excluded; the distillation's keys only
        where it runs)."""
        skip = {"log_every", "out_dir", "eval_tokens", "eval_top_ks", "eval_windows"}
        if not self.distill_steps:
            skip |= {k for k in dataclasses.asdict(self) if k.startswith("distill_") and k != "distill_steps"}
        if self.refit_lambda:  # the refit draws from the distillation's pool of sequences
            skip -= {"distill_seqs"}
        else:
            skip |= {"refit_seqs"}
        if not self.refit_routers:  # stores built before the key existed keep matching
            skip |= {"refit_routers"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


def _check_router_config(cfg: RouterConfig, where: str) -> RouterConfig:
    def bad(key, detail):
        return RouterConfigError(f"{where}: key '{key}' {detail}")

    if cfg.model not in MOE_MODELS:
        raise bad("model", f"must be one of {sorted(MOE_MODELS)}, got {cfg.model!r}")
    for key in ("n_experts", "kmeans_iters", "target_top_k", "calib_tokens", "calib_seq_len", "steps", "log_every",
                "eval_tokens", "distill_rank", "distill_batch", "distill_seqs", "refit_seqs"):
        if getattr(cfg, key) < 1:
            raise bad(key, f"must be >= 1, got {getattr(cfg, key)}")
    for key in ("seed", "calib_char_offset", "distill_steps", "eval_windows"):
        if getattr(cfg, key) < 0:
            raise bad(key, f"must be >= 0, got {getattr(cfg, key)}")
    for key in ("learning_rate", "distill_learning_rate"):
        if not getattr(cfg, key) > 0:
            raise bad(key, f"must be > 0, got {getattr(cfg, key)}")
    if cfg.partition_by not in PARTITIONS:
        raise bad("partition_by", f"must be one of {', '.join(PARTITIONS)}, got {cfg.partition_by!r}")
    if not cfg.refit_lambda >= 0:
        raise bad("refit_lambda", f"must be >= 0 (0: no refit), got {cfg.refit_lambda}")
    if cfg.refit_routers and not cfg.refit_lambda:
        raise bad("refit_routers", "trains the routers again inside the refit: set refit_lambda > 0 too")
    if cfg.refit_lambda and cfg.refit_seqs > cfg.distill_seqs:
        raise bad("refit_seqs", f"must be <= distill_seqs ({cfg.distill_seqs}), the pool it draws from, got "
                                f"{cfg.refit_seqs}")
    if cfg.distill_batch > cfg.distill_seqs:
        raise bad("distill_batch", f"must be <= distill_seqs ({cfg.distill_seqs}), got {cfg.distill_batch}")
    if not 0.0 <= cfg.shared_fraction < 1.0:
        raise bad("shared_fraction", f"must lie in [0, 1), got {cfg.shared_fraction}")
    if cfg.target_top_k > cfg.n_experts:
        raise bad("target_top_k", f"must be <= n_experts ({cfg.n_experts}), got {cfg.target_top_k}")
    if cfg.calib_tokens % cfg.calib_seq_len:
        raise bad("calib_tokens", f"must be a multiple of calib_seq_len ({cfg.calib_seq_len}), got {cfg.calib_tokens}")
    for k in cfg.eval_top_ks:
        if not 1 <= k <= cfg.n_experts:
            raise bad("eval_top_ks", f"entries must lie in [1, n_experts={cfg.n_experts}], got {k}")
    return cfg


def _coerce(key: str, value, tp, where: str):
    def bad():
        return RouterConfigError(f"{where}: key '{key}' expects {getattr(tp, '__name__', tp)}, got "
                                 f"{type(value).__name__} ({value!r})")

    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise bad()
    elif tp is bool:
        if not isinstance(value, bool):
            raise bad()
    elif typing.get_origin(tp) is tuple:
        if not isinstance(value, (list, tuple)) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise RouterConfigError(f"{where}: key '{key}' expects a list of ints, got {value!r}")
        value = tuple(value)
    return value


def router_config_from_dict(data, where: str = "<dict>") -> RouterConfig:
    """A RouterConfig from a mapping; unknown keys and wrong types fail naming the key and `where`."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise RouterConfigError(f"{where}: the top level must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(RouterConfig)
    for key in data:
        if key not in hints:
            raise RouterConfigError(f"{where}: unknown key '{key}' (valid keys: {', '.join(hints)})")
    kwargs = {k: _coerce(k, v, hints[k], where) for k, v in data.items()}
    return _check_router_config(RouterConfig(**kwargs), where)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key set twice (PyYAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise RouterConfigError(f"key '{key}' is set twice (lines {seen[key]} and {line})")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_router_config(path: str | Path) -> RouterConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RouterConfigError(f"cannot read router config {path}: {e}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except RouterConfigError as e:
        raise RouterConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise RouterConfigError(f"{path}: invalid YAML ({' '.join(str(e).split())})") from None
    return router_config_from_dict(data, str(path))


# ---------------------------------------------------------------------------------------------------- partition


def shared_neurons(cfg: RouterConfig, d_ff: int) -> int:
    """Fs: the shared part's neurons per layer, a multiple of 2E, so that the rest splits into equal experts of an
    even width (the int4 state packs two rows of `w_down` a byte)."""
    return int(round(cfg.shared_fraction * d_ff / (2 * cfg.n_experts))) * 2 * cfg.n_experts


def activation_mass(act_NxF, w_down_FxD) -> np.ndarray:
    """float64 [F]: each neuron's mean |activation| over the tokens times ‖w_down[n]‖ (what it adds to the output)."""
    act = np.abs(np.asarray(act_NxF, np.float64)).reshape(-1, np.shape(act_NxF)[-1])
    return act.mean(0) * np.linalg.norm(np.asarray(w_down_FxD, np.float64), axis=1)


def swiglu_activations(mlp_w: dict, h_NxD):
    """[N, F]: each neuron's activation silu(h·g_n)·(h·u_n) on the tokens h (what reaches w_down)."""
    return jax.nn.silu(h_NxD @ mlp_w["w_gate"]) * (h_NxD @ mlp_w["w_up"])


def neuron_mass(mlp_w: dict, h_NxD) -> np.ndarray:
    """float64 [F]: each neuron's mean activation mass |silu(h·g_n)·(h·u_n)|·‖w_down[n]‖ over the tokens h."""
    return activation_mass(swiglu_activations(mlp_w, h_NxD), mlp_w["w_down"])


def most_massive(mass_F: np.ndarray, n_shared: int) -> np.ndarray:
    """int32 [Fs] sorted: the `n_shared` neurons of most mass (stable order on ties)."""
    return np.sort(np.argsort(-mass_F, kind="stable")[:n_shared]).astype(np.int32)


def choose_shared(mlp_w: dict, h_NxD, n_shared: int) -> np.ndarray:
    """int32 [Fs] sorted: the `n_shared` neurons with the most mean activation mass on the tokens h."""
    return most_massive(neuron_mass(mlp_w, h_NxD), n_shared)


def _balanced_assign(sim_NxE: np.ndarray, capacity: int) -> np.ndarray:
    """Greedy capacity-constrained assignment: pairs by decreasing similarity, each cluster takes `capacity`."""
    N, E = sim_NxE.shape
    order = np.argsort(-sim_NxE, axis=None, kind="stable")
    assign = np.full(N, -1, np.int64)
    room = np.full(E, capacity, np.int64)
    left = N
    for flat in order:
        n, e = divmod(int(flat), E)
        if assign[n] < 0 and room[e] > 0:
            assign[n] = e
            room[e] -= 1
            left -= 1
            if left == 0:
                break
    return assign


def balanced_kmeans(x_NxK: np.ndarray, n_clusters: int, seed: int, iters: int) -> np.ndarray:
    """int64 [N]: cluster of each row, exactly N / n_clusters rows per cluster (spherical k-means, cosine)."""
    N = x_NxK.shape[0]
    if N % n_clusters:
        raise MoEError(f"{N} neurons do not split into {n_clusters} equal experts (need F % E == 0)")
    xn = x_NxK / np.maximum(np.linalg.norm(x_NxK, axis=1, keepdims=True), 1e-12)
    rng = np.random.default_rng(seed)
    centers = xn[rng.choice(N, n_clusters, replace=False)]
    assign = None
    for _ in range(iters):
        new = _balanced_assign(xn @ centers.T, N // n_clusters)
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        centers = np.stack([xn[assign == e].mean(0) for e in range(n_clusters)])
        centers /= np.maximum(np.linalg.norm(centers, axis=1, keepdims=True), 1e-12)
    return assign


def partition_layer(dense_mlp: dict, n_experts: int, seed: int, iters: int, shared_Fs=None, h_NxD=None) -> np.ndarray:
    """int32 [E, Fe]: neuron ids per expert (sorted), over the neurons not in `shared_Fs`: balanced k-means on each
    neuron's [gate col; up col] weights, or, given the calibration hidden states `h_NxD`, on its activation mass
    profile over those tokens, |silu(h·g_n)·(h·u_n)|·‖w_down[n]‖ (co-activation: neurons that fire on the same
    tokens share an expert)."""
    F = dense_mlp["w_gate"].shape[1]
    rest = np.setdiff1d(np.arange(F), np.asarray([] if shared_Fs is None else shared_Fs, np.int64))
    if h_NxD is None:
        feats_FxK = np.concatenate([dense_mlp["w_gate"].T[rest], dense_mlp["w_up"].T[rest]], axis=1)
    else:
        act_NxF = np.abs(np.asarray(swiglu_activations(dense_mlp, h_NxD)))
        feats_FxK = act_NxF[:, rest].T * np.linalg.norm(np.asarray(dense_mlp["w_down"])[rest], axis=1)[:, None]
    assign = balanced_kmeans(feats_FxK, n_experts, seed, iters)
    return np.stack([rest[assign == e] for e in range(n_experts)]).astype(np.int32)


def build_partition(dense_source, n_experts: int, seed: int, iters: int, layers=None,
                    shared_LxFs: np.ndarray | None = None, h_LxNxD: np.ndarray | None = None) -> ExpertPartition:
    """Partition every layer (or only `layers`, the others keep neurons in order: for fast tests) into experts
    over the neurons outside the shared part `shared_LxFs` (None: no shared part); by co-activation on the
    calibration hidden states `h_LxNxD` where given, else by weights (`partition_layer`)."""
    cfg = dense_source.config
    fs = 0 if shared_LxFs is None else shared_LxFs.shape[1]
    if (cfg.d_ff - fs) % n_experts:
        raise MoEError(f"d_ff = {cfg.d_ff} less {fs} shared neurons is not divisible by n_experts = {n_experts}")
    fe = (cfg.d_ff - fs) // n_experts
    out = np.zeros((cfg.n_layers, n_experts, fe), np.int32)
    for i in range(cfg.n_layers):
        shared = None if shared_LxFs is None else shared_LxFs[i]
        if layers is None or i in layers:
            out[i] = partition_layer(dense_source(layer_block_id(i, "mlp")), n_experts, seed + i, iters, shared,
                                     None if h_LxNxD is None else h_LxNxD[i])
        else:
            out[i] = np.setdiff1d(np.arange(cfg.d_ff), [] if shared is None else shared).reshape(n_experts, fe)
    return ExpertPartition(out, shared_LxFs).check(cfg.n_layers, cfg.d_ff)


# ----------------------------------------------------------------------------------------------- router targets


def dense_mlp_inputs(cfg, blocks: dict, ids_BxT) -> list:
    """Per layer, the dense model's normed MLP input h [B, T, D] on ids_BxT (fresh sequence, float32)."""

    @jax.jit
    def run(blocks, ids):
        B, T = ids.shape
        x = Lay.embed_tokens(blocks["embed"], ids, jnp.float32)
        kv = jnp.zeros((B, T, cfg.n_kv_heads, cfg.head_dim), jnp.float32)
        hs = []
        for i in range(cfg.n_layers):
            x, _, _ = Lay.attention_block(cfg, blocks[layer_block_id(i, "attn")], x, kv, kv, 0)
            hs.append(Lay.rms_norm(x, blocks[layer_block_id(i, "mlp")]["ffn_norm"], cfg.norm_eps))
            x = Lay.mlp_block(cfg, blocks[layer_block_id(i, "mlp")], x)
        return hs

    return run(blocks, jnp.asarray(ids_BxT))


@jax.jit
def expert_mass(mlp_w: dict, neurons_ExFe, h_NxD):
    """float32 [N, E]: Σ_{n in expert e} |silu(h·w_gate[:, n]) · (h·w_up[:, n])| per token."""
    return jnp.abs(swiglu_activations(mlp_w, h_NxD))[:, neurons_ExFe].sum(-1)


# ------------------------------------------------------------------------------------------------ router training


def _topk_hot(scores_NxE, k):
    _, idx = jax.lax.top_k(scores_NxE, k)
    return jax.nn.one_hot(idx, scores_NxE.shape[-1]).sum(-2)


def train_routers(h_LxNxD, mass_LxNxE, *, top_k: int, steps: int, learning_rate: float, seed: int,
                  log_every: int = 50, say=print) -> tuple[Routers, dict]:
    """Train one linear router per layer (vmapped) to predict each token's top_k experts by activation mass.

    Returns (routers, stats) with stats: final per-layer loss and top-k recall on the training tokens, seconds.
    """
    import optax

    h = jnp.asarray(h_LxNxD, jnp.float32)
    L, N, D = h.shape
    E = mass_LxNxE.shape[-1]
    target_LxNxE = jax.vmap(lambda m: _topk_hot(m, top_k))(jnp.asarray(mass_LxNxE)) / top_k
    kw, _ = jax.random.split(jax.random.PRNGKey(seed))
    params = {"w": 0.01 * jax.random.normal(kw, (L, D, E), jnp.float32), "b": jnp.zeros((L, E), jnp.float32)}
    opt = optax.adam(learning_rate)
    state = opt.init(params)

    def layer_loss(w, b, h_NxD, t_NxE):
        logits = h_NxD @ w + b
        return optax.softmax_cross_entropy(logits, t_NxE).mean()

    def loss_fn(p):
        per_layer = jax.vmap(layer_loss)(p["w"], p["b"], h, target_LxNxE)
        return per_layer.sum(), per_layer

    def recall_L(p):
        logits = jnp.einsum("lnd,lde->lne", h, p["w"]) + p["b"][:, None, :]
        pred = jax.vmap(lambda z: _topk_hot(z, top_k))(logits)
        return (pred * (target_LxNxE > 0)).sum((1, 2)) / (N * top_k)

    @functools.partial(jax.jit, static_argnums=2)
    def run_chunk(p, s, n_steps):
        def step(carry, _):
            p, s = carry
            (_, per_layer), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
            upd, s = opt.update(g, s, p)
            return (optax.apply_updates(p, upd), s), per_layer

        (p, s), losses = jax.lax.scan(step, (p, s), None, length=n_steps)
        return p, s, losses[-1], recall_L(p)

    t0 = time.perf_counter()
    done, loss_L, rec_L = 0, None, None
    while done < steps:
        n = min(log_every, steps - done)
        params, state, loss_L, rec_L = run_chunk(params, state, n)
        done += n
        say(f"  router step {done:4d}/{steps}: loss {float(loss_L.mean()):.4f}  top-{top_k} recall "
            f"mean {float(rec_L.mean()):.3f} (min {float(rec_L.min()):.3f} over {L} layers)")
    stats = {"loss_L": np.asarray(loss_L), "recall_L": np.asarray(rec_L), "seconds": time.perf_counter() - t0}
    return Routers(np.asarray(params["w"]), np.asarray(params["b"])), stats


# -------------------------------------------------------------------------------------------- calibration, build


def calibration_ids(tokenizer, text: str, bos: int, cfg: RouterConfig, n_seq: int | None = None) -> np.ndarray:
    """int32 [n_seq, calib_seq_len]: BOS + text tokens, from `calib_char_offset` on; n_seq defaults to
    calib_tokens / calib_seq_len (the routers' calibration; the distillation asks for `distill_seqs`).

    The evaluation text is the start of the corpus; calibrating after the offset keeps the two apart.
    """
    n_seq, seq = n_seq or cfg.calib_tokens // cfg.calib_seq_len, cfg.calib_seq_len
    ids = tokenizer.encode(text[cfg.calib_char_offset:calibration_chars(cfg)]).ids
    need = n_seq * (seq - 1)
    if len(ids) < need:
        raise MoEError(f"calibration text has {len(ids)} tokens after char {cfg.calib_char_offset}, need {need}")
    body = np.asarray(ids[:need], np.int32).reshape(n_seq, seq - 1)
    return np.concatenate([np.full((n_seq, 1), bos, np.int32), body], axis=1)


def held_out_windows(tokenizer, text: str, bos: int, cfg: RouterConfig) -> tuple[np.ndarray, int]:
    """(int32 [eval_windows, calib_seq_len]: BOS + tokens, first character of the held-out text): windows starting
    at verse starts evenly spread over the corpus after `calibration_chars(cfg)`, the last character any training
    reads. The corpus's opening (the `eval_tokens` evaluation) is the best-known text of the book, which a small
    model partly recites; these windows sample the rest of what training never saw."""
    start, seq = calibration_chars(cfg), cfg.calib_seq_len
    span = 12 * seq  # characters read per window: ample for seq - 1 tokens
    if len(text) < start + cfg.eval_windows * span:
        raise MoEError(f"the corpus has {len(text)} characters: too few after the training text (char {start}) for "
                       f"{cfg.eval_windows} windows of {seq} tokens; lower eval_windows")
    rows = []
    for a in np.linspace(start, len(text) - span, cfg.eval_windows).astype(int):
        a = text.find("\n", a) + 1 or a
        rows.append([bos] + tokenizer.encode(text[a:a + span]).ids[: seq - 1])
        if len(rows[-1]) < seq:
            raise MoEError(f"the held-out window at char {a} has {len(rows[-1]) - 1} tokens, need {seq - 1}")
    return np.asarray(rows, np.int32), start


def calibration_chars(cfg: RouterConfig) -> int:
    """How many corpus characters `calibration_ids` needs (a generous 8 chars per token)."""
    pool = cfg.distill_steps or cfg.refit_lambda  # the distillation's (or the refit's) pool of sequences
    tokens = max(cfg.calib_tokens, cfg.distill_seqs * cfg.calib_seq_len if pool else 0)
    return cfg.calib_char_offset + 8 * tokens + 1000


def build_moe(dense_source, tokenizer, text: str, bos: int, cfg: RouterConfig, *, layers=None,
              say=print) -> tuple[ExpertPartition, Routers, dict]:
    """Choose the shared part (if any) and partition every layer (or `layers`) from the dense model's hidden states
    on calibration text, and train the routers there. Returns (partition, routers, stats) where stats holds seconds
    per phase and the routers' training loss / recall per layer."""
    mcfg = dense_source.config
    blocks = {b: dense_source(b) for b in ["embed"] + [layer_block_id(i, k) for i in range(mcfg.n_layers)
                                                       for k in ("attn", "mlp")]}
    ids = calibration_ids(tokenizer, text, bos, cfg)
    t1 = time.perf_counter()
    hs = dense_mlp_inputs(mcfg, blocks, ids)
    h_LxNxD = np.stack([np.asarray(h).reshape(-1, mcfg.d_model) for h in hs])
    t_calib = time.perf_counter() - t1
    n_shared = shared_neurons(cfg, mcfg.d_ff)
    shared = None if not n_shared else np.stack([choose_shared(blocks[layer_block_id(i, "mlp")], h_LxNxD[i], n_shared)
                                                 for i in range(mcfg.n_layers)])
    t0 = time.perf_counter()
    partition = build_partition(dense_source, cfg.n_experts, cfg.seed, cfg.kmeans_iters, layers, shared,
                                h_LxNxD if cfg.partition_by == "coactivation" else None)
    t_part = time.perf_counter() - t0
    say(f"partition: {mcfg.n_layers} layers × {cfg.n_experts} experts of {partition.neurons_LxExFe.shape[2]} neurons"
        f"{f' + {n_shared} shared' if n_shared else ''}, by {cfg.partition_by} ({t_part:.1f} s)")
    t1 = time.perf_counter()
    mass_LxNxE = np.stack([np.asarray(expert_mass(blocks[layer_block_id(i, "mlp")], partition.neurons_LxExFe[i],
                                                  h_LxNxD[i])) for i in range(mcfg.n_layers)])
    t_calib += time.perf_counter() - t1
    say(f"calibration: {ids.size} tokens of dense hidden states and expert masses ({t_calib:.1f} s)")
    routers, stats = train_routers(h_LxNxD, mass_LxNxE, top_k=cfg.target_top_k, steps=cfg.steps,
                                   learning_rate=cfg.learning_rate, seed=cfg.seed, log_every=cfg.log_every, say=say)
    stats.update(partition_seconds=t_part, calibration_seconds=t_calib)
    return partition, routers, stats
