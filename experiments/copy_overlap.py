"""Whether a load runs beside the compute dispatched before it, by the way it lands: what a prefetch can hide.

Run:   GLIBC_TUNABLES=glibc.malloc.hugetlb=1 .venv/bin/python experiments/copy_overlap.py [--sizes-mb 6.6 15.7 42]
Takes: about a minute on 2 CPU cores (alone: anything else running shares the cores and the memory bus).

A prefetch pays only if its copy runs while the device computes. Two measurements, per block size and per way a
block lands from pinned host memory (the ways of `experiments/host_copy_rates.py`: `jax.device_put` into new
memory, the compiled transfer `full_precision.land` into new memory, the donated jitted copy
`full_precision.copy_into` into held memory):
  queued     a long computation (about 40 ms of matmuls) is dispatched, then one load: the ms until the load is
             ready, beside the ms until the computation is. A load ready about when the computation is waited for it.
  stream     a decode-shaped stream: `--layers` small layer computations, one load issued after each (each load
             frees the oldest of three landed blocks, as a streaming run drops what it read). `hidden` is the share
             of the loads' own time (each timed alone, then summed) that the stream did not add to the compute
             alone: 1 when the loads run entirely beside the compute, 0 when after it, below 0 when loads and
             compute slow each other down.
Medians of `--repeats` rounds, the ways interleaved within each round. Results:
experiments/results/copy_overlap.txt.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from vorch_jax.tiers.full_precision import copy_into, device_sharding, land, pinned_host_sharding  # noqa: E402
from vorch_jax.tiers.host_memory import huge_page_heap  # noqa: E402

WAYS = ("device_put", "land", "copy_into")
RING = 3  # landed blocks a stream keeps; the oldest is freed (or, copy_into, reused) by the next load
D_MODEL, D_FF = 640, 2048  # the stream's layer: decode-shaped matrix-vector products (Gemma 3 270M's widths)


@jax.jit
def long_compute(x_NxN):
    for _ in range(6):
        x_NxN = jnp.tanh(x_NxN @ x_NxN)
    return x_NxN


@jax.jit
def decode_layer(h_1xD, w1_DxF, w2_DxF, w3_DxF):
    a_1xF = jax.nn.silu(h_1xD @ w1_DxF) * (h_1xD @ w2_DxF)
    return h_1xD + 0.01 * (a_1xF @ w3_DxF.T)


class Loader:
    """One way of landing `src` on the device; `held` is the device array it may reuse (copy_into only)."""

    def __init__(self, way: str, device):
        self.way, self.device, self.dev = way, device, device_sharding(device)

    def __call__(self, src, held=None):
        if self.way == "device_put":
            return jax.device_put(src, self.dev)
        if self.way == "land":
            return land(src, self.device)
        return copy_into(held, src, self.device)

    def stream_step(self, src, ring: list):
        """Land `src`, letting the oldest landed block go (freed, or for copy_into, landed into)."""
        oldest = ring.pop(0)
        if self.way == "copy_into":
            ring.append(self(src, oldest))
        else:
            ring.append(self(src))
            oldest.delete()


def queued_ms(loader: Loader, src, x_NxN) -> tuple[float, float]:
    held = jnp.zeros(src.shape, src.dtype, device=loader.dev).block_until_ready()
    t0 = time.perf_counter()
    out = long_compute(x_NxN)
    y = loader(src, held)
    y.block_until_ready()
    t_load = time.perf_counter() - t0
    out.block_until_ready()
    return 1e3 * t_load, 1e3 * (time.perf_counter() - t0)


def stream_ms(loader: Loader | None, srcs: list, layers: int, weights, h_1xD) -> float:
    ring = [jnp.zeros(srcs[0].shape, srcs[0].dtype, device=device_sharding(jax.devices()[0])) for _ in range(RING)]
    jax.block_until_ready(ring)
    t0 = time.perf_counter()
    h = h_1xD
    for i in range(layers):
        h = decode_layer(h, *weights)
        if loader is not None:
            loader.stream_step(srcs[i % len(srcs)], ring)
    h.block_until_ready()
    jax.block_until_ready(ring)
    return 1e3 * (time.perf_counter() - t0)


def alone_ms(loader: Loader, srcs: list) -> float:
    """Median ms of one load with nothing else running (copy_into into a held array, the others into new memory)."""
    ring = [jnp.zeros(srcs[0].shape, srcs[0].dtype, device=loader.dev) for _ in range(RING)]
    ts = []
    for src in srcs * 2:
        t0 = time.perf_counter()
        loader.stream_step(src, ring)
        ring[-1].block_until_ready()
        ts.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(ts))


def measure(size_mb: float, layers: int, repeats: int) -> list[str]:
    device = jax.devices()[0]
    n = max(1, int(size_mb * 1e6) // 4)
    rng = np.random.default_rng(0)
    srcs = [jax.device_put(rng.random(n, np.float32), pinned_host_sharding(device)) for _ in range(4)]
    weights = [jnp.asarray(rng.random((D_MODEL, D_FF), np.float32) * 0.01) for _ in range(3)]
    h_1xD = jnp.ones((1, D_MODEL), jnp.float32)
    x_NxN = jnp.ones((1024, 1024), jnp.float32) * 1e-3
    loaders = {w: Loader(w, device) for w in WAYS}
    long_compute(x_NxN).block_until_ready()
    for loader in loaders.values():  # compile and warm every path
        queued_ms(loader, srcs[0], x_NxN)
        stream_ms(loader, srcs, 2, weights, h_1xD)
    queued = {w: [] for w in WAYS}
    stream = {w: [] for w in ("none",) + WAYS}
    alone = {w: [] for w in WAYS}
    for _ in range(repeats):
        stream["none"].append(stream_ms(None, srcs, layers, weights, h_1xD))
        for w, loader in loaders.items():
            queued[w].append(queued_ms(loader, srcs[1], x_NxN))
            stream[w].append(stream_ms(loader, srcs, layers, weights, h_1xD))
            alone[w].append(alone_ms(loader, srcs))
    med = {w: float(np.median(v)) for w, v in stream.items()}
    lines = []
    for w in WAYS:
        q_load = float(np.median([a for a, _ in queued[w]]))
        q_compute = float(np.median([b for _, b in queued[w]]))
        one = float(np.median(alone[w]))
        hidden = (med["none"] + layers * one - med[w]) / (layers * one)
        lines.append(f"{size_mb:7.1f} {w:>10} {one:9.2f} {q_load:10.1f} {q_compute:11.1f} {med['none']:9.1f} "
                     f"{med[w]:9.1f} {med['none'] + layers * one:9.1f} {hidden:7.2f}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mb", nargs="+", type=float, default=[6.6, 15.7, 42.0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    if min(args.sizes_mb) <= 0 or args.layers < 1 or args.repeats < 1:
        print("copy_overlap: --sizes-mb must be > 0, --layers and --repeats >= 1", file=sys.stderr)
        return 2
    dev = jax.devices()[0]
    print(f"{dev.platform} ({dev.device_kind}), jax {jax.__version__}, huge-page heap "
          f"{'on' if huge_page_heap() else 'off'}; {args.layers} layers a stream, medians of {args.repeats} rounds")
    print(f"{'MB':>7} {'way':>10} {'alone ms':>9} {'queued ms':>10} {'compute ms':>11} {'layers ms':>9} "
          f"{'+loads ms':>9} {'serial ms':>9} {'hidden':>7}")
    for size in args.sizes_mb:
        for line in measure(size, args.layers, args.repeats):
            print(line, flush=True)
    print("queued: a load issued right after a ~40 ms computation, ms until it is ready beside ms until the computation"
          " is; stream: the layers alone, with a load after each, and their sum with the loads timed alone (serial);"
          " hidden: the share of the loads' time the stream did not add")
    return 0


if __name__ == "__main__":
    sys.exit(main())
