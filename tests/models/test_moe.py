"""MoE SmolLM2 (models/moe.py, models/moe_build.py): exactness at k = E, partition, routers, store, source, routing.

Small on purpose: two-layer truncations of the real model, a one-layer partition, a few router steps.
"""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vorch_jax.models import llama_layers as Lay
from vorch_jax.models import moe
from vorch_jax.models import moe_build as mb
from vorch_jax.models import moe_store as store
from vorch_jax.models.llama import KVCache, LlamaModel

REPO = Path(__file__).resolve().parents[2]
E = 8


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _random_routers(cfg, seed=0, n_experts=E):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(cfg.n_layers, cfg.d_model, n_experts)).astype(np.float32)
    return moe.Routers(w, np.zeros((cfg.n_layers, n_experts), np.float32))


@pytest.fixture(scope="module")
def partition(smollm2_source):
    """k-means on layers 0 and 1 only (the others keep neurons in order: still a valid partition)."""
    return mb.build_partition(smollm2_source, E, seed=0, iters=5, layers=[0, 1])


@pytest.fixture(scope="module")
def msource(smollm2_source, partition):
    return moe.moe_source(smollm2_source, partition, _random_routers(smollm2_source.config))


@pytest.fixture(scope="module")
def layer0(smollm2_source, msource):
    """(dense mlp block, gate block, expert blocks) of layer 0."""
    return (smollm2_source("layers.0.mlp"), msource(moe.gate_block_id(0)),
            [msource(moe.expert_block_id(0, e)) for e in range(E)])


def _x(cfg, seed=1, T=6):
    return jax.random.normal(jax.random.PRNGKey(seed), (2, T, cfg.d_model), jnp.float32)


# ------------------------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_layer_with_all_experts_is_the_dense_mlp(smollm2_source, layer0, jit):
    cfg = smollm2_source.config
    dense, gate, experts = layer0
    f = jax.jit(moe.moe_mlp_block, static_argnames=("cfg", "top_k")) if jit else moe.moe_mlp_block
    x = _x(cfg)
    out = f(cfg=cfg, gate_block_w=gate, expert_ws=experts, x_BxTxD=x, top_k=E)
    ref = Lay.mlp_block(cfg, dense, x)
    assert _rel(out - x, ref - x) < 1e-5


def test_model_with_k_equal_E_reproduces_dense_logits(smollm2_source, msource):
    cfg2 = dataclasses.replace(smollm2_source.config, n_layers=2)
    dense = {b: smollm2_source(b) for b in ["embed", "final_norm", "layers.0.attn", "layers.0.mlp",
                                             "layers.1.attn", "layers.1.mlp"]}
    blocks = {b: msource(b) for b in moe.moe_block_ids(2, E)}
    ids = jnp.asarray([[0, 1030, 15, 1100, 28, 355, 17, 9, 4400, 312, 12, 60]], jnp.int32)
    ref, _ = LlamaModel(cfg2, lambda b: dense[b])(ids, KVCache.zeros(cfg2, 1, ids.shape[1]), 0)
    got = jax.jit(moe.moe_forward, static_argnames=("cfg", "top_k", "collect"))(cfg2, blocks, ids, top_k=E)
    assert _rel(got, ref) < 1e-5
    fewer = moe.moe_forward(cfg2, blocks, ids, top_k=2)
    assert _rel(fewer, ref) > 1e-3  # top-2 really drops experts


# ------------------------------------------------------------------------------------------------ partition


def test_partition_is_balanced_covers_every_neuron_once_and_is_deterministic(smollm2_source, partition):
    F = smollm2_source.config.d_ff
    n = partition.neurons_LxExFe
    assert n.shape == (smollm2_source.config.n_layers, E, F // E)
    for i in (0, 1):
        assert np.array_equal(np.sort(n[i].ravel()), np.arange(F))
        assert all(np.all(np.diff(row) > 0) for row in n[i])
    assert not np.array_equal(n[0], np.arange(F).reshape(E, -1))  # really clustered
    again = mb.partition_layer(smollm2_source("layers.0.mlp"), E, seed=0, iters=5)
    assert np.array_equal(again, n[0])


def test_partition_refuses_uneven_split_and_broken_partitions(smollm2_source, partition):
    with pytest.raises(moe.MoEError, match="divisible"):
        mb.build_partition(smollm2_source, 7, seed=0, iters=1, layers=[])
    bad = partition.neurons_LxExFe.copy()
    bad[3, 0, 0] = bad[3, 0, 1]
    with pytest.raises(moe.MoEError, match="layer 3"):
        moe.ExpertPartition(bad).check(smollm2_source.config.n_layers, smollm2_source.config.d_ff)


# --------------------------------------------------------------------------------------------------- routers


def _router_data(smollm2_source, partition, n=96):
    dense = smollm2_source("layers.0.mlp")
    h = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (2, n, smollm2_source.config.d_model)))
    mass = np.stack([np.asarray(mb.expert_mass(dense, partition.neurons_LxExFe[0], h[j])) for j in range(2)])
    return h, mass


def test_fixed_seed_gives_identical_routers_and_training_reports_progress(smollm2_source, partition):
    h, mass = _router_data(smollm2_source, partition)
    logs = []
    kw = dict(top_k=2, steps=6, learning_rate=1e-2, log_every=3)
    r1, s1 = mb.train_routers(h, mass, seed=5, say=logs.append, **kw)
    r2, _ = mb.train_routers(h, mass, seed=5, say=lambda _: None, **kw)
    r3, _ = mb.train_routers(h, mass, seed=6, say=lambda _: None, **kw)
    assert np.array_equal(r1.w_LxDxE, r2.w_LxDxE) and np.array_equal(r1.b_LxE, r2.b_LxE)
    assert not np.array_equal(r1.w_LxDxE, r3.w_LxDxE)
    assert r1.w_LxDxE.shape == (2, smollm2_source.config.d_model, E)
    assert len(logs) == 2 and "step    6/6" in logs[-1] and "recall" in logs[-1]
    assert s1["recall_L"].shape == (2,) and np.all((0 <= s1["recall_L"]) & (s1["recall_L"] <= 1))


def test_routers_learn_the_targets(smollm2_source, partition):
    h, mass = _router_data(smollm2_source, partition)
    _, first = mb.train_routers(h, mass, top_k=2, steps=1, learning_rate=1e-2, seed=0, say=lambda _: None)
    _, later = mb.train_routers(h, mass, top_k=2, steps=60, learning_rate=1e-2, seed=0, log_every=60,
                                say=lambda _: None)
    assert later["loss_L"].mean() < first["loss_L"].mean()
    assert later["recall_L"].mean() > first["recall_L"].mean()


# ----------------------------------------------------------------------------------------------------- store


def _cfg(tmp_path, **kw):
    return mb.RouterConfig(out_dir=str(tmp_path / "store"), **kw)


def test_save_load_round_trip(tmp_path, smollm2_source, partition):
    cfg = _cfg(tmp_path)
    routers = _random_routers(smollm2_source.config, seed=2)
    where = store.save_moe(store.default_store_dir(cfg), smollm2_source.config, cfg, partition, routers, {"seconds": 1.0})
    p2, r2, d2 = store.load_moe(where, smollm2_source.config, cfg)
    assert np.array_equal(p2.neurons_LxExFe, partition.neurons_LxExFe)
    assert np.array_equal(r2.w_LxDxE, routers.w_LxDxE) and np.array_equal(r2.b_LxE, routers.b_LxE)
    assert d2 is None  # not distilled
    # build_or_load finds the stored result and does not rebuild
    got_p, _, _ = store.build_or_load(smollm2_source, None, None, 0, cfg, say=lambda _: None)
    assert np.array_equal(got_p.neurons_LxExFe, partition.neurons_LxExFe)


def test_mismatched_store_raises(tmp_path, smollm2_source, partition):
    mcfg = smollm2_source.config
    cfg = _cfg(tmp_path)
    where = store.save_moe(store.default_store_dir(cfg), mcfg, cfg, partition, _random_routers(mcfg))
    with pytest.raises(moe.MoEError, match="d_ff"):
        store.load_moe(where, dataclasses.replace(mcfg, d_ff=2048), cfg)
    with pytest.raises(moe.MoEError, match="n_experts"):
        store.load_moe(where, mcfg, _cfg(tmp_path, n_experts=4))
    with pytest.raises(moe.MoEError, match="seed"):
        store.load_moe(where, mcfg, _cfg(tmp_path, seed=1))
    with pytest.raises(moe.MoEError, match="routers of shapes"):
        moe.moe_source(smollm2_source, partition, _random_routers(mcfg, n_experts=4))
    with pytest.raises(moe.MoEError, match="meta.json missing"):
        store.load_moe(tmp_path / "nothing", mcfg, cfg)


# ---------------------------------------------------------------------------------------------------- source


def test_moe_source_bytes_shapes_and_ids(smollm2_source, msource, partition):
    cfg = smollm2_source.config
    L, D = cfg.n_layers, cfg.d_model
    ids = msource.block_ids
    assert ids[:4] == ["embed", "layers.0.attn", "layers.0.moe_gate", "layers.0.expert.0"]
    assert len(ids) == 2 + L * (2 + E) and "layers.0.mlp" not in ids
    gates = sum(msource.block_nbytes(b) for b in ids if b.endswith("moe_gate"))
    experts = sum(msource.block_nbytes(b) for b in ids if ".expert." in b)
    dense_mlp = sum(smollm2_source.block_nbytes(f"layers.{i}.mlp") for i in range(L))
    router_bytes = L * (D * E + E) * 4
    assert experts + gates == dense_mlp + router_bytes
    assert gates == L * (D + D * E + E) * 4
    assert msource.block_kind_layer("layers.4.expert.5") == ("expert", 4)
    assert msource.block_kind_layer("layers.4.moe_gate") == ("norm", 4)
    with pytest.raises(KeyError, match="layers.0.mlp"):
        msource("layers.0.mlp")
    # reading layer 1's blocks counts the dense file bytes of layers.1.mlp plus the router, exactly
    before_dense = smollm2_source.nbytes_read
    dense1 = smollm2_source("layers.1.mlp")
    file_bytes = smollm2_source.nbytes_read - before_dense
    before = msource.nbytes_read
    for b in [moe.gate_block_id(1)] + [moe.expert_block_id(1, e) for e in range(E)]:
        w = msource(b)
        assert {k: v.shape for k, v in w.items()} == {k: s.shape for k, s in msource.block_shapes(b).items()}
    assert msource.nbytes_read - before == file_bytes + (D * E + E) * 4
    ex3 = msource(moe.expert_block_id(1, 3))
    assert np.array_equal(ex3["w_down"], dense1["w_down"][partition.neurons_LxExFe[1, 3]])
    assert msource.tokenizer_metadata()["model"] == "gpt2"


# ---------------------------------------------------------------------------------------------------- routing


def test_unselected_expert_is_not_computed(smollm2_source, layer0):
    cfg = smollm2_source.config
    dense, gate, experts = layer0
    never = 3
    gate = dict(gate, router_b=np.where(np.arange(E) == never, -1e9, 0.0).astype(np.float32))
    poisoned = list(experts)
    poisoned[never] = {k: np.full_like(v, np.nan) for k, v in experts[never].items()}
    x = _x(cfg, T=8)
    for f in (moe.moe_mlp_block, jax.jit(moe.moe_mlp_block, static_argnums=(0, 4))):
        for k in (1, 2, 4):
            clean, got = np.asarray(f(cfg, gate, experts, x, k)), np.asarray(f(cfg, gate, poisoned, x, k))
            assert np.isfinite(got).all() and np.array_equal(got, clean), f"k={k}"
    # an expert no token chose may be left out (not fetched)
    h, mask, _ = moe.moe_route(cfg, gate, x, 2)
    chosen = np.asarray(mask).any((0, 1))
    partial = [w if chosen[e] else None for e, w in enumerate(experts)]
    assert np.allclose(moe.moe_combine(x, h, partial, mask), moe.moe_mlp_block(cfg, gate, experts, x, 2))
    # and a selected expert's contribution is the expert's SwiGLU on the tokens that chose it
    one = moe.moe_mlp_block(cfg, gate, experts, x, 1)
    top1 = int(np.asarray(moe.moe_router_probs(gate, h))[0, 0].argmax())
    ref = x[0, 0] + moe.expert_mlp(experts[top1], h[0, 0])
    assert np.allclose(one[0, 0], ref, rtol=1e-5, atol=1e-5)


def test_router_probs_and_speculative_probs(smollm2_source, msource):
    cfg = smollm2_source.config
    g1 = msource(moe.gate_block_id(1))
    x = _x(cfg)
    spec = moe.speculative_expert_probs(g1, x, cfg.norm_eps)
    assert spec.shape == (2, 6, E) and np.allclose(spec.sum(-1), 1.0, atol=1e-5)
    h = Lay.rms_norm(x, g1["ffn_norm"], cfg.norm_eps)
    assert np.allclose(spec, moe.moe_router_probs(g1, h))


# ----------------------------------------------------------------------------------------------------- config


def test_shipped_router_config_loads_and_has_a_header():
    path = REPO / "configs/moe/router.yaml"
    cfg = mb.load_router_config(path)
    assert (cfg.model, cfg.n_experts, cfg.eval_top_ks) == ("smollm2-135m-moe", 8, (1, 2, 4, 8))
    text = path.read_text()
    for label in ("# Measures:", "# Run:", "# Takes:"):
        assert label in text
    assert "configs/moe/router.yaml" in text


@pytest.mark.parametrize("body, match", [
    ("n_experts: 8\nnexperts: 4\n", "unknown key 'nexperts'"),
    ("steps: 3\nsteps: 4\n", "key 'steps' is set twice"),
    ("steps: three\n", "key 'steps' expects int"),
    ("learning_rate: 1e-3\n", "key 'learning_rate' expects float"),
    ("n_experts: 8\ntarget_top_k: 9\n", "key 'target_top_k'"),
    ("model: smollm2-135m\n", "key 'model'"),
    ("eval_windows: -1\n", "key 'eval_windows' must be >= 0"),
])
def test_router_config_errors_name_key_and_file(tmp_path, body, match):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(mb.RouterConfigError, match=match) as err:
        mb.load_router_config(path)
    assert str(path) in str(err.value)


class _CharTokenizer:  # one token per character: a window's tokens map back to the text exactly
    def encode(self, text):
        return type("Encoding", (), {"ids": [ord(c) for c in text]})()


def test_held_out_windows_lie_after_all_training_text_at_verse_starts():
    cfg = dataclasses.replace(mb.RouterConfig(), calib_char_offset=100, calib_tokens=64, calib_seq_len=32,
                              eval_windows=5)
    verses = [f"verse {i} " + "x" * (i % 7) for i in range(3000)]
    text = "\n".join(verses)
    windows, start = mb.held_out_windows(_CharTokenizer(), text, 1, cfg)
    assert start == mb.calibration_chars(cfg) and start > cfg.calib_char_offset
    assert windows.shape == (5, 32) and windows.dtype == np.int32 and (windows[:, 0] == 1).all()
    firsts = []
    for row in windows:
        chunk = "".join(map(chr, row[1:]))
        at = text.index(chunk, start)  # every window is text from `start` on ...
        assert text[at - 1] == "\n"  # ... and begins a verse
        firsts.append(at)
    assert firsts == sorted(set(firsts)) and firsts[-1] - firsts[0] > len(text) // 2  # spread, not clustered
    # a training-key no-op: changing it reuses a stored MoE
    assert mb.RouterConfig().training_key() == dataclasses.replace(mb.RouterConfig(), eval_windows=3).training_key()
    with pytest.raises(mb.MoEError, match="lower eval_windows"):
        mb.held_out_windows(_CharTokenizer(), text[: start + 500], 1, cfg)
