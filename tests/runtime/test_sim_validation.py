"""The simulator's timing against real runs on this machine, on a small subset of experiments/sim_validate.py.

The script is the validation (dense and MoE, static / lru / scored at three budgets, medians of repeats, targets 15%
per row and 7% median). This test keeps it from regressing: three rounds of the calibration runs and two rows (about
2.5 minutes), each row's simulated decode step within 35% of the fastest of its three measured runs.

The fastest, not the median (the script's figure), because on a busy machine most runs of a row can be disturbed:
CI on a clean 2-core clone measured the lru row at 146, 297 and 253 ms against 158 ms simulated (the median missed
by 37.5%, the fastest is 8% off), and a full-suite run here once took 387 ms against 140-190 ms usually. The lru
row reloads the 113 MB embedding every step and that copy lands in freshly mapped pages, whose cost a loaded
machine multiplies. The fastest run is the one least disturbed, which is what the calibrated profile describes.
The bound is wide because undisturbed runs on a shared 2-core machine still vary by up to +-25%. The model this
test replaced was off by 62% on the lru row.
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
def test_simulated_decode_step_within_35_percent_of_fastest_measured(result, row):
    r = result["rows"][row]
    print(table(result))
    fastest = min(r["runs"])
    assert abs(r["simulated"] - fastest) / fastest < 0.35, (row, r)
