"""Tests for vorch_jax.config: shipped configs load, bad inputs fail with one clear line, budgets, overrides."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import yaml

from vorch_jax import config as C
from vorch_jax.config import (
    ConfigError,
    PlacementRule,
    RunConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
)
from vorch_jax.config_fields import parse_budget

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
# Sub-folders with their own schema (sweep grids, hardware profiles) belong to their owners' tests.
OTHER_SCHEMAS = ("sweeps", "hardware", "moe")


def _run_configs() -> list[Path]:
    files = sorted(CONFIGS.rglob("*.yaml")) + sorted(CONFIGS.rglob("*.yml"))
    return [f for f in files if f.relative_to(CONFIGS).parts[0] not in OTHER_SCHEMAS]


def _write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------------ shipped files


def test_shipped_configs_exist():
    names = {f.name for f in _run_configs()}
    assert {"demo.yaml", "smoke.yaml"} <= names


@pytest.mark.parametrize("path", _run_configs(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)


@pytest.mark.parametrize("path", _run_configs(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_has_a_header(path):
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    text = "\n".join(header)
    assert header, f"{path} must start with a comment header"
    for label in ("# Measures:", "# Run:", "# Takes:"):
        assert label in text, f"{path} header lacks '{label}'"
    assert path.relative_to(REPO).as_posix() in text, f"{path} header should show the command that runs it"


def test_demo_and_smoke_contents():
    demo = load_config(CONFIGS / "demo.yaml")
    assert (demo.model, demo.policy, demo.hbm_budget, demo.lossy, demo.new_tokens) == (
        "smollm2-135m", "scored", 0.5, False, 16)
    assert [(r.path, r.state, r.protect) for r in demo.placement] == [
        ("embed", "S0", True), ("final_norm", "S0", True)]
    smoke = load_config(CONFIGS / "smoke.yaml")
    assert (smoke.new_tokens, smoke.prompt_tokens, smoke.eval_tokens) == (4, 16, 64)


# ---------------------------------------------------------------------------------------------------- defaults


def test_defaults_and_empty_file(tmp_path):
    cfg = RunConfig()
    assert (cfg.model, cfg.policy, cfg.hbm_budget, cfg.dram_budget, cfg.executor, cfg.dtype) == (
        "smollm2-135m", "scored", 0.5, 1.0, "real", "float32")
    assert (cfg.new_tokens, cfg.prompt_tokens, cfg.tick_every_n_layers, cfg.prefetch_depth, cfg.eval_tokens) == (
        16, 64, 4, 2, 256)
    assert cfg.score == C.ScoreConfig(1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    assert cfg.guardrail == C.GuardrailConfig(0.7, 2, 0.1)
    assert cfg.quant == C.QuantConfig(64, 32)
    assert cfg.placement == ()
    assert load_config(_write(tmp_path, "")) == cfg
    assert load_config(_write(tmp_path, "# only a comment\n")) == cfg
    assert load_config(None) == cfg


def test_config_is_frozen_and_hashable():
    cfg = load_config(CONFIGS / "demo.yaml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.policy = "lru"  # type: ignore[misc]
    assert {cfg: 1}[load_config(CONFIGS / "demo.yaml")] == 1


def test_int_is_accepted_for_float_and_section_may_be_empty(tmp_path):
    cfg = load_config(_write(tmp_path, "score:\n  w1: 2\nguardrail:\nhbm_budget: 1\n"))
    assert cfg.score.w1 == 2.0 and isinstance(cfg.score.w1, float)
    assert cfg.guardrail == C.GuardrailConfig()
    assert cfg.hbm_budget == 1.0


def test_python_construction_is_validated_too():
    with pytest.raises(ConfigError, match="policy"):
        RunConfig(policy="fifo")
    assert RunConfig(placement=[PlacementRule("embed")]).placement == (PlacementRule("embed"),)


# ------------------------------------------------------------------------------------------------- bad inputs

BAD_FILES = {
    # name: (file text, fragments the one-line message must contain)
    "unknown key": ("polcy: lru\n", ["unknown key 'polcy'", "top level", "did you mean 'policy'"]),
    "unknown nested key": ("score:\n  w5: 1.0\n", ["unknown key 'w5'", "section 'score'", "w1, w2"]),
    "unknown nested key near": ("guardrail:\n  min_dwel_ticks: 3\n",
                                ["unknown key 'min_dwel_ticks'", "did you mean 'min_dwell_ticks'"]),
    "unknown rule key": ("placement:\n  - {path: embed, stat: S0}\n",
                         ["unknown key 'stat'", "section 'placement[0]'", "did you mean 'state'"]),
    "wrong type int": ('new_tokens: "ten"\n', ["new_tokens", "expects int", "got str ('ten')"]),
    "wrong type bool": ("lossy: 3\n", ["lossy", "expects bool", "got int (3)"]),
    "wrong type float": ("score:\n  w1: high\n", ["score.w1", "expects float", "got str"]),
    "wrong type section": ("score: 3\n", ["section 'score'", "mapping"]),
    "yaml 1.1 exponent": ("score:\n  alpha: 1e-3\n", ["score.alpha", "1.0e-3"]),
    "negative budget": ("hbm_budget: -0.5\n", ["hbm_budget", "(0, 1]", "-0.5"]),
    "zero budget": ("hbm_budget: 0\n", ["hbm_budget", "(0, 1]", "got 0"]),
    "fraction above one": ("dram_budget: 300\n", ["dram_budget", "(0, 1]", "'300B'"]),
    "nan budget": ("hbm_budget: .nan\n", ["hbm_budget", "finite"]),
    "negative byte budget": ('hbm_budget: "-3MiB"\n', ["hbm_budget", "positive"]),
    "unknown budget unit": ('hbm_budget: "300MB/s"\n', ["hbm_budget", "not a byte size"]),
    "unknown budget unit letters": ('hbm_budget: "300XiB"\n', ["hbm_budget", "unknown unit 'XiB'"]),
    "key set twice": ("policy: lru\nseed: 1\npolicy: lfu\n", ["'policy'", "set twice", "lines 1 and 3"]),
    "nested key set twice": ("quant:\n  lowrank_rank: 8\n  lowrank_rank: 16\n",
                             ["'lowrank_rank'", "set twice", "lines 2 and 3"]),
    "invalid yaml": ("policy: lru\nscore: [1, 2\nseed: 3\n", ["invalid YAML", "line "]),
    "not a mapping": ("- policy\n- lru\n", ["top level", "mapping"]),
    "unknown policy": ("policy: fifo\n", ["policy", "'resident'", "'belady'", "'fifo'"]),
    "unknown model": ("model: llama-7b\n", ["model", "'smollm2-135m'", "'smollm2-135m-moe'"]),
    "unknown executor": ("executor: fake\n", ["executor", "'real'", "'sim'"]),
    "unknown dtype": ("dtype: float16\n", ["dtype", "'bfloat16'"]),
    "bad group size": ("quant:\n  int4_group_size: 48\n", ["quant.int4_group_size", "32, 64, 128", "48"]),
    "zero rank": ("quant:\n  lowrank_rank: 0\n", ["quant.lowrank_rank", "> 0"]),
    "zero new_tokens": ("new_tokens: 0\n", ["new_tokens", ">= 1", "got 0"]),
    "negative new_tokens": ("new_tokens: -4\n", ["new_tokens", ">= 1", "got -4"]),
    "negative prefetch": ("prefetch_depth: -1\n", ["prefetch_depth", ">= 0"]),
    "zero tick": ("tick_every_n_layers: 0\n", ["tick_every_n_layers", ">= 1"]),
    "negative weight": ("score:\n  w3: -1\n", ["score.w3", ">= 0"]),
    "bad regex": ("placement:\n  - {path: 'layers.(', state: S0}\n",
                  ["placement[0].path", "not a valid regex", "'layers.('"]),
    "rule without path": ("placement:\n  - {state: S0}\n", ["placement[0].path", "required"]),
    "rule state S5": ("placement:\n  - {path: embed, state: S5}\n", ["placement[0].state", "S5", "transient"]),
    "rule unknown state": ("placement:\n  - {path: embed, state: S9}\n", ["placement[0].state", "'S9'"]),
    "lossy state without lossy": ("placement:\n  - {path: embed}\n  - {path: final_norm, state: S2}\n",
                                  ["placement[1].state", "lossy", "S2"]),
    "state below floor": ("lossy: true\nplacement:\n  - {path: embed, state: S3, floor: S6}\n",
                          ["placement[0].state", "floor S6"]),
    "placement not a list": ("placement: embed\n", ["placement", "list"]),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_raises_one_clear_line(tmp_path, name):
    text, fragments = BAD_FILES[name]
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path)), message  # names the file
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="not found") as info:
        load_config(missing)
    assert str(missing) in str(info.value)
    with pytest.raises(ConfigError, match="directory"):
        load_config(tmp_path)


BAD_OVERRIDES = {
    "unknown override key": (["polcy=lru"], ["override 'polcy=lru'", "unknown key 'polcy'", "'policy'"]),
    "unknown nested override key": (["score.w9=1"], ["unknown key 'w9'", "section 'score'"]),
    "override under a leaf": (["policy.x=1"], ["'policy' is not a section"]),
    "override of a section": (["score=1"], ["'score' is a section", "score.w1"]),
    "duplicate override": (["policy=lru", "seed=1", "policy=lfu"],
                           ["'policy' given twice", "'policy=lru'", "'policy=lfu'"]),
    "duplicate nested override": (["score.w1=1", "score.w1=2"], ["'score.w1' given twice"]),
    "override without =": (["policy"], ["key=value"]),
    "override wrong type": (["new_tokens=ten"], ["override 'new_tokens=ten'", "expects int", "got str ('ten')"]),
    "override out of range": (["prefetch_depth=-2"], ["override 'prefetch_depth=-2'", ">= 0"]),
    "override bad budget": (["hbm_budget=2048"], ["hbm_budget", "'2048B'"]),
    "override bad group size": (["quant.int4_group_size=16"], ["quant.int4_group_size", "32, 64, 128"]),
    "override bad placement": (["placement=[{path: '(', state: S0}]"], ["placement[0].path", "regex"]),
}


@pytest.mark.parametrize("name", sorted(BAD_OVERRIDES))
def test_bad_override_raises_one_clear_line(name):
    overrides, fragments = BAD_OVERRIDES[name]
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / "demo.yaml", overrides)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_cross_field_error_blames_the_overrides():
    cfg = load_config(None, ["lossy=true", "placement=[{path: embed, state: S1}]"])
    with pytest.raises(ConfigError, match=r"overrides 'lossy=false'.*lossy state S1"):
        apply_overrides(cfg, ["lossy=false"])


# ---------------------------------------------------------------------------------------------------- budgets


@pytest.mark.parametrize("value, model_bytes, expected", [
    (0.5, 1000, 500),
    ("300MiB", 1000, 314572800),
    ("1.5GB", 1000, 1500000000),
    ("2048", 1000, 2048),
    (1, 1000, 1000),
    (1.0, 538_000_000, 538_000_000),
    (0.29, 100, 29),  # exact decimal arithmetic: float 0.29 * 100 is 28.999...
    ("1 KiB", 1, 1024),
    ("2kb", 1, 2000),
    ("1.3GiB", 1, 1395864371),  # rounds down to whole bytes
    ("5000B", 1, 5000),
    ("2TB", 1, 2 * 10**12),
])
def test_parse_budget(value, model_bytes, expected):
    assert parse_budget(value, model_bytes) == expected


@pytest.mark.parametrize("value, fragment", [
    (0, "(0, 1]"),
    (-0.1, "(0, 1]"),
    (1.5, "(0, 1]"),
    (math.nan, "finite"),
    (math.inf, "finite"),
    ("0", "positive"),
    ("-1GB", "positive"),
    ("0.4B", "less than one byte"),
    ("0.5", "whole bytes"),
    ("12 parsecs", "unknown unit"),
    ("lots", "not a byte size"),
    ("", "not a byte size"),
    (True, "got bool"),
    (None, "got null"),
])
def test_parse_budget_rejects(value, fragment):
    with pytest.raises(ConfigError, match=r"^budget ") as info:
        parse_budget(value, 1000)
    assert fragment in str(info.value)


def test_parse_budget_fraction_needs_model_bytes():
    with pytest.raises(ConfigError, match="model's S0 bytes"):
        parse_budget(0.5, 0)
    assert parse_budget("1KiB", 0) == 1024  # bytes do not need the model size


def test_budget_forms_in_files(tmp_path):
    cfg = load_config(_write(tmp_path, 'hbm_budget: "300MiB"\ndram_budget: 0.75\n'))
    assert (cfg.hbm_budget, cfg.dram_budget) == ("300MiB", 0.75)
    assert parse_budget(cfg.hbm_budget, 10**9) == 314572800


# -------------------------------------------------------------------------------------------------- overrides


def test_overrides_apply_to_file_values():
    cfg = load_config(CONFIGS / "demo.yaml", ["policy=lru", "score.w1=0.5", "lossy=true", "hbm_budget=300MiB",
                                              "guardrail.min_dwell_ticks=5", "quant.int4_group_size=128"])
    assert (cfg.policy, cfg.score.w1, cfg.lossy, cfg.hbm_budget) == ("lru", 0.5, True, "300MiB")
    assert (cfg.guardrail.min_dwell_ticks, cfg.quant.int4_group_size) == (5, 128)
    assert cfg.score.w2 == 1.0 and cfg.new_tokens == 16  # the rest is the file's
    assert len(cfg.placement) == 2


def test_override_str_fields_keep_their_text():
    cfg = load_config(None, ["prompt=yes", "hardware=h100", "nvme_dir="])
    assert (cfg.prompt, cfg.hardware, cfg.nvme_dir) == ("yes", "h100", "")
    assert load_config(None, ["prompt=In the beginning: God"]).prompt == "In the beginning: God"
    assert load_config(None, ["prompt=1234"]).prompt == "1234"
    assert load_config(None, ['prompt="quoted"']).prompt == "quoted"


def test_override_placement_list():
    cfg = load_config(CONFIGS / "demo.yaml", [r"placement=[{path: 'layers\.\d+\.mlp', state: S3}]"])
    assert cfg.placement == (PlacementRule(path=r"layers\.\d+\.mlp", state="S3"),)
    assert load_config(CONFIGS / "demo.yaml", ["placement=[]"]).placement == ()


def test_apply_overrides_without_overrides_is_identity():
    cfg = load_config(CONFIGS / "demo.yaml")
    assert apply_overrides(cfg, []) is cfg
    assert apply_overrides(cfg, ["seed=3"]).seed == 3
    assert cfg.seed == 0


# -------------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("path", _run_configs(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_round_trip_through_dict_json_and_yaml(tmp_path, path):
    cfg = load_config(path, ["lossy=true", "placement=[{path: embed, state: S1, floor: S2, kappa: 0.5}]",
                             "hbm_budget=1.5GB"])
    data = config_to_dict(cfg)
    assert json.loads(json.dumps(data)) == data
    assert config_from_dict(data) == cfg
    dumped = _write(tmp_path, yaml.safe_dump(data, sort_keys=False), "dumped.yaml")
    assert load_config(dumped) == cfg


def test_config_from_dict_names_its_source():
    with pytest.raises(ConfigError, match=r"^sweep point 3: unknown key 'seeds'"):
        config_from_dict({"seeds": 1}, source="sweep point 3")


def test_quality_rank_matches_controller_state_ids():
    from vorch_jax.controller import state_ids as state_ids

    assert C.STATES == tuple(state_ids.STATE_NAMES)
    assert [C.QUALITY_RANK[name] for name in C.STATES] == list(state_ids.QUALITY_RANK)
    assert tuple(C.STATES.index(s) for s in C.LOSSY_STATES) == tuple(state_ids.LOSSY)
