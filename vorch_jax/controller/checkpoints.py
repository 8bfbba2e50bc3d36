"""Small orbax helpers: one record (a flat dict of numpy arrays + JSON metadata) per (model, machine) key.

Why orbax and not `np.savez` + `json.dump`: the design asks for one checkpoint library across the project, and orbax
gives atomic, finalized saves (a half-written record is never listed as a step), which matters for a cache that a
crashed run may leave behind. Layout on disk:

    <root>/<model_key>/<machine_key>/<step>/{arrays, meta}      (CheckpointManager, max_to_keep=1)

`arrays` goes through `StandardSave` / `StandardRestore`, `meta` through `JsonSave` / `JsonRestore`, bundled by
`args.Composite`. Saves are synchronous (a cache write must be complete when `save_record` returns).

`restore_record(..., expect=...)` compares the stored metadata against what the caller expects (model structure:
block ids, leaf shapes) and raises `RecordMismatchError` naming the first difference, never a silent mis-load.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from vorch_jax.errors import RecordMismatchError



def safe_name(key: str) -> str:
    """A key as one directory name: anything but [A-Za-z0-9._-] becomes '_' (keys keep their readable parts)."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._")
    if not out:
        raise ValueError(f"key {key!r} has no usable characters for a directory name")
    return out


def record_dir(root: str | os.PathLike, model_key: str, machine_key: str) -> Path:
    return Path(root).expanduser() / safe_name(model_key) / safe_name(machine_key)


def _manager(directory: Path, *, create: bool):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=create, enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory.absolute(), options=options, item_names=("arrays", "meta"))


def save_record(root, model_key: str, machine_key: str, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    """Save `arrays` (flat {name: ndarray}) and `meta` (JSON-able) as the newest record for the key; returns its dir.

    `meta` gets `model_key` and `machine_key` added, so a restore can check it read the record it asked for.
    """
    import orbax.checkpoint as ocp

    directory = record_dir(root, model_key, machine_key)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "model_key": model_key, "machine_key": machine_key}
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    mngr = _manager(directory, create=True)
    try:
        step = (mngr.latest_step() or 0) + 1
        mngr.save(step, args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)))
        mngr.wait_until_finished()
    finally:
        mngr.close()
    return directory / str(step)


def _check(meta: dict, expect: dict) -> None:
    for key, want in expect.items():
        if key not in meta:
            raise RecordMismatchError(f"stored record has no '{key}' (expected {_short(want)})")
        have = meta[key]
        if have == want:
            continue
        if isinstance(want, dict) and isinstance(have, dict):
            missing = [k for k in want if k not in have]
            extra = [k for k in have if k not in want]
            if missing or extra:
                raise RecordMismatchError(f"stored '{key}' differs: missing {missing[:3]}, unexpected {extra[:3]}")
            for k in want:
                if have[k] != want[k]:
                    raise RecordMismatchError(f"stored '{key}' differs at '{k}': stored {_short(have[k])}, "
                                              f"current {_short(want[k])}")
        raise RecordMismatchError(f"stored '{key}' is {_short(have)}, current is {_short(want)}")


def _short(x, n: int = 120) -> str:
    s = repr(x)
    return s if len(s) <= n else s[: n - 3] + "..."


def restore_record(root, model_key: str, machine_key: str, *, expect: dict | None = None):
    """(arrays, meta) of the newest record for the key, or None when none is stored.

    `expect`: {meta key: value} that must equal the stored metadata (lists and dicts compared after a JSON round
    trip, so pass JSON-shaped values: lists, not tuples); a difference raises RecordMismatchError naming it.
    """
    import orbax.checkpoint as ocp

    directory = record_dir(root, model_key, machine_key)
    if not directory.is_dir():
        return None
    mngr = _manager(directory, create=False)
    try:
        step = mngr.latest_step()
        if step is None:
            return None
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        _check(meta, {"model_key": model_key, "machine_key": machine_key, **(expect or {})})
        arrays = mngr.restore(step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore()))["arrays"]
    finally:
        mngr.close()
    return {k: np.asarray(v) for k, v in arrays.items()}, meta
