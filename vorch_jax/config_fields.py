"""The values of a typed config: how a field's value is described, checked against its annotation and coerced,
and how a budget (a fraction of the model's S0 bytes or a byte string) is read. Every problem is a `ConfigError`
of one line that names the key; `config.py` (the schema) and the sweep loader use these.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from vorch_jax.errors import ConfigError

_BYTE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_BYTES_RE = re.compile(r"^\s*([+-]?)\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")


def key_error(key: str, detail: str) -> ConfigError:
    return ConfigError(f"key '{key}' {detail}", key=key, detail=detail)


def rekey(err: ConfigError, prefix: str) -> ConfigError:
    """The same error with its key placed under `prefix` (``"score."``, ``"placement[2]."``)."""
    if err.key is None or err.detail is None:
        return ConfigError(f"{prefix.rstrip('.')}: {err}", key=prefix.rstrip("."), detail=str(err))
    return key_error(prefix + err.key, err.detail)


# --------------------------------------------------------------------------------------------------------- types


def show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, types.UnionType):
        return " or ".join(type_name(t) for t in tp.__args__)
    if typing.get_origin(tp) is tuple:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return tp.__name__
    return {int: "int", float: "float", bool: "bool", str: "str"}.get(tp, getattr(tp, "__name__", str(tp)))


def got(value: Any) -> str:
    kind = {dict: "mapping", list: "list", type(None): "null"}.get(type(value), type(value).__name__)
    return kind if value is None else f"{kind} ({show(value)})"


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it normalised (int -> float, list -> tuple)."""
    if isinstance(tp, types.UnionType):
        for option in tp.__args__:
            try:
                return coerce(value, option, key)
            except ConfigError:
                pass
        raise key_error(key, f"expects {type_name(tp)}, got {got(value)}")
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _looks_like_float(value):
            raise key_error(key, f"expects float, got str ({value!r}); YAML 1.1 reads '1e-3' as text, "
                                  f"write '1.0e-3'")
    elif tp is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(tp) is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if isinstance(value, (list, tuple)):
            return tuple(coerce(item, item_tp, f"{key}[{i}]") for i, item in enumerate(value))
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
    else:  # pragma: no cover - a schema annotation this function was not taught
        raise TypeError(f"unsupported annotation {tp!r} for {key}")
    raise key_error(key, f"expects {type_name(tp)}, got {got(value)}")


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@functools.cache
def field_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_types(obj: Any) -> None:
    """Type-check and normalise every field of a frozen dataclass instance in place (used by __post_init__)."""
    hints = field_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = coerce(getattr(obj, f.name), hints[f.name], f.name)
        object.__setattr__(obj, f.name, value)


def require(ok: bool, key: str, detail: str) -> None:
    if not ok:
        raise key_error(key, detail)


def finite(obj: Any, *names: str, min_value: float | None = None) -> None:
    for name in names:
        value = getattr(obj, name)
        require(math.isfinite(value), name, f"must be a finite number, got {value}")
        if min_value is not None:
            require(value >= min_value, name, f"must be >= {min_value}, got {value}")


def choice(obj: Any, name: str, choices: Sequence[Any]) -> None:
    value = getattr(obj, name)
    if value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        suffix = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise key_error(name, f"must be one of {listed}; got {show(value)}{suffix}")


# -------------------------------------------------------------------------------------------------------- budgets


def _num(value: float) -> str:
    """2048.0 -> '2048', 0.5 -> '0.5' (budgets read from YAML ints arrive as floats)."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(value)


def budget_spec(value: Any) -> tuple[str, Decimal]:
    """Classify a budget: ``("fraction", f)`` with f in (0, 1], or ``("bytes", n)`` with n >= 1 (may be fractional).

    Raises a keyless ConfigError whose message starts with a verb and shows the value, so callers can prefix it
    with ``key 'hbm_budget'`` or ``budget``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"expects a fraction in (0, 1] or a byte string like '300MiB', got {got(value)}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ConfigError(f"must be a finite fraction in (0, 1], got {value}")
        if not 0 < value <= 1:
            hint = f"; for bytes write a string with a unit, e.g. '{_num(value)}B' or '300MiB'" if value > 1 else ""
            raise ConfigError(f"is a fraction of the model's S0 bytes and must be in (0, 1], got {_num(value)}{hint}")
        return "fraction", Decimal(repr(float(value)))
    match = _BYTES_RE.match(value)
    if not match:
        raise ConfigError(f"is not a byte size: {value!r} (examples: '1024', '300MiB', '1.5GB')")
    sign, number, unit = match.groups()
    if sign == "-":
        raise ConfigError(f"must be positive, got {value!r}")
    if unit.lower() not in _BYTE_UNITS:
        hint = difflib.get_close_matches(unit, ["B", "KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB"], n=1)
        suffix = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ConfigError(f"has unknown unit {unit!r} in {value!r}; use B, KB, MB, GB, TB, KiB, MiB, GiB "
                          f"or TiB{suffix}")
    if not unit and "." in number:
        raise ConfigError(f"must be whole bytes when it has no unit, got {value!r}; "
                          f"for a fraction write the number unquoted")
    amount = Decimal(number) * _BYTE_UNITS[unit.lower()]
    if int(amount) < 1:
        raise ConfigError(f"must be positive, got {value!r} (less than one byte)")
    return "bytes", amount


def parse_budget(value: float | str, model_bytes: int) -> int:
    """Bytes meant by a budget: a fraction in (0, 1] of `model_bytes`, or a byte string (``"300MiB"``, ``"2048"``).

    Rounds down to whole bytes. Raises ConfigError for zero, negative, NaN, a fraction above 1, an unknown unit,
    or a result under one byte.

    >>> parse_budget(0.5, 1000), parse_budget("300MiB", 0), parse_budget("1.5GB", 0)
    (500, 314572800, 1500000000)
    """
    try:
        kind, amount = budget_spec(value)
    except ConfigError as err:
        raise ConfigError(f"budget {err}") from None
    if kind == "bytes":
        return int(amount)
    if isinstance(model_bytes, bool) or not isinstance(model_bytes, int) or model_bytes <= 0:
        raise ConfigError(f"budget {value} is a fraction and needs the model's S0 bytes, got {show(model_bytes)}")
    result = int(amount * model_bytes)
    if result < 1:
        raise ConfigError(f"budget {value} of {model_bytes} bytes is less than one byte")
    return result
