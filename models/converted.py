"""The GGUF → float32 conversion, saved once with orbax and read back block by block.

Dequantizing the GGUF (numpy) is the slow part of loading; the converted blocks are saved as one orbax checkpoint
(`CheckpointManager`: OCDBT + zarr) under a cache directory keyed by the model file's content, and a later run
restores only the block it asks for (`partial_restore`). `ConvertedSource` serves blocks with the same interface as
`GGUFSource`, so the tiers and the runner use either. A stored conversion whose model key or shapes differ from the
current model file is a `ConversionMismatchError`, never a silent mis-load.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import numpy as np

from .gguf_source import GGUFSource

FORMAT_VERSION = 1


class ConversionMismatchError(RuntimeError):
    """A stored conversion describes another model file or other shapes."""


def model_file_key(source: GGUFSource) -> str:
    """sha256 of the file's first MiB plus its size: stable across reinstalls, changes with the file."""
    h = hashlib.sha256()
    with open(source.path, "rb") as f:
        h.update(f.read(1 << 20))
    h.update(str(source.path.stat().st_size).encode())
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    root = os.environ.get("VORCH_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "vorch_jax") / "converted"


def _manager(directory: Path):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))


def _shapes(source) -> dict:
    return {b: {k: list(v.shape) for k, v in source.block_shapes(b).items()} for b in source.block_ids}


def convert(source: GGUFSource, directory: Path) -> Path:
    """Dequantize every block and save them (float32) with their metadata; returns the checkpoint directory."""
    import orbax.checkpoint as ocp

    blocks = {b: source(b) for b in source.block_ids}
    meta = {"format_version": FORMAT_VERSION, "model_key": model_file_key(source), "blocks": source.block_ids,
            "shapes": _shapes(source), "gguf": str(source.path)}
    mgr = _manager(directory)
    mgr.save(0, args=ocp.args.Composite(weights=ocp.args.PyTreeSave(blocks), meta=ocp.args.JsonSave(meta)),
             force=True)
    mgr.wait_until_finished()
    mgr.close()
    return directory


class ConvertedSource:
    """A `GGUFSource` look-alike whose blocks come from the saved conversion (the GGUF still answers metadata)."""

    def __init__(self, gguf: GGUFSource, directory: Path):
        import orbax.checkpoint as ocp

        self.gguf, self.directory = gguf, Path(directory)
        self.path, self.config, self.layout = gguf.path, gguf.config, gguf.layout
        self._mgr = _manager(self.directory)
        if self._mgr.latest_step() is None:
            raise ConversionMismatchError(f"no saved conversion under {self.directory}")
        meta = self._mgr.restore(0, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if meta.get("format_version") != FORMAT_VERSION:
            raise ConversionMismatchError(f"saved conversion under {self.directory} has format "
                                          f"{meta.get('format_version')}, this code reads {FORMAT_VERSION}")
        if meta["model_key"] != model_file_key(gguf):
            raise ConversionMismatchError(f"saved conversion under {self.directory} is of another model file "
                                          f"(key {meta['model_key']}, current {model_file_key(gguf)})")
        now = _shapes(gguf)
        if meta["blocks"] != gguf.block_ids or meta["shapes"] != now:
            bad = next((b for b in now if meta["shapes"].get(b) != now[b]), None)
            raise ConversionMismatchError(f"saved conversion under {self.directory} does not match the model's "
                                          f"blocks (first difference: {bad!r})")
        self.nbytes_read = 0
        self._lock = threading.Lock()

    @property
    def block_ids(self) -> list[str]:
        return self.gguf.block_ids

    def block_shapes(self, block_id: str) -> dict:
        return self.gguf.block_shapes(block_id)

    def block_nbytes(self, block_id: str) -> int:
        return self.gguf.block_nbytes(block_id)

    def metadata(self, key: str):
        return self.gguf.metadata(key)

    def tokenizer_metadata(self) -> dict:
        return self.gguf.tokenizer_metadata()

    def __call__(self, block_id: str) -> dict[str, np.ndarray]:
        import jax
        import orbax.checkpoint as ocp

        shapes = self.gguf.block_shapes(block_id)  # KeyError names an unknown block
        item = {block_id: {k: np.zeros(v.shape, v.dtype) for k, v in shapes.items()}}
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        with self._lock:  # one restore at a time: bytes read are attributed to one block
            got = self._mgr.restore(0, args=ocp.args.Composite(
                weights=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True)))["weights"]
            out = {k: np.ascontiguousarray(v, np.float32) for k, v in got[block_id].items()}
            self.nbytes_read += sum(a.nbytes for a in out.values())
        return out


def load_converted(gguf: GGUFSource, directory: Path | None = None, progress=None) -> ConvertedSource:
    """The saved conversion of `gguf` (converting and saving it the first time)."""
    directory = Path(directory) if directory else default_cache_dir() / model_file_key(gguf)
    try:
        return ConvertedSource(gguf, directory)
    except ConversionMismatchError as e:
        if progress:
            progress(f"converting the model file once ({e})")
    convert(gguf, directory)
    return ConvertedSource(gguf, directory)
