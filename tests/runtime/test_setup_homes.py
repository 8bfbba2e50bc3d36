"""Where a run's blocks rest off device: compressed homes take DRAM first, then lossless homes in pass order (those
of blocks without a compressed copy first), the rest on NVMe (compressed homes too); the policy loads a block in its
compressed home's state."""

import pytest

from vorch_jax.config import load_config
from vorch_jax.errors import RunError
from vorch_jax.placement import Placement
from vorch_jax.runtime.inputs import policy_context
from vorch_jax.runtime.setup import build_setup, lay_out_homes
from vorch_jax.policies.baselines import StaticPolicy
from vorch_jax.tiers.state import State

S1, S3, S4 = State.S1, State.S3, State.S4
RULES = ("placement=[{path: embed, state: S0, protect: true}, {path: final_norm, state: S0, protect: true}, "
         "{path: 'layers\\.[0-9]\\..*', home_format: int8}]")


def test_compressed_homes_take_dram_first_and_their_lossless_homes_last():
    order = ["a", "b", "c", "d"]
    placement = {b: Placement() for b in order}
    size = {b: 10 for b in order}
    # c and d keep 3-byte compressed homes: 6 bytes, then a and b (no compressed copy) in pass order, then c
    homes, where = lay_out_homes(order, order, placement, size, {"c": 3, "d": 3}, dram=27)
    assert homes == {"a": S3, "b": S3, "c": S4, "d": S4} and where == {"c": "host", "d": "host"}
    assert lay_out_homes(order, order, placement, size, {"c": 3, "d": 3}, dram=36)[0]["c"] == S3
    homes, where = lay_out_homes(order, order, placement, size, {"c": 3, "d": 3}, dram=5)
    assert where == {"c": "host", "d": "disk"} and homes == {b: S4 for b in order}  # what does not fit: NVMe


def test_blocks_computed_on_the_host_take_dram_before_anything_else():
    order = ["a", "b", "c", "d"]
    placement = {b: Placement(compute="host" if b == "d" else None) for b in order}
    homes, where = lay_out_homes(order, order, placement, {b: 10 for b in order}, {"c": 3}, dram=14)
    assert homes == {"a": S4, "b": S4, "c": S4, "d": S3} and where == {"c": "host"}  # d first, then c's 3 bytes
    with pytest.raises(RunError, match="dram_budget of 9 bytes cannot hold the 1 blocks of toy"):
        lay_out_homes(order, order, placement, {b: 10 for b in order}, {}, dram=9, model="toy")


def test_a_home_format_rule_makes_its_blocks_stream_compressed():
    cfg = load_config("configs/demo.yaml", ["policy=static", "lossy=true", "hbm_budget=0.3", RULES])
    setup = build_setup(cfg)
    assert set(setup.packed) == {b for b in setup.block_ids if b.startswith("layers.") and b.split(".")[1].isdigit()
                                 and len(b.split(".")[1]) == 1}
    assert set(setup.packed.values()) == {S1}
    assert setup.packed_bytes == sum(setup.state_bytes[b][S1] for b in setup.packed)
    policy = StaticPolicy(policy_context(cfg, setup, []))
    for b in setup.block_ids:
        want = S1 if b in setup.packed else State.S0
        assert policy.device_state(b) == want and policy.held_bytes(b) == setup.state_bytes[b][want]
    assert setup.with_compressed_homes({"layers.10.mlp": State.S2}).packed["layers.10.mlp"] == State.S2


def test_a_quality_budget_home_keeps_to_the_controllers_ladder():
    """A compressed home is where a block streams: never for protected or rule-fixed blocks, never below a rule's
    floor, and int8 at worst for a block the ψ guardrail holds."""
    from vorch_jax.runtime.inputs import with_quality_budget_homes

    rules = ("placement=[{path: embed, state: S0, protect: true}, {path: final_norm, state: S0, protect: true}, "
             "{path: 'layers\\.0\\.mlp', floor: S1}, {path: 'layers\\.1\\.mlp', floor: S0}, "
             "{path: 'layers\\.2\\.mlp', state: S1}]")
    cfg = load_config("configs/demo.yaml", ["policy=scored", "lossy=true", "guardrail.psi_threshold=0.5", rules])
    setup = build_setup(cfg)
    S2, S6 = State.S2, State.S6
    allowed = {b: (S1, S2) for b in setup.block_ids}
    allowed["layers.3.mlp"] = (S2, S6)  # the guardrail holds it (ψ below): nothing left to stream it in
    allowed["layers.4.mlp"] = (S2,)  # not held: int4
    psi = {b: 0.0 for b in setup.block_ids} | {"layers.3.mlp": 1.0, "layers.5.mlp": 0.9}
    homes = with_quality_budget_homes(cfg, setup, allowed, psi).packed
    assert "embed" not in homes and "final_norm" not in homes  # protected
    assert "layers.2.mlp" not in homes  # its state is fixed by a rule
    assert homes["layers.0.mlp"] == S1 and "layers.1.mlp" not in homes  # floors S1 and S0
    assert "layers.3.mlp" not in homes and homes["layers.4.mlp"] == S2 and homes["layers.5.mlp"] == S1
    assert all(s == S1 for b, s in homes.items() if b not in ("layers.4.mlp",))
    plain = load_config("configs/demo.yaml", ["policy=static", "lossy=true"])
    assert with_quality_budget_homes(plain, build_setup(plain), allowed, psi).packed == {}  # scored only
