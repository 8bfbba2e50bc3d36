"""A compressed home: a block's int8 / int4 / low-rank representation kept in pinned host memory, or on NVMe.

Made once, when the block is staged (from its lossless float32 leaves, by the very conversion the on-device states
run), and kept for the whole run beside the lossless home. A load into the state it represents moves these arrays
over `host->device` as they are (read from the store first, `nvme->host`, when the copy is on disk) and lands as
that state (S1, S2 or S6): the links carry the compressed bytes, and the device computes on them directly (the
dequant-matmul kernels read int8 / int4 as is).

Invariant: `to_device()` is bit-identical to converting the block's S0 arrays on device (the same jitted
quantizer / factorisation on the same float32 input); its `nbytes` equal the landed state's device bytes; on NVMe
the leaves are the same arrays, flattened, each with its checksum (`nvme_store`).
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from vorch_jax.tiers.full_precision import FullPrecisionBlock, delete_arrays, device_sharding, pinned_host_sharding
from vorch_jax.tiers.nvme_store import NvmeBlock
from vorch_jax.tiers.state import LOSSY, OffDeviceError, State


def convert_on_device(block, state: State, *, int4_group_size: int, lowrank_rank: int):
    """An S0 block converted to lossy `state` on its device (the caller frees the S0 block)."""
    from vorch_jax.tiers.low_bit import LowBitBlock
    from vorch_jax.tiers.low_rank import LowRankBlock

    if state == State.S1:
        return LowBitBlock.from_full_precision(block, bits=8)
    if state == State.S2:
        return LowBitBlock.from_full_precision(block, bits=4, group_size=int4_group_size)
    if state == State.S6:
        return LowRankBlock.from_full_precision(block, rank=lowrank_rank)
    raise ValueError(f"no lossy conversion to {state.name}: expected S1, S2 or S6")


class PackedHostBlock:
    """A compressed home in pinned host memory: `lands_in` is the on-device state it loads as (S1, S2, S6)."""

    state = State.S3
    where = "host"

    def __init__(self, device_rep, device: jax.Device):
        """Copy the leaves of an on-device lossy representation (LowBitBlock, LowRankBlock) to pinned host memory;
        the caller frees `device_rep`."""
        if device_rep.state not in LOSSY:
            raise ValueError(f"a compressed home holds a lossy state (S1, S2, S6), not {device_rep.state.name}")
        from vorch_jax.tiers.low_bit import LowBitBlock
        from vorch_jax.tiers.low_rank import LowRankBlock

        self.lands_in = device_rep.state
        self._rebuild = (functools.partial(LowBitBlock, bits=device_rep.bits, group_size=device_rep.group_size)
                         if isinstance(device_rep, LowBitBlock) else functools.partial(LowRankBlock, rank=device_rep.rank))
        self.leaves = jax.device_put(device_rep.leaves, pinned_host_sharding(device))
        self.treedef = jax.tree.structure(self.leaves)
        jax.block_until_ready(self.leaves)

    def flat_numpy(self) -> dict[str, np.ndarray]:
        """The leaves as host numpy arrays named by their order (what the NVMe store writes); `treedef` rebuilds."""
        return {f"{i:03d}": np.asarray(a) for i, a in enumerate(jax.tree.leaves(self.leaves))}

    @classmethod
    def from_flat(cls, flat: dict, like: "PackedNvmeBlock", device: jax.Device) -> "PackedHostBlock":
        """Pinned host arrays from the store's flat leaves, shaped like the block `like` was written from."""
        new = cls.__new__(cls)
        new.lands_in, new._rebuild, new.treedef = like.lands_in, like._rebuild, like.treedef
        arrays = [jax.device_put(flat[f"{i:03d}"], pinned_host_sharding(device)) for i in range(len(flat))]
        new.leaves = jax.tree.unflatten(like.treedef, arrays)
        jax.block_until_ready(new.leaves)
        return new

    @classmethod
    def stage(cls, host_leaves: dict, state: State, device: jax.Device, *, int4_group_size: int = 64,
              lowrank_rank: int = 32) -> "PackedHostBlock":
        """Compress float32 host leaves (the source's) into `state` on `device`, keep the result in host memory."""
        full = FullPrecisionBlock({k: jax.device_put(v, device_sharding(device)) for k, v in host_leaves.items()})
        try:
            lossy = convert_on_device(full, state, int4_group_size=int4_group_size, lowrank_rank=lowrank_rank)
        finally:
            full.free()
        try:
            return cls(lossy, device)
        finally:
            lossy.free()

    def to_device(self, device: jax.Device):
        """The representation on `device` (a LowBitBlock / LowRankBlock in state `lands_in`): the host->device
        copy of the compressed arrays; this home copy stays."""
        leaves = jax.device_put(self.leaves, device_sharding(device))
        jax.block_until_ready(leaves)
        return self._rebuild(leaves)

    @functools.cached_property
    def nbytes(self) -> int:
        return sum(int(x.nbytes) for x in jax.tree.leaves(self.leaves))

    def arrays(self) -> list[jax.Array]:
        return jax.tree.leaves(self.leaves)

    def materialize(self):
        raise OffDeviceError(f"block is compressed ({self.lands_in.name}) in host memory: request "
                             f"{self.lands_in.name} before using it")

    def free(self) -> None:
        delete_arrays(self.leaves)


class PackedNvmeBlock:
    """A compressed home on NVMe: the flat leaves of a PackedHostBlock in the store, under `<block>@<state>`."""

    state = State.S4
    where = "disk"

    def __init__(self, block_id: str, host: PackedHostBlock, store_dir):
        self.lands_in, self._rebuild = host.lands_in, host._rebuild
        self.store = NvmeBlock.write(f"{block_id}@{host.lands_in.name}", host.flat_numpy(), store_dir)
        self.treedef = host.treedef

    def read_async(self):
        return self.store.read_async()

    @property
    def nbytes(self) -> int:
        return self.store.nbytes

    def arrays(self) -> list:
        return []

    def materialize(self):
        raise OffDeviceError(f"block is compressed ({self.lands_in.name}) on NVMe: request {self.lands_in.name} "
                             f"before using it")

    def free(self) -> None:
        self.store.free()
