"""The simulator's timing against real runs measured on this machine: a replay of a recorded validation.

`experiments/sim_validate.py` is the validation (real runs of SmolLM2 dense and MoE, static / lru / scored at three
budgets, medians of repeats, targets 15% per row and 7% median); it prints measured against simulated. Its
`--save` record (`experiments/results/sim_validation.json`: every row's measured decode steps, the calibration
fitted from the calibration runs beside them, the MoE routing and speculation the real runs read) is replayed here
through today's simulator (`sim_validate.simulate_rows`, overhead and contention refitted): a change to the time
model, the ledger or the policies that moves the simulated step away from what was measured fails this test.

No real run is timed here: timing real runs on a shared CI machine measured its load (CI once ran the dense lru row
at 203 / 281 / 198 ms where this machine ran 163 / 163 / 157), not the simulator. The live comparison is the
script's, and its numbers are in the record and the issue's notes.

The rows checked are three the record's simulation meets the 15% target on with room (record of 2026-11-29
15:03 UTC, 5 repeats, replayed: dense static 0.5 +6.8%, dense lru 0.5 +5.5%, moe lru 0.3 -5.9%; replayed on
2026-12-07 with host time as CPU time: +10.4%, +7.2%, -9.2%, and +10.7%, +7.3%, -4.1% beside two busy loops, where
wall time gave +13.0%, +9.0%, +8.5%, and CI, beside the other test worker, +22.5% for the MoE row). The record's rows:
median 9.5%, max 36.5%, 15 of 18 within 15% (out: dense static 0.3 +29.0%, moe scored 0.5 -21.2%, 0.8 -36.5%); the
record's own runs, split into even and odd rounds, disagree by a median 12.8% and up to 21.4% (the record of 14:17
UTC, `sim_validation-2026-11-29-1417.json`: 12.9% and 57.6%, dense static 0.5 ran 56 / 199 / 87 / 71 / 85 ms):
checking the rows the simulator misses would assert a known miss or the machine's noise. Scored rows are left out
for another reason too: the simulator charges the host the CPU time of the real policy code it runs (eviction
order, ticks), and that moves a scored replay by up to 20% (dense scored 0.3 of the 15:03 record: 133.1 ms when
measured, 164.4 ms in the replay; MoE scored 0.3 of the 12:08 record: 58.4 and 51.8 ms in two replays).
"""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from experiments.sim_validate import simulate_rows  # noqa: E402

RECORD = ROOT / "experiments" / "results" / "sim_validation.json"
ROWS = [("dense", "static", 0.5), ("dense", "lru", 0.5), ("moe", "lru", 0.3)]


@pytest.fixture(scope="module")
def record():
    return json.loads(RECORD.read_text())


@pytest.fixture(scope="module")
def replay(record):
    subset = {**record, "rows": [r for r in record["rows"] if (r["model"], r["policy"], r["budget"]) in ROWS]}
    return simulate_rows(subset)


def test_a_broken_cost_model_misses_the_measurement(record):
    """The check below can fail: replayed with the record's own fit (no refit, a few seconds), the dense lru row, which
    streams most of the model every step, lands within 15% (+7.0% on 2026-12-01); with the host->device rate halved
    (a cost model that prices a copy twice too high) it lands outside (+28.4%)."""
    row = ("dense", "lru", 0.5)
    one = {**record, "rows": [r for r in record["rows"] if (r["model"], r["policy"], r["budget"]) == row]}
    broken = {**one, "calibration": {**record["calibration"], "h2d": record["calibration"]["h2d"] / 2}}
    ok, bad = (simulate_rows(rec, refit=False)["rows"][row] for rec in (one, broken))
    assert abs(ok["rel_err"]) < 0.15 < bad["rel_err"], (ok["simulated"], bad["simulated"], ok["measured"])


@pytest.mark.parametrize("row", ROWS, ids=lambda r: "-".join(map(str, r)))
def test_replayed_decode_step_within_15_percent_of_measured(replay, row):
    r = replay["rows"][row]
    assert abs(r["rel_err"]) < 0.15, (row, r["simulated"], r["runs"], r["measured"])
