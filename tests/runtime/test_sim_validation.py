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
15:03 UTC, 5 repeats, replayed: dense static 0.5 +6.8%, dense lru 0.5 +5.5%, moe lru 0.3 -5.9%). The record's rows:
median 9.5%, max 36.5%, 15 of 18 within 15% (out: dense static 0.3 +29.0%, moe scored 0.5 -21.2%, 0.8 -36.5%); the
record's own runs, split into even and odd rounds, disagree by a median 12.8% and up to 21.4% (the record of 14:17
UTC, `sim_validation-2026-11-29-1417.json`: 12.9% and 57.6%, dense static 0.5 ran 56 / 199 / 87 / 71 / 85 ms):
checking the rows the simulator misses would assert a known miss or the machine's noise. Scored rows are left out
for another reason too: the simulator charges the host the wall time of the real policy code it runs (eviction
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


def test_record_is_a_measurement_of_every_row(record):
    rows = {(r["model"], r["policy"], r["budget"]): r for r in record["rows"]}
    assert set(ROWS) <= set(rows)
    assert {m for m, _, _ in rows} == {"dense", "moe"} and {p for _, p, _ in rows} == {"static", "lru", "scored"}
    for r in rows.values():
        assert len(r["runs"]) == record["repeats"] >= 3 and all(0.005 < x < 2.0 for x in r["runs"])
    cal = record["calibration"]
    assert cal["h2d"] > 1e8 and 0 <= cal["h2d_lat"] < 0.05 and 0 < cal["dispatch"] < 0.05
    assert cal["hbm_bw"] > 1e8 and 0 <= cal["contention"] <= 2 and cal["transfers"] > 100
    assert 0 <= cal["beside"] < 0.01 and 0 <= cal["overhead"] < 0.001 and cal["link_points"] >= 15
    assert 0 <= cal["prefetch_beside"] < 0.01 and cal["prefetches"] > 100 and cal["fresh_free"] > 1e8
    n_layers = len(record["moe_routing"][0])
    assert len(record["moe_routing"]) >= record["tokens"] and n_layers == 30


@pytest.mark.parametrize("row", ROWS, ids=lambda r: "-".join(map(str, r)))
def test_replayed_decode_step_within_15_percent_of_measured(replay, row):
    r = replay["rows"][row]
    assert abs(r["rel_err"]) < 0.15, (row, r["simulated"], r["runs"], r["measured"])
