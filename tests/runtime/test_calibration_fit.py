"""`calibrate_hardware.fit_from_runs` recovers the machine parameters from run traces built with known ones.

The validation's calibration (sim_validate.measure) fits the link, the host time per position and the memory
bandwidth from real runs' traces; here the traces are synthetic with those parameters set, so the fit must return
them exactly (the copy contention, a bisection through the simulator, is exercised by test_sim_validation.py,
whose replay refits it).
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments import calibrate_hardware as C  # noqa: E402
from vorch_jax.hardware import load_profile  # noqa: E402
from vorch_jax.model_shapes import model_shape  # noqa: E402

BW, LAT, HOST = 5e9, 8e-4, 1e-4  # bytes/s, s per transfer, host s per position


def trace(n_blocks: int, miss_every: int, sizes):
    """Access records of 3 decode steps over `n_blocks` positions, every `miss_every`-th a miss whose duration (the
    host's request to usable weights) holds the position's host time, the latency and the copy."""
    recs, t = [], 0.001
    for b, nbytes in enumerate(sizes):
        recs.append({"event": "transition", "block": f"b{b}", "link": "host->device", "bytes": nbytes})
    for step in range(1, 4):
        for b in range(n_blocks):
            miss = miss_every and b % miss_every == 0
            dur = HOST + LAT + sizes[b] / BW if miss else 1e-5
            recs.append({"event": "access", "t": t, "step": step, "block": f"b{b}", "hit": not miss, "dur_s": dur})
            t += dur if miss else HOST
    return recs


def test_fit_recovers_link_host_and_memory_parameters(monkeypatch):
    monkeypatch.setattr(C, "fit_contention", lambda cal, profile, tokens: 0.25)
    sizes = [(1 + b % 7) * 2**20 for b in range(40)]  # 1..7 MiB, under the fresh-allocation threshold
    runs = {("resident", 1.0): [({"decode_step_s": 0.030}, trace(40, 0, sizes))] * 2,
            ("static", 0.4): [({"decode_step_s": 0.080}, trace(40, 3, sizes))] * 3,
            ("static-prefetch", 0.4): [({"decode_step_s": 0.090}, trace(40, 0, sizes))]}
    shape = model_shape("smollm2-135m")
    cal = C.fit_from_runs(runs, shape, load_profile("this-machine"), 6, fresh_rates=[2e9, 1e9, 3e9])
    assert cal["h2d"] == pytest.approx(BW, rel=1e-6)
    assert cal["h2d_lat"] == pytest.approx(LAT, rel=1e-6)
    assert cal["dispatch"] == pytest.approx(HOST)
    streamed = sum(shape.bytes_read(b, op, 1, 17 + 5) for b, op in shape.pass_positions())
    assert cal["hbm_bw"] == pytest.approx(streamed / 0.030) and cal["resident_step_s"] == 0.030
    assert cal["fresh"] == 2e9 and cal["contention"] == 0.25
    assert cal["static_prefetch_step_s"] == 0.090 and cal["static_prefetch_budget"] == 0.4
    assert cal["transfers"] == 3 * 3 * 14  # 3 static runs x 3 steps x 14 misses (b = 0, 3, ..., 39)
    prof = C.apply_calibration(load_profile("this-machine"), cal)
    assert prof.host_to_device.bandwidth_bytes_per_s == cal["h2d"] and prof.dispatch_s_per_block == cal["dispatch"]
    assert prof.copy_contention == 0.25 and prof.fresh_alloc_bytes_per_s == 2e9
