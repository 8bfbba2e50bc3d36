"""The quality budget's allocation of lossy states (vorch_jax.controller.quality_budget), on small hand-made cases."""

import pytest

from vorch_jax.controller.quality_budget import allocate, forced_lossy_kl
from vorch_jax.tiers.state import State

S0, S1, S2, S6 = State.S0, State.S1, State.S2, State.S6


def _bytes(s0):
    return {S0: s0, S1: s0 // 4, S2: s0 // 8, S6: s0 // 16}


def test_cheapest_nats_per_byte_first_and_the_bound_holds():
    kl = {"a": {"S1": 0.001, "S2": 0.01, "S6": 5.0},   # a's int4 is cheap for its bytes
          "b": {"S1": 0.001, "S2": 0.05, "S6": 5.0},
          "c": {"S1": 0.0, "S2": 0.0, "S6": 0.0}}      # a 1-D block: nothing to save, never allowed
    sizes = {"a": _bytes(800), "b": _bytes(800), "c": {S0: 8, S1: 8, S2: 8, S6: 8}}
    got = allocate(kl, sizes, max_kl=0.03, share=0.5)  # a budget of 0.015 nats
    assert got.states["a"] == (S1, S2) and got.states["b"] == (S1,) and got.states["c"] == ()
    assert got.bound_kl == pytest.approx(0.011) and got.bound_kl <= 0.015
    assert got.bytes_saved == (800 - 100) + (800 - 200)


def test_a_state_costing_more_than_the_budget_is_never_allowed():
    kl = {"mlp": {"S1": 0.0001, "S2": 0.002, "S6": 0.9}}
    got = allocate(kl, {"mlp": _bytes(1000)}, max_kl=1.0, share=0.5)
    assert S6 not in got.states["mlp"] and got.states["mlp"] == (S1, S2)
    assert allocate(kl, {"mlp": _bytes(1000)}, max_kl=2.0, share=0.5).states["mlp"] == (S1, S2, S6)


def test_unmeasured_blocks_stay_lossless_and_forced_states_are_counted():
    got = allocate({"a": {"S1": 0.001}}, {"a": _bytes(10), "b": _bytes(10)}, max_kl=1.0, blocks=["a", "b"])
    assert got.states == {"a": (S1,), "b": ()}
    assert forced_lossy_kl({"a": {"S2": 0.25}, "b": {"S1": 0.5}}, {"a": S2, "b": S0}) == 0.25
