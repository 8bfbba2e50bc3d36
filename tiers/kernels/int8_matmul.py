"""Pallas kernel ``x @ dequant(W)`` for :class:`~vorch_jax.tiers.quant_int8.Int8Weight`, and its jnp reference.

Layout. Grid ``(M / block_m, N / block_n)``; each program owns one ``[block_m, block_n]`` output tile, gets the
``[block_m, K]`` panel of x and the ``[K, block_n]`` panel of int8 codes, and walks K in ``block_k`` steps with
a ``fori_loop`` whose float32 carry is the accumulator. Per step the int8 tile is converted to x's dtype
(exact: |q| <= 127) and fed to one MXU / tensor-core dot with float32 accumulation; the per-column scale is
applied once to the accumulator at the end (it does not depend on k). The result is written in x's dtype.

Why K is walked in-kernel rather than by a third grid axis: on GPU (Triton) grid programs run concurrently, so
an output tile revisited along a K grid axis would race; the loop carry is Triton's natural register
accumulator. On TPU (Mosaic) the same body works with the K panels held in VMEM (fine for K up to a few
thousand; a K grid axis with a VMEM scratch would be needed beyond that).

GPU lowering: jax 0.10.2 lowers ``pl.pallas_call`` to Mosaic GPU by default (``jax_pallas_use_mosaic_gpu``
defaults to True) and deprecates that route in favour of ``plgpu.kernel``. This kernel passes
``jax.experimental.pallas.triton.CompilerParams`` explicitly, which selects the Triton lowering: it takes this
BlockSpec + in-kernel-loop shape directly, handles bf16 and f32 dots (f32 with ``Precision.HIGHEST`` -> IEEE, not
TF32) and needs every loaded tile to have a power-of-2 size and dot dims >= 16, hence ``block_m >= 16`` and
power-of-2 ``block_n``/``block_k``. Triton does not mask ragged edge blocks, so the wrapper pads M, N, K.
TPU: Mosaic, same body, ``dimension_semantics=("parallel", "parallel")``, N/K blocks a multiple of 128 or the
full dimension (:func:`tpu_lane_block`). The Pallas -> Mosaic lowering is exercised on CPU (jax.export in
tests/tiers/test_kernels.py); compiling and running on a TPU has NOT been tested.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

SUPPORTED_X_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def pad_axis_to(a: jax.Array, axis: int, multiple: int, value=0) -> jax.Array:
    """Pad ``a`` at the end of ``axis`` up to a multiple of ``multiple`` (no-op when already there)."""
    extra = -a.shape[axis] % multiple
    if extra == 0:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, extra)
    return jnp.pad(a, widths, constant_values=value)


def largest_pow2_block(size: int, cap: int, floor: int = 16) -> int:
    """Largest power of 2 in ``[floor, cap]`` dividing ``size``; ``floor`` when none does (then pad)."""
    block = cap
    while block > floor and size % block:
        block //= 2
    return block


def tpu_lane_block(size: int, caps: tuple[int, ...] = (512, 256, 128)) -> int:
    """Largest of ``caps`` (multiples of 128) dividing ``size``, else ``size``: a full-dimension block is always
    legal on Mosaic TPU, which otherwise needs the last block dim to be a multiple of 128."""
    return next((c for c in caps if size % c == 0), size)


def mn_block_sizes(m: int, n: int, backend: str = "gpu") -> tuple[int, int]:
    """Default ``(block_m, block_n)`` shared by both kernels.

    gpu (Triton): powers of 2 dividing N where possible; decode (M <= 16) gets narrower N tiles so that even
    N=576 spreads over >= 18 programs. tpu (Mosaic): block_n a multiple of 128 or the full N.
    """
    block_m = 16 if m <= 16 else min(64, pl.next_power_of_2(m))
    if backend == "tpu":
        return block_m, tpu_lane_block(n)
    block_n = largest_pow2_block(n, 64 if m <= 16 else 128)
    if m <= 16 and n // block_n < 16:
        block_n = largest_pow2_block(n, 32)
    return block_m, block_n


def int8_block_sizes(m: int, k: int, n: int, backend: str = "gpu") -> tuple[int, int, int]:
    """Default ``(block_m, block_n, block_k)`` that divide N and K where possible (so the weight is not padded):
    :func:`mn_block_sizes`, and block_k a power of 2 <= 256 (gpu) or a multiple of 128 / the full K (tpu)."""
    block_m, block_n = mn_block_sizes(m, n, backend)
    block_k = tpu_lane_block(k) if backend == "tpu" else largest_pow2_block(k, 256)
    return block_m, block_n, block_k


def check_x(x_MxK: jax.Array, k: int, who: str) -> None:
    """Raise ValueError unless x is ``[M, K]``-compatible float32/bfloat16 with the weight's K."""
    if x_MxK.ndim < 1:
        raise ValueError(f"{who}: x must have shape [..., K], got a scalar")
    if jnp.dtype(x_MxK.dtype) not in SUPPORTED_X_DTYPES:
        raise ValueError(f"{who}: x dtype {x_MxK.dtype} is not supported; use float32 or bfloat16")
    if x_MxK.shape[-1] != k:
        raise ValueError(f"{who}: x has K={x_MxK.shape[-1]} (shape {tuple(x_MxK.shape)}) but the weight has K={k}")


def check_triton_blocks(who: str, **blocks: int) -> None:
    """Raise ValueError unless every block is a power of 2 >= 16 (Triton's tile-size and dot-size rules)."""
    for name, size in blocks.items():
        if size < 16 or size & (size - 1):
            raise ValueError(f"{who}: {name}={size} must be a power of 2 >= 16 for the Triton (gpu) lowering")


def dot_precision(dtype) -> lax.Precision:
    """HIGHEST for float32 x (IEEE on Triton, not TF32 / bf16 passes), DEFAULT for bfloat16."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def _int8_matmul_kernel(x_ref, q_ref, s_ref, o_ref, *, block_k: int, num_k_blocks: int):
    # x_ref: [block_m, K_pad] (x dtype); q_ref: [K_pad, block_n] int8; s_ref: [1, block_n] f32;
    # o_ref: [block_m, block_n] (x dtype).
    block_m, block_n = o_ref.shape
    x_dtype = x_ref.dtype
    precision = dot_precision(x_dtype)

    def body(kb, acc_MxN):
        k_slice = pl.ds(pl.multiple_of(kb * block_k, block_k), block_k)
        x_MxBk = x_ref[:, k_slice]
        w_BkxN = q_ref[k_slice, :].astype(x_dtype)  # exact: |q| <= 127
        return acc_MxN + jnp.dot(x_MxBk, w_BkxN, precision=precision, preferred_element_type=jnp.float32)

    acc_MxN = lax.fori_loop(0, num_k_blocks, body, jnp.zeros((block_m, block_n), jnp.float32))
    o_ref[...] = (acc_MxN * s_ref[...]).astype(o_ref.dtype)


def compiler_params_for(backend: str, num_warps: int = 4, num_stages: int = 3):
    """Compiler params that pin the lowering: Triton on GPU, Mosaic on TPU, none for interpret."""
    if backend == "gpu":
        from jax.experimental.pallas import triton as plgpu

        params_cls = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams  # name before jax 0.7
        return params_cls(num_warps=num_warps, num_stages=num_stages)
    if backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        params_cls = getattr(pltpu, "CompilerParams", None) or pltpu.TPUCompilerParams  # name before jax 0.7
        return params_cls(dimension_semantics=("parallel", "parallel"))
    return None


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "block_k", "interpret", "backend"))
def int8_matmul(
    x_MxK: jax.Array,
    w,
    *,
    block_m: int = 16,
    block_n: int = 64,
    block_k: int = 64,
    interpret: bool = False,
    backend: str = "gpu",
) -> jax.Array:
    """``x_MxK @ w.dequantize()`` with the Pallas kernel; ``w`` is an ``Int8Weight``. Returns ``[M, N]`` in x's dtype.

    Edges that are not block multiples are padded (x and codes with zeros, scales with zeros) and sliced off;
    padding the weight copies it, so prefer blocks that divide N and K (see :func:`int8_block_sizes`).
    ``backend`` ("gpu" | "tpu") picks the compiler params when ``interpret`` is False.
    """
    k, n = w.q_KxN.shape
    check_x(x_MxK, k, "int8_matmul")
    if x_MxK.ndim != 2:
        raise ValueError(f"int8_matmul: x must be 2-D [M, K], got shape {tuple(x_MxK.shape)}")
    if backend == "gpu" and not interpret:
        check_triton_blocks("int8_matmul", block_m=block_m, block_n=block_n, block_k=block_k)
    m = x_MxK.shape[0]
    x_MpxKp = pad_axis_to(pad_axis_to(x_MxK, 0, block_m), 1, block_k)
    q_KpxNp = pad_axis_to(pad_axis_to(w.q_KxN, 0, block_k), 1, block_n)
    s_1xNp = pad_axis_to(w.scale_N.reshape(1, n), 1, block_n)
    m_pad, k_pad = x_MpxKp.shape
    n_pad = q_KpxNp.shape[1]

    kernel = functools.partial(_int8_matmul_kernel, block_k=block_k, num_k_blocks=k_pad // block_k)
    out_MpxNp = pl.pallas_call(
        kernel,
        grid=(m_pad // block_m, n_pad // block_n),
        in_specs=[
            pl.BlockSpec((block_m, k_pad), lambda i, j: (i, 0)),
            pl.BlockSpec((k_pad, block_n), lambda i, j: (0, j)),
            pl.BlockSpec((1, block_n), lambda i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m_pad, n_pad), x_MxK.dtype),
        compiler_params=None if interpret else compiler_params_for(backend),
        interpret=interpret,
        name="int8_dequant_matmul",
    )(x_MpxKp, q_KpxNp, s_1xNp)
    return out_MpxNp[:m, :n]


@jax.jit
def int8_matmul_reference(x_MxK: jax.Array, w) -> jax.Array:
    """Pure jnp: dequantize to x's dtype, then ``jnp.dot`` with float32 accumulation; ``[..., N]`` in x's dtype."""
    check_x(x_MxK, w.q_KxN.shape[0], "int8_matmul_reference")
    w_KxN = w.dequantize(x_MxK.dtype)
    out = jnp.dot(x_MxK, w_KxN, precision=dot_precision(x_MxK.dtype), preferred_element_type=jnp.float32)
    return out.astype(x_MxK.dtype)
