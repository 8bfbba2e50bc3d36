"""The models the runtime can run, by name: the shipped families (`families.py`) and any a user registers.

`get(name, **options)` builds a spec once per process and options (a spec holds its source and tokenizer: read-only,
shared by every run of the process); `names()` lists the registered models; `register(name)(factory)` adds one.
"""

from __future__ import annotations

from typing import Callable

from .errors import ModelError
from .spec import ModelSpec


class UnknownModelError(ModelError, ValueError):
    """A model name that no spec is registered under."""


_FACTORIES: dict[str, Callable[..., ModelSpec]] = {}
_BUILT: dict[tuple, ModelSpec] = {}


def register(name: str):
    """Decorator: `@register("my-model")` on a factory `(**options) -> ModelSpec`. Options are a run's model
    settings (the `moe` section: router_config, top_k); a factory takes what it uses and ignores the rest
    (`**_options`)."""
    def deco(factory):
        if name in _FACTORIES and _FACTORIES[name] is not factory:
            raise ValueError(f"model '{name}' is registered twice")
        _FACTORIES[name] = factory
        return factory
    return deco


def _shipped() -> dict:
    from .families import FACTORIES

    for name, factory in FACTORIES.items():
        _FACTORIES.setdefault(name, factory)
    return _FACTORIES


def names() -> tuple[str, ...]:
    return tuple(_shipped())


def get(name: str, **options) -> ModelSpec:
    """The spec registered as `name` for `options`, built once per process."""
    factories = _shipped()
    if name not in factories:
        raise UnknownModelError(f"unknown model '{name}': registered models are {', '.join(factories)}")
    key = (name, tuple(sorted(options.items())))
    if key not in _BUILT:
        spec = factories[name](**options)
        spec.name = spec.name or name
        _BUILT[key] = spec
    return _BUILT[key]
