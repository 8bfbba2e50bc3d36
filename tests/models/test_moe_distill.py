"""The distilled MoE (models/moe_distill.py, models/moe_store.py): the training forward is the runtime's MoE, the
corrections merge where the experts are sliced, a few steps lower the KL, and the store keeps and checks them.

Two-layer truncations of the real SmolLM2, a shared part of 32 neurons, 8 experts.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from vorch_jax.models import moe
from vorch_jax.models import moe_build as mb
from vorch_jax.models import moe_distill as md
from vorch_jax.models import moe_store as store
from vorch_jax.models.errors import MoEError, RouterConfigError

E, LAYERS = 8, 2  # tests/models/conftest.py's two and parts
IDS = jnp.asarray([[0, 1030, 15, 1100, 28, 355, 17, 9, 4400, 312, 12, 60]], jnp.int32)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _random_delta(cfg, rank=4, seed=3, scale=0.02):
    rng = np.random.default_rng(seed)
    shapes = {"ga": (cfg.d_model, rank), "gb": (rank, cfg.d_ff), "ua": (cfg.d_model, rank), "ub": (rank, cfg.d_ff),
              "da": (cfg.d_ff, rank), "db": (rank, cfg.d_model)}
    return md.MLPDeltas.from_tree({k: scale * rng.normal(size=(LAYERS,) + s) for k, s in shapes.items()})


def _moe_logits(two, parts, deltas, top_k):
    ms = moe.moe_source(two, *parts, deltas)
    blocks = {b: ms(b) for b in moe.moe_block_ids(LAYERS, E)}
    return moe.moe_forward(two.config, blocks, IDS, top_k=top_k)


@pytest.mark.parametrize("top_k", [2, E])
@pytest.mark.parametrize("distilled", [False, True], ids=["plain", "distilled"])
def test_training_forward_is_the_runtime_moe(two, parts, top_k, distilled):
    """routed_logits (a neuron mask over the corrected dense MLP) equals moe_forward over the sliced blocks."""
    deltas = _random_delta(two.config) if distilled else None
    weights = md.stacked_weights(two, *parts)
    tree = None if deltas is None else {k: jnp.asarray(v) for k, v in deltas.tree().items()}
    got = md.routed_logits(two.config, weights, tree, IDS, top_k)
    assert _rel(got, _moe_logits(two, parts, deltas, top_k)) < 1e-5


def test_corrections_change_the_model_and_top_zero_is_dense(two, parts):
    weights = md.stacked_weights(two, *parts)
    dense = md.routed_logits(two.config, weights, None, IDS, 0)
    assert _rel(_moe_logits(two, parts, None, E), dense) < 1e-5
    assert _rel(_moe_logits(two, parts, _random_delta(two.config), E), dense) > 1e-3
    assert _rel(_moe_logits(two, parts, None, 2), dense) > 1e-3


def test_a_few_steps_lower_the_kl_and_are_deterministic(two, parts):
    ids = np.asarray(np.tile(IDS, (3, 1)) + np.arange(3)[:, None], np.int32)
    run = lambda: md.distill(two, *parts, ids, top_k=2, steps=6, rank=4, batch=2, learning_rate=1e-2, seed=0,
                             log_every=3, say=lambda _: None)
    deltas, stats = run()
    weights = md.stacked_weights(two, *parts)
    before = float(md.kl_dense_moe(two.config, weights, None, jnp.asarray(ids), 2))
    after = float(md.kl_dense_moe(two.config, weights, {k: jnp.asarray(v) for k, v in deltas.tree().items()},
                                  jnp.asarray(ids), 2))
    assert after < 0.9 * before, (before, after)
    assert [s for s, _ in stats["distill_kl"]] == [3, 6]
    again, _ = run()
    assert all(np.array_equal(a, b) for a, b in zip(deltas.tree().values(), again.tree().values()))


SHARED_32 = 1 / 48  # shared_neurons: round(f * 1536 / 16) * 16 = 32, the fixture's shared part


def test_store_keeps_corrections_and_refuses_a_store_without_them(tmp_path, two, parts):
    cfg = mb.RouterConfig(out_dir=str(tmp_path / "s"), shared_fraction=SHARED_32, distill_steps=5, distill_rank=4)
    deltas = _random_delta(two.config)
    where = store.save_moe(store.default_store_dir(cfg), two.config, cfg, *parts, {"seconds": 1.0}, deltas)
    got = store.load_moe(where, two.config, cfg)[2]
    assert all(np.array_equal(a, b) for a, b in zip(got.tree().values(), deltas.tree().values()))
    with pytest.raises(MoEError, match="distill_steps: stored 5 vs config 6"):
        store.load_moe(where, two.config, dataclasses.replace(cfg, distill_steps=6))
    plain = dataclasses.replace(cfg, out_dir=str(tmp_path / "p"), distill_steps=0)
    where_plain = store.save_moe(store.default_store_dir(plain), two.config, plain, *parts)
    assert store.load_moe(where_plain, two.config, plain)[2] is None
    with pytest.raises(MoEError, match="distill_steps"):
        store.load_moe(where_plain, two.config, dataclasses.replace(plain, distill_steps=5))


def test_build_or_load_reads_a_matching_shipped_store(tmp_path, two, parts, monkeypatch):
    """Cache first, then the shipped store; a shipped store built with other settings is passed over (here the
    build that follows fails on purpose, with no text to calibrate on)."""
    cfg = mb.RouterConfig(shared_fraction=SHARED_32, distill_steps=5, distill_rank=4)
    monkeypatch.setattr(store, "SHIPPED_DIR", tmp_path / "shipped")
    monkeypatch.setattr(store, "default_store_dir", lambda c: tmp_path / "cache")
    deltas = _random_delta(two.config)
    store.save_moe(tmp_path / "shipped" / store.store_name(cfg), two.config, cfg, *parts, None, deltas)
    said = []
    partition, _, got = store.build_or_load(two, None, None, 0, cfg, say=said.append)
    assert "shipped" in said[0] and np.array_equal(partition.neurons_LxExFe, parts[0].neurons_LxExFe)
    assert store.store_in_use(cfg) == tmp_path / "shipped" / store.store_name(cfg)
    assert np.array_equal(got.gb_LxRxF, deltas.gb_LxRxF)

    def no_text(_):
        raise RuntimeError("no calibration text")

    with pytest.raises(RuntimeError, match="no calibration text"):
        store.build_or_load(two, None, no_text, 0, dataclasses.replace(cfg, distill_steps=7), say=said.append)
    assert "does not fit" in said[-1]
    with pytest.raises(RuntimeError, match="no calibration text"):  # rebuild reads neither store
        store.build_or_load(two, None, no_text, 0, cfg, rebuild=True, say=said.append)
    # a cache store built with other settings: the matching shipped one is read; with none matching, the cache's
    # error is raised
    store.save_moe(tmp_path / "cache", two.config, dataclasses.replace(cfg, distill_steps=9), *parts, None, deltas)
    store.build_or_load(two, None, None, 0, cfg, say=said.append)
    assert "cache store does not fit" in said[-1]
    with pytest.raises(MoEError, match="distill_steps: stored 9 vs config 8"):
        store.build_or_load(two, None, None, 0, dataclasses.replace(cfg, distill_steps=8), say=said.append)


def test_store_names_keep_plain_and_distilled_apart():
    plain = mb.RouterConfig(model="smollm2-135m-moe-shared")
    assert store.store_name(plain) == "smollm2-135m-moe-shared-E8"
    assert store.store_name(dataclasses.replace(plain, distill_steps=3)) == "smollm2-135m-moe-shared-E8-distilled"
    # a plain config's training key ignores the distillation's other keys
    assert plain.training_key() == dataclasses.replace(plain, distill_rank=7).training_key()
    assert plain.training_key() != dataclasses.replace(plain, distill_steps=3).training_key()


def test_config_checks_the_distillation_keys():
    with pytest.raises(RouterConfigError, match="distill_batch"):
        mb.router_config_from_dict({"distill_batch": 8, "distill_seqs": 4})
    with pytest.raises(RouterConfigError, match="distill_steps"):
        mb.router_config_from_dict({"distill_steps": -1})
    with pytest.raises(RouterConfigError, match="distill_learning_rate"):
        mb.router_config_from_dict({"distill_learning_rate": 0.0})
