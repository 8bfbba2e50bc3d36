"""Where built artifacts live between runs: `$VORCH_CACHE`, else `~/.cache/vorch_jax` (the MoE stores under `moe/`,
the calibrations under `calibration/`). One place for it, in the lowest room: models/ and the controller both read it.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_ROOT = Path("~/.cache/vorch_jax")
ENV_ROOT = "VORCH_CACHE"


def cache_root(override: str | os.PathLike | None = None, sub: str = "") -> Path:
    """The cache directory: `override` if given, else `$VORCH_CACHE`, else `~/.cache/vorch_jax`; then `/sub`."""
    if override is not None:
        return Path(override).expanduser()
    base = Path(os.environ[ENV_ROOT]).expanduser() if os.environ.get(ENV_ROOT) else DEFAULT_ROOT.expanduser()
    return base / sub if sub else base
