"""A quick measurement of the links a plan depends on, through the tiers' own representations.

Used when no calibration is stored: the scored policy's τ needs bytes/second for host→device and NVMe→host on
this machine, now. Median of a few repetitions after one warm-up, on a probe block of `mib` MiB.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from vorch_jax.tiers.full_precision import FullPrecisionBlock
from vorch_jax.tiers.nvme_store import NvmeBlock
from vorch_jax.tiers.pinned_host import PinnedHostBlock


def median_seconds(fn, repeats: int) -> float:
    """Median wall seconds of `fn()` over `repeats` calls, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def probe_bandwidths(store_dir: str | Path | None = None, *, mib: int = 16, repeats: int = 3,
                     device: jax.Device | None = None) -> dict[str, float]:
    """{'host->device': bytes/s, 'nvme->host': bytes/s} measured on a `mib` MiB float32 probe."""
    device = device or jax.devices()[0]
    leaves = {"probe": np.random.default_rng(0).standard_normal(mib * 2**18, dtype=np.float32)}
    nbytes = leaves["probe"].nbytes
    host = PinnedHostBlock.from_numpy(leaves, device)

    def h2d():
        FullPrecisionBlock.from_pinned_host(host, device).free()

    h2d_s = median_seconds(h2d, repeats)
    host.free()
    with tempfile.TemporaryDirectory(dir=store_dir) as d:
        stored = NvmeBlock.write("link-probe", leaves, Path(d))
        nvme_s = median_seconds(lambda: stored.read(), repeats)
        stored.free()
    return {"host->device": nbytes / h2d_s, "nvme->host": nbytes / nvme_s}


def probe_block_loads(leaf_shapes: dict, *, repeats: int = 5, device: jax.Device | None = None,
                      fresh: bool = False) -> dict[str, float]:
    """{block: seconds} a load of each block from pinned host to the device takes alone, measured once per distinct
    set of leaf shapes (`leaf_shapes`: {block: {leaf: ShapeDtypeStruct}}) on zeros of those shapes, the way the
    engine lands a block in steady state: on a backend where the runtime holds dropped memory
    (`full_precision.copies_measured`) into the device arrays of the block's previous load, elsewhere, or with
    `fresh`, into new memory (each landed copy freed before the next, as an eviction before a load frees it).
    Bytes alone do not price a load: on this project's 2-core CPU a 6.6 MB attention block of eight leaves lands at
    about half the rate of a 42 MB embedding shard (`experiments/results/block_load_costs.txt`), and an H200's link
    moves 4 MiB at 6.7 GB/s against 44 GB/s at 256 MiB."""
    from vorch_jax.tiers.full_precision import copies_measured

    device = device or jax.devices()[0]
    held_memory = copies_measured(device) and not fresh
    by_shapes: dict[tuple, float] = {}
    out = {}
    for block, leaves in leaf_shapes.items():
        key = tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in leaves.items()))
        if key not in by_shapes:
            host = PinnedHostBlock.from_numpy({k: np.zeros(v.shape, v.dtype) for k, v in leaves.items()}, device)
            landed = [FullPrecisionBlock.from_pinned_host(host, device)]

            def load():
                previous = landed.pop()
                if not held_memory:
                    previous.free()
                landed.append(FullPrecisionBlock.from_pinned_host(host, device,
                                                                  previous.leaves if held_memory else None))

            by_shapes[key] = median_seconds(load, repeats)
            landed.pop().free()
            host.free()
        out[block] = by_shapes[key]
    return out
