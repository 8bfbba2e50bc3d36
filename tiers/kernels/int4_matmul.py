"""Pallas kernel ``x @ dequant(W)`` for :class:`~vorch_jax.tiers.quant_int4.Int4Weight`, and its jnp reference.

Same layout as ``int8_matmul`` (grid over M and N tiles, K walked in ``block_k`` steps by an in-kernel
``fori_loop`` with a float32 accumulator carry; see that module for the Triton / Mosaic choice), plus:

* ``block_k`` is a multiple of ``group_size``; each K step runs ``block_k // group_size`` group sub-steps
  (a static unroll), so a group's scale and zero line up with its rows.
* Nibble unpacking happens in the kernel. The packing puts k = 2i in the low and k = 2i + 1 in the high nibble
  of packed row i, so instead of interleaving the unpacked rows (Triton cannot reshape/interleave register
  tiles) the wrapper splits x into its even and odd K columns once, ``xe = x[:, 0::2]``, ``xo = x[:, 1::2]``,
  and a group contributes ``(xe_g @ (lo_g - z_g) + xo_g @ (hi_g - z_g)) * s_g``. The split is one extra pass
  over x (cheap for decode; for prefill it is about one more activation-sized read + write).
* ``lo - z`` and ``hi - z`` are integers in [-15, 15], exact in bf16, so the dot is exact up to float32
  accumulation and the scale is applied once per group to a ``[block_m, block_n]`` float32 partial.

Triton needs power-of-2 tile sizes: the loads are ``[group_size/2, block_n]`` codes, ``[block_m, group_size/2]``
x halves and ``[1, block_n]`` scale / zero rows, so ``block_n`` is a power of 2; ``block_k`` need not be.
TPU (Mosaic): the Pallas -> Mosaic lowering passes on CPU (jax.export), but compiling and running on a TPU has
NOT been tested; the 16/32/64-wide lane slices of x per group may be rejected or need relayouts there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from vorch_jax.tiers.kernels.int8_matmul import (
    dot_precision,
    check_triton_blocks,
    check_x,
    compiler_params_for,
    mn_block_sizes,
    pad_axis_to,
)

SUPPORTED_GROUP_SIZES = (32, 64, 128)


def check_group_size(group_size: int, who: str = "int4") -> None:
    """Raise ValueError unless ``group_size`` is one of :data:`SUPPORTED_GROUP_SIZES`."""
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"{who}: group_size={group_size!r} is not supported; use one of {SUPPORTED_GROUP_SIZES}")


def _check_group(group_size: int, block_k: int, who: str) -> None:
    check_group_size(group_size, who)
    if block_k % group_size:
        raise ValueError(f"{who}: block_k={block_k} must be a multiple of group_size={group_size}")


def int4_block_sizes(m: int, k_padded: int, n: int, group_size: int, backend: str = "gpu") -> tuple[int, int, int]:
    """Default ``(block_m, block_n, block_k)``: ``mn_block_sizes`` and ``block_k`` the largest multiple of
    ``group_size`` that is <= 256 and divides the stored K (so the weight is never re-padded)."""
    block_m, block_n = mn_block_sizes(m, n, backend)
    n_groups = k_padded // group_size
    groups_per_block = max(1, min(n_groups, 256 // group_size))
    while n_groups % groups_per_block:
        groups_per_block -= 1
    return block_m, block_n, groups_per_block * group_size


def _int4_matmul_kernel(xe_ref, xo_ref, p_ref, s_ref, z_ref, o_ref, *, group_size: int, block_k: int,
                        num_k_blocks: int):
    # xe_ref, xo_ref: [block_m, K_pad/2] even / odd K columns of x (x dtype);
    # p_ref: [K_pad/2, block_n] uint8 packed codes; s_ref: [G, block_n] f32; z_ref: [G, block_n] uint8;
    # o_ref: [block_m, block_n] (x dtype).
    block_m, block_n = o_ref.shape
    x_dtype = xe_ref.dtype
    precision = dot_precision(x_dtype)
    half_g = group_size // 2
    groups_per_block = block_k // group_size

    def body(kb, acc_MxN):
        for j in range(groups_per_block):  # static unroll over the groups of this K tile
            g_idx = kb * groups_per_block + j
            rows = pl.ds(pl.multiple_of(g_idx * half_g, half_g), half_g)
            p_HxN = p_ref[rows, :]
            z_1xN = z_ref[pl.ds(g_idx, 1), :].astype(jnp.int32)
            s_1xN = s_ref[pl.ds(g_idx, 1), :]
            lo_HxN = ((p_HxN & 0xF).astype(jnp.int32) - z_1xN).astype(x_dtype)  # exact, in [-15, 15]
            hi_HxN = ((p_HxN >> 4).astype(jnp.int32) - z_1xN).astype(x_dtype)
            part_MxN = jnp.dot(xe_ref[:, rows], lo_HxN, precision=precision, preferred_element_type=jnp.float32)
            part_MxN += jnp.dot(xo_ref[:, rows], hi_HxN, precision=precision, preferred_element_type=jnp.float32)
            acc_MxN = acc_MxN + part_MxN * s_1xN
        return acc_MxN

    acc_MxN = lax.fori_loop(0, num_k_blocks, body, jnp.zeros((block_m, block_n), jnp.float32))
    o_ref[...] = acc_MxN.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "block_k", "interpret", "backend"))
def int4_matmul(
    x_MxK: jax.Array,
    w,
    *,
    block_m: int = 16,
    block_n: int = 64,
    block_k: int = 128,
    interpret: bool = False,
    backend: str = "gpu",
) -> jax.Array:
    """``x_MxK @ w.dequantize()`` with the Pallas kernel; ``w`` is an ``Int4Weight``. Returns ``[M, N]`` in x's dtype.

    x is zero-padded from the true K to the stored ``K_pad`` (so padded weight rows add 0), then to a multiple
    of ``block_k``; M and N edges are padded and sliced off. Padding the weight (N not a multiple of
    ``block_n``, or ``block_k`` not dividing ``K_pad``) copies it: prefer :func:`int4_block_sizes`.
    """
    g = w.group_size
    _check_group(g, block_k, "int4_matmul")
    check_x(x_MxK, w.k_true, "int4_matmul")
    if x_MxK.ndim != 2:
        raise ValueError(f"int4_matmul: x must be 2-D [M, K], got shape {tuple(x_MxK.shape)}")
    if backend == "gpu" and not interpret:
        check_triton_blocks("int4_matmul", block_m=block_m, block_n=block_n)
    m = x_MxK.shape[0]
    n = w.packed_K2xN.shape[1]
    # Whole extra groups (codes 0, zero 0, scale 0) when block_k does not divide the stored K.
    groups_per_block = block_k // g
    p_KhxNp = pad_axis_to(pad_axis_to(w.packed_K2xN, 0, block_k // 2), 1, block_n)
    s_GxNp = pad_axis_to(pad_axis_to(w.scale_GxN, 0, groups_per_block), 1, block_n)
    z_GxNp = pad_axis_to(pad_axis_to(w.zero_GxN, 0, groups_per_block), 1, block_n)
    k_pad = 2 * p_KhxNp.shape[0]
    n_pad = p_KhxNp.shape[1]
    n_groups = s_GxNp.shape[0]

    x_MpxKp = pad_axis_to(jnp.pad(x_MxK, ((0, 0), (0, k_pad - w.k_true))), 0, block_m)
    x_MpxKhx2 = x_MpxKp.reshape(x_MpxKp.shape[0], k_pad // 2, 2)
    xe_MpxKh, xo_MpxKh = x_MpxKhx2[..., 0], x_MpxKhx2[..., 1]
    m_pad = x_MpxKp.shape[0]

    kernel = functools.partial(
        _int4_matmul_kernel, group_size=g, block_k=block_k, num_k_blocks=k_pad // block_k
    )
    out_MpxNp = pl.pallas_call(
        kernel,
        grid=(m_pad // block_m, n_pad // block_n),
        in_specs=[
            pl.BlockSpec((block_m, k_pad // 2), lambda i, j: (i, 0)),
            pl.BlockSpec((block_m, k_pad // 2), lambda i, j: (i, 0)),
            pl.BlockSpec((k_pad // 2, block_n), lambda i, j: (0, j)),
            pl.BlockSpec((n_groups, block_n), lambda i, j: (0, j)),
            pl.BlockSpec((n_groups, block_n), lambda i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m_pad, n_pad), x_MxK.dtype),
        compiler_params=None if interpret else compiler_params_for(backend),
        interpret=interpret,
        name="int4_dequant_matmul",
    )(xe_MpxKh, xo_MpxKh, p_KhxNp, s_GxNp, z_GxNp)
    return out_MpxNp[:m, :n]


@jax.jit
def int4_matmul_reference(x_MxK: jax.Array, w) -> jax.Array:
    """Pure jnp: dequantize to x's dtype, then ``jnp.dot`` with float32 accumulation; ``[..., N]`` in x's dtype."""
    check_x(x_MxK, w.k_true, "int4_matmul_reference")
    w_KxN = w.dequantize(x_MxK.dtype)
    out = jnp.dot(x_MxK, w_KxN, precision=dot_precision(x_MxK.dtype), preferred_element_type=jnp.float32)
    return out.astype(x_MxK.dtype)
