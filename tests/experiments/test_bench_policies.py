"""bench_policies' verdict on scored: bytes against the tightest lower bound it has (the LP's, or the integral
problem's proven one where the LP's is missed), tok/s against static-prefetch's medians, the controller's share."""

import pytest

import experiments.bench_policies as bench


def _run(over_lp: float, ctrl_s: float = 0.001) -> dict:
    return {"moved_over_lower_bound": over_lp, "controller_s": ctrl_s, "wall_s": 1.0}


MEDIANS = {"scored": 10.0, "static-prefetch": 9.9}


def test_within_the_lp_bound_no_integral_problem_is_solved(monkeypatch):
    monkeypatch.setattr(bench, "integral_bound", lambda *a: pytest.fail("solved although the LP bound is met"))
    (line,) = bench.scored_verdict(0.5, [_run(1.02)], MEDIANS, base=object(), optimum_s=60)
    assert "1.020x the LP bound (ok)" in line and "1.010x static-prefetch's (ok)" in line and "0.10% (ok)" in line


def test_over_the_lp_bound_the_proven_integral_bound_judges(monkeypatch):
    monkeypatch.setattr(bench, "integral_bound", lambda *a: (1.19, "integral problem: ..."))
    line, note = bench.scored_verdict(0.3, [_run(1.20)], MEDIANS, base=object(), optimum_s=60)
    assert "1.200x the LP bound, 1.008x the integral problem's proven bound (ok)" in line
    assert note == "  integral problem: ..."
    monkeypatch.setattr(bench, "integral_bound", lambda *a: (1.10, "integral problem: ..."))
    line, _ = bench.scored_verdict(0.3, [_run(1.20)], MEDIANS, base=object(), optimum_s=60)
    assert "1.091x the integral problem's proven bound (over 1.03)" in line


def test_without_a_proven_bound_the_lp_bound_judges(monkeypatch):
    monkeypatch.setattr(bench, "integral_bound", lambda *a: (None, "integral bound: none proven"))
    line, _ = bench.scored_verdict(0.3, [_run(1.20, ctrl_s=0.02)], {"scored": 9.0, "static-prefetch": 10.0},
                                   base=object(), optimum_s=60)
    assert "1.200x the LP bound (over 1.03)" in line and "(below)" in line and "(over 1%)" in line
    (line,) = bench.scored_verdict(0.3, [_run(1.20)], MEDIANS, base=None, optimum_s=0)
    assert "1.200x the LP bound (over 1.03)" in line


def test_the_rounds_ratios_print_beside_the_medians_verdict():
    (line,) = bench.scored_verdict(0.5, [_run(1.02)], MEDIANS, base=None, optimum_s=0, paired=[1.02, 0.99, 1.04])
    assert "1.010x static-prefetch's (ok; by round 1.020 0.990 1.040)" in line


def test_two_lanes_share_is_the_busy_time_with_two_loads_under_way(tmp_path):
    import json

    recs = [  # loads at [0, 4) and [2, 6): busy 6 s, two at once 2 s; one before generation and one other link
        {"event": "transition", "link": "host->device", "t": 0.0, "dur_s": 4.0},
        {"event": "transition", "link": "host->device", "t": 2.0, "dur_s": 4.0},
        {"event": "transition", "link": "host->device", "t": -3.0, "dur_s": 10.0},
        {"event": "transition", "link": "device->host", "t": 1.0, "dur_s": 5.0},
        {"event": "access", "t": 1.0},
    ]
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs))
    assert bench.two_lanes_share(path) == pytest.approx(2 / 6)
    path.write_text("")
    assert bench.two_lanes_share(path) == 0.0


def test_a_bytes_weight_row_runs_scored_with_that_weight_and_gets_its_own_verdict():
    from vorch_jax.config import load_config

    assert bench.weighted_rows([0.0, 4.0, 0.5]) == ["scored", "scored b=4", "scored b=0.5"]
    base = load_config("configs/demo.yaml")
    cfg = bench.row_config(base, "scored b=4")
    assert cfg.policy == "scored" and cfg.score.bytes_weight == 4.0 and cfg.score.w1 == base.score.w1
    assert bench.row_config(base, "static-prefetch").policy == "static-prefetch"
    (line,) = bench.scored_verdict(0.5, [_run(1.02)], {**MEDIANS, "scored b=4": 9.0}, base=None, optimum_s=0,
                                   row="scored b=4")
    assert line.startswith("budget 0.5: scored b=4 bytes 1.020x") and "0.909x static-prefetch's (below)" in line
