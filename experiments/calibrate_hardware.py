"""Measure this machine and write configs/hardware/this-machine.yaml (the simulator's profile of it).

Run:   .venv/bin/python experiments/calibrate_hardware.py [--out configs/hardware/this-machine.yaml]
Takes: about half a minute on 2 CPU cores. Medians of a few repetitions after a warm-up.

What is measured, and how each number feeds the profile:
  * matmul FLOP/s per precision: a jitted [1024, 1024] @ [1024, 1024] in float32, bfloat16 and int8 (int32 accum);
  * device memory bandwidth and fixed per-block overhead: the runtime's own jitted block functions
    (`models.llama_compute.attention`, `.mlp`, `.head`) decode-shaped (M = 1) on SmolLM2-shaped zero weights, fitted
    by least squares to `overhead + weight bytes / bandwidth` (two parameters of the machine, shared by every block);
  * host dispatch per block: the host-side seconds of one asynchronous block call (returns before compute ends);
  * host->device and NVMe->host: `tiers.link_probe.probe_bandwidths` (the tiers' own representations), latency from
    a 4 KiB probe; device->host from `PinnedHostBlock.from_device`; NVMe write from `NvmeBlock.write`;
  * fresh-allocation rate: a 64 MiB block landing on device, above glibc's 32 MiB mmap threshold, so each copy lands
    in freshly mapped pages (2.2 GB/s here against ~15 GB/s into reused memory; the embedding is such a block);
  * dequant throughput: int8 / int4 decode-shaped matmuls through the tiers' formats (bytes of low-bit weight / s).
  * fresh-free rate: freeing such a block (`fresh_free_rate`: its pages are unmapped on the calling thread);
  * copies at once: the movement engine's worker threads, at most one per core.
With `--from-runs R`, R rounds of real runs at `CALIBRATION_POINTS` and probes beside them (`fit_from_runs`) replace
the host time per position, the load alone (`link_probe`: through the engine, compute idle), a waited-for copy's
and a prefetch's extra time beside compute, the memory bandwidth (per-block overhead folded in: the MoE resident
point that separates them is `sim_validate`'s), the copy contention and the fresh-allocation and free rates.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

CMD = "python experiments/calibrate_hardware.py"


def _median(fn, repeats=7):
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def matmul_flops() -> dict:
    n = 1024
    out = {}
    for name, dt in (("fp32", jnp.float32), ("bf16", jnp.bfloat16), ("int8", jnp.int8)):
        a = jnp.ones((n, n), dt)
        pref = jnp.int32 if dt == jnp.int8 else jnp.float32
        f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=pref))
        out[name] = 2 * n**3 / _median(lambda: f(a, a).block_until_ready())
    return out


def host_compute_overheads(k: int = 64, width: int = 576) -> dict:
    """Seconds a host op computed in place costs beyond the same op on the device (a k x k matmul through
    `compute_on('device_host')` on pinned_host weights), and one activation copy ([1, width] to pinned_host and
    back in one jitted program, halved): the `host_compute` section's overheads."""
    from jax.experimental.compute_on import compute_on
    from jax.sharding import SingleDeviceSharding

    dev = jax.devices()[0]
    w_host = jax.device_put(jnp.full((k, k), 1e-3), SingleDeviceSharding(dev, memory_kind="pinned_host"))
    w_dev, x = jnp.full((k, k), 1e-3), jnp.ones((1, k))

    @jax.jit
    def on_host(x, w):
        with compute_on("device_host"):
            y = jax.device_put(x, jax.memory.Space.Host) @ w
        return jax.device_put(y, jax.memory.Space.Device)

    on_device = jax.jit(lambda x, w: x @ w)
    round_trip = jax.jit(lambda a: jax.device_put(jax.device_put(a, jax.memory.Space.Host), jax.memory.Space.Device))
    act = jnp.ones((1, width))
    host_s = _median(lambda: on_host(x, w_host).block_until_ready(), repeats=101)
    dev_s = _median(lambda: on_device(x, w_dev).block_until_ready(), repeats=101)
    return {"op_overhead": max(0.0, host_s - dev_s), "host_op": host_s, "device_op": dev_s, "k": k, "width": width,
            "activation_latency": _median(lambda: round_trip(act).block_until_ready(), repeats=101) / 2}


def block_fit() -> tuple[float, float, dict]:
    """(bandwidth bytes/s, overhead s, {kind: seconds}) from the runtime's decode-shaped block functions."""
    from vorch_jax.models import llama_compute as C
    from vorch_jax.models.registry import get

    spec = get("smollm2-135m")
    cfg = spec.config
    n = 16  # distinct copies per kind, cycled, so weights stream from memory as in a pass (not from cache)
    rng = np.random.default_rng(0)
    w = {b: [{k: jnp.asarray(rng.standard_normal(s.shape, np.float32)) for k, s in spec.block_shapes(b).items()}
             for _ in range(1 if b == "embed" else n)] for b in ("embed", "layers.0.attn", "layers.0.mlp")}
    x = jnp.zeros((1, 1, cfg.d_model), jnp.float32)
    k = jnp.zeros((1, 24, cfg.n_kv_heads, cfg.head_dim), jnp.float32)

    def chain(fn, ws):
        y = x
        for wi in ws:
            y = fn(wi, y)
        y.block_until_ready()

    times = {"attn": _median(lambda: chain(lambda wi, y: C.attention(cfg, wi, y, jnp.zeros_like(k), jnp.zeros_like(k),
                                                                      jnp.int32(3))[0], w["layers.0.attn"]), 5) / n,
             "mlp": _median(lambda: chain(lambda wi, y: C.mlp(cfg, wi, y), w["layers.0.mlp"]), 5) / n,
             "head": _median(lambda: C.head(w["embed"][0], x).block_until_ready(), 7)}
    nbytes = {"attn": spec.device_bytes("layers.0.attn"), "mlp": spec.device_bytes("layers.0.mlp"),
              "head": spec.device_bytes("embed")}
    A = np.array([[1.0, nbytes[kd]] for kd in times])
    y = np.array([times[kd] for kd in times])
    (overhead, inv_bw), *_ = np.linalg.lstsq(A, y, rcond=None)
    # Async dispatch: the host-side cost of one block call.
    n = 32
    t0 = time.perf_counter()
    outs = [C.mlp(cfg, w["layers.0.mlp"][i % len(w["layers.0.mlp"])], x) for i in range(n)]
    dispatch = (time.perf_counter() - t0) / n
    jax.block_until_ready(outs)
    return 1.0 / inv_bw, max(0.0, overhead), {**times, "dispatch": dispatch}


def links(store_dir) -> dict:
    from vorch_jax.tiers.full_precision import FullPrecisionBlock
    from vorch_jax.tiers.link_probe import probe_bandwidths
    from vorch_jax.tiers.nvme_store import NvmeBlock
    from vorch_jax.tiers.pinned_host import PinnedHostBlock

    dev = jax.devices()[0]
    bw = probe_bandwidths(store_dir, mib=16, repeats=5)
    small = PinnedHostBlock.from_numpy({"p": np.zeros(1024, np.float32)}, dev)
    lat = _median(lambda: FullPrecisionBlock.from_pinned_host(small, dev).free(), 15)
    big = {"p": np.random.default_rng(0).standard_normal(16 * 2**18, dtype=np.float32)}
    on_dev = FullPrecisionBlock.from_pinned_host(PinnedHostBlock.from_numpy(big, dev), dev)
    d2h = big["p"].nbytes / _median(lambda: PinnedHostBlock.from_device(on_dev, dev).free(), 5)
    with tempfile.TemporaryDirectory(dir=store_dir) as d:
        i = iter(range(100))
        write = big["p"].nbytes / _median(lambda: NvmeBlock.write(f"w{next(i)}", big, Path(d)), 3)
        tiny = NvmeBlock.write("tiny", {"p": np.zeros(1024, np.float32)}, Path(d))
        nvme_lat = _median(lambda: tiny.read(), 7)
    return {"h2d": bw["host->device"], "h2d_lat": lat, "d2h": d2h, "nvme_read": bw["nvme->host"],
            "nvme_write": write, "nvme_lat": nvme_lat, "fresh": fresh_alloc_rate(dev),
            "fresh_free": fresh_free_rate(dev)}


FRESH_ALLOC_THRESHOLD = 32 * 2**20  # glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)


def fresh_alloc_rate(dev, mib: int = 64) -> float:
    """bytes/s of pinned_host->device into a buffer above glibc's mmap threshold: every allocation of that size is
    a fresh mapping whose pages are faulted in as the copy touches them (the previous copy is freed first)."""
    from vorch_jax.tiers.full_precision import FullPrecisionBlock
    from vorch_jax.tiers.pinned_host import PinnedHostBlock

    assert mib * 2**20 > FRESH_ALLOC_THRESHOLD
    host = PinnedHostBlock.from_numpy({"p": np.ones(mib * 2**18, np.float32)}, dev)
    return mib * 2**20 / _median(lambda: FullPrecisionBlock.from_pinned_host(host, dev).free(), 5)


def fresh_free_rate(dev, mib: int = 64) -> float:
    """bytes/s of freeing a device block above glibc's mmap threshold (its pages are unmapped on the calling thread:
    the engine's eviction of such a block holds the host that long). Median of 5 after a warm-up."""
    from vorch_jax.tiers.full_precision import FullPrecisionBlock
    from vorch_jax.tiers.pinned_host import PinnedHostBlock

    assert mib * 2**20 > FRESH_ALLOC_THRESHOLD
    host = PinnedHostBlock.from_numpy({"p": np.ones(mib * 2**18, np.float32)}, dev)
    times = []
    for _ in range(6):
        block = FullPrecisionBlock.from_pinned_host(host, dev)
        t0 = time.perf_counter()
        block.free()
        times.append(time.perf_counter() - t0)
    return mib * 2**20 / statistics.median(times[1:])


LINK_PROBE_MIB = (1, 2, 4, 8, 12)  # SmolLM2's blocks: 2.7 MB (an expert), 3.5 MB (attention), 10.6 MB (an MLP)


def link_probe(sizes_mib=LINK_PROBE_MIB, repeats: int = 5) -> list[tuple[int, float]]:
    """(bytes, seconds) of S3 -> S0 loads through the runtime's own `MovementEngine` (request, hand-off to its
    worker thread, the copy, the wait), nothing else running: the link as a miss sees it with the compute stream
    idle. Median of `repeats` per size after a warm-up; each load is dropped back to its kept home copy (untimed)
    before the next."""
    from vorch_jax.tiers.engine import MovementEngine

    leaves = {f"b{mib}": {"p": np.ones(mib * 2**18, np.float32)} for mib in sizes_mib}
    out = []
    with tempfile.TemporaryDirectory() as d, MovementEngine(leaves.__getitem__, d, keep_home=True) as eng:
        for mib in sizes_mib:
            b = f"b{mib}"
            eng.register(b, "S3")
            times = []
            for _ in range(repeats + 1):  # the first: warm-up
                t0 = time.perf_counter()
                eng.request(b, "S0")
                eng.wait(b)
                times.append(time.perf_counter() - t0)
                eng.request(b, "S3").result()
            out.append((mib * 2**20, statistics.median(times[1:])))
    return out


def dequant() -> dict:
    from vorch_jax.tiers.quant_int4 import quantize_int4
    from vorch_jax.tiers.quant_int8 import quantize_int8

    w = jnp.asarray(np.random.default_rng(0).standard_normal((1536, 1536), dtype=np.float32))
    x = jnp.ones((1, 1536), jnp.float32)
    f = jax.jit(lambda q, x: q.matmul(x))
    out = {}
    for name, q in (("int8", quantize_int8(w)), ("int4", quantize_int4(w, 64))):
        nbytes = sum(int(a.nbytes) for a in jax.tree_util.tree_leaves(q))
        out[name] = nbytes / _median(lambda: f(q, x).block_until_ready(), 15)
    return out


# Outside sim_validate's grid (static / lru / scored at 0.3 / 0.5 / 0.8): resident for the compute speed, static
# (no prefetch: every copy seen whole by the host) for the link, static-prefetch (copies beside compute) for contention.
CALIBRATION_POINTS = (("resident", 1.0), ("static", 0.4), ("static-prefetch", 0.4))


def real_run(policy: str, budget, out_dir, new_tokens: int = 6) -> tuple[dict, list]:
    """One real run (vorch_jax.runtime.run.run) at validation size; returns (summary, trace records)."""
    import json

    from vorch_jax.config import load_config
    from vorch_jax.runtime.run import run

    cfg = load_config(None, [f"policy={policy}", f"hbm_budget={budget}", f"new_tokens={new_tokens}",
                             "prompt_tokens=16", "eval_tokens=16"])
    summary = run(cfg, out_dir)
    records = [json.loads(line) for line in open(Path(out_dir) / "trace.jsonl")]
    return summary, records


def fit_from_runs(runs: dict, spec, profile, new_tokens: int = 6, fresh_rates=(), link_points=(),
                  moe_resident=None, free_rates=()) -> dict:
    """Machine parameters from measured runs {(policy, budget): [(summary, trace records), ...]} at the calibration
    points and the probes made beside them, pooled over repeats (never per row of a validation grid):
      * host seconds per schedule position: median gap between consecutive hit accesses of one pass in the runs that
        prefetch nothing (resident, static): the jax dispatch and the ledger's work on a hit, no copy waited for;
      * host->device bandwidth and latency of a load alone: least squares `seconds = latency + bytes / bandwidth`
        over `link_points` (`link_probe`: loads through the runtime's engine with the compute stream idle);
      * a copy's extra time with compute beside it: the mean, over the static runs' misses after placement of
        blocks up to the fresh-allocation threshold (the host ran ahead: the forward's compute is queued as the
        copy starts), of the miss's duration less the host's position time and the load alone. The mean, not the
        median: the simulator charges it to every such copy, and what a step adds up is n x the mean (the misses'
        durations have a long right tail: a static run's MLP misses, median 1.03 ms, mean 1.35 ms);
      * a prefetch's extra time (the host does not wait for it: compute runs beside it throughout): the mean, over
        the static-prefetch runs' prefetches after placement, up to the threshold, of the transition's duration
        (the copy itself, from when the engine's worker starts it) less the load alone;
      * device memory bandwidth and per-block overhead: `step = positions x overhead + bytes / bandwidth` holds for
        the resident dense run; with `moe_resident` = (measured steps, simulate(profile) -> simulated step) of the
        resident MoE (twice the positions per byte), the overhead is the one with which the simulator reproduces it
        (bisection), else 0 (folded into the bandwidth);
      * fresh-allocation rate: the median rate of the runs' own host->device loads of blocks above the threshold
        (every run places the embedding once), else of `fresh_rates` (`fresh_alloc_rate`, a probe beside the runs:
        it measured 0.59 to 10.7 GB/s within one day while the runs' embedding loads took 1.3-2.3 GB/s);
      * fresh-free rate: the median rate of the runs' own evictions of such blocks (held host time), else of
        `free_rates` (`fresh_free_rate`, a probe beside the runs; the calibration points evict no embedding);
      * copy contention: the value in [0, 2] for which the simulator, with the parameters above, reproduces the
        static-prefetch run's decode step (`fit_contention`)."""
    def pooled(policy):
        return [x for (p, _), lst in runs.items() if p == policy for x in lst]

    def load_bytes(recs):  # block -> bytes of its host->device loads in one run's trace
        return {r["block"]: r["bytes"] for r in recs if r["event"] == "transition" and r["link"] == "host->device"}

    every_run = [x for lst in runs.values() for x in lst]

    gaps = []
    for _, recs in pooled("resident") + pooled("static"):
        acc = [r for r in recs if r["event"] == "access" and r["t"] > 0]
        gaps += [b["t"] - a["t"] for a, b in zip(acc, acc[1:]) if a["hit"] and b["hit"] and a["step"] == b["step"]]
    dispatch = statistics.median(gaps)
    x = np.asarray([b for b, _ in link_points], np.float64)
    slope, lat = np.polyfit(x, np.asarray([t for _, t in link_points], np.float64), 1)
    h2d, h2d_lat = 1.0 / slope, max(0.0, float(lat))
    beside = []  # a static run's decode misses: duration less the position's host time and the load alone
    for _, recs in pooled("static"):
        nbytes = load_bytes(recs)
        beside += [r["dur_s"] - dispatch - h2d_lat - nbytes[r["block"]] / h2d for r in recs
                   if r["event"] == "access" and not r["hit"] and r["t"] > 0 and r["block"] in nbytes
                   and nbytes[r["block"]] <= profile.fresh_alloc_threshold_bytes]
    ahead = []  # the static-prefetch runs' prefetches (compute beside them throughout): duration less the load alone
    for _, recs in pooled("static-prefetch"):
        ahead += [r["dur_s"] - h2d_lat - r["bytes"] / h2d for r in recs
                  if r["event"] == "transition" and r["link"] == "host->device" and r.get("reason") == "prefetch"
                  and r["t"] > 0 and r["bytes"] <= profile.fresh_alloc_threshold_bytes]
    resident = statistics.median(s["decode_step_s"] for s, _ in pooled("resident"))
    P = 17 + new_tokens - 1  # context of the last decode step: BOS + 16 prompt tokens + the tokens before it
    positions = spec.skeleton()
    streamed = sum(spec.cost(p, 1, P, spec.device_bytes(p.block), 4)[1] for p in positions)
    cal = {"h2d": h2d, "h2d_lat": h2d_lat, "link_points": len(link_points), "dispatch": dispatch,
           "beside": max(0.0, statistics.mean(beside)), "transfers": len(beside), "gaps": len(gaps),
           "beside_median": statistics.median(beside),
           "hbm_bw": streamed / resident, "overhead": 0.0, "resident_step_s": resident, "contention": 0.0}
    big = [r["bytes"] / r["dur_s"] for _, recs in every_run for r in recs
           if r["event"] == "transition" and r["link"] == "host->device"
           and r["bytes"] > profile.fresh_alloc_threshold_bytes and r["dur_s"] > 0]
    if big:  # the runs' own loads into fresh pages (each run places the 113 MB embedding once)
        cal["fresh"], cal["fresh_loads"] = statistics.median(big), len(big)
    elif fresh_rates:
        cal["fresh"], cal["fresh_loads"] = statistics.median(fresh_rates), 0
    if ahead:  # (none: the profile's value stands)
        cal["prefetch_beside"], cal["prefetches"] = max(0.0, statistics.mean(ahead)), len(ahead)
    drops = []  # the runs' own evictions of blocks above the threshold: (bytes, seconds the host was held)
    for _, recs in every_run:
        nbytes = load_bytes(recs)
        drops += [(nbytes[r["block"]], r["dur_s"]) for r in recs if r["event"] == "transition"
                  and r["link"] is None and r.get("reason", "").startswith("evict") and r["dur_s"] > 0
                  and nbytes.get(r["block"], 0) > profile.fresh_alloc_threshold_bytes]
    if drops:
        cal["fresh_free"], cal["fresh_frees"] = statistics.median(b / t for b, t in drops), len(drops)
    elif free_rates:
        cal["fresh_free"], cal["fresh_frees"] = statistics.median(free_rates), 0
    cal["static_prefetch_step_s"] = statistics.median(s["decode_step_s"] for s, _ in pooled("static-prefetch"))
    cal["static_prefetch_budget"] = next(b for p, b in runs if p == "static-prefetch")
    cal["static_step_s"] = statistics.median(s["decode_step_s"] for s, _ in pooled("static"))
    cal["streamed_bytes"], cal["positions"] = streamed, len(positions)
    if moe_resident is not None:
        cal["moe_resident_step_s"] = statistics.median(moe_resident[0])
    return fit_with_simulator(cal, profile, new_tokens, moe_resident[1] if moe_resident else None)


def fit_with_simulator(cal: dict, profile, new_tokens: int = 6, simulate_moe=None) -> dict:
    """`cal` with the parameters fitted through the simulator itself (refit whenever its time model changes, as
    `sim_validate --replay` does): the per-block overhead with which `simulate_moe(profile)` reproduces
    `cal["moe_resident_step_s"]` (the device bandwidth following from the dense resident step), then the copy
    contention (`fit_contention`). Bisections: each simulated step grows with the parameter."""
    cal = dict(cal)
    if simulate_moe is not None:
        resident, n, streamed = cal["resident_step_s"], cal["positions"], cal["streamed_bytes"]
        lo, hi = 0.0, 0.5 * resident / n
        for _ in range(12):
            o = (lo + hi) / 2
            trial = {**cal, "overhead": o, "hbm_bw": streamed / (resident - n * o)}
            faster = simulate_moe(apply_calibration(profile, trial)) < cal["moe_resident_step_s"]
            lo, hi = (o, hi) if faster else (lo, o)
        cal["overhead"] = (lo + hi) / 2
        cal["hbm_bw"] = streamed / (resident - n * cal["overhead"])
    cal["contention"] = fit_contention(cal, profile, new_tokens)
    return cal


def fit_contention(cal: dict, profile, new_tokens: int = 6) -> float:
    """The copy contention in [0, 2] with which the simulator, on `profile` with `cal`'s other parameters,
    reproduces `cal["static_prefetch_step_s"]`, the measured static-prefetch decode step (bisection: the simulated
    step grows with it). Refitted whenever the simulator's time model changes (`sim_validate --replay`)."""
    target, budget = cal["static_prefetch_step_s"], cal["static_prefetch_budget"]
    lo, hi = 0.0, 2.0
    with tempfile.TemporaryDirectory() as d:
        for i in range(12):
            c = (lo + hi) / 2
            sim = sim_step("static-prefetch", budget, new_tokens, apply_calibration(profile, {**cal, "contention": c}),
                           Path(d) / str(i))
            lo, hi = (c, hi) if sim < target else (lo, c)
    return (lo + hi) / 2


def apply_calibration(profile, cal: dict):
    """`profile` with the machine parameters `fit_from_runs` measured."""
    from vorch_jax.simulation.hardware import Link

    fresh = {"fresh_alloc_bytes_per_s": cal["fresh"]} if "fresh" in cal else {}
    if "fresh_free" in cal:
        fresh["fresh_free_bytes_per_s"] = cal["fresh_free"]
    if "prefetch_beside" in cal:
        fresh["prefetch_beside_compute_s"] = cal["prefetch_beside"]
    return profile.replace(
        host_to_device=Link(cal["h2d"], cal["h2d_lat"]), dispatch_s_per_block=cal["dispatch"],
        hbm_bandwidth_bytes_per_s=cal["hbm_bw"], block_overhead_s=cal["overhead"], copy_contention=cal["contention"],
        copy_beside_compute_s=cal["beside"], **fresh)


def sim_step(policy: str, budget, tokens: int, profile, out_dir) -> float:
    """Simulated decode step of the validation-size run (as `real_run`) on `profile`."""
    from vorch_jax.config import load_config
    from vorch_jax.runtime.run import simulate

    cfg = load_config(None, [f"policy={policy}", f"hbm_budget={budget}", f"new_tokens={tokens}", "prompt_tokens=16",
                             "eval_tokens=16", "executor=sim", "hardware=this-machine"])
    return simulate(cfg, out_dir, hardware=profile)["decode_step_s"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "configs/hardware/this-machine.yaml"))
    ap.add_argument("--from-runs", type=int, default=0, metavar="R",
                    help="also run the real runner R times at each calibration point and take link latency and "
                         "bandwidth, host time per position, memory bandwidth and copy contention from those runs "
                         "(what sim_validate does each round)")
    args = ap.parse_args(argv)
    measured = {"fl": matmul_flops(), "blk": block_fit(), "ln": links(None), "dq": dequant(),
                "hc": host_compute_overheads()}
    Path(args.out).write_text(profile_text(**measured, cal=None, from_runs=0))
    if args.from_runs:
        from vorch_jax.simulation.hardware import load_profile
        from vorch_jax.models.registry import get

        runs, links_pts, fresh, free = {}, [], [], []
        with tempfile.TemporaryDirectory() as d:
            for r in range(args.from_runs):
                fresh.append(fresh_alloc_rate(jax.devices()[0]))
                free.append(fresh_free_rate(jax.devices()[0]))
                links_pts += link_probe()
                for policy, budget in CALIBRATION_POINTS:
                    runs.setdefault((policy, budget), []).append(
                        real_run(policy, budget, Path(d) / f"{policy}-{budget}-{r}"))
        cal = fit_from_runs(runs, get("smollm2-135m"), load_profile(args.out), fresh_rates=fresh,
                            link_points=links_pts, free_rates=free)
        print("calibration from runs:", cal)
        Path(args.out).write_text(profile_text(**measured, cal=cal, from_runs=args.from_runs))
    print(Path(args.out).read_text())


def profile_text(fl, blk, ln, dq, hc, cal, from_runs) -> str:
    """The YAML profile, each value with its source; `cal` (from `fit_from_runs`) replaces the parameters it fits."""
    import os
    import platform

    bw, overhead, blk = blk
    ln = dict(ln)
    contention = beside = ahead = 0.0
    if cal:
        bw, overhead, contention, beside = cal["hbm_bw"], cal["overhead"], cal["contention"], cal["beside"]
        ahead = cal.get("prefetch_beside", 0.0)
        ln["h2d"], ln["h2d_lat"] = cal["h2d"], cal["h2d_lat"]
        ln["fresh"] = cal.get("fresh", ln["fresh"])
        ln["fresh_free"] = cal.get("fresh_free", ln["fresh_free"])
        blk = {**blk, "dispatch": cal["dispatch"]}
    from vorch_jax.tiers.engine import MovementEngine

    workers = MovementEngine.__init__.__kwdefaults__["workers"]
    copies = min(workers, os.cpu_count() or 1)
    cpu = platform.processor() or platform.machine()
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    m = f"measured here ({when}, `{CMD}`"
    pts = ", ".join(f"{p} at {b}" for p, b in CALIBRATION_POINTS)
    r = f"calibrated here from real runs ({when}, `{CMD} --from-runs {from_runs}`: vorch_jax.runtime.run.run, {pts}"
    src = {"hbm": f"{r}: decode-pass bytes / measured decode step of the resident run "
                  f"{cal['resident_step_s'] * 1e3:.2f} ms)"
           if cal else f"{m}: least-squares fit of decode block times attn {blk['attn']*1e3:.3f} ms, mlp "
                       f"{blk['mlp']*1e3:.3f} ms, head {blk['head']*1e3:.3f} ms)",
           "h2d": f"{r}: link_probe, loads of 1-12 MiB through the engine with the compute idle, least squares "
                  f"latency + bytes / bandwidth over {cal['link_points']} loads)" if cal
           else f"{m}: tiers.link_probe.probe_bandwidths, 16 MiB)",
           "lat": f"{r}: intercept of the same fit)" if cal else f"{m}: 4 KiB pinned_host->device)",
           "ovh": f"{r}: folded into the bandwidth above)" if cal else f"{m}: intercept of the block-time fit above)",
           "disp": f"{r}: median gap between consecutive hit accesses of the resident and static runs, "
                   f"{cal['gaps']} gaps)" if cal else f"{m}: host seconds of one async block call)",
           "beside": f"{r}: mean over {cal['transfers']} misses of the static runs of duration less host time and "
                     f"the load alone)" if cal else "not measured without --from-runs",
           "ahead": f"{r}: mean over {cal['prefetches']} prefetches of the static-prefetch runs of duration less the "
                    f"load alone)" if cal and "prefetches" in cal else "not measured (without --from-runs, or no "
                    "prefetch in the runs)",
           "fresh": f"{r}: median rate of the runs' own loads above the threshold, {cal['fresh_loads']} embedding "
                    f"placements)" if cal and cal.get("fresh_loads")
           else f"{m}: 64 MiB pinned_host->device into a fresh buffer, each copy freed before the next)",
           "free": f"{r}: median rate of the runs' own evictions above the threshold, {cal['fresh_frees']} evictions)"
           if cal and cal.get("fresh_frees")
           else f"{r}: fresh_free_rate, freeing a 64 MiB device block (the unmapping the host waits for), median of "
                f"one probe per round)" if cal
           else f"{m}: freeing a 64 MiB device block, the unmapping the host waits for)",
           "cont": f"{r}: the value with which the simulator reproduces the static-prefetch run's decode step "
                   f"{cal['static_prefetch_step_s'] * 1e3:.2f} ms)" if cal
           else "not measured without --from-runs: copies assumed not to slow compute"}
    return f"""# Hardware profile of the machine this repository runs on ({cpu}, {os.cpu_count()} cores,
# jax {jax.__version__}, backend {jax.default_backend()}): the 'device' is the CPU and its memory; pinned_host and
# device memory are the same DRAM.
# Every number below was {m[:-1]}); rerun the command to refresh. Units: bytes, seconds, bytes/s, FLOP/s.
name: this-machine
device: "{jax.devices()[0].device_kind} via jax {jax.default_backend()} ({os.cpu_count()} cores)"
hbm:
  capacity_bytes: {16e9:.6e}  # not measured: a budget ceiling for simulated runs (the runs here use < 1 GB)
  bandwidth_bytes_per_s: {bw:.6e}  # {src['hbm']}
  fresh_alloc_threshold_bytes: {FRESH_ALLOC_THRESHOLD:.6e}  # glibc: buffers above its 32 MiB mmap threshold are mapped afresh on every allocation
  fresh_alloc_bytes_per_s: {ln['fresh']:.6e}  # {src['fresh']}
  fresh_free_bytes_per_s: {ln['fresh_free']:.6e}  # {src['free']}
links:
  host_to_device:
    bandwidth_bytes_per_s: {ln['h2d']:.6e}  # {src['h2d']}
    latency_s: {ln['h2d_lat']:.6e}  # {src['lat']}
  device_to_host:
    bandwidth_bytes_per_s: {ln['d2h']:.6e}  # {m}: PinnedHostBlock.from_device, 16 MiB)
    latency_s: {ln['h2d_lat']:.6e}  # taken equal to host->device's latency above
  copies_at_once: {copies}  # tiers.engine.MovementEngine's {workers} worker threads, {os.cpu_count()} cores
nvme:
  read_bytes_per_s: {ln['nvme_read']:.6e}  # {m}: tiers.link_probe.probe_bandwidths, 16 MiB, page cache warm)
  write_bytes_per_s: {ln['nvme_write']:.6e}  # {m}: NvmeBlock.write, 16 MiB)
  latency_s: {ln['nvme_lat']:.6e}  # {m}: NvmeBlock.read of 4 KiB)
compute:
  flops_per_s:
    bf16: {fl['bf16']:.6e}  # {m}: jitted 1024^3 matmul)
    fp32: {fl['fp32']:.6e}  # {m}: jitted 1024^3 matmul)
    int8: {fl['int8']:.6e}  # {m}: jitted 1024^3 matmul, int32 accumulation)
  block_overhead_s: {overhead:.6e}  # {src['ovh']}
  dequant_bytes_per_s:
    int8: {dq['int8']:.6e}  # {m}: int8 [1536, 1536] decode matmul, low-bit bytes / s)
    int4: {dq['int4']:.6e}  # {m}: int4/g64 [1536, 1536] decode matmul, low-bit bytes / s)
  copy_contention: {contention:.6e}  # {src['cont']}
  copy_beside_compute_s: {beside:.6e}  # {src['beside']}
  prefetch_beside_compute_s: {ahead:.6e}  # {src['ahead']}
host:
  dispatch_s_per_block: {blk['dispatch']:.6e}  # {src['disp']}
host_compute:  # the same {os.cpu_count()} cores and DRAM as the 'device' above: an op computed in place competes with the device's compute
  cores: {os.cpu_count()}  # os.cpu_count() here
  flops_per_s_per_core:
    fp32: {fl['fp32'] / os.cpu_count():.6e}  # compute.flops_per_s.fp32 above (measured here) over the {os.cpu_count()} cores
    bf16: {fl['bf16'] / os.cpu_count():.6e}  # compute.flops_per_s.bf16 above (measured here) over the {os.cpu_count()} cores
  dram_bandwidth_bytes_per_s: {bw:.6e}  # hbm.bandwidth_bytes_per_s above: the same DRAM
  op_overhead_s: {hc['op_overhead']:.6e}  # {m}: a {hc['k']}x{hc['k']} op through compute_on('device_host') took {hc['host_op'] * 1e6:.1f} us against {hc['device_op'] * 1e6:.1f} us on the device)
  activation_latency_s: {hc['activation_latency']:.6e}  # {m}: half a jitted program moving a [1, {hc['width']}] activation to pinned_host and back)
"""


if __name__ == "__main__":
    main()
