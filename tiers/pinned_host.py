"""S3: the block in pinned host DRAM, as jax arrays with memory_kind "pinned_host".

Invariant: bit-identical to the source; the arrays are not usable by device compute (a jitted op mixing a
pinned_host and a device operand fails), so `materialize()` raises: move the block to S0 first.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from vorch_jax.tiers.full_precision import delete_arrays, pinned_host_sharding, tree_nbytes
from vorch_jax.tiers.state import OffDeviceError, State


class PinnedHostBlock:
    """S3. `leaves: {name: f32[K, N] | f32[D]}` in pinned host memory."""

    state = State.S3
    where = "host"

    def __init__(self, leaves: dict[str, jax.Array]):
        self.leaves = leaves

    @classmethod
    def from_device(cls, block, device: jax.Device) -> "PinnedHostBlock":
        """Copy an S0 block device->host (the caller frees the device copy once the whole route landed)."""
        return cls._put(block.leaves, device)

    @classmethod
    def from_numpy(cls, host_leaves: dict[str, np.ndarray], device: jax.Device) -> "PinnedHostBlock":
        """Place host numpy arrays (read from the source or the store) into pinned host memory."""
        return cls._put(host_leaves, device)

    @classmethod
    def _put(cls, leaves, device) -> "PinnedHostBlock":
        sharding = pinned_host_sharding(device)
        out = {k: jax.device_put(v, sharding) for k, v in leaves.items()}
        jax.block_until_ready(out)
        return cls(out)

    @functools.cached_property
    def nbytes(self) -> int:
        """Bytes of the leaves' arrays, read once: a representation's arrays never change (the ledger reads this at
        every access; summing ~200 jax `nbytes` each time cost 0.7 ms an access on a 62-block model)."""
        return tree_nbytes(self.leaves)

    def arrays(self) -> list[jax.Array]:
        return list(self.leaves.values())

    def to_numpy(self) -> dict[str, np.ndarray]:
        """Host numpy copies (what the store writes)."""
        return {k: np.asarray(v) for k, v in self.leaves.items()}

    def materialize(self):
        raise OffDeviceError("block is in pinned host memory (S3): request S0 before using it")

    def free(self) -> None:
        delete_arrays(self.leaves)
