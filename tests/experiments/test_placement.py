"""Tests for vorch_jax.placement: first match wins, unmatched and shadowed rules are reported."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from vorch_jax.config import ConfigError, PlacementRule, load_config
from vorch_jax.placement import Placement, describe_unused, resolve_placement, unused_rules

BLOCKS = ["embed"] + [f"layers.{i}.{kind}" for i in range(4) for kind in ("attn", "mlp")] + ["final_norm"]
MOE_BLOCKS = ["embed", "layers.0.attn"] + [f"layers.0.expert.{e}" for e in range(4)] + ["final_norm"]


def test_first_match_wins():
    rules = (
        PlacementRule(path=r"layers\.0\.mlp", state="S0", protect=True),
        PlacementRule(path=r"layers\.\d+\.mlp", state="S3", floor="S3"),
        PlacementRule(path=r".*", state="S4", kappa=0.25),
    )
    plan = resolve_placement(rules, BLOCKS)
    assert plan["layers.0.mlp"] == Placement(state="S0", protect=True, rule=0)
    assert plan["layers.3.mlp"] == Placement(state="S3", floor="S3", rule=1)
    assert plan["layers.2.attn"] == Placement(state="S4", kappa=0.25, rule=2)
    assert plan["embed"].state == "S4"
    assert list(plan) == BLOCKS  # keys keep block order


def test_blocks_without_a_rule_get_the_default():
    plan = resolve_placement([PlacementRule(path="embed", state="S0")], BLOCKS)
    default = Placement(state=None, protect=False, floor=None, kappa=None)
    assert plan["final_norm"] == default
    assert plan["layers.1.attn"] == default
    assert sum(p != default for p in plan.values()) == 1


def test_fullmatch_not_search():
    # 'layers.1.attn' must not catch 'layers.11.attn' nor 'layers.1.attn_extra'.
    blocks = ["layers.1.attn", "layers.11.attn"]
    plan = resolve_placement([PlacementRule(path=r"layers\.1\.attn", state="S3"),
                              PlacementRule(path=r"layers\.\d+\.attn")], blocks)
    assert plan["layers.1.attn"].state == "S3"
    assert plan["layers.11.attn"] == Placement(rule=1)


def test_empty_state_means_policy_decides():
    plan = resolve_placement([PlacementRule(path="embed", protect=True)], BLOCKS)
    assert plan["embed"] == Placement(state=None, protect=True, rule=0)


def test_unmatched_rule_raises_naming_index_and_pattern():
    rules = [PlacementRule(path="embed", state="S0"), PlacementRule(path=r"layers\.\d+\.expert\.\d+", state="S3")]
    with pytest.raises(ConfigError) as info:
        resolve_placement(rules, BLOCKS)
    message = str(info.value)
    assert "placement[1]" in message and r"layers\\.\\d+\\.expert\\.\\d+" in message and "matches no block" in message
    assert "\n" not in message
    assert unused_rules(rules, BLOCKS) == [(1, rules[1])]
    # The same rule is used on the MoE variant.
    assert unused_rules(rules, MOE_BLOCKS) == []
    assert resolve_placement(rules, MOE_BLOCKS)["layers.0.expert.2"].state == "S3"


def test_shadowed_rule_is_unused_and_names_its_shadow():
    rules = [PlacementRule(path=r"layers\.\d+\.mlp", state="S3"), PlacementRule(path=r"layers\.2\.mlp", state="S0")]
    assert unused_rules(rules, BLOCKS) == [(1, rules[1])]
    (line,) = describe_unused(rules, BLOCKS)
    assert "placement[1]" in line and "shadowed" in line and "placement[0]" in line
    with pytest.raises(ConfigError, match=r"placement\[1\].*shadowed"):
        resolve_placement(rules, BLOCKS)


def test_several_unused_rules_are_counted():
    rules = [PlacementRule(path="nope"), PlacementRule(path="embed"), PlacementRule(path="nada")]
    assert [i for i, _ in unused_rules(rules, BLOCKS)] == [0, 2]
    with pytest.raises(ConfigError, match=r"placement\[0\].*1 more unused"):
        resolve_placement(rules, BLOCKS)


def test_no_rules_and_no_blocks():
    assert resolve_placement([], BLOCKS) == {b: Placement() for b in BLOCKS}
    assert resolve_placement([], []) == {}
    assert unused_rules([PlacementRule(path="embed")], []) == [(0, PlacementRule(path="embed"))]


def test_shipped_demo_rules_resolve_on_smollm2_block_ids():
    demo = load_config(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml")
    smollm2 = ["embed"] + [f"layers.{i}.{k}" for i in range(30) for k in ("attn", "mlp")] + ["final_norm"]
    plan = resolve_placement(demo.placement, smollm2)
    assert plan["embed"] == Placement(state="S0", protect=True, rule=0)
    assert plan["final_norm"] == Placement(state="S0", protect=True, rule=1)
    assert all(plan[b] == Placement() for b in smollm2[1:-1])


def test_placement_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Placement().state = "S0"  # type: ignore[misc]


def test_config_and_placement_do_not_import_jax():
    code = ("import sys, vorch_jax.config, vorch_jax.placement; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'numpy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
