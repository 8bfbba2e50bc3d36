"""S4: the block on disk, one tensorstore zarr3 array per leaf, with a checksum file verified on every read.

Layout under `store_dir`:
    <block_id>/<leaf>/zarr.json       zarr3 metadata: ONE chunk per leaf (chunk shape = array shape), codecs=[bytes]
    <block_id>/<leaf>/c/0[/0]         the chunk: the raw little-endian bytes of the leaf, uncompressed
    <block_id>/checksums.json         {leaf: {"sha256": hex, "shape": [...], "dtype": "float32", "nbytes": n}}

Invariants:
  * A block directory exists only complete: it is written under a temporary name and renamed into place after
    every chunk and the checksum file were written, so a failed write (ENOSPC, EIO) leaves nothing half-done.
  * A read returns bytes whose sha256 equals the recorded one, or raises CorruptBlockError naming the block and leaf.
  * `nbytes` is the sum of the chunk files' sizes on disk (stat), not a formula.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import tensorstore as ts

from vorch_jax.tiers.state import OffDeviceError, State, TierError

CHECKSUM_FILE = "checksums.json"


class CorruptBlockError(TierError):
    """A leaf read from the store does not match its checksum (or cannot be decoded)."""

    def __init__(self, block_id: str, leaf: str, why: str):
        super().__init__(f"block '{block_id}' leaf '{leaf}' in the NVMe store is corrupt: {why}")
        self.block_id, self.leaf = block_id, leaf


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).view(np.uint8).reshape(-1)).hexdigest()


def _spec(path: Path, shape=None, dtype=None) -> dict:
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}
    if shape is not None:
        shape = list(shape)
        spec["metadata"] = {
            "shape": shape,
            "data_type": np.dtype(dtype).name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [max(1, n) for n in shape]}},
            # bytes codec only: without explicit codecs tensorstore adds sharding on its own.
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
        }
        spec["create"] = True
        # a chunk equal to the fill value would otherwise not be written at all
        spec["store_data_equal_to_fill_value"] = True
    return spec


def _write_leaf(path: Path, a: np.ndarray):
    """Start writing one leaf; returns the tensorstore write future (`.result()` waits and raises OSError-ish)."""
    store = ts.open(_spec(path, a.shape, a.dtype)).result()
    return store.write(a)


def _chunk_files(leaf_dir: Path) -> list[Path]:
    return [p for p in (leaf_dir / "c").rglob("*") if p.is_file()] if (leaf_dir / "c").exists() else []


class NvmeRead:
    """An in-flight read of a whole block: the tensorstore futures of every leaf, started together."""

    def __init__(self, block: "NvmeBlock", futures: dict):
        self._block, self._futures = block, futures

    def result(self) -> dict[str, np.ndarray]:
        """Wait for every leaf and verify its checksum; raises CorruptBlockError on mismatch."""
        out = {}
        for leaf, fut in self._futures.items():
            meta = self._block.meta[leaf]
            try:
                a = np.asarray(fut.result()).reshape(meta["shape"])
            except Exception as e:  # decode failures (truncated chunk, bad metadata)
                raise CorruptBlockError(self._block.block_id, leaf, f"unreadable ({type(e).__name__}: {e})") from e
            if not _chunk_files(self._block.path / leaf):
                raise CorruptBlockError(self._block.block_id, leaf, "chunk file is missing")
            if _digest(a) != meta["sha256"]:
                raise CorruptBlockError(self._block.block_id, leaf, "sha256 checksum mismatch")
            out[leaf] = a
        return out


class NvmeBlock:
    """S4. A block written to `store_dir/<block_id>/`."""

    state = State.S4
    where = "disk"

    def __init__(self, block_id: str, path: Path, meta: dict):
        self.block_id, self.path, self.meta = block_id, Path(path), meta

    @classmethod
    def write(cls, block_id: str, host_leaves: dict[str, np.ndarray], store_dir: str | Path) -> "NvmeBlock":
        """Write host arrays as a complete block directory (temp name, then rename). Raises OSError on failure,
        leaving no partial block behind."""
        store_dir = Path(store_dir)
        final = store_dir / block_id
        tmp = store_dir / f".tmp-{block_id}-{uuid.uuid4().hex[:8]}"
        futures = {}
        try:
            tmp.mkdir(parents=True)
            for leaf, a in host_leaves.items():
                futures[leaf] = _write_leaf(tmp / leaf, np.ascontiguousarray(a))
            meta = {  # hashed while tensorstore writes (hashlib releases the GIL)
                leaf: {"sha256": _digest(a), "shape": list(a.shape), "dtype": np.dtype(a.dtype).name,
                       "nbytes": int(a.nbytes)}
                for leaf, a in host_leaves.items()
            }
            for leaf, fut in futures.items():
                try:
                    fut.result()
                except OSError:
                    raise
                except Exception as e:  # tensorstore reports I/O failures as ValueError with the errno text
                    raise OSError(f"writing leaf '{leaf}' of block '{block_id}' failed: {e}") from e
            for leaf, m in meta.items():  # the chunk really landed with the right size
                size = sum(p.stat().st_size for p in _chunk_files(tmp / leaf))
                if size != m["nbytes"]:
                    raise OSError(f"leaf '{leaf}' of block '{block_id}': wrote {size} bytes, expected {m['nbytes']}")
            (tmp / CHECKSUM_FILE).write_text(json.dumps(meta, indent=1))
            old = None
            if final.exists():  # rewriting (recovery): move the old one aside, then swap
                old = store_dir / f".old-{block_id}-{uuid.uuid4().hex[:8]}"
                os.rename(final, old)
            os.rename(tmp, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            for fut in futures.values():  # let started writes finish before removing their directory
                try:
                    fut.result()
                except Exception:
                    pass
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(block_id, final, meta)

    def read_async(self) -> NvmeRead:
        """Start reading every leaf (tensorstore futures, all in flight together)."""
        futures = {}
        for leaf in self.meta:
            try:
                store = ts.open(_spec(self.path / leaf)).result()
                futures[leaf] = store.read()
            except Exception as e:
                raise CorruptBlockError(self.block_id, leaf, f"cannot open ({type(e).__name__}: {e})") from e
        return NvmeRead(self, futures)

    def read(self) -> dict[str, np.ndarray]:
        return self.read_async().result()

    def chunk_files(self) -> list[Path]:
        return [p for leaf in self.meta for p in _chunk_files(self.path / leaf)]

    @property
    def nbytes(self) -> int:
        """Bytes of the chunk files on disk (stat)."""
        return sum(p.stat().st_size for p in self.chunk_files())

    def arrays(self) -> list:
        return []

    def materialize(self):
        raise OffDeviceError(f"block '{self.block_id}' is on NVMe (S4): request S0 before using it")

    def free(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
