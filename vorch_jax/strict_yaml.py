"""YAML read strictly, for configs and sweeps: a key set twice in one mapping is an error naming both lines (PyYAML
silently keeps the last), and a file that cannot be read or parsed is one `ConfigError` line naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from vorch_jax.errors import ConfigError


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping key set twice (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # unhashable key: let PyYAML report it
                continue
            line = key_node.start_mark.line + 1
            if first is not None:
                raise ConfigError(f"key '{key}' is set twice (lines {first} and {line})", key=str(key))
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def yaml_error(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    context = getattr(err, "context", None)
    text = f"{context}, {problem}" if context else problem
    return f"line {mark.line + 1}, column {mark.column + 1}: {text}" if mark else text


def read_yaml(path: Path, what: str = "config") -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} path is a directory, not a file: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read {what} file {path}: {err}") from None
    try:
        return yaml.load(text, Loader=StrictLoader)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}", key=err.key) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML at {yaml_error(err)}") from None
