"""Invariants of the S1 (int8) and S2 (int4) weight formats, checked in float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vorch_jax.tiers.quant_int4 import Int4Weight, pack_nibbles, quantize_int4, unpack_nibbles
from vorch_jax.tiers.quant_int8 import Int8Weight, quantize_int8

# float32 slack of round(w / scale): the division is rounded once, so a code may differ from the exact
# round-to-nearest only where |w / scale| * 2^-24 reaches a .5 boundary (|w / scale| <= 127 or <= 15 + 15).
_EPS32 = 2.0**-24
_INT8_BOUND = 0.5 + 128 * _EPS32
_INT4_BOUND = 0.5 + 32 * _EPS32

# Golden mean absolute errors on rng(0) standard-normal [576, 576] weights. Never loosen: find out why it moved.
_GOLDEN_MAE = {"int8": 0.00644715091087246, 32: 0.06903526069220758, 64: 0.07825530895754558,
               128: 0.08567582725371736}


def _weight(k, n, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal((k, n)).astype(dtype)


def _np_unpack(packed_K2xN):
    packed = np.asarray(packed_K2xN)
    q = np.empty((2 * packed.shape[0], packed.shape[1]), np.int64)
    q[0::2] = packed & 0xF
    q[1::2] = packed >> 4
    return q


# ----------------------------------------------------------------------------------------------- packing


@pytest.mark.parametrize("k,n", [(2, 1), (64, 3), (640, 576)])
def test_nibble_pack_round_trip_exact(k, n):
    codes = np.random.default_rng(k + n).integers(0, 16, (k, n), dtype=np.uint8)
    packed = np.asarray(pack_nibbles(jnp.asarray(codes)))
    assert packed.dtype == np.uint8 and packed.shape == (k // 2, n)
    np.testing.assert_array_equal(packed, codes[0::2] | (codes[1::2] << 4))  # low nibble = even k
    np.testing.assert_array_equal(np.asarray(unpack_nibbles(jnp.asarray(packed))), codes)


# ----------------------------------------------------------------------------------------------- int8


def test_int8_layout_and_dequantize_formula():
    w = _weight(576, 192, seed=1)
    q8 = quantize_int8(jnp.asarray(w))
    assert isinstance(q8, Int8Weight)
    assert q8.q_KxN.dtype == jnp.int8 and q8.scale_N.dtype == jnp.float32
    assert q8.shape == (576, 192) and q8.scale_N.shape == (192,)
    q = np.asarray(q8.q_KxN, np.float64)
    s = np.asarray(q8.scale_N, np.float64)
    assert np.abs(q).max() <= 127
    np.testing.assert_allclose(np.asarray(q8.dequantize(), np.float64), q * s[None, :], rtol=2 * _EPS32, atol=0)
    np.testing.assert_allclose(s, np.abs(w.astype(np.float64)).max(axis=0) / 127, rtol=2 * _EPS32)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0])
def test_int8_error_bound_per_channel(scale):
    w = _weight(576, 576, seed=2) * scale
    q8 = quantize_int8(jnp.asarray(w))
    deq = np.asarray(q8.q_KxN, np.float64) * np.asarray(q8.scale_N, np.float64)[None, :]
    bound = _INT8_BOUND * np.asarray(q8.scale_N, np.float64)[None, :]
    assert np.all(np.abs(w.astype(np.float64) - deq) <= bound)


def test_int8_golden_error():
    w = _weight(576, 576, seed=0)
    mae = np.abs(np.asarray(quantize_int8(jnp.asarray(w)).dequantize(), np.float64) - w).mean()
    np.testing.assert_allclose(mae, _GOLDEN_MAE["int8"], rtol=1e-9)


def test_int8_zero_column_and_bf16_input():
    w = _weight(64, 32, seed=3)
    w[:, 5] = 0.0
    q8 = quantize_int8(jnp.asarray(w, jnp.bfloat16))
    deq = np.asarray(q8.dequantize())
    assert np.all(np.isfinite(deq)) and np.all(deq[:, 5] == 0.0)


# ----------------------------------------------------------------------------------------------- int4


@pytest.mark.parametrize("k,g", [(576, 128), (576, 32), (1536, 64), (96, 64)])
def test_int4_layout_and_dequantize_formula(k, g):
    n = 48
    w = _weight(k, n, seed=k + g)
    q4 = quantize_int4(jnp.asarray(w), group_size=g)
    assert isinstance(q4, Int4Weight)
    k_pad = -(-k // g) * g
    assert q4.group_size == g and q4.k_true == k and q4.k_padded == k_pad
    assert q4.shape == (k, n)
    assert q4.packed_K2xN.dtype == jnp.uint8 and q4.packed_K2xN.shape == (k_pad // 2, n)
    assert q4.scale_GxN.dtype == jnp.float32 and q4.scale_GxN.shape == (k_pad // g, n)
    assert q4.zero_GxN.dtype == jnp.uint8 and int(np.asarray(q4.zero_GxN).max()) <= 15
    q = _np_unpack(q4.packed_K2xN).astype(np.float64)
    rows = np.arange(k_pad) // g
    z = np.asarray(q4.zero_GxN, np.float64)[rows]
    s = np.asarray(q4.scale_GxN, np.float64)[rows]
    formula = ((q - z) * s)[:k]
    deq = np.asarray(q4.dequantize(), np.float64)
    assert deq.shape == (k, n)
    np.testing.assert_allclose(deq, formula, rtol=2 * _EPS32, atol=0)
    # Group error bound, true rows only (padding rows repeat the last true row, so they cannot widen a range).
    assert np.all(np.abs(w.astype(np.float64) - formula) <= _INT4_BOUND * s[:k])


@pytest.mark.parametrize("g", [32, 64, 128])
def test_int4_golden_error(g):
    w = _weight(576, 576, seed=0)
    mae = np.abs(np.asarray(quantize_int4(jnp.asarray(w), g).dequantize(), np.float64) - w).mean()
    np.testing.assert_allclose(mae, _GOLDEN_MAE[g], rtol=1e-9)


def test_int4_all_positive_and_zero_groups():
    w = np.abs(_weight(128, 16, seed=4)) + 1.0  # all-positive: range still includes 0
    w[:, 3] = 0.0
    q4 = quantize_int4(jnp.asarray(w), group_size=32)
    deq = np.asarray(q4.dequantize(), np.float64)
    s = np.repeat(np.asarray(q4.scale_GxN, np.float64), 32, axis=0)
    assert np.all(np.isfinite(deq)) and np.all(deq[:, 3] == 0.0)
    assert np.all(np.abs(w - deq) <= _INT4_BOUND * s)


# ----------------------------------------------------------------------------------------------- both


def _both(k=576, n=96, g=128):
    w = jnp.asarray(_weight(k, n, seed=5))
    return [quantize_int8(w), quantize_int4(w, group_size=g)]


@pytest.mark.parametrize("idx", [0, 1])
def test_nbytes_is_real_leaf_bytes(idx):
    qw = _both()[idx]
    leaves = jax.tree.leaves(qw)
    assert qw.nbytes == sum(np.asarray(leaf).nbytes for leaf in leaves)
    if idx == 0:
        assert qw.nbytes == 576 * 96 * 1 + 96 * 4
    else:  # K padded to 640: 320 packed rows, 5 groups of f32 scale + uint8 zero
        assert qw.nbytes == 320 * 96 + 5 * 96 * 4 + 5 * 96


@pytest.mark.parametrize("idx", [0, 1])
def test_pytree_round_trip_through_jit(idx):
    qw = _both()[idx]
    leaves, treedef = jax.tree.flatten(qw)
    assert len(leaves) == (2 if idx == 0 else 3)  # static fields are not leaves
    out = jax.jit(lambda w: w)(qw)
    assert type(out) is type(qw) and out.shape == qw.shape
    if idx == 1:
        assert out.group_size == qw.group_size and out.k_true == qw.k_true
    for a, b in zip(jax.tree.leaves(out), leaves):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda w: w.dequantize())(qw)), np.asarray(qw.dequantize()))
    rebuilt = jax.tree.unflatten(treedef, leaves)
    np.testing.assert_array_equal(np.asarray(rebuilt.dequantize()), np.asarray(qw.dequantize()))


@pytest.mark.parametrize("idx", [0, 1])
def test_take_columns_equals_dequantize_columns(idx):
    qw = _both()[idx]
    ids = np.array([0, 95, 7, 7, 42])
    expected = np.asarray(qw.dequantize())[:, ids].T
    got = qw.take_columns(jnp.asarray(ids))
    assert got.shape == (len(ids), 576)
    np.testing.assert_array_equal(np.asarray(got), expected)
    got_jit = jax.jit(lambda w, i: w.take_columns(i))(qw, jnp.asarray(ids))
    np.testing.assert_array_equal(np.asarray(got_jit), expected)
    assert qw.take_columns(ids, dtype=jnp.bfloat16).dtype == jnp.bfloat16


def test_quantization_is_deterministic():
    w = jnp.asarray(_weight(576, 64, seed=6))
    for quantize in (quantize_int8, lambda a: quantize_int4(a, 64)):
        a, b = quantize(w), quantize(w)
        for la, lb in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))


# ----------------------------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_with_a_message():
    w = jnp.asarray(_weight(576, 64, seed=7))
    with pytest.raises(ValueError, match="group_size=48"):
        quantize_int4(w, group_size=48)
    with pytest.raises(ValueError, match="even K"):
        quantize_int4(jnp.asarray(_weight(575, 8)), group_size=32)
    with pytest.raises(ValueError, match="2-D"):
        quantize_int8(jnp.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="2-D"):
        quantize_int4(jnp.zeros((64,)), group_size=32)
    with pytest.raises(ValueError, match="float weight"):
        quantize_int8(jnp.ones((4, 4), jnp.int32))
    with pytest.raises(ValueError, match="float weight"):
        quantize_int4(jnp.ones((64, 4), jnp.int8), group_size=32)
    for qw in (quantize_int8(w), quantize_int4(w, 64)):
        with pytest.raises(ValueError, match="K=575"):
            qw.matmul(jnp.ones((2, 575)))
        with pytest.raises(ValueError, match="int32"):
            qw.matmul(jnp.ones((2, 576), jnp.int32))
