"""Measure the bandwidth of every link the movement engine uses, on this machine, through the tiers' own code.

    .venv/bin/python -m vorch_jax.experiments.bench_links --out runs/links.json      # ~1 min on a 2-core CPU

Links (names as in `vorch_jax.tiers.state.LINKS`):
  device->host     jax.device_put to memory_kind="pinned_host" (PinnedHostBlock.from_device)
  host->device     jax.device_put back to memory_kind="device" (FullPrecisionBlock.from_pinned_host)
  host->nvme       NvmeBlock.write: tensorstore zarr3, one raw chunk, checksum, temp dir + rename (no fsync)
  nvme->host       NvmeBlock.read with checksum verification, page cache dropped first (fsync + fadvise DONTNEED);
  nvme->host:cached  the same read right after the write (page cache warm), for comparison
  device:convert:int8 / :int4g64 / :lowrank32   on-device conversions of a [1024, N] f32 weight (bytes = input)
  source->host     reading SmolLM2 blocks from the GGUF file (file bytes), when the model package is installed
Each figure is the median of `--repeats` timed runs after one warm-up, in GB/s (1e9 bytes/s).
The JSON (`--out`) holds every size and, per link, `gbps` = the figure at the largest size (for the controller's τ).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from vorch_jax.tiers.full_precision import FullPrecisionBlock
from vorch_jax.tiers.link_probe import median_seconds
from vorch_jax.tiers.low_bit import LowBitBlock
from vorch_jax.tiers.low_rank import LowRankBlock
from vorch_jax.tiers.nvme_store import NvmeBlock
from vorch_jax.tiers.pinned_host import PinnedHostBlock

K = 1024  # rows of the benchmark weight; columns = size / (4 K)




def _drop_page_cache(paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def bench_size(size_mib: int, repeats: int, store: Path, dev) -> dict[str, float]:
    n = size_mib * 2**20 // (4 * K)
    w_KxN = np.random.default_rng(size_mib).standard_normal((K, n)).astype(np.float32)
    nbytes = w_KxN.nbytes
    host = PinnedHostBlock.from_numpy({"w": w_KxN}, dev)
    s0 = FullPrecisionBlock.from_pinned_host(host, dev)
    out: dict[str, float] = {}

    def d2h():
        PinnedHostBlock.from_device(s0, dev).free()

    def h2d():
        FullPrecisionBlock.from_pinned_host(host, dev).free()

    out["device->host"] = nbytes / median_seconds(d2h, repeats)
    out["host->device"] = nbytes / median_seconds(h2d, repeats)

    written: list[NvmeBlock] = []

    def write():
        written.append(NvmeBlock.write(f"bench{size_mib}", {"w": w_KxN}, store))  # from host memory

    out["host->nvme"] = nbytes / median_seconds(write, repeats)
    blk = written[-1]
    out["nvme->host:cached"] = nbytes / median_seconds(blk.read, repeats)

    def cold_read():
        _drop_page_cache(blk.chunk_files())
        t0 = time.perf_counter()
        blk.read()
        return time.perf_counter() - t0

    cold_read()
    out["nvme->host"] = nbytes / statistics.median(cold_read() for _ in range(repeats))
    blk.free()

    for name, convert in (
        ("device:convert:int8", lambda: LowBitBlock.from_full_precision(s0, bits=8)),
        ("device:convert:int4g64", lambda: LowBitBlock.from_full_precision(s0, bits=4, group_size=64)),
        ("device:convert:lowrank32", lambda: LowRankBlock.from_full_precision(s0, rank=32)),
    ):
        out[name] = nbytes / median_seconds(lambda: convert().free(), repeats)
    s0.free()
    host.free()
    return {k: v / 1e9 for k, v in out.items()}


def bench_source(repeats: int) -> float | None:
    try:
        from vorch_jax.models.gguf_source import ModelFileError, load_smollm2_source

        src = load_smollm2_source()
    except (ImportError, ModelFileError):
        return None
    blocks = [f"layers.{i}.mlp" for i in range(4)]

    def read():
        for b in blocks:
            src(b)

    before = src.nbytes_read
    read()
    per_run = (src.nbytes_read - before)
    return per_run / median_seconds(read, repeats) / 1e9


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4, 16, 64], help="MiB per transfer")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--store", type=Path, default=None, help="store directory (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=None, help="write the numbers as JSON")
    args = ap.parse_args(argv)

    dev = jax.devices()[0]
    store = args.store or Path(tempfile.mkdtemp(prefix="bench_links_"))
    store.mkdir(parents=True, exist_ok=True)
    try:
        by_size = {s: bench_size(s, args.repeats, store, dev) for s in args.sizes}
        src_gbps = bench_source(args.repeats)
    finally:
        if args.store is None:
            shutil.rmtree(store, ignore_errors=True)
    links = list(next(iter(by_size.values())))
    print(f"device: {dev} ({dev.platform}); jax {jax.__version__}; store {store}")
    print(f"{'link (GB/s)':26s}" + "".join(f"{f'{s} MiB':>10s}" for s in args.sizes))
    for link in links:
        print(f"{link:26s}" + "".join(f"{by_size[s][link]:10.3f}" for s in args.sizes))
    if src_gbps is not None:
        print(f"{'source->host (file bytes)':26s}{src_gbps:10.3f}  (4 SmolLM2 mlp blocks, GGUF Q4_1 dequantized)")
    result = {
        "device": str(dev), "platform": dev.platform, "host": platform.node(), "jax": jax.__version__,
        "sizes_mib": args.sizes, "repeats": args.repeats, "unit": "GB/s (1e9 bytes per second)",
        "by_size": {str(s): v for s, v in by_size.items()},
        "gbps": {link: by_size[max(args.sizes)][link] for link in links},
    }
    if src_gbps is not None:
        result["gbps"]["source->host"] = src_gbps
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
