"""Shared by the runtime tests: one small configuration and its resident reference, computed once."""

from pathlib import Path

import jax.numpy as jnp
import pytest

from vorch_jax.config import load_config
from vorch_jax.runtime.reference import resident_reference
from vorch_jax.runtime.setup import build_setup

SMOKE = Path(__file__).parents[2] / "configs" / "smoke.yaml"
SMALL = ["new_tokens=4", "prompt_tokens=12", "eval_tokens=24", "tick_every_n_layers=4", "prefetch_depth=2"]


def small_config(*overrides):
    return load_config(SMOKE, SMALL + list(overrides))


@pytest.fixture(scope="session", name="small_config")
def small_config_fixture():
    """`small_config(*overrides)`: the smoke config at test sizes."""
    return small_config


@pytest.fixture(scope="session")
def reference():
    cfg = small_config()
    return resident_reference(build_setup(cfg), jnp.float32, cfg.new_tokens)
