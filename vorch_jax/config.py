"""Typed run configuration: schema, YAML loading, dotted overrides, validation.

A run is described by one `RunConfig`, read from a YAML file and adjusted with dotted overrides::

    cfg = load_config("configs/demo.yaml", ["policy=lru", "score.w1=0.5"])

Why stdlib frozen dataclasses and not pydantic:
  * no extra dependency for a layer every other room imports;
  * frozen and hashable, so a config can key a dict of sweep results or a cache, and nobody mutates it mid-run;
  * we write every error message ourselves: one line that names the file or override, the key, what was expected
    and what was found (the CLI prints it without a traceback).

Every problem raises `ConfigError` (a `ValueError`) whose message is one line, e.g.
``configs/demo.yaml: unknown key 'polcy' at top level (did you mean 'policy'?)``.

Rules worth knowing:
  * Unknown keys fail at every level; a key set twice in one file fails with both line numbers.
  * Types are strict: ``new_tokens: "ten"`` and ``lossy: 3`` fail. An int is accepted where a float is expected.
    PyYAML reads YAML 1.1, where ``1e-3`` is a *string*; write ``1.0e-3``.
  * Budgets (`hbm_budget`, `dram_budget`): a number is a fraction of the model's S0 (full-precision) bytes and
    must lie in (0, 1]; a string is bytes, either plain (``"1024"``) or with a unit (``"300MiB"``, ``"1.5GB"``;
    B, KB, MB, GB, TB are powers of 1000, KiB, MiB, GiB, TiB powers of 1024). `config_fields.parse_budget` turns either
    into bytes once the model's size is known; loading only checks the form.
  * Overrides are ``key=value`` or ``section.key=value``. The value is read as YAML (``0.5`` is a float, ``true``
    a bool, ``[{path: embed, state: S0}]`` a placement list) and then checked like a file value. For a field typed
    ``str`` the raw text is kept when YAML would read something else, so ``prompt=yes`` is the string "yes".
    ``key=`` (nothing after ``=``) sets the empty string.
  * `placement` is stored as a tuple so the config stays hashable; a YAML list is accepted.
  * Empty sections (``score:`` with nothing under it) mean "all defaults".

`model` names a model of the registry (`vorch_jax.models.spec`; the one import from another room: an unknown name
lists the registered ones).

Block states, as strings (the `State` enum itself lives in tiers/; this module imports nothing else from the rooms):
S0 device full precision, S1 device int8, S2 device int4, S3 host DRAM, S4 NVMe, S5 in flight (transient, never
requested), S6 low-rank fallback. S1, S2 and S6 are lossy. A rule's `floor` is the worst state a block may reach,
ranked by quality for use, best first: S0, S1, S2, S6, S3, S4 (the ranking of `vorch_jax.controller.state_ids.QUALITY_RANK`,
copied by value and kept in sync by a test). ``floor: S1`` allows S0 and S1; ``floor: S3`` allows all but S4.

Shipped config files start with a comment header of three labelled lines, checked by the tests::

    # Measures: what the run measures
    # Run: the command that runs it
    # Takes: roughly how long
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vorch_jax import config_fields as F
from vorch_jax.errors import ConfigError
from vorch_jax.strict_yaml import StrictLoader, read_yaml, yaml_error

__all__ = [
    "ConfigError", "ScoreConfig", "GuardrailConfig", "QuantConfig", "QualityConfig", "PlacementRule", "RunConfig",
    "MoEConfig", "MeshConfig", "POLICIES", "IN_PLACE", "EXECUTORS", "DTYPES", "GROUP_SIZES", "STATES", "RULE_STATES",
    "LOSSY_STATES", "QUALITY_RANK", "load_config", "apply_overrides", "config_from_dict", "config_to_dict",
]

POLICIES = ("resident", "static", "static-prefetch", "lru", "lfu", "scored", "belady")
EXECUTORS = ("real", "sim")
DTYPES = ("float32", "bfloat16")
GROUP_SIZES = (32, 64, 128)
STATES = ("S0", "S1", "S2", "S3", "S4", "S5", "S6")
RULE_STATES = ("S0", "S1", "S2", "S3", "S4", "S6")  # S5 (in flight) is transient: no rule may ask for it
HOME_FORMATS = ("int8", "int4", "lowrank")  # a compressed home's format: it loads as S1, S2, S6 (runtime.setup)
LOSSY_STATES = ("S1", "S2", "S6")
IN_PLACE = ("off", "auto")  # auto: a read off device runs where its weights live when quicker (runtime/in_place.py)
# Higher is better to compute with; same values as vorch_jax.controller.state_ids.QUALITY_RANK (tests check they agree).
QUALITY_RANK = {"S0": 5, "S1": 4, "S2": 3, "S3": 1, "S4": 0, "S5": 1, "S6": 2}

# --------------------------------------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class ScoreConfig:
    """Weights of the residency score (w1..w4) and its shape parameters (alpha, beta)."""

    w1: float = 1.0
    w2: float = 1.0
    w3: float = 1.0
    w4: float = 1.0
    alpha: float = 1.0
    beta: float = 1.0
    bytes_weight: float = 0.0  # plans minimise link s + this x bytes at the mean rate (`Timing.with_bytes_weight`)

    def __post_init__(self) -> None:
        F.check_types(self)
        F.finite(self, "w1", "w2", "w3", "w4", "bytes_weight", min_value=0.0)
        F.finite(self, "alpha", "beta")


@dataclass(frozen=True)
class GuardrailConfig:
    """Hysteresis that stops the controller from flapping a block between states."""

    psi_threshold: float = 0.7
    min_dwell_ticks: int = 2
    switch_margin: float = 0.1

    def __post_init__(self) -> None:
        F.check_types(self)
        F.finite(self, "psi_threshold", "switch_margin", min_value=0.0)
        F.require(self.min_dwell_ticks >= 0, "min_dwell_ticks", f"must be >= 0, got {self.min_dwell_ticks}")


@dataclass(frozen=True)
class QuantConfig:
    """Static facts of the lossy representations: int4 group size and low-rank fallback rank. `compressed_homes`: a
    lossy scored run keeps, beside each block's lossless home, a compressed copy (DRAM first, then NVMe) in the
    best-quality lossy state its quality budget allows, and streams the block in that state (the link carries the compressed
    bytes); false: lossy blocks travel in full precision and convert on device."""

    int4_group_size: int = 64
    lowrank_rank: int = 32
    compressed_homes: bool = True

    def __post_init__(self) -> None:
        F.check_types(self)
        F.choice(self, "int4_group_size", GROUP_SIZES)
        F.require(self.lowrank_rank > 0, "lowrank_rank", f"must be > 0, got {self.lowrank_rank}")


@dataclass(frozen=True)
class QualityConfig:
    """The quality budget of a lossy run (`vorch_jax.controller.quality_budget`): what the controller may trade for bytes.

    `max_kl`: nats, the mean KL to the resident model per token the run may reach (its summary says whether it did);
    `kl_share`: the share of it the lossy states are allocated against, by their calibrated ΔKL (the rest covers
    what the additive estimate misses); `calibration`: with no stored calibration of the model on this machine,
    `auto` measures one first (about a minute for SmolLM2; saved for later runs), `stored` stops with a one-line
    error instead; `calibration_tokens`: the tokens it measures on."""

    max_kl: float = 0.02
    kl_share: float = 0.5
    calibration: str = "auto"
    calibration_tokens: int = 64

    def __post_init__(self) -> None:
        F.check_types(self)
        F.require(math.isfinite(self.max_kl) and self.max_kl > 0, "max_kl", f"must be > 0 nats, got {self.max_kl}")
        F.require(0 < self.kl_share <= 1, "kl_share", f"must lie in (0, 1], got {self.kl_share}")
        F.choice(self, "calibration", ("auto", "stored"))
        F.require(self.calibration_tokens >= 2, "calibration_tokens", f"must be >= 2, got {self.calibration_tokens}")


@dataclass(frozen=True)
class MoEConfig:
    """A routed model's settings (models that route nothing ignore them).

    `top_k`: experts per token a run routes with (0: the k its routers were trained for); `router_config`: the
    router build of the MoE SmolLM2 (default configs/moe/router.yaml); `speculative`: the next layer's router
    predicts its experts and the sure guesses load early (`auto`: scored only, the baselines stay plain caches, and
    only where an expert's load takes half a layer's resident compute or more: `runtime.inputs.speculative`)."""

    top_k: int = 0
    router_config: str = ""
    speculative: str = "auto"

    def __post_init__(self) -> None:
        F.check_types(self)
        F.require(self.top_k >= 0, "top_k", f"must be >= 0 (0: the routers' trained k), got {self.top_k}")
        F.choice(self, "speculative", ("auto", "on", "off"))


@dataclass(frozen=True)
class MeshConfig:
    """`tp`-way tensor and `ep`-way expert parallelism on tp x ep devices, each with `hbm_budget` of its own shard's
    bytes: real (`runtime/mesh_run.py`) or simulated, with the profile's `mesh` section (`simulation/mesh.py`)."""

    tp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        F.check_types(self)
        for name in ("tp", "ep"):
            F.require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")

    @property
    def devices(self) -> int:
        return self.tp * self.ep


def _model_names() -> tuple[str, ...]:
    """The registered models (`vorch_jax.models.spec`): what `model` may name."""
    from vorch_jax.models.registry import names

    return names()


@dataclass(frozen=True)
class PlacementRule:
    """Where blocks whose id fully matches `path` start and how far they may fall.

    `path` is a regex matched with `re.fullmatch` against block ids such as ``embed``, ``layers.3.attn``,
    ``layers.12.mlp``, ``layers.4.expert.5``, ``final_norm``. `state` pins the initial state ("" lets the policy
    decide); `protect` asks the guardrail to keep the block where it is; `floor` is the worst state the block may
    reach in quality order S0, S1, S2, S6, S3, S4 ("" = no floor); `kappa` overrides the block's criticality
    (None = computed); `home_format` (int8, int4, lowrank; needs `lossy`) keeps a compressed copy of each matched
    block (in DRAM, else on NVMe), made once, and every load of it moves and lands that format (S1, S2, S6): FlexGen-style
    compression of what streams, e.g. ``{path: 'layers.*', home_format: int4}`` with ``policy: static``.
    `compute`: where the blocks' ops run. ``host``: always where the weights live, in host DRAM (their lossless home
    is laid out there): the activations cross the link instead, the block never loads and takes no HBM (llama.cpp's
    ``--n-cpu-moe``: ``{path: 'layers.*expert.*', compute: host}``); ``device``: always moved to the device; ""
    (default): the run's ``in_place`` decides.
    """

    path: str
    state: str = ""
    protect: bool = False
    floor: str = ""
    kappa: float | None = None
    home_format: str = ""
    compute: str = ""

    def __post_init__(self) -> None:
        F.check_types(self)
        F.require(self.path != "", "path", "must be a non-empty regex")
        F.choice(self, "home_format", ("",) + HOME_FORMATS)
        F.choice(self, "compute", ("", "device", "host"))
        if self.compute == "host":
            F.require(not (self.protect or self.state in ("S0", "S1", "S2", "S4", "S6") or self.home_format), "compute",
                      f"is host (computed where the weights live in DRAM) but the rule also sets "
                      f"{'protect' if self.protect else 'home_format' if self.home_format else 'state ' + self.state}"
                      f", which puts them elsewhere: drop one of the two")
        F.require(not (self.home_format and (self.state in ("S0", "S1", "S2", "S6") or self.protect)), "home_format",
                  f"is set but the rule pins the blocks on device ({'protect' if self.protect else 'state ' + self.state})"
                  f", so they never load from a home: drop one of the two")
        try:
            re.compile(self.path)
        except re.error as err:
            raise F.key_error("path", f"is not a valid regex: {self.path!r} ({err})") from None
        for name in ("state", "floor"):
            if getattr(self, name) == "S5":
                raise F.key_error(name, "cannot be S5: S5 (in flight) is transient and never requested")
            F.choice(self, name, ("",) + RULE_STATES)
        if self.state and self.floor:
            F.require(QUALITY_RANK[self.state] >= QUALITY_RANK[self.floor], "state",
                     f"is {self.state}, below the rule's floor {self.floor} (quality order S0, S1, S2, S6, S3, S4)")
        if self.kappa is not None:
            F.finite(self, "kappa", min_value=0.0)


@dataclass(frozen=True)
class RunConfig:
    """One experiment: which model, which policy, under which budgets, for how many tokens."""

    model: str = "smollm2-135m"
    policy: str = "scored"
    hbm_budget: float | str = 0.5
    dram_budget: float | str = 1.0
    lossy: bool = False
    new_tokens: int = 16
    prompt_tokens: int = 64
    prompt: str = ""
    tick_every_n_layers: int = 4
    prefetch_depth: int = 2
    nvme_dir: str = ""
    seed: int = 0
    executor: str = "real"
    hardware: str = ""
    routing_trace: str = ""  # executor sim, MoE: a routing.json a real MoE run wrote (else Zipf routing)
    eval_tokens: int = 256
    dtype: str = "float32"
    in_place: str = "off"
    score: ScoreConfig = field(default_factory=ScoreConfig)
    guardrail: GuardrailConfig = field(default_factory=GuardrailConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    placement: tuple[PlacementRule, ...] = ()

    def __post_init__(self) -> None:
        F.check_types(self)
        F.choice(self, "model", _model_names())
        F.choice(self, "policy", POLICIES)
        F.choice(self, "executor", EXECUTORS)
        F.choice(self, "dtype", DTYPES)
        F.choice(self, "in_place", IN_PLACE)
        for name in ("hbm_budget", "dram_budget"):
            try:
                F.budget_spec(getattr(self, name))
            except ConfigError as err:
                raise F.key_error(name, str(err)) from None
        for name in ("new_tokens", "prompt_tokens", "eval_tokens", "tick_every_n_layers"):
            F.require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("prefetch_depth", "seed"):
            F.require(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        F.require(self.mesh.devices == 1 or self.executor == "sim" or not self.lossy, "mesh",
                  "runs lossless on real devices so far (lossy: false), lossy on the simulator (executor: sim)")
        host = self.in_place != "off" or any(r.compute == "host" for r in self.placement)
        F.require(self.mesh.devices == 1 or not host, "mesh", "with compute in place is not modelled (each device "
                  "would get the whole host): drop in_place / compute: host, or the mesh")
        F.require(not self.routing_trace or self.executor == "sim", "routing_trace",
                 "is replayed only by the simulator (executor: sim); a real run routes with its own router")
        if not self.lossy:
            for i, rule in enumerate(self.placement):
                if rule.state in LOSSY_STATES:
                    raise F.key_error(f"placement[{i}].state",
                                     f"puts blocks matching {rule.path!r} in lossy state {rule.state} but lossy is "
                                     f"false; set lossy: true or choose S0, S3 or S4")
                if rule.home_format:
                    raise F.key_error(f"placement[{i}].home_format",
                                      f"streams blocks matching {rule.path!r} as {rule.home_format}, a lossy format, "
                                      f"but lossy is false; set lossy: true or drop home_format")


_SECTIONS: dict[str, type] = {"score": ScoreConfig, "guardrail": GuardrailConfig, "quant": QuantConfig,
                              "quality": QualityConfig, "moe": MoEConfig, "mesh": MeshConfig}


# ------------------------------------------------------------------------------------------------ dict -> config


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _unknown_key(key: Any, section: str, valid: Sequence[str]) -> ConfigError:
    where = "at top level" if not section else f"in section '{section}'"
    hint = difflib.get_close_matches(str(key), valid, n=1)
    suffix = f" (did you mean '{hint[0]}'?)" if hint else f" (valid keys: {', '.join(valid)})"
    full = f"{section}.{key}" if section else str(key)
    return ConfigError(f"unknown key '{key}' {where}{suffix}", key=full, detail=None)


def _build(cls: type, data: Any, section: str) -> Any:
    """One dataclass from one mapping, refusing unknown keys; `section` is the dotted location ("" = top level)."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        where = f"section '{section}'" if section else "the top level"
        raise ConfigError(f"{where} must be a mapping, got {F.got(data)}", key=section or None)
    valid = _field_names(cls)
    for key in data:
        if key not in valid:
            raise _unknown_key(key, section, valid)
    prefix = f"{section}." if section else ""
    for f in dataclasses.fields(cls):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in data:
            raise F.key_error(prefix + f.name, "is required but missing")
    kwargs = dict(data)
    if cls is RunConfig:
        for name, section_cls in _SECTIONS.items():
            if name in kwargs:
                kwargs[name] = _build(section_cls, kwargs[name], name)
        if "placement" in kwargs:
            rules = kwargs["placement"] if kwargs["placement"] is not None else []
            if not isinstance(rules, (list, tuple)):
                raise F.key_error("placement", f"expects a list of rules, got {F.got(rules)}")
            kwargs["placement"] = tuple(_build(PlacementRule, rule, f"placement[{i}]") for i, rule in enumerate(rules))
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise F.rekey(err, prefix) if prefix else err from None


def config_from_dict(data: Mapping[str, Any] | None, source: str = "<dict>") -> RunConfig:
    """A RunConfig from a plain nested dict (the shape `config_to_dict` returns and YAML files hold).

    Errors are prefixed with `source`, e.g. a file name.
    """
    try:
        return _build(RunConfig, data, "")
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}", key=err.key, detail=err.detail) from None


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """A JSON-able nested dict of `cfg` (placement as a list of dicts); `config_from_dict` turns it back."""
    data = dataclasses.asdict(cfg)
    data["placement"] = [dict(rule) for rule in data["placement"]]
    return data


# ------------------------------------------------------------------------------------------------------ overrides


def _field_type(key: str, source: str) -> Any:
    """The annotation of dotted `key` in the schema; ConfigError if it names no leaf field."""
    parts = key.split(".")
    cls: type = RunConfig
    for depth, part in enumerate(parts):
        section = ".".join(parts[:depth])
        valid = _field_names(cls)
        if part not in valid:
            err = _unknown_key(part, section, valid)
            raise ConfigError(f"{source}: {err}", key=key) from None
        tp = F.field_hints(cls)[part]
        if depth == len(parts) - 1:
            if tp in _SECTIONS.values():
                raise ConfigError(f"{source}: '{key}' is a section; set one of its keys, e.g. "
                                  f"'{key}.{_field_names(tp)[0]}=...'", key=key)
            return tp
        if tp not in _SECTIONS.values():
            raise ConfigError(f"{source}: '{'.'.join(parts[:depth + 1])}' is not a section", key=key)
        cls = tp
    raise AssertionError("unreachable")  # pragma: no cover


def _parse_override(text: str) -> tuple[str, Any, str]:
    """``"score.w1=0.5"`` -> ``("score.w1", 0.5, "override 'score.w1=0.5'")``."""
    source = f"override '{text}'"
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(f"{source}: expected key=value, e.g. 'policy=lru' or 'score.w1=0.5'")
    key, raw = (part.strip() for part in text.split("=", 1))
    if not key:
        raise ConfigError(f"{source}: missing key before '='")
    tp = _field_type(key, source)
    if raw == "":
        return key, "", source
    try:
        value = yaml.load(raw, Loader=StrictLoader)
    except (ConfigError, yaml.YAMLError) as err:
        detail = yaml_error(err) if isinstance(err, yaml.YAMLError) else str(err)
        if tp is str:
            return key, raw, source
        raise ConfigError(f"{source}: invalid YAML value: {detail}", key=key) from None
    if tp is str and not isinstance(value, str):
        value = raw  # a str field keeps its text: prompt=yes is "yes", not True
    return key, value, source


def apply_overrides(cfg: RunConfig, overrides: Sequence[str] = ()) -> RunConfig:
    """`cfg` with dotted ``key=value`` overrides applied, validated like a file. Each key may appear once."""
    if isinstance(overrides, str):
        overrides = [overrides]
    data = config_to_dict(cfg)
    seen: dict[str, str] = {}
    for text in overrides:
        key, value, source = _parse_override(text)
        if key in seen:
            raise ConfigError(f"override '{key}' given twice: '{seen[key]}' and '{text}'", key=key)
        seen[key] = text
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    if not seen:
        return cfg
    try:
        return _build(RunConfig, data, "")
    except ConfigError as err:
        culprit = _blame(err.key, seen)
        source = f"override '{culprit}'" if culprit else "overrides " + " ".join(f"'{t}'" for t in seen.values())
        raise ConfigError(f"{source}: {err}", key=err.key, detail=err.detail) from None


def _blame(key: str | None, seen: Mapping[str, str]) -> str | None:
    """The override text that set `key` (or a section or list containing it), if any."""
    if key is None:
        return None
    for candidate, text in seen.items():
        if key == candidate or key.startswith(candidate + ".") or key.startswith(candidate + "["):
            return text
    return None


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML run config (None or an empty file = defaults) and apply dotted overrides.

    >>> load_config(None, ["policy=lru", "score.w1=0.5"]).score.w1
    0.5
    """
    if path is None:
        cfg = RunConfig()
    else:
        path = Path(path)
        cfg = config_from_dict(read_yaml(path), source=str(path))
    return apply_overrides(cfg, overrides)
