"""The shared-expert MoE SmolLM2 (models/moe.py, models/moe_build.py): a shared part every token runs, held in the
layer's gate block, beside E routed experts made from the other neurons.

Small on purpose: a two-layer truncation of the real model, the shared part chosen on random hidden states.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vorch_jax.models import llama_layers as Lay
from vorch_jax.models import moe
from vorch_jax.models import moe_build as mb
from vorch_jax.models.llama import KVCache, LlamaModel

E = 8
FRACTION = 0.4


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _h(cfg, seed=3, n=64):
    return np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (n, cfg.d_model), jnp.float32))


@pytest.fixture(scope="module")
def shared_partition(smollm2_source):
    cfg = smollm2_source.config
    fs = mb.shared_neurons(mb.RouterConfig(shared_fraction=FRACTION), cfg.d_ff)
    shared = np.stack([mb.choose_shared(smollm2_source(f"layers.{i}.mlp"), _h(cfg, seed=i), fs)
                       for i in range(cfg.n_layers)])
    return mb.build_partition(smollm2_source, E, seed=0, iters=5, layers=[0, 1], shared_LxFs=shared)


@pytest.fixture(scope="module")
def shared_source(smollm2_source, shared_partition):
    cfg = smollm2_source.config
    rng = np.random.default_rng(0)
    routers = moe.Routers(rng.normal(size=(cfg.n_layers, cfg.d_model, E)).astype(np.float32),
                          np.zeros((cfg.n_layers, E), np.float32))
    return moe.moe_source(smollm2_source, shared_partition, routers)


def test_shared_part_is_the_most_active_neurons_and_the_experts_split_the_rest(smollm2_source, shared_partition):
    cfg = smollm2_source.config
    fs = mb.shared_neurons(mb.RouterConfig(shared_fraction=FRACTION), cfg.d_ff)
    assert fs == 608 and (cfg.d_ff - fs) % (2 * E) == 0  # round(0.4 * 1536 / 16) * 16: experts of 116
    p = shared_partition
    assert p.n_shared == fs and p.neurons_LxExFe.shape == (cfg.n_layers, E, (cfg.d_ff - fs) // E)
    for i in (0, 1):  # every neuron in exactly one place
        every = np.concatenate([p.shared_LxFs[i], p.neurons_LxExFe[i].ravel()])
        assert np.array_equal(np.sort(every), np.arange(cfg.d_ff))
    mass = mb.neuron_mass(smollm2_source("layers.0.mlp"), _h(cfg, seed=0))
    assert mass[p.shared_LxFs[0]].min() >= np.delete(mass, p.shared_LxFs[0]).max()


def test_a_partition_whose_shared_part_overlaps_an_expert_is_refused(smollm2_source, shared_partition):
    cfg = smollm2_source.config
    bad = shared_partition.shared_LxFs.copy()
    bad[1, 0] = shared_partition.neurons_LxExFe[1, 0, 0]
    with pytest.raises(moe.MoEError, match="layer 1"):
        moe.ExpertPartition(shared_partition.neurons_LxExFe, np.sort(bad, axis=1)).check(cfg.n_layers, cfg.d_ff)
    with pytest.raises(mb.RouterConfigError, match="shared_fraction"):
        mb.router_config_from_dict({"shared_fraction": 1.0})


def test_the_gate_block_holds_the_shared_part_with_the_shapes_it_declares(shared_source, smollm2_source):
    gate = shared_source(moe.gate_block_id(0))
    shapes = shared_source.block_shapes(moe.gate_block_id(0))
    assert set(gate) == set(moe.GATE_LEAVES) | set(moe.SHARED_LEAVES) == set(shapes)
    assert all(gate[k].shape == shapes[k].shape for k in gate)
    assert shared_source.block_kind_layer(moe.gate_block_id(3)) == ("mlp", 3)  # a dense FFN every token runs
    assert shared_source.block_shapes(moe.expert_block_id(0, 0))["w_gate"].shape == (576, 116)
    before = shared_source.nbytes_read  # a layer's blocks share the dense MLP's file bytes exactly
    dense_before = smollm2_source.nbytes_read
    for b in [moe.gate_block_id(1)] + [moe.expert_block_id(1, e) for e in range(E)]:
        shared_source(b)
    router_bytes = shared_source.routers.w_LxDxE[1].nbytes + shared_source.routers.b_LxE[1].nbytes
    assert shared_source.nbytes_read - before == (smollm2_source.nbytes_read - dense_before) + router_bytes


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_shared_part_plus_every_expert_is_the_dense_mlp(smollm2_source, shared_source, jit):
    cfg = smollm2_source.config
    gate = shared_source(moe.gate_block_id(0))
    experts = [shared_source(moe.expert_block_id(0, e)) for e in range(E)]
    f = jax.jit(moe.moe_mlp_block, static_argnames=("cfg", "top_k")) if jit else moe.moe_mlp_block
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, cfg.d_model), jnp.float32)
    out = f(cfg=cfg, gate_block_w=gate, expert_ws=experts, x_BxTxD=x, top_k=E)
    ref = Lay.mlp_block(cfg, smollm2_source("layers.0.mlp"), x)
    assert _rel(out - x, ref - x) < 1e-5


def test_top2_with_the_shared_part_stays_nearer_the_dense_model(smollm2_source, shared_source):
    """k = E reproduces the dense logits; at top-2 the shared part keeps the model nearer the dense one than the
    same routers over experts of all the neurons (the no-shared variant) do."""
    cfg2 = dataclasses.replace(smollm2_source.config, n_layers=2)
    dense = {b: smollm2_source(b) for b in ["embed", "final_norm", "layers.0.attn", "layers.0.mlp",
                                             "layers.1.attn", "layers.1.mlp"]}
    ids = jnp.asarray([[0, 1030, 15, 1100, 28, 355, 17, 9, 4400, 312, 12, 60]], jnp.int32)
    ref, _ = LlamaModel(cfg2, lambda b: dense[b])(ids, KVCache.zeros(cfg2, 1, ids.shape[1]), 0)
    blocks = {b: shared_source(b) for b in moe.moe_block_ids(2, E)}
    fwd = jax.jit(moe.moe_forward, static_argnames=("cfg", "top_k", "collect"))
    assert _rel(fwd(cfg2, blocks, ids, top_k=E), ref) < 1e-5
    plain = moe.moe_source(smollm2_source, mb.build_partition(smollm2_source, E, seed=0, iters=5, layers=[0, 1]),
                           shared_source.routers)
    plain_blocks = {b: plain(b) for b in moe.moe_block_ids(2, E)}
    assert _rel(fwd(cfg2, blocks, ids, top_k=2), ref) < 0.8 * _rel(fwd(cfg2, plain_blocks, ids, top_k=2), ref)


def test_the_route_op_adds_the_shared_part(smollm2_source, shared_source):
    """The runtime's `route` position returns the residual with the shared part added, and its experts then
    complete the layer as `moe_mlp_block` does."""
    from vorch_jax.models.moe_compute import expert_add, route

    cfg = smollm2_source.config
    gate = {k: jnp.asarray(v) for k, v in shared_source(moe.gate_block_id(0)).items()}
    x = jax.random.normal(jax.random.PRNGKey(2), (1, 5, cfg.d_model), jnp.float32)
    x_shared, h, mask, selected, _ = route(cfg, gate, x, 2)
    assert int(np.asarray(selected).sum()) >= 2 and _rel(x_shared, x) > 1e-3
    for e in np.flatnonzero(np.asarray(selected)):
        x_shared = expert_add(shared_source(moe.expert_block_id(0, int(e))), h, x_shared, mask, jnp.int32(e))
    experts = [shared_source(moe.expert_block_id(0, e)) for e in range(E)]
    assert _rel(x_shared, moe.moe_mlp_block(cfg, gate, experts, x, 2)) < 1e-6
