"""Where a built MoE lives: an orbax checkpoint plus `meta.json`, in the user's cache or shipped with the repository.

`build_or_load` looks in three places, in order: the cache store of the router config (`default_store_dir`, or its
`out_dir`), the store shipped in the repository (`SHIPPED_DIR`, for builds too heavy for a fresh machine: the
distilled MoE trains for about an hour and a half on a 2-core CPU; the plain 8-expert one, 630 KB, builds in 20-30 s, which
every fresh clone's test suite paid), and otherwise builds (partition, routers, and the
distillation where the config asks for it) and writes the cache store. A store is used only if its meta says it was
built from the same dense model with the same training settings; a shipped store that does not match is passed
over, a cache store that does not match yields to a matching shipped store and is otherwise an error naming the
difference.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import MoEError
from .moe import ExpertPartition, Routers
from .moe_build import MOE_MODELS, RouterConfig, build_moe, calibration_chars, calibration_ids, shared_neurons
from .moe_distill import MLPDeltas, distill
from .moe_refit import DownRefit, RefitSource, RefitThenDeltas, refit_down
from .user_cache import cache_root

FORMAT_VERSION = 1
MLPEdit = MLPDeltas | DownRefit | RefitThenDeltas  # what `moe.moe_source` applies to each dense MLP it reads
SHIPPED_DIR = Path(__file__).resolve().parent / "shipped" / "moe"


def store_name(cfg: RouterConfig) -> str:
    """`{model}-E{n_experts}`, `-refit` added where the config refits w_down and `-distilled` where it distils: no
    two kinds of build share a store."""
    return f"{cfg.model}-E{cfg.n_experts}" + ("-refit" if cfg.refit_lambda else "") + ("-distilled" if cfg.distill_steps
                                                                                       else "")


def default_store_dir(cfg: RouterConfig) -> Path:
    if cfg.out_dir:
        return Path(cfg.out_dir).expanduser()
    return cache_root(sub="moe") / store_name(cfg)


def store_in_use(cfg: RouterConfig) -> Path | None:
    """The store `build_or_load` reads first for `cfg`: the cache store, else the shipped one, else None."""
    for where in (default_store_dir(cfg), None if cfg.out_dir else SHIPPED_DIR / store_name(cfg)):
        if where is not None and (where / "meta.json").is_file():
            return where
    return None


def _expected_meta(dense_config, cfg: RouterConfig) -> dict:
    return {"format": FORMAT_VERSION, "dense_model": MOE_MODELS[cfg.model],
            "n_layers": dense_config.n_layers, "d_model": dense_config.d_model, "d_ff": dense_config.d_ff,
            "training": cfg.training_key()}


def save_moe(store_dir: str | Path, dense_config, cfg: RouterConfig, partition: ExpertPartition,
             routers: Routers, stats: dict | None = None, deltas: MLPEdit | None = None) -> Path:
    """Write `meta.json` and an orbax checkpoint `state/` (neurons, router_w, router_b; shared and the MLP edit,
    the distilled corrections or the refitted w_down, where they exist) under store_dir."""
    import orbax.checkpoint as ocp

    store_dir = Path(store_dir).expanduser().absolute()
    store_dir.mkdir(parents=True, exist_ok=True)
    tree = {"neurons": np.asarray(partition.neurons_LxExFe, np.int32),
            "router_w": np.asarray(routers.w_LxDxE, np.float32), "router_b": np.asarray(routers.b_LxE, np.float32)}
    if partition.shared_LxFs is not None:
        tree["shared"] = np.asarray(partition.shared_LxFs, np.int32)
    for edit in (deltas.refit, deltas.deltas) if isinstance(deltas, RefitThenDeltas) else (deltas,):
        if edit is not None:
            tree["refit" if isinstance(edit, DownRefit) else "delta"] = edit.tree()
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(store_dir / "state", tree, force=True)
    meta = _expected_meta(dense_config, cfg)
    if stats:
        meta["stats"] = {k: (np.asarray(v).tolist() if isinstance(v, np.ndarray) else v) for k, v in stats.items()}
    (store_dir / "meta.json").write_text(json.dumps(meta, indent=1))
    return store_dir


def load_moe(store_dir: str | Path, dense_config,
             cfg: RouterConfig) -> tuple[ExpertPartition, Routers, MLPEdit | None]:
    """Read a stored MoE; MoEError (naming what differs) if it was built for another model, shape or training."""
    import orbax.checkpoint as ocp

    store_dir = Path(store_dir).expanduser().absolute()
    meta_path = store_dir / "meta.json"
    if not meta_path.is_file():
        raise MoEError(f"no stored MoE at {store_dir} (meta.json missing)")
    meta = json.loads(meta_path.read_text())
    want = _expected_meta(dense_config, cfg)
    for key in ("format", "dense_model", "n_layers", "d_model", "d_ff"):
        if meta.get(key) != want[key]:
            raise MoEError(f"stored MoE at {store_dir} has {key} = {meta.get(key)!r}, this model needs {want[key]!r}; "
                           "delete it or choose another out_dir")
    default = RouterConfig().training_key()  # a key added since the store was written has its default there
    stored = {k: meta["training"].get(k, default.get(k)) for k in want["training"]}
    diff = {k: (stored[k], v) for k, v in want["training"].items() if stored[k] != v}
    if diff:
        shown = ", ".join(f"{k}: stored {a!r} vs config {b!r}" for k, (a, b) in diff.items())
        raise MoEError(f"stored MoE at {store_dir} was built with other settings ({shown}); rebuild it or choose "
                       "another out_dir")
    with ocp.StandardCheckpointer() as ckpt:
        tree = ckpt.restore(store_dir / "state")
    shared = np.asarray(tree["shared"], np.int32) if "shared" in tree else None
    partition = ExpertPartition(np.asarray(tree["neurons"], np.int32), shared).check(dense_config.n_layers,
                                                                                      dense_config.d_ff)
    if partition.n_experts != cfg.n_experts or partition.n_shared != shared_neurons(cfg, dense_config.d_ff):
        raise MoEError(f"stored MoE at {store_dir} has {partition.n_experts} experts and {partition.n_shared} shared "
                       f"neurons, config asks {cfg.n_experts} and {shared_neurons(cfg, dense_config.d_ff)}: rebuild it")
    routers = Routers(np.asarray(tree["router_w"], np.float32), np.asarray(tree["router_b"], np.float32))
    deltas = None
    if cfg.distill_steps:
        if "delta" not in tree:
            raise MoEError(f"stored MoE at {store_dir} holds no MLP corrections, the config distils for "
                           f"{cfg.distill_steps} steps: rebuild it")
        try:
            deltas = MLPDeltas.from_tree(tree["delta"]).check(dense_config.n_layers, dense_config.d_model,
                                                              dense_config.d_ff)
        except MoEError as e:
            raise MoEError(f"stored MoE at {store_dir}: {e}; rebuild it") from None
    if cfg.refit_lambda:
        if "refit" not in tree:
            raise MoEError(f"stored MoE at {store_dir} holds no refitted w_down, the config refits it: rebuild it")
        try:
            refit = DownRefit.from_tree(tree["refit"]).check(dense_config.n_layers, dense_config.d_model,
                                                             dense_config.d_ff)
        except MoEError as e:
            raise MoEError(f"stored MoE at {store_dir}: {e}; rebuild it") from None
        deltas = refit if deltas is None else RefitThenDeltas(refit, deltas)
    return partition, routers.check(dense_config.n_layers, dense_config.d_model, cfg.n_experts), deltas


def _load_or_error(store_dir: Path, dense_config, cfg: RouterConfig):
    """`load_moe`'s result, or the MoEError it raised (so callers can fall back to another store)."""
    try:
        return load_moe(store_dir, dense_config, cfg)
    except MoEError as e:
        return e


def build_or_load(dense_source, tokenizer, text_fn, bos: int, cfg: RouterConfig, *, rebuild: bool = False,
                  eval_fn=None, say=print) -> tuple[ExpertPartition, Routers, MLPEdit | None]:
    """The stored MoE for `cfg` (cache, then shipped; a mismatching cache store with no matching shipped one
    raises), else build and store it. The third element is the MLP edit `moe.moe_source` applies: the distilled
    corrections, the refitted w_down, the refit then the corrections, or None.

    `text_fn(max_chars) -> str` supplies calibration text (e.g. `vorch_jax.corpus.kjv_text`); models/ does not
    import the corpus itself. `eval_fn(source, partition, routers) -> (delta_tree -> str)` (source: the dense one,
    or the refitted one a distillation starts from), if given, reports held-out quality during the distillation.
    """
    store, shipped = default_store_dir(cfg), SHIPPED_DIR / store_name(cfg)
    use_shipped = not cfg.out_dir and not rebuild and (shipped / "meta.json").is_file()
    if (store / "meta.json").is_file() and not rebuild:
        say(f"loading stored MoE from {store}")
        cached = _load_or_error(store, dense_source.config, cfg)
        if not isinstance(cached, MoEError):
            return cached
        found = _load_or_error(shipped, dense_source.config, cfg) if use_shipped else cached
        if isinstance(found, MoEError):
            raise cached
        say(f"the cache store does not fit this config; loading the MoE shipped in {shipped}")
        return found
    if use_shipped:
        found = _load_or_error(shipped, dense_source.config, cfg)
        if not isinstance(found, MoEError):
            say(f"loading the MoE shipped in {shipped}")
            return found
        say(f"the shipped MoE does not fit this config, building instead ({found})")
    text = text_fn(calibration_chars(cfg))
    partition, routers, stats = build_moe(dense_source, tokenizer, text, bos, cfg, say=say)
    refit = deltas = None
    if cfg.refit_lambda:
        ids = calibration_ids(tokenizer, text, bos, cfg, n_seq=cfg.distill_seqs)[:cfg.refit_seqs]
        refit, routers, more = refit_down(dense_source, partition, routers, ids, top_k=cfg.target_top_k,
                                          lam=cfg.refit_lambda, router_steps=cfg.steps if cfg.refit_routers else 0,
                                          router_learning_rate=cfg.learning_rate, seed=cfg.seed, say=say)
        stats.update(more)
    if cfg.distill_steps:
        base = dense_source if refit is None else RefitSource(dense_source, refit)
        ids = calibration_ids(tokenizer, text, bos, cfg, n_seq=cfg.distill_seqs)
        say(f"distilling the dense model into the top-{cfg.target_top_k} MoE: {cfg.distill_steps} steps of "
            f"{cfg.distill_batch} x {cfg.calib_seq_len} tokens, rank {cfg.distill_rank}"
            f"{', on top of the refit' if refit is not None else ''}")
        deltas, more = distill(base, partition, routers, ids, top_k=cfg.target_top_k,
                               steps=cfg.distill_steps, rank=cfg.distill_rank, batch=cfg.distill_batch,
                               learning_rate=cfg.distill_learning_rate, seed=cfg.seed,
                               eval_fn=eval_fn(base, partition, routers) if eval_fn else None, say=say)
        stats.update(more)
    deltas = refit if deltas is None else deltas if refit is None else RefitThenDeltas(refit, deltas)
    save_moe(store, dense_source.config, cfg, partition, routers, stats, deltas)
    say(f"stored MoE in {store}")
    return partition, routers, deltas
