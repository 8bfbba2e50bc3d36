"""Time one jitted controller tick for 64, 1,000 and 10,000 blocks, and the two ways of handing decisions to the host.

Run:  python experiments/bench_tick.py            (CPU: ~1 min; prints ms per tick)
      python experiments/bench_tick.py --quick    (fewer repeats)
Target: < 1 ms per tick at 10,000 blocks. Hand-off options timed per tick:
  (a) return:      target = tick(...)[0]; np.asarray(target)          (device -> host copy after the call)
  (b) io_callback: a jitted tick that calls jax.experimental.io_callback(push, None, target) inside, pushing the
                   decisions to a Python callable; the host side only waits for completion.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from vorch_jax.controller import score as score_lib
from vorch_jax.controller import state_update as su
from vorch_jax.controller.block_table import KINDS, BlockTable


def random_table(B: int, seed: int = 0) -> BlockTable:
    """A plausible table: layered dense blocks plus experts, a few protected, mixed states and ladders."""
    rng = np.random.default_rng(seed)
    full = rng.uniform(1, 64, B) * 2**20
    state = rng.choice([0, 1, 2, 3, 4, 6], B)
    allowed = np.ones((B, 7), bool)
    allowed[:, 5] = False
    prot = rng.random(B) < 0.02
    prot[0] = True
    state[prot] = 0
    kind = rng.integers(0, len(KINDS), B)
    return BlockTable.from_rows(
        state=state, bytes_per_state=full, kind=kind, layer=rng.integers(0, 32, B), protected=prot, allowed=allowed,
        rho=rng.exponential(1, B), lam=rng.random(B), kappa=rng.random(B), psi=rng.random(B),
        delta=rng.random((B, 7)) * 1e-4, h2d_bytes_per_s=25e9, nvme_bytes_per_s=5e9,
        dwell=rng.integers(0, 8, B))


def median_ms(fn, n):
    for _ in range(3):
        fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", default="64,1000,10000")
    ap.add_argument("--methods", default="sort,bisect")
    args = ap.parse_args()
    n = 30 if args.quick else 200
    w = score_lib.ScoreWeights.make()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; median of {n} ticks after warm-up")
    for B in [int(x) for x in args.sizes.split(",")]:
        table = random_table(B)
        budget = jnp.float32(0.3 * float(jnp.sum(table.bytes_per_state[:, 0])))
        for method in args.methods.split(","):
            params = su.TickParams(method=method)
            ms = median_ms(lambda: jax.block_until_ready(su.tick(table, budget, w, params)), n)
            print(f"B={B:>6} method={method:<6} tick           {ms:8.3f} ms")
        params = su.TickParams()
        ms_ret = median_ms(lambda: np.asarray(su.tick(table, budget, w, params)[0]), n)

        sink = []

        @jax.jit
        def tick_push(t, b):
            target, reason, stats = su.tick(t, b, w, params)
            io_callback(lambda x: sink.append(x), None, target, ordered=True)
            return stats.n_changed

        ms_cb = median_ms(lambda: jax.block_until_ready(tick_push(table, budget)), n)
        assert len(sink) > 0 and np.array_equal(sink[-1], np.asarray(su.tick(table, budget, w, params)[0]))
        print(f"B={B:>6} hand-off (a) return + np.asarray {ms_ret:8.3f} ms   (b) io_callback {ms_cb:8.3f} ms   "
              f"-> {'return' if ms_ret <= ms_cb else 'io_callback'} is cheaper")


if __name__ == "__main__":
    main()
