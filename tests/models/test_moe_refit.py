"""The refitted MoE (models/moe_refit.py) and the co-activation partition (models/moe_build.py): the ridge solve is
least squares pulled toward the dense w_down, a refit lowers each layer's output error and keeps every block's
shape, the store keeps it, and co-activation groups neurons that fire on the same tokens.

Two-layer truncations of the real SmolLM2, a shared part of 32 neurons, 8 experts (tests/models/conftest.py).
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from vorch_jax.models import moe
from vorch_jax.models import moe_build as mb
from vorch_jax.models import moe_distill as md
from vorch_jax.models import moe_refit as mr
from vorch_jax.models import moe_store as store
from vorch_jax.models.errors import MoEError, RouterConfigError

E, LAYERS = 8, 2  # tests/models/conftest.py's two and parts
IDS = jnp.asarray([[0, 1030, 15, 1100, 28, 355, 17, 9, 4400, 312, 12, 60]], jnp.int32)
SHARED_32 = 1 / 48  # shared_neurons: round(f * 1536 / 16) * 16 = 32


@pytest.fixture(scope="module")
def refit(two, parts):
    rng = np.random.default_rng(1)
    ids = np.concatenate([np.zeros((12, 1), np.int32), rng.integers(10, 20000, (12, 63))], axis=1).astype(np.int32)
    got, routers, stats = mr.refit_down(two, *parts, ids, top_k=2, lam=0.03, say=lambda _: None)
    assert routers is parts[1]  # no router steps: the routers it was given
    return got, stats


def test_ridge_solve_is_least_squares_pulled_toward_w0():
    rng = np.random.default_rng(0)
    a_NxF, w0_FxD = rng.normal(size=(200, 12)), rng.normal(size=(12, 5))
    y_NxD = rng.normal(size=(200, 5))
    gram, cross = jnp.asarray(a_NxF.T @ a_NxF), jnp.asarray(a_NxF.T @ y_NxD)
    lstsq = np.linalg.lstsq(a_NxF, y_NxD, rcond=None)[0]
    assert np.allclose(mr.ridge_solve(gram, cross, jnp.asarray(w0_FxD), 1e-9), lstsq, atol=1e-6)
    assert np.allclose(mr.ridge_solve(gram, cross, jnp.asarray(w0_FxD), 1e9), w0_FxD, atol=1e-6)
    mid = np.asarray(mr.ridge_solve(gram, cross, jnp.asarray(w0_FxD), 1.0))
    loss = lambda w: float(np.sum((a_NxF @ w - y_NxD) ** 2))
    assert loss(lstsq) < loss(mid) < loss(w0_FxD)


def test_refit_lowers_every_layers_error_and_keeps_the_blocks(two, parts, refit):
    got, stats = refit
    cfg = two.config
    assert got.w_down_LxFxD.shape == (LAYERS, cfg.d_ff, cfg.d_model)
    for before, after in zip(stats["refit_error_before_L"], stats["refit_error_after_L"]):
        assert 0 <= after < 0.8 * before, (before, after)
    ms, plain = moe.moe_source(two, *parts, got), moe.moe_source(two, *parts)
    partition = parts[0]
    for b in moe.moe_block_ids(LAYERS, E):
        w, p = ms(b), plain(b)
        assert {k: v.shape for k, v in w.items()} == {k: v.shape for k, v in p.items()}
    layer, e = 1, 3
    expert = ms(moe.expert_block_id(layer, e))
    assert np.array_equal(expert["w_down"], got.w_down_LxFxD[layer][partition.neurons_LxExFe[layer, e]])
    assert np.array_equal(expert["w_gate"], plain(moe.expert_block_id(layer, e))["w_gate"])
    gate = ms(moe.gate_block_id(layer))
    assert np.array_equal(gate["shared_w_down"], got.w_down_LxFxD[layer][partition.shared_LxFs[layer]])


def test_routers_trained_again_on_the_moes_own_stream_set_the_keep_masks(two, parts):
    """With router steps, each layer's router is trained again before its solve (on the MoE's own stream): new
    routers of the same shapes, each learning its tokens' top-2 experts well above chance (2/8), and the refit
    still lowers every layer's error with the keep masks those routers choose."""
    ids = np.random.default_rng(1).integers(10, 20000, (12, 64)).astype(np.int32)
    got, routers, stats = mr.refit_down(two, *parts, ids, top_k=2, lam=0.03, router_steps=60, say=lambda _: None)
    given = parts[1]
    assert routers.w_LxDxE.shape == given.w_LxDxE.shape and routers.b_LxE.shape == given.b_LxE.shape
    assert not np.allclose(routers.w_LxDxE, given.w_LxDxE)
    assert len(stats["refit_router_recall_L"]) == LAYERS and min(stats["refit_router_recall_L"]) > 0.5
    for before, after in zip(stats["refit_error_before_L"], stats["refit_error_after_L"]):
        assert 0 <= after < 0.8 * before, (before, after)
    cfg = mb.RouterConfig(shared_fraction=SHARED_32, refit_lambda=0.03)
    assert "refit_routers" not in cfg.training_key()  # stores built before the key existed still match
    assert dataclasses.replace(cfg, refit_routers=True).training_key()["refit_routers"] is True


def test_store_keeps_the_refit_and_refuses_a_store_without_it(tmp_path, two, parts, refit):
    cfg = mb.RouterConfig(out_dir=str(tmp_path / "s"), shared_fraction=SHARED_32, refit_lambda=0.03)
    assert store.store_name(cfg).endswith("-refit")
    assert store.store_name(dataclasses.replace(cfg, distill_steps=5)).endswith("-refit-distilled")
    where = store.save_moe(store.default_store_dir(cfg), two.config, cfg, *parts, {"seconds": 1.0}, refit[0])
    got = store.load_moe(where, two.config, cfg)[2]
    assert isinstance(got, mr.DownRefit) and np.array_equal(got.w_down_LxFxD, refit[0].w_down_LxFxD)
    with pytest.raises(MoEError, match="refit_lambda: stored 0.03 vs config 0.1"):
        store.load_moe(where, two.config, dataclasses.replace(cfg, refit_lambda=0.1))
    plain = dataclasses.replace(cfg, out_dir=str(tmp_path / "p"), refit_lambda=0.0)
    where_plain = store.save_moe(store.default_store_dir(plain), two.config, plain, *parts)
    with pytest.raises(MoEError, match="refit_lambda"):
        store.load_moe(where_plain, two.config, cfg)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _small_deltas(cfg, rank=4, scale=0.02):
    rng = np.random.default_rng(5)
    shapes = {"ga": (cfg.d_model, rank), "gb": (rank, cfg.d_ff), "ua": (cfg.d_model, rank), "ub": (rank, cfg.d_ff),
              "da": (cfg.d_ff, rank), "db": (rank, cfg.d_model)}
    return md.MLPDeltas.from_tree({k: scale * rng.normal(size=(LAYERS,) + s) for k, s in shapes.items()})


def _runtime_logits(two, parts, edit):
    ms = moe.moe_source(two, *parts, edit)
    return moe.moe_forward(two.config, {b: ms(b) for b in moe.moe_block_ids(LAYERS, E)}, IDS, top_k=2)


def test_a_distillation_on_top_trains_the_refitted_model(two, parts, refit):
    """The distillation's forward over the refitted source is the runtime's refitted MoE; with corrections, the
    runtime's MoE of the refit then the corrections."""
    weights = md.stacked_weights(mr.RefitSource(two, refit[0]), *parts)
    start = md.routed_logits(two.config, weights, None, IDS, 2)
    assert _rel(start, _runtime_logits(two, parts, refit[0])) < 1e-5
    assert _rel(start, _runtime_logits(two, parts, None)) > 1e-3
    deltas = _small_deltas(two.config)
    tree = {k: jnp.asarray(v) for k, v in deltas.tree().items()}
    both = md.routed_logits(two.config, weights, tree, IDS, 2)
    assert _rel(both, _runtime_logits(two, parts, mr.RefitThenDeltas(refit[0], deltas))) < 1e-5
    assert _rel(both, start) > 1e-3


def test_store_keeps_the_refit_and_the_corrections_on_top(tmp_path, two, parts, refit):
    cfg = mb.RouterConfig(out_dir=str(tmp_path / "b"), shared_fraction=SHARED_32, refit_lambda=0.03,
                          distill_steps=5, distill_rank=4)
    edit = mr.RefitThenDeltas(refit[0], _small_deltas(two.config))
    got = store.load_moe(store.save_moe(store.default_store_dir(cfg), two.config, cfg, *parts, None, edit),
                         two.config, cfg)[2]
    assert isinstance(got, mr.RefitThenDeltas) and np.array_equal(got.refit.w_down_LxFxD, refit[0].w_down_LxFxD)
    assert all(np.array_equal(a, b) for a, b in zip(got.deltas.tree().values(), edit.deltas.tree().values()))


def test_a_refit_of_the_wrong_shape_is_refused(two):
    cfg = two.config
    with pytest.raises(MoEError, match="does not fit"):
        mr.DownRefit(np.zeros((LAYERS, cfg.d_model, cfg.d_ff), np.float32)).check(LAYERS, cfg.d_model, cfg.d_ff)


def test_coactivation_groups_neurons_that_fire_together():
    """Planted: token kind j drives input dim j, and each neuron (owners shuffled) fires on one kind only: the
    experts are the kinds."""
    D, F, groups = 4, 32, 4
    rng = np.random.default_rng(0)
    owner_F = rng.permutation(np.arange(F) % groups)
    w_gate = np.zeros((D, F), np.float32)
    w_gate[owner_F, np.arange(F)] = 4.0
    w_up = np.full((D, F), 0.5, np.float32)
    mlp = {"w_gate": w_gate, "w_up": w_up, "w_down": np.ones((F, 6), np.float32)}
    h_NxD = np.eye(D, dtype=np.float32)[rng.integers(0, D, 400)] * rng.uniform(0.5, 2.0, (400, 1)).astype(np.float32)
    experts = mb.partition_layer(mlp, groups, seed=0, iters=10, h_NxD=h_NxD)
    assert sorted(len(set(owner_F[e])) for e in experts) == [1] * groups


@pytest.mark.parametrize("text, match", [
    ("partition_by: neighbours\n", "partition_by"),
    ("refit_lambda: -1\n", "refit_lambda"),
    ("refit_lambda: 0.03\nrefit_seqs: 300\n", "refit_seqs"),
    ("refit_routers: true\n", "refit_routers.*refit_lambda"),
    ("refit_lambda: 0.03\nrefit_routers: 1\n", "refit_routers' expects bool"),
])
def test_bad_refit_and_partition_keys_fail_naming_the_key(tmp_path, text, match):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RouterConfigError, match=match):
        mb.load_router_config(path)
