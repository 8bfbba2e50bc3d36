"""How fast a block lands on the device from pinned host memory, by where it lands: fresh memory or memory held.

Run:   .venv/bin/python experiments/host_copy_rates.py [--sizes-mb 4 16 42 168] [--repeats 8]
       GLIBC_TUNABLES=glibc.malloc.hugetlb=1 .venv/bin/python experiments/host_copy_rates.py     (huge pages)
Takes: about 20 s on 2 CPU cores.

Per block size, the median GB/s (1e9 bytes/s) over `--repeats` copies after one warm-up, of
  fresh      `jax.device_put` to memory_kind "device", landed and deleted (freeing it is timed too); on a CPU
             backend each lands in a new allocation, and one above glibc's mmap threshold (at most 32 MB) in new
             pages the copy faults in;
  landed     the same by a compiled transfer (`full_precision.land`): what the engine does on a CPU backend for a
             load with no held memory of its shapes (`FullPrecisionBlock.from_pinned_host`; elsewhere it uses
             `jax.device_put`);
  into held  a jitted copy into device arrays of the same shape, donated to it (their memory reused; the script
             checks the address did not change): what the engine pays for a load landing in a dropped block's
             memory (`tiers/device_pool.py`, since 2026-12-07).
The header says whether the heap used huge pages (`tiers/host_memory.huge_page_heap`). On an accelerator both land
in memory its allocator pools, and the two should agree.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from vorch_jax.tiers.full_precision import copy_into, device_sharding, land, pinned_host_sharding  # noqa: E402
from vorch_jax.tiers.host_memory import huge_page_heap  # noqa: E402
from vorch_jax.tiers.link_probe import median_seconds  # noqa: E402


def rates(size_mb: float, repeats: int, device) -> dict[str, float]:
    """Median GB/s of each way of landing `size_mb` MB (float32) from pinned host memory."""
    n = max(1, int(size_mb * 2**20) // 4)
    src = jax.device_put(np.random.default_rng(0).random(n, np.float32), pinned_host_sharding(device))
    held = {}

    def fresh():
        x = jax.device_put(src, device_sharding(device))
        x.block_until_ready()
        x.delete()

    def landed():
        x = land(src, device)
        x.block_until_ready()
        x.delete()

    def into_held():
        held["dst"] = copy_into(held["dst"], src, device)
        held["dst"].block_until_ready()

    fresh_s = median_seconds(fresh, repeats)
    landed_s = median_seconds(landed, repeats)
    # made by XLA, not put from numpy (a device_put of a numpy array may alias its memory, which cannot be donated)
    held["dst"] = jax.jit(lambda: jnp.zeros(n, jnp.float32), out_shardings=device_sharding(device))()
    address = held["dst"].unsafe_buffer_pointer()
    held_s = median_seconds(into_held, repeats)
    dst = held["dst"]
    if dst.unsafe_buffer_pointer() != address or not np.array_equal(np.asarray(dst), np.asarray(src)):
        raise RuntimeError("the donated copy moved its buffer or changed the bytes")
    return {"fresh": src.nbytes / fresh_s / 1e9, "landed": src.nbytes / landed_s / 1e9,
            "into held": src.nbytes / held_s / 1e9}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mb", nargs="+", type=float, default=[4, 16, 42, 168])
    ap.add_argument("--repeats", type=int, default=8)
    args = ap.parse_args(argv)
    if min(args.sizes_mb) <= 0 or args.repeats < 1:
        print("host_copy_rates: --sizes-mb must be > 0 and --repeats >= 1", file=sys.stderr)
        return 2
    device = jax.devices()[0]
    print(f"{jax.default_backend()} ({device.device_kind}), jax {jax.__version__}, huge-page heap "
          f"{'on' if huge_page_heap() else 'off'}; pinned_host -> device, median of {args.repeats} copies")
    print(f"{'MB':>7s} {'fresh GB/s':>11s} {'landed GB/s':>12s} {'into held GB/s':>15s}")
    for mb in args.sizes_mb:
        r = rates(mb, args.repeats, device)
        print(f"{mb:7.1f} {r['fresh']:11.2f} {r['landed']:12.2f} {r['into held']:15.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
