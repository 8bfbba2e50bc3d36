"""Placement rules as data: an ordered list of `PlacementRule`, first full match on the block id wins.

In the style of qwix's quantization rules and big_vision's sharding rules (STYLE.md section 1): the config holds a
list of frozen rules, this module resolves them against the model's block ids, and a rule that never applies is an
error the user sees, not a silent no-op::

    rules = (PlacementRule(path="embed|final_norm", state="S0", protect=True),
             PlacementRule(path=r"layers\\.\\d+\\.mlp", state="S3"))
    plan = resolve_placement(rules, ["embed", "layers.0.attn", "layers.0.mlp", "final_norm"])
    plan["layers.0.mlp"].state  # "S3"; plan["layers.0.attn"] is the default Placement()

A rule "never applies" when no block id matches it, or when every block it matches was already taken by an earlier
rule (it is shadowed). Both are reported, with the rule's index and pattern.

States stay strings ("S0".."S6") here; the `State` enum lives in tiers/ and this module imports neither it nor jax.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from vorch_jax.config import ConfigError, PlacementRule

__all__ = ["Placement", "resolve_placement", "unused_rules", "describe_unused"]


@dataclass(frozen=True)
class Placement:
    """What the rules say about one block. None means "not constrained": the policy decides.

    `rule` is the index of the rule that set it (None for the default), so a plan can explain itself.
    """

    state: str | None = None
    protect: bool = False
    floor: str | None = None
    kappa: float | None = None
    rule: int | None = None
    home_format: str | None = None
    compute: str | None = None  # "host" | "device": where the block's op runs (None: the run's in_place decides)


def _placement(rule: PlacementRule, index: int) -> Placement:
    return Placement(state=rule.state or None, protect=rule.protect, floor=rule.floor or None, kappa=rule.kappa,
                     rule=index, home_format=rule.home_format or None, compute=rule.compute or None)


def _first_matches(rules: Sequence[PlacementRule], block_ids: Iterable[str]) -> tuple[dict[str, int | None], list[int]]:
    """For each block, the index of the first rule that fully matches it (or None); and per rule, how many
    blocks it matches at all (shadowed or not)."""
    patterns = [re.compile(rule.path) for rule in rules]
    winner: dict[str, int | None] = {}
    matched = [0] * len(rules)
    for block_id in block_ids:
        winner[block_id] = None
        for i, pattern in enumerate(patterns):
            if pattern.fullmatch(block_id):
                matched[i] += 1
                if winner[block_id] is None:
                    winner[block_id] = i
    return winner, matched


def unused_rules(rules: Sequence[PlacementRule], block_ids: Iterable[str]) -> list[tuple[int, PlacementRule]]:
    """The rules that decide no block, as ``(index, rule)`` pairs in rule order: they match no block id, or only
    blocks an earlier rule already took."""
    winner, _matched = _first_matches(rules, block_ids)
    used = {i for i in winner.values() if i is not None}
    return [(i, rule) for i, rule in enumerate(rules) if i not in used]


def describe_unused(rules: Sequence[PlacementRule], block_ids: Iterable[str]) -> list[str]:
    """One line per unused rule, saying whether it matches nothing or is shadowed (and by which rules)."""
    block_ids = list(block_ids)
    winner, matched = _first_matches(rules, block_ids)
    used = {i for i in winner.values() if i is not None}
    lines = []
    for i, rule in enumerate(rules):
        if i in used:
            continue
        if matched[i] == 0:
            sample = ", ".join(block_ids[:4]) + (", ..." if len(block_ids) > 4 else "")
            lines.append(f"placement[{i}] (path {rule.path!r}) matches no block (block ids look like: {sample})")
        else:
            pattern = re.compile(rule.path)
            earlier = sorted({winner[b] for b in block_ids if pattern.fullmatch(b)})
            by = ", ".join(f"placement[{j}] ({rules[j].path!r})" for j in earlier)
            lines.append(f"placement[{i}] (path {rule.path!r}) is shadowed: every block it matches is taken by {by}")
    return lines


def resolve_placement(rules: Sequence[PlacementRule], block_ids: Iterable[str]) -> dict[str, Placement]:
    """Map every block id to its Placement: the first rule whose `path` fully matches it, else `Placement()`.

    Raises ConfigError (one line) when a rule decides no block, naming the first such rule's index and pattern.
    Keys keep the order of `block_ids`.
    """
    rules = tuple(rules)
    block_ids = list(block_ids)
    problems = describe_unused(rules, block_ids)
    if problems:
        more = f" (and {len(problems) - 1} more unused rule(s))" if len(problems) > 1 else ""
        raise ConfigError(problems[0] + more, key="placement")
    winner, _matched = _first_matches(rules, block_ids)
    return {b: Placement() if i is None else _placement(rules[i], i) for b, i in winner.items()}
