"""The simulator's timing against real runs on this machine, on a small subset of experiments/sim_validate.py.

The script is the validation (dense and MoE, static / lru / scored at three budgets, medians of repeats, targets 15%
per row and 7% median). This test keeps it from regressing: three rounds of the calibration runs and two rows (about
2.5 minutes), each row's simulated decode step within 35% of the median measured one. Medians of three because a
single lru run here now and then takes 2x its usual time (387 ms against 140-190 ms, once in a full-suite run:
its 113 MB embedding reload lands in fresh pages, which a busy machine slows); the bound is wide because runs on a
shared 2-core machine vary by up to ±25%. The model this test replaced was off by 62% on the lru row.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.sim_validate import table, validate  # noqa: E402

ROWS = [("dense", "lru", 0.5), ("dense", "static", 0.8)]


@pytest.fixture(scope="module")
def result():
    return validate(ROWS, repeats=3, tokens=6, say=lambda msg: None)


def test_calibration_is_physical(result):
    cal = result["calibration"]
    assert cal["h2d"] > 1e8 and 0 <= cal["h2d_lat"] < 0.05 and 0 < cal["dispatch"] < 0.05
    assert cal["hbm_bw"] > 1e8 and 0 <= cal["contention"] <= 2


@pytest.mark.parametrize("row", ROWS, ids=lambda r: "-".join(map(str, r)))
def test_simulated_decode_step_within_35_percent_of_measured(result, row):
    r = result["rows"][row]
    print(table(result))
    assert abs(r["rel_err"]) < 0.35, (row, r)
