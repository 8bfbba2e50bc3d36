"""Which path runs a quantized matmul: compiled Pallas, interpret-mode Pallas, or the jnp reference.

Mode: ``set_kernel_mode(...)`` sets the process-wide default (seen by every thread, e.g. the engine's
workers); the ``kernel_mode(...)`` context manager overrides it for the current thread / context only.

* ``"auto"`` (default): compiled Pallas on gpu / tpu when :func:`can_use_pallas` says so, else the reference.
* ``"pallas"``: compiled Pallas; raises ValueError where it cannot run (cpu backend, guard fails).
* ``"interpret"``: Pallas in interpret mode (any backend; slow; for tests and CPU smoke runs).
* ``"reference"``: dequantize-then-``jnp.dot``.

The choice is visible: each (format, path) pair is logged once via ``logging`` (logger of this module) and
counted; :func:`kernel_paths_used` returns e.g. ``{"int8:reference": 12, "int4:pallas_interpret": 3}``.

Counts and the mode are read at TRACE time: inside ``jax.jit`` a call is counted once per trace, not per
execution, and a jitted function traced under one mode keeps that path until it is retraced (changing the
mode does not invalidate jit caches; use a fresh function or ``jax.clear_caches()``).

Bad input (x not float32/bfloat16, K mismatch, unsupported int4 group size) raises ValueError here, before
any kernel is traced or launched.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import logging
from typing import Iterator, Literal

import jax

from vorch_jax.tiers.kernels import int4_matmul as _int4
from vorch_jax.tiers.kernels import int8_matmul as _int8

KernelMode = Literal["auto", "pallas", "interpret", "reference"]
KERNEL_MODES: tuple[str, ...] = ("auto", "pallas", "interpret", "reference")
PALLAS_BACKENDS: tuple[str, ...] = ("gpu", "tpu")

_log = logging.getLogger(__name__)
_default_mode = "auto"
_mode_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("vorch_kernel_mode", default=None)
_path_counts: collections.Counter[str] = collections.Counter()
_logged: set[str] = set()


def _check_mode(mode: str) -> None:
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernel mode {mode!r} is not one of {KERNEL_MODES}")


def set_kernel_mode(mode: KernelMode) -> None:
    """Set the process-wide default kernel mode (see module docstring)."""
    global _default_mode
    _check_mode(mode)
    _default_mode = mode


def get_kernel_mode() -> str:
    """The kernel mode in force here: the innermost ``kernel_mode`` block, else the process-wide default."""
    override = _mode_override.get()
    return _default_mode if override is None else override


@contextlib.contextmanager
def kernel_mode(mode: KernelMode) -> Iterator[None]:
    """Run the body under ``mode`` (this thread / context only); restores the previous mode on exit."""
    _check_mode(mode)
    token = _mode_override.set(mode)
    try:
        yield
    finally:
        _mode_override.reset(token)


def kernel_paths_used() -> dict[str, int]:
    """Trace-time counts of ``"<format>:<path>"`` (path in reference | pallas | pallas_interpret)."""
    return dict(_path_counts)


def reset_kernel_paths_used() -> None:
    """Forget counts and the log-once memory."""
    _path_counts.clear()
    _logged.clear()


def _hard_reason(w, backend: str | None) -> str | None:
    """Why the kernel cannot run at all (None when it can). ``backend=None`` skips the backend check."""
    if backend is not None and backend not in PALLAS_BACKENDS:
        return f"backend {backend!r} has no compiled Pallas lowering (needs one of {PALLAS_BACKENDS})"
    if hasattr(w, "group_size") and w.group_size not in _int4.SUPPORTED_GROUP_SIZES:
        return f"int4 group_size={w.group_size} not in {_int4.SUPPORTED_GROUP_SIZES}"
    return None


def _soft_reason(w) -> str | None:
    """Why the kernel would be wasteful (it pads and copies the weight on every call)."""
    k, n = w.shape
    if n % 16:
        return f"N={n} is not a multiple of 16 (the kernel would pad and copy the weight)"
    if not hasattr(w, "group_size") and k % 16:
        return f"K={k} is not a multiple of 16 (the kernel would pad and copy the weight)"
    return None


def can_use_pallas(x_shape: tuple[int, ...], w, backend: str) -> bool:
    """True when the compiled Pallas kernel should run ``x[x_shape] @ w`` on ``backend`` ("cpu"/"gpu"/"tpu").

    Needs a gpu/tpu backend, a supported int4 group size, and x's last dim equal to the weight's K. The kernel
    is correct for any N/K (it pads), but padding the weight copies it every call, so the guard also declines
    weights whose N (and, for int8, K) is not a multiple of 16; "auto" then uses the reference.
    """
    if len(x_shape) < 1 or x_shape[-1] != w.shape[0]:
        return False
    return _hard_reason(w, backend) is None and _soft_reason(w) is None


def _backend_of(x) -> str:
    """Platform of a concrete array, else (tracers) the default backend."""
    try:
        return next(iter(x.devices())).platform
    except Exception:  # tracers have no devices
        return jax.default_backend()


def _record(fmt: str, path: str, reason: str | None) -> None:
    key = f"{fmt}:{path}"
    _path_counts[key] += 1
    if key not in _logged:
        _logged.add(key)
        _log.info("quantized matmul %s runs on path %r%s", fmt, path, f" ({reason})" if reason else "")


def _resolve_path(fmt: str, x, w) -> tuple[str, str]:
    """``(path, backend)`` for this call under the current mode; raises for an impossible forced mode."""
    mode = get_kernel_mode()
    backend = _backend_of(x)
    if mode == "reference":
        _record(fmt, "reference", "mode=reference")
        return "reference", backend
    hard = _hard_reason(w, None if mode == "interpret" else backend)
    if mode in ("interpret", "pallas"):
        if hard is not None:
            raise ValueError(f"{fmt}: kernel_mode({mode!r}) but the kernel cannot run: {hard}")
        path = "pallas_interpret" if mode == "interpret" else "pallas"
        _record(fmt, path, _soft_reason(w))
        return path, backend
    reason = hard or _soft_reason(w)
    if reason is None:
        _record(fmt, "pallas", f"auto on {backend}")
        return "pallas", backend
    _record(fmt, "reference", f"auto: {reason}")
    return "reference", backend


def _run(fmt: str, x_xK, w, k: int, kernel, reference, block_sizes):
    _int8.check_x(x_xK, k, f"{fmt} matmul")
    path, backend = _resolve_path(fmt, x_xK, w)
    lead_shape = x_xK.shape[:-1]
    x_MxK = x_xK.reshape(-1, k)
    if path == "reference" or x_MxK.shape[0] == 0:  # an empty grid is not a kernel launch
        out_MxN = reference(x_MxK, w)
    else:
        block_m, block_n, block_k = block_sizes(x_MxK.shape[0], backend)
        interpret = path == "pallas_interpret"
        out_MxN = kernel(  # backend only picks compiler params, which interpret mode ignores
            x_MxK, w, block_m=block_m, block_n=block_n, block_k=block_k,
            interpret=interpret, backend=backend if backend in PALLAS_BACKENDS else "gpu",
        )
    return out_MxN.reshape(*lead_shape, out_MxN.shape[-1])


def matmul_int8(x_xK: jax.Array, w) -> jax.Array:
    """``x[..., K] @ w`` for an ``Int8Weight`` through the selected path; ``[..., N]`` in x's dtype."""
    k, n = w.shape
    return _run("int8", x_xK, w, k, _int8.int8_matmul, _int8.int8_matmul_reference,
                lambda m, backend: _int8.int8_block_sizes(m, k, n, backend))


def matmul_int4(x_xK: jax.Array, w) -> jax.Array:
    """``x[..., K] @ w`` for an ``Int4Weight`` through the selected path; ``[..., N]`` in x's dtype."""
    _int4.check_group_size(w.group_size, "int4 matmul")
    k, n = w.shape
    return _run("int4", x_xK, w, k, _int4.int4_matmul, _int4.int4_matmul_reference,
                lambda m, backend: _int4.int4_block_sizes(m, w.k_padded, n, w.group_size, backend))
