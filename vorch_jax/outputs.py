"""Where a run writes: its output folder and its NVMe store, and one rule for failing writes.

A run's folder is checked before any work (created, written to once); a stale `summary.json` is removed first, so an
interrupted re-run never leaves the old summary claiming to describe it. Any `OSError` while writing outputs (a full
disk, a folder made read-only mid-run) becomes one `OutputError` line naming the folder; the summary is always
written last, so a run that failed to write leaves nothing that claims completion.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from vorch_jax.errors import OutputError


def check_out_dir(out_dir) -> Path:
    """Create `out_dir`, prove it writable, remove a stale summary.json; OutputError if it cannot be written."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-probe-{os.getpid()}"  # processes of one mesh run may share the folder
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"--out {out_dir} is not writable: {e.strerror or e}; choose another folder") from None
    (out_dir / "summary.json").unlink(missing_ok=True)
    return out_dir


@contextlib.contextmanager
def writing(out_dir):
    """Turn an OSError raised inside into an OutputError naming `out_dir` (one line, exit 2 at the CLI)."""
    try:
        yield
    except OSError as e:
        raise OutputError(f"cannot write the run's outputs to {out_dir}: {e.strerror or e}; free space there or "
                          f"choose another --out (nothing written claims a complete run)") from None


def nvme_store_dir(nvme_dir: str, out_dir: Path) -> tuple[Path, bool]:
    """The NVMe (S4) store of a run: `nvme_dir`, or a scratch folder under the output (True: remove afterwards)."""
    store_dir = Path(nvme_dir) if nvme_dir else Path(out_dir) / "nvme"
    try:
        store_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"nvme_dir {store_dir} cannot be created: {e.strerror or e}; choose another folder"
                          ) from None
    return store_dir, not nvme_dir
