"""`calibrate_hardware.fit_from_runs` recovers the machine parameters from traces and probes built with known ones.

The validation's calibration (sim_validate.measure) takes the host time per position, a copy's extra time beside
compute and the memory bandwidth from real runs' traces, and the link alone from probe loads; here traces and probe
points are synthetic with those parameters set, so the fit must return them exactly. The simulator-fitted
parameters (per-block overhead, copy contention: bisections through the simulator, `fit_with_simulator`) are
stubbed here and exercised by test_sim_validation.py, whose replay refits them.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments import calibrate_hardware as C  # noqa: E402
from vorch_jax.simulation.hardware import load_profile  # noqa: E402
from vorch_jax.models.registry import get as get_spec  # noqa: E402

BW, LAT, HOST, BESIDE = 5e9, 2e-4, 4e-5, 7e-4  # bytes/s, s per load alone, host s per position, s beside compute
AHEAD = 1.1e-3  # s a prefetch takes beyond the load alone (compute beside it throughout)


def trace(n_blocks: int, miss_every: int, sizes):
    """Access records of 3 decode steps over `n_blocks` positions, every `miss_every`-th a miss whose duration (the
    host's request to usable weights) holds the position's host time, the load alone and the wait beside compute."""
    recs, t = [], 0.001
    for b, nbytes in enumerate(sizes):
        recs.append({"event": "transition", "block": f"b{b}", "link": "host->device", "bytes": nbytes})
    for step in range(1, 4):
        for b in range(n_blocks):
            miss = miss_every and b % miss_every == 0
            dur = HOST + LAT + sizes[b] / BW + BESIDE if miss else 1e-5
            recs.append({"event": "access", "t": t, "step": step, "block": f"b{b}", "hit": not miss, "dur_s": dur})
            t += dur if miss else HOST
    return recs


def test_fit_recovers_link_host_beside_and_memory_parameters(monkeypatch):
    monkeypatch.setattr(C, "fit_contention", lambda cal, profile, tokens: 0.25)
    sizes = [(1 + b % 7) * 2**20 for b in range(40)]  # 1..7 MiB, under the fresh-allocation threshold
    probe = [(mib * 2**20, LAT + mib * 2**20 / BW) for mib in C.LINK_PROBE_MIB] * 2
    prefetches = [{"event": "transition", "block": f"b{b}", "link": "host->device", "bytes": n, "reason": "prefetch",
                   "t": 0.01 + b, "dur_s": LAT + n / BW + AHEAD} for b, n in enumerate(sizes)]
    runs = {("resident", 1.0): [({"decode_step_s": 0.030}, trace(40, 0, sizes))] * 2,
            ("static", 0.4): [({"decode_step_s": 0.080}, trace(40, 3, sizes))] * 3,
            ("static-prefetch", 0.4): [({"decode_step_s": 0.090}, trace(40, 0, sizes) + prefetches)]}
    shape = get_spec("smollm2-135m")
    prof = load_profile("this-machine")
    cal = C.fit_from_runs(runs, shape, prof, 6, fresh_rates=[2e9, 1e9, 3e9], link_points=probe,
                          free_rates=[3e10, 1e10, 2e10])
    assert cal["h2d"] == pytest.approx(BW, rel=1e-6) and cal["h2d_lat"] == pytest.approx(LAT, rel=1e-6)
    assert cal["dispatch"] == pytest.approx(HOST) and cal["beside"] == pytest.approx(BESIDE, rel=1e-6)
    streamed = sum(shape.cost(p, 1, 17 + 5, shape.device_bytes(p.block), 4)[1] for p in shape.skeleton())
    assert cal["hbm_bw"] == pytest.approx(streamed / 0.030) and cal["overhead"] == 0.0  # no MoE point: folded in
    assert cal["fresh"] == 2e9 and cal["fresh_free"] == 2e10 and cal["fresh_frees"] == 0  # probes: no evictions
    assert cal["contention"] == 0.25 and cal["static_step_s"] == 0.080
    assert cal["static_prefetch_step_s"] == 0.090 and cal["static_prefetch_budget"] == 0.4
    assert cal["transfers"] == 3 * 3 * 14  # 3 static runs x 3 steps x 14 misses (b = 0, 3, ..., 39)
    assert cal["prefetch_beside"] == pytest.approx(AHEAD, rel=1e-6) and cal["prefetches"] == 40
    p = C.apply_calibration(prof, cal)
    assert p.host_to_device.bandwidth_bytes_per_s == cal["h2d"] and p.dispatch_s_per_block == cal["dispatch"]
    assert p.copy_contention == 0.25 and p.fresh_alloc_bytes_per_s == 2e9 and p.copy_beside_compute_s == cal["beside"]
    assert p.fresh_free_bytes_per_s == 2e10 and p.prefetch_beside_compute_s == cal["prefetch_beside"]


def test_beside_is_the_mean_excess_and_big_evictions_give_the_free_rate(monkeypatch):
    """The simulator charges the wait beside compute to every copy, so the fit takes the mean excess (a long tail
    counts); the runs' own evictions of blocks above the threshold give the free rate before any probe."""
    monkeypatch.setattr(C, "fit_contention", lambda cal, profile, tokens: 0.0)
    sizes = [2**20] * 40
    static = trace(40, 3, sizes)
    misses = [r for r in static if r["event"] == "access" and not r["hit"]]
    misses[0]["dur_s"] += 0.010  # one slow miss of 42: the median ignores it, the total does not
    big = 113 * 2**20
    drops = [{"event": "transition", "block": "embed", "link": "host->device", "bytes": big, "dur_s": 0.05},
             {"event": "transition", "block": "embed", "link": None, "bytes": 0, "reason": "evict:miss",
              "dur_s": big / 1.5e10},
             {"event": "transition", "block": "embed", "link": None, "bytes": 0, "reason": "evict:miss",
              "dur_s": big / 1.3e10},
             {"event": "transition", "block": "embed", "link": None, "bytes": 0, "reason": "evict:miss",
              "dur_s": big / 1.1e10}]
    runs = {("resident", 1.0): [({"decode_step_s": 0.03}, trace(40, 0, sizes))],
            ("static", 0.4): [({"decode_step_s": 0.08}, static)],
            ("static-prefetch", 0.4): [({"decode_step_s": 0.09}, drops)]}
    probe = [(b, LAT + b / BW) for b in (2**20, 2**22)]
    cal = C.fit_from_runs(runs, get_spec("smollm2-135m"), load_profile("this-machine"), 6, link_points=probe,
                          free_rates=[9e9])
    assert cal["beside"] == pytest.approx(BESIDE + 0.010 / len(misses), rel=1e-6)
    assert cal["beside_median"] == pytest.approx(BESIDE, rel=1e-6)
    assert "prefetch_beside" not in cal  # no prefetch in these traces: the profile's value stands
    assert cal["fresh_free"] == pytest.approx(1.3e10) and cal["fresh_frees"] == 3


def test_moe_resident_point_splits_overhead_from_bandwidth(monkeypatch):
    """With a second resident point of more positions per byte, the overhead is what the (here: linear) simulated
    MoE step needs, and the bandwidth keeps the dense resident step."""
    monkeypatch.setattr(C, "fit_contention", lambda cal, profile, tokens: 0.0)
    shape = get_spec("smollm2-135m")
    n = len(shape.skeleton())
    streamed = sum(shape.cost(p, 1, 17 + 5, shape.device_bytes(p.block), 4)[1] for p in shape.skeleton())
    true_o, true_bw = 5e-5, 2e10
    dense = n * true_o + streamed / true_bw

    def sim_moe(profile):  # 2 n positions over half the bytes
        return 2 * n * profile.block_overhead_s + streamed / 2 / profile.hbm_bandwidth_bytes_per_s

    runs = {("resident", 1.0): [({"decode_step_s": dense}, trace(40, 0, [2**20] * 40))],
            ("static", 0.4): [({"decode_step_s": 0.08}, trace(40, 3, [2**20] * 40))],
            ("static-prefetch", 0.4): [({"decode_step_s": 0.09}, [])]}
    probe = [(b, LAT + b / BW) for b in (2**20, 2**22)]
    cal = C.fit_from_runs(runs, shape, load_profile("this-machine"), 6, link_points=probe,
                          moe_resident=([2 * n * true_o + streamed / 2 / true_bw], sim_moe))
    assert cal["overhead"] == pytest.approx(true_o, rel=1e-2)  # 12 bisection steps
    assert cal["hbm_bw"] == pytest.approx(true_bw, rel=1e-3)


def test_fresh_allocation_rate_comes_from_the_runs_own_large_loads(monkeypatch):
    """Each run places the embedding (above the fresh-allocation threshold) once: those loads give the rate; the
    probe rates are the fallback only."""
    monkeypatch.setattr(C, "fit_contention", lambda cal, profile, tokens: 0.0)
    sizes = [2**20] * 40
    big = 113 * 2**20

    def placed(seconds):
        return trace(40, 0, sizes) + [{"event": "transition", "block": "embed", "link": "host->device",
                                       "bytes": big, "dur_s": seconds, "t": 0.0}]

    runs = {("resident", 1.0): [({"decode_step_s": 0.03}, placed(0.05)), ({"decode_step_s": 0.03}, placed(0.07))],
            ("static", 0.4): [({"decode_step_s": 0.08}, trace(40, 3, sizes) + placed(0.06)[-1:])],
            ("static-prefetch", 0.4): [({"decode_step_s": 0.09}, [])]}
    cal = C.fit_from_runs(runs, get_spec("smollm2-135m"), load_profile("this-machine"), 6,
                          fresh_rates=[9e9, 9e9], link_points=[(2**20, 3e-4), (2**22, 6e-4)])
    assert cal["fresh"] == pytest.approx(big / 0.06) and cal["fresh_loads"] == 3
