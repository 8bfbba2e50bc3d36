"""Calibration on SmolLM2's real weights, on a few late blocks and 16 tokens (one shared run, ~30 s CPU):
identity swap is exactly 0, lossy swaps cost KL in the order the formats' errors predict, the gradient estimate ranks
blocks like the measurement, and the orbax cache round-trips, refuses a mismatched model and is reused."""

import dataclasses
import math

import numpy as np
import pytest

from vorch_jax.controller import calibrate as K

BLOCKS = ["layers.20.attn", "layers.20.mlp", "layers.26.attn", "layers.26.mlp", "final_norm"]
TOKENS = 16
STATES = ("S0", "S1", "S2", "S6")


@pytest.fixture(scope="module")
def cal(smollm2_source):
    return K.calibrate(smollm2_source, tokens=TOKENS, states=STATES, blocks=BLOCKS, grad_chunks=4)


def test_identity_swap_is_zero_and_lossy_swaps_cost_kl(cal):
    for b in BLOCKS:
        assert cal.kl[b]["S0"] == 0.0 and cal.grad_estimate[b]["S0"] == 0.0, b
    for b in BLOCKS[:-1]:
        for s in ("S1", "S2", "S6"):
            assert cal.kl[b][s] > 0 and cal.grad_estimate[b][s] > 0, (b, s)
    # final_norm has only a 1-D leaf: every state holds it exactly
    assert all(cal.kl["final_norm"][s] == 0.0 for s in STATES)
    assert cal.psi == {b: cal.kl[b]["S2"] for b in BLOCKS}


def test_kl_grows_from_int8_to_int4_to_low_rank(cal):
    mean = {s: np.mean([cal.kl[b][s] for b in BLOCKS[:-1]]) for s in ("S1", "S2", "S6")}
    assert mean["S6"] > mean["S2"] > mean["S1"] > 0, mean


def test_gradient_estimate_ranks_like_the_measurement(cal):
    # Reached on these 4 lossy blocks x 3 states (2026-12-01, this CPU): S1 0.6, S2 1.0, S6 0.8, all 0.979. With
    # 4 blocks a state's correlation moves in steps of 0.2; an estimate unrelated to the KL scores about 0 on all 12.
    assert cal.spearman["all"] >= 0.9, cal.spearman
    assert cal.spearman["S2"] >= 0.8, cal.spearman  # ψ's state: the ranking the guardrail acts on
    assert set(cal.spearman) == {"S1", "S2", "S6", "all"}  # S0, the control, is not ranked


def test_lossy_loss_and_delta_feed_the_controller(cal):
    from vorch_jax.controller.state_update import TickParams
    from vorch_jax.tiers.state import State

    assert set(cal.lossy_loss) == {"S1", "S2", "S6"}
    assert all(0 <= v < 1 for v in cal.lossy_loss.values())
    assert cal.lossy_loss["S1"] < cal.lossy_loss["S2"] <= cal.lossy_loss["S6"]
    TickParams(lossy_loss=cal.tick_lossy_loss())  # validates: lossy states, 0 <= loss < 1
    assert set(cal.delta) == {"embed", "attn", "mlp"}
    assert all(set(d) == {State.S1, State.S2, State.S6} for d in cal.policy_delta().values())
    assert cal.bandwidths["host->device"] > 0 and cal.bandwidths["nvme->host"] > 0


def test_spearman_matches_known_values():
    assert K.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert K.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties take their average rank: ranks x = [1, 2.5, 2.5, 4], y = [1, 2, 3, 4] -> 0.9486832980505138 (scipy)
    assert K.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)
    assert math.isnan(K.spearman([1, 1, 1], [1, 2, 3]))


def test_save_load_round_trip(cal, smollm2_source, tmp_path):
    K.save_calibration(cal, tmp_path)
    back = K.load_calibration(tmp_path, cal.model_key, cal.machine_key, source=smollm2_source)
    assert dataclasses.asdict(back) == dataclasses.asdict(cal)
    assert K.load_calibration(tmp_path, "other-model", cal.machine_key) is None


def _renamed(cal, old, new):
    ren = lambda d: {(new if k == old else k): v for k, v in d.items()}  # noqa: E731
    return dataclasses.replace(cal, psi=ren(cal.psi), kl=ren(cal.kl), grad_estimate=ren(cal.grad_estimate),
                               block_shapes=ren(cal.block_shapes))


def test_mismatched_block_id_is_named(cal, smollm2_source, tmp_path):
    K.save_calibration(_renamed(cal, "layers.26.mlp", "layers.99.mlp"), tmp_path)
    with pytest.raises(K.CalibrationMismatchError, match=r"layers\.99\.mlp"):
        K.load_calibration(tmp_path, cal.model_key, cal.machine_key, source=smollm2_source)


def test_mismatched_shape_is_named(cal, smollm2_source, tmp_path):
    shapes = {b: dict(v) for b, v in cal.block_shapes.items()}
    shapes["layers.20.mlp"]["w_up"] = [576, 1537]
    K.save_calibration(dataclasses.replace(cal, block_shapes=shapes), tmp_path)
    with pytest.raises(K.CalibrationMismatchError, match=r"layers\.20\.mlp.*w_up.*1537"):
        K.load_or_calibrate(smollm2_source, tmp_path, tokens=TOKENS, blocks=BLOCKS)


def _no_calibrate(*a, **k):
    raise AssertionError("calibrate() ran although a stored calibration covers the request")


def test_load_or_calibrate_reuses_the_stored_result(cal, smollm2_source, tmp_path, monkeypatch):
    K.save_calibration(cal, tmp_path)
    monkeypatch.setattr(K, "calibrate", _no_calibrate)
    got = K.load_or_calibrate(smollm2_source, tmp_path, tokens=TOKENS, blocks=BLOCKS[:2], states=("S1", "S2"))
    assert got.reused and got.kl == cal.kl
    with pytest.raises(AssertionError, match="calibrate\\(\\) ran"):  # a request it does not cover recomputes
        K.load_or_calibrate(smollm2_source, tmp_path, tokens=TOKENS + 1, blocks=BLOCKS)


def test_cli_second_invocation_reuses(cal, smollm2_source, tmp_path, monkeypatch, capsys):
    from vorch_jax.cli import main
    from vorch_jax.models import gguf_source

    K.save_calibration(cal, tmp_path)
    monkeypatch.setattr(K, "calibrate", _no_calibrate)
    monkeypatch.setattr(gguf_source, "load_smollm2_source", lambda: smollm2_source)  # the session's open file
    rc = main(["calibrate", "--tokens", str(TOKENS), "--blocks", r"^layers\.2[06]\.", "--dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "reused the stored calibration" in err
    assert "layers.26.mlp" in out and "spearman" in out
    assert main(["calibrate", "--blocks", "nothing-matches", "--dir", str(tmp_path)]) == 2


def test_cache_dir_from_env(monkeypatch, tmp_path):
    from vorch_jax.models.user_cache import cache_root

    monkeypatch.setenv("VORCH_CACHE", str(tmp_path))
    assert cache_root(None, "calibration") == tmp_path / "calibration"
    assert cache_root(tmp_path / "x", "calibration") == tmp_path / "x"
