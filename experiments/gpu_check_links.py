"""Self-contained link bandwidth check for an accelerator machine: pinned_host <-> device copies with jax.

    PYTHONPATH=. python experiments/gpu_check_links.py

Prints GB/s for host->device and device->host over 4, 16, 64 and 256 MiB (median of 5 after a warm-up), and the
device's on-device copy bandwidth, so simulator profiles and the runtime's floor can use measured numbers.
"""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np


def _time(fn, reps=5):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main():
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"memories: {[m.kind for m in dev.addressable_memories()]}")
    d_sh = jax.sharding.SingleDeviceSharding(dev, memory_kind="device")
    h_sh = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
    print(f"{'MiB':>6} {'host->device GB/s':>18} {'device->host GB/s':>18} {'device copy GB/s':>17}")
    for mib in (4, 16, 64, 256):
        n = mib * 2**20 // 4
        host = jax.device_put(np.random.default_rng(0).standard_normal(n, dtype=np.float32), h_sh)
        onde = jax.device_put(host, d_sh)
        h2d = _time(lambda: jax.device_put(host, d_sh).block_until_ready())
        d2h = _time(lambda: jax.device_put(onde, h_sh).block_until_ready())
        copy = jax.jit(lambda x: x * 1.0)
        dd = _time(lambda: copy(onde).block_until_ready())
        nb = n * 4
        print(f"{mib:>6} {nb / h2d / 1e9:>18.2f} {nb / d2h / 1e9:>18.2f} {2 * nb / dd / 1e9:>17.1f}")


if __name__ == "__main__":
    main()
