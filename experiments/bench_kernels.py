"""Time the int8 / int4 dequant-matmul paths against full precision on SmolLM2's decode and prefill shapes.

Run:  python experiments/bench_kernels.py                 (CPU: ~1 min; reference + full rows, one interpret row)
      python experiments/bench_kernels.py --dtype bf16    (activation dtype; default bf16 on gpu/tpu, f32 on cpu)
Prints one table: per (format, path, M, K, N) the median ms per call after warm-up (the compiling call is never
timed; every timed call ends in block_until_ready), the achieved bytes/s and its ratio to the device's
measured copy bandwidth. Bytes counted per call = weight bytes read (leaf nbytes for int8 / int4, K*N*itemsize
for full precision) + activation bytes (x read + y written). The bandwidth is measured here with a jitted
``a + 1`` over a 256 MiB float32 array (256 MiB read + 256 MiB written).

Paths: ``pallas`` (compiled kernel, gpu/tpu only), ``reference`` (dequantize then jnp.dot), ``full``
(``x @ W`` with W already in x's dtype), ``interpret`` (Pallas interpret mode; correctness tool, not a speed).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from vorch_jax.tiers.kernels import select
from vorch_jax.tiers.quant_int4 import quantize_int4
from vorch_jax.tiers.quant_int8 import quantize_int8

# SmolLM2-135M projections as (K, N): q/o (576, 576), k/v (576, 192), gate/up (576, 1536), down (1536, 576).
SMOLLM2_KN = ((576, 576), (576, 192), (576, 1536), (1536, 576))
DECODE_M = 1
PREFILL_M = 512


def time_call(fn: Callable[[], jax.Array], min_seconds: float = 0.02, trials: int = 5) -> float:
    """Median seconds per call of ``fn`` over ``trials`` (each a batch of calls lasting >= ``min_seconds``).

    Two warm-up calls first (compilation is never timed); a batch dispatches its calls back to back and
    blocks once at the end, so asynchronous dispatch overlaps as it would in a decode loop.
    """
    fn().block_until_ready()
    fn().block_until_ready()
    t0 = time.perf_counter()
    fn().block_until_ready()
    reps = max(1, int(min_seconds / max(time.perf_counter() - t0, 1e-6)))
    per_call = []
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(reps - 1):
            fn()
        fn().block_until_ready()
        per_call.append((time.perf_counter() - t0) / reps)
    return statistics.median(per_call)


def measure_bandwidth(mib: int = 256) -> float:
    """Device copy bandwidth in bytes/s: jitted ``a + 1`` over ``mib`` MiB of float32 (read + write).

    The input is donated and the output fed back, so the timed calls reuse one buffer: without that, XLA:CPU
    page-faults a fresh 256 MiB output every call and reports ~1 GB/s instead of the memory system's rate.
    """
    add_one = jax.jit(lambda v: v + 1.0, donate_argnums=0)
    state = [jnp.zeros((mib * 2**20 // 4,), jnp.float32)]
    nbytes = state[0].nbytes

    def step():
        state[0] = add_one(state[0])
        return state[0]

    seconds = time_call(step, min_seconds=0.1, trials=3)
    return 2 * nbytes / seconds


@dataclasses.dataclass
class Row:
    fmt: str
    path: str
    dtype: str
    m: int
    k: int
    n: int
    seconds: float
    bytes_moved: int

    def cells(self, bandwidth: float) -> list[str]:
        rate = self.bytes_moved / self.seconds
        return [self.fmt, self.path, self.dtype, str(self.m), str(self.k), str(self.n),
                f"{1e3 * self.seconds:.4f}", f"{rate / 1e9:.2f}", f"{100 * rate / bandwidth:.1f}%",
                f"{self.bytes_moved / 1e6:.3f}"]


HEADER = ["format", "path", "x", "M", "K", "N", "ms", "GB/s", "of BW", "MB/call"]


def format_table(rows: list[Row], bandwidth: float) -> str:
    body = [HEADER] + [r.cells(bandwidth) for r in rows]
    widths = [max(len(line[i]) for line in body) for i in range(len(HEADER))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _activation_bytes(m: int, k: int, n: int, dtype) -> int:
    return (m * k + m * n) * jnp.dtype(dtype).itemsize


def bench_shape(fmt: str, qw, w_full, x, paths: tuple[str, ...]) -> list[Row]:
    """Rows for one (format, shape): each quantized path in ``paths``, plus ``full`` when listed."""
    m, k = x.shape
    n = w_full.shape[1]
    dtype_name = jnp.dtype(x.dtype).name
    act = _activation_bytes(m, k, n, x.dtype)
    rows = []
    for path in paths:
        if path == "full":
            f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype))
            seconds = time_call(lambda: f(x, w_full))
            rows.append(Row(dtype_name, "full", dtype_name, m, k, n, seconds, w_full.nbytes + act))
            continue
        mode = {"pallas": "pallas", "reference": "reference", "interpret": "interpret"}[path]
        with select.kernel_mode(mode):
            f = jax.jit(lambda w, a: w.matmul(a))  # traced under this mode (the mode is read at trace time)
            f(qw, x).block_until_ready()
        seconds = time_call(lambda: f(qw, x), min_seconds=0.0 if path == "interpret" else 0.02,
                            trials=1 if path == "interpret" else 5)
        rows.append(Row(fmt, path, dtype_name, m, k, n, seconds, qw.nbytes + act))
    return rows


def run(dtype, ms: tuple[int, ...], shapes=SMOLLM2_KN, interpret_row: bool = True, group_size: int = 128,
        seed: int = 0, quantized_paths: tuple[str, ...] | None = None) -> tuple[list[Row], float]:
    """All rows for this backend. On gpu/tpu: pallas, reference, full; on cpu: reference, full (+ one interpret).

    ``quantized_paths`` overrides the quantized paths timed (e.g. ``("reference",)``).
    """
    if quantized_paths is None:
        on_accelerator = jax.default_backend() in select.PALLAS_BACKENDS
        quantized_paths = ("pallas", "reference") if on_accelerator else ("reference",)
    rng = np.random.default_rng(seed)
    rows: list[Row] = []
    for k, n in shapes:
        w = jnp.asarray(rng.standard_normal((k, n)).astype(np.float32) * 0.05)
        w_full = w.astype(dtype)
        formats = {"int8": quantize_int8(w), f"int4/g{group_size}": quantize_int4(w, group_size)}
        for m in ms:
            x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32), dtype)
            for fmt, qw in formats.items():
                rows += bench_shape(fmt, qw, w_full, x, quantized_paths)
            rows += bench_shape("-", None, w_full, x, ("full",))
    if interpret_row:
        k, n = shapes[0]
        w = jnp.asarray(rng.standard_normal((k, n)).astype(np.float32) * 0.05)
        x = jnp.asarray(rng.standard_normal((ms[0], k)).astype(np.float32), dtype)
        rows += bench_shape("int8", quantize_int8(w), w.astype(dtype), x, ("interpret",))
    return rows, measure_bandwidth()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=["f32", "bf16"], default=None)
    ap.add_argument("--no-interpret-row", action="store_true")
    args = ap.parse_args(argv)
    backend = jax.default_backend()
    dtype_name = args.dtype or ("f32" if backend == "cpu" else "bf16")
    dtype = {"f32": jnp.float32, "bf16": jnp.bfloat16}[dtype_name]
    t0 = time.perf_counter()
    rows, bandwidth = run(dtype, (DECODE_M, PREFILL_M), interpret_row=not args.no_interpret_row)
    print(f"device: {jax.devices()[0].device_kind} ({backend}); jax {jax.__version__}; x dtype {dtype_name}")
    print(f"measured copy bandwidth: {bandwidth / 1e9:.2f} GB/s (jitted a + 1 over 256 MiB float32)")
    print("(shapes this small can sit in cache: on cpu 'of BW' above 100% means cache, not DRAM, bandwidth)")
    print(format_table(rows, bandwidth))
    print(f"paths traced: {select.kernel_paths_used()}")
    print(f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
