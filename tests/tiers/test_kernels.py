"""Dequant-matmul kernels (interpret-mode Pallas) and jnp references vs a float64 numpy reference.

The float64 reference is ``x.astype(f64) @ W.dequantize().astype(f64)``: it measures the matmul path, not the
quantization error (that is pinned in test_quant_formats.py). Tolerances (relative Frobenius error): 1e-5 for
float32 activations, 1e-2 for bfloat16. Shapes are SmolLM2's (K, N) with decode M in {1, 5, 16} and prefill
M in {128, 256}; the file runs in well under 60 s on a 2-core CPU.
"""

import concurrent.futures
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from vorch_jax.tiers.kernels import select
from vorch_jax.tiers.kernels.int4_matmul import int4_block_sizes, int4_matmul, int4_matmul_reference
from vorch_jax.tiers.kernels.int8_matmul import int8_block_sizes, int8_matmul, int8_matmul_reference
from vorch_jax.tiers.quant_int4 import Int4Weight, quantize_int4
from vorch_jax.tiers.quant_int8 import quantize_int8

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}

QUANTIZE = {
    "int8": quantize_int8,
    "int4_g32": functools.partial(quantize_int4, group_size=32),
    "int4_g64": functools.partial(quantize_int4, group_size=64),
    "int4_g128": functools.partial(quantize_int4, group_size=128),
}

# (format, M, K, N): every SmolLM2 (K, N) for int8 and int4/g128, decode and prefill M, plus g32 / g64.
CASES = [
    ("int8", 1, 576, 576),
    ("int8", 5, 576, 192),
    ("int8", 16, 576, 1536),
    ("int8", 128, 1536, 576),
    ("int8", 256, 576, 576),
    ("int4_g128", 1, 576, 1536),
    ("int4_g128", 5, 576, 576),
    ("int4_g128", 16, 1536, 576),
    ("int4_g128", 128, 576, 192),
    ("int4_g128", 256, 576, 576),
    ("int4_g32", 5, 576, 192),
    ("int4_g64", 16, 1536, 576),
]


@functools.lru_cache(maxsize=None)
def _quantized(fmt: str, k: int, n: int):
    w = np.random.default_rng(k * 7 + n).standard_normal((k, n)).astype(np.float32) * 0.05
    return QUANTIZE[fmt](jnp.asarray(w))


def _x(lead_shape, k, dtype, seed):
    x = np.random.default_rng(seed).standard_normal((*lead_shape, k)).astype(np.float32)
    return jnp.asarray(x, dtype)


def _rel_err(y, x, qw):
    w64 = np.asarray(qw.dequantize(jnp.float32), np.float64)
    ref = np.asarray(x.astype(jnp.float32), np.float64) @ w64
    return np.linalg.norm(np.asarray(y.astype(jnp.float32), np.float64) - ref) / np.linalg.norm(ref)


def _call(qw, x, mode, jitted):
    fn = jax.jit(lambda w, a: w.matmul(a)) if jitted else (lambda w, a: w.matmul(a))
    with select.kernel_mode(mode):
        return fn(qw, x)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case_idx", range(len(CASES)), ids=[f"{c[0]}-M{c[1]}-K{c[2]}-N{c[3]}" for c in CASES])
def test_interpret_kernel_matches_float64(case_idx, dtype):
    fmt, m, k, n = CASES[case_idx]
    qw = _quantized(fmt, k, n)
    x = _x((m,), k, dtype, seed=case_idx)
    jitted = case_idx % 2 == 0  # half the grid under an outer jit, half eager (kernel wrappers jit inside)
    y = _call(qw, x, "interpret", jitted)
    assert y.shape == (m, n) and y.dtype == dtype
    assert _rel_err(y, x, qw) < TOLERANCE[dtype]


@pytest.mark.parametrize("jitted", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case_idx", range(len(CASES)), ids=[f"{c[0]}-M{c[1]}-K{c[2]}-N{c[3]}" for c in CASES])
def test_reference_matches_float64(case_idx, dtype, jitted):
    fmt, m, k, n = CASES[case_idx]
    qw = _quantized(fmt, k, n)
    x = _x((m,), k, dtype, seed=100 + case_idx)
    y = _call(qw, x, "reference", jitted)
    assert y.shape == (m, n) and y.dtype == dtype
    assert _rel_err(y, x, qw) < TOLERANCE[dtype]


# (format, M, K, N, block_m, block_n, block_k): edges that are not block multiples, padded and sliced.
EDGE_CASES = [
    ("int8", 5, 576, 576, 16, 128, 128),  # N 576 -> 640, K 576 -> 640
    ("int8", 3, 100, 40, 16, 32, 64),  # K and N not multiples of 16
    ("int4_g64", 5, 576, 576, 16, 128, 256),  # stored K 576 -> 768 in whole groups
    ("int4_g128", 17, 576, 200, 16, 64, 128),  # K 576 stored as 640, M 17 -> 32, N 200 -> 256
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("edge", EDGE_CASES, ids=[f"{e[0]}-M{e[1]}-K{e[2]}-N{e[3]}" for e in EDGE_CASES])
def test_kernel_edges_pad_and_slice(edge, dtype):
    fmt, m, k, n, block_m, block_n, block_k = edge
    qw = _quantized(fmt, k, n)
    x = _x((m,), k, dtype, seed=m + n)
    kernel = int8_matmul if fmt == "int8" else int4_matmul
    y = kernel(x, qw, block_m=block_m, block_n=block_n, block_k=block_k, interpret=True)
    assert y.shape == (m, n) and y.dtype == dtype
    assert _rel_err(y, x, qw) < TOLERANCE[dtype]
    reference = int8_matmul_reference if fmt == "int8" else int4_matmul_reference
    assert _rel_err(reference(x, qw), x, qw) < TOLERANCE[dtype]


@pytest.mark.parametrize("fmt", ["int8", "int4_g128"])
def test_leading_dims(fmt):
    qw = _quantized(fmt, 576, 192)
    x = _x((2, 3), 576, jnp.float32, seed=7)
    for mode in ("interpret", "reference"):
        y = _call(qw, x, mode, jitted=False)
        assert y.shape == (2, 3, 192)
        assert _rel_err(y.reshape(6, 192), x.reshape(6, 576), qw) < TOLERANCE[jnp.float32]


# (format, M, K, N, x dtype) lowered for a device this machine does not have.
LOWERING_CASES = [
    ("int8", 1, 576, 576, jnp.float32),
    ("int8", 512, 1536, 576, jnp.bfloat16),
    ("int4_g128", 1, 576, 1536, jnp.bfloat16),
    ("int4_g32", 512, 576, 192, jnp.float32),
]
_CUSTOM_CALL = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_kernels_lower_for_gpu_and_tpu(platform):
    """Cross-lowering on CPU with jax.export: Pallas -> Triton IR (cuda) and Pallas -> Mosaic (tpu), with the
    default block sizes. Catches lowering-rule errors (tile sizes, dtypes, ops); Triton's PTX compile and Mosaic's
    compile run only on the device and are not covered here."""
    backend = "gpu" if platform == "cuda" else "tpu"
    checks = [export.DisabledSafetyCheck.custom_call(_CUSTOM_CALL[platform])]
    for fmt, m, k, n, dtype in LOWERING_CASES:
        qw = _quantized(fmt, k, n)
        if fmt == "int8":
            kernel, blocks = int8_matmul, int8_block_sizes(m, k, n, backend)
        else:
            kernel, blocks = int4_matmul, int4_block_sizes(m, qw.k_padded, n, qw.group_size, backend)
        block_m, block_n, block_k = blocks
        fn = jax.jit(functools.partial(kernel, block_m=block_m, block_n=block_n, block_k=block_k, backend=backend))
        exported = export.export(fn, platforms=[platform], disabled_checks=checks)(
            jax.ShapeDtypeStruct((m, k), dtype), qw)
        assert _CUSTOM_CALL[platform] in exported.mlir_module()


# ----------------------------------------------------------------------------------------------- selection


@pytest.fixture
def fresh_counts():
    select.reset_kernel_paths_used()
    yield
    select.reset_kernel_paths_used()


def test_auto_on_cpu_uses_reference_and_counts_at_trace_time(fresh_counts):
    assert select.get_kernel_mode() == "auto"
    qw = _quantized("int8", 576, 192)
    x = _x((1,), 576, jnp.float32, seed=1)
    qw.matmul(x)
    qw.matmul(x)
    f = jax.jit(lambda w, a: w.matmul(a))
    for _ in range(3):
        f(qw, x)
    assert select.kernel_paths_used() == {"int8:reference": 3}  # 2 eager + 1 trace


def test_mode_context_and_paths_logged_once(fresh_counts, caplog):
    qw8, qw4 = _quantized("int8", 576, 192), _quantized("int4_g128", 576, 192)
    x = _x((1,), 576, jnp.bfloat16, seed=2)
    with caplog.at_level(logging.INFO, logger=select.__name__):
        with select.kernel_mode("reference"):
            with select.kernel_mode("interpret"):
                assert select.get_kernel_mode() == "interpret"
                qw4.matmul(x)
                qw4.matmul(x)
            assert select.get_kernel_mode() == "reference"
            qw8.matmul(x)
    assert select.get_kernel_mode() == "auto"
    assert select.kernel_paths_used() == {"int4:pallas_interpret": 2, "int8:reference": 1}
    messages = [r.getMessage() for r in caplog.records if r.name == select.__name__]
    assert len(messages) == 2 and any("pallas_interpret" in msg for msg in messages)


def test_set_kernel_mode_is_process_wide_and_context_is_local():
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        with select.kernel_mode("interpret"):  # this thread only
            assert pool.submit(select.get_kernel_mode).result() == "auto"
        select.set_kernel_mode("reference")  # every thread
        assert pool.submit(select.get_kernel_mode).result() == "reference"
        with select.kernel_mode("interpret"):
            assert select.get_kernel_mode() == "interpret"
        assert select.get_kernel_mode() == "reference"
    finally:
        select.set_kernel_mode("auto")
        pool.shutdown()


def test_guard():
    qw8, qw4 = _quantized("int8", 576, 192), _quantized("int4_g128", 576, 192)
    for qw in (qw8, qw4):
        assert not select.can_use_pallas((1, 576), qw, "cpu")
        assert select.can_use_pallas((1, 576), qw, "gpu")
        assert select.can_use_pallas((4, 8, 576), qw, "tpu")
        assert not select.can_use_pallas((1, 577), qw, "gpu")
    assert not select.can_use_pallas((3, 100), _quantized("int8", 100, 40), "gpu")  # would copy the weight
    bad_group = Int4Weight(qw4.packed_K2xN, qw4.scale_GxN, qw4.zero_GxN, group_size=48, k_true=576)
    assert not select.can_use_pallas((1, 576), bad_group, "gpu")


def test_bad_input_raises_before_any_kernel(fresh_counts):
    qw8, qw4 = _quantized("int8", 576, 192), _quantized("int4_g128", 576, 192)
    with select.kernel_mode("interpret"):
        for qw in (qw8, qw4):
            with pytest.raises(ValueError, match="K=500"):
                qw.matmul(jnp.ones((2, 500), jnp.float32))
            with pytest.raises(ValueError, match="int32"):
                qw.matmul(jnp.ones((2, 576), jnp.int32))
            with pytest.raises(ValueError, match="float16"):
                qw.matmul(jnp.ones((2, 576), jnp.float16))
        bad_group = Int4Weight(qw4.packed_K2xN, qw4.scale_GxN, qw4.zero_GxN, group_size=48, k_true=576)
        with pytest.raises(ValueError, match="group_size=48"):
            bad_group.matmul(jnp.ones((2, 576), jnp.float32))
    assert select.kernel_paths_used() == {}
    with pytest.raises(ValueError, match="block_k=96 must be a multiple of group_size=128"):
        int4_matmul(jnp.ones((2, 576)), qw4, block_k=96, interpret=True)
    with pytest.raises(ValueError, match="block_n=48 must be a power of 2"):
        int8_matmul(jnp.ones((2, 576)), qw8, block_n=48, backend="gpu")
    with pytest.raises(ValueError, match="block_m=8 must be a power of 2 >= 16"):
        int4_matmul(jnp.ones((2, 576)), qw4, block_m=8, backend="gpu")
    with pytest.raises(ValueError, match="'cpu'"):
        with select.kernel_mode("pallas"):
            qw8.matmul(jnp.ones((2, 576), jnp.float32))
    with pytest.raises(ValueError, match="kernel mode 'fast'"):
        select.set_kernel_mode("fast")
