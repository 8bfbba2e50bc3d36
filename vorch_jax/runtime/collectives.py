"""The collectives of a real mesh whose devices' runs are threads of this process: sharded jitted sums and gathers.

Each device of a mesh runs its own run (its shard, budget, engine, policy and driver) in a thread of its own
(`mesh_run.py`). Where its ops must join the other devices' (`models/shard_compute.py`), the device's thread hands
its part to `MeshCollectives`; once every device of this process has handed in its part, the parts become one
`jax.Array` sharded over the mesh's axis (`jax.make_array_from_single_device_arrays`, no copy) and one jitted
program with a replicated output sharding sums or gathers them: XLA's own all-reduce / all-gather across the
devices, the result's shard on each device handed back to that device's thread. Across processes
(`jax.distributed`) the same program runs in every process over the global mesh, each process handing in its own
devices' parts (every process runs the same schedule, so they call it in the same order).
"""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


class MeshCollectives:
    """Sums and gathers over the 1-D mesh `devices` (all processes' devices, in mesh order) along `axis`."""

    def __init__(self, devices: list, axis: str, timeout_s: float = 600.0):
        self.mesh = Mesh(np.asarray(devices), (axis,))
        self.local = [d for d in devices if d.process_index == jax.process_index()]
        self._parts: dict = {}
        self._op, self._result = None, {}
        self._enter = threading.Barrier(len(self.local), action=self._combine, timeout=timeout_s)
        self._leave = threading.Barrier(len(self.local), timeout=timeout_s)
        self._stacked = NamedSharding(self.mesh, PartitionSpec(axis))
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self._programs = {
            "sum": jax.jit(lambda parts_NxS: parts_NxS.sum(0), out_shardings=replicated),
            "gather": jax.jit(lambda parts_NxS: jnp.concatenate(list(parts_NxS), axis=-1), out_shardings=replicated),
        }
        self.calls = 0

    def on(self, device) -> "DeviceCollectives":
        """The collectives as device `device`'s ops call them."""
        return DeviceCollectives(self, device)

    def call(self, device, op: str, part):
        """Device `device`'s part of collective `op`; returns its copy of the result once every local device's
        part is in (the devices of this process meet here)."""
        self._parts[device] = part
        self._op = op
        self._enter.wait()  # the last to arrive runs `_combine` before any is released
        out = self._result[device]
        self._leave.wait()  # nobody hands in the next part before every device has its result
        return out

    def _combine(self) -> None:
        parts = [self._parts[d] for d in self.local]
        shape = (self.mesh.size, *parts[0].shape)
        stacked = jax.make_array_from_single_device_arrays(shape, self._stacked, [p[None] for p in parts])
        out = self._programs[self._op](stacked)
        self._result = {s.device: s.data for s in out.addressable_shards}
        self._parts = {}
        self.calls += 1

    def abort(self) -> None:
        """A device failed: release the others (their next call raises `threading.BrokenBarrierError`)."""
        self._enter.abort()
        self._leave.abort()


class DeviceCollectives:
    """One device's view of `MeshCollectives`: what `models.shard_compute.ShardCompute` calls."""

    def __init__(self, mesh: MeshCollectives, device):
        self._mesh, self.device = mesh, device

    def all_reduce(self, part):
        """The sum over the mesh's devices of their `part`s (same shape), on this device."""
        return self._mesh.call(self.device, "sum", part)

    def all_gather(self, part):
        """The devices' `part`s concatenated along the last axis in mesh order, on this device."""
        return self._mesh.call(self.device, "gather", part)
