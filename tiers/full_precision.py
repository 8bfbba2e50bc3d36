"""S0: the block in full precision (float32) in device memory.

Invariant: every leaf is a `jax.Array` whose sharding has memory_kind "device", bit-identical to the source.
"""

from __future__ import annotations

import functools

import jax

from vorch_jax.tiers.state import State


def device_sharding(device: jax.Device) -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(device, memory_kind="device")


def pinned_host_sharding(device: jax.Device) -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")


@functools.cache
def _copy_into(device: jax.Device):
    dev, host = device_sharding(device), pinned_host_sharding(device)
    return jax.jit(lambda dst, src: jax.lax.dynamic_update_slice(dst, jax.device_put(src, dev), (0,) * dst.ndim),
                   donate_argnums=0, in_shardings=(dev, host), out_shardings=dev)


def copy_into(held: jax.Array, src: jax.Array, device: jax.Device) -> jax.Array:
    """`src` (pinned host) copied into the memory of `held` (device, same shape and dtype), which it consumes."""
    return _copy_into(device)(held, src)


def copy_into_reference(held: jax.Array, src: jax.Array, device: jax.Device) -> jax.Array:
    """What `copy_into` returns, by `jax.device_put` into new memory (`held` is left alone)."""
    return jax.device_put(src, device_sharding(device))


COPIES_MEASURED_ON = ("cpu",)  # platforms where `land` and copies into held memory were measured to pay


def copies_measured(device: jax.Device) -> bool:
    """Whether `device`'s platform is one where the compiled landing and copies into held memory
    (`experiments/host_copy_rates.py`) were measured faster than `jax.device_put`: elsewhere the runtime keeps
    `jax.device_put` and fresh memory."""
    return device.platform in COPIES_MEASURED_ON


@functools.cache
def _land(device: jax.Device):
    dev, host = device_sharding(device), pinned_host_sharding(device)
    return jax.jit(lambda src: jax.device_put(src, dev), in_shardings=host, out_shardings=dev)


def land(src: jax.Array, device: jax.Device) -> jax.Array:
    """`src` (pinned host) copied into new device memory: on a CPU backend by a compiled transfer, faster than
    `jax.device_put` at every size measured (`experiments/host_copy_rates.py`, its results file: 'landed' against
    'fresh'); elsewhere, where that is unmeasured, by `jax.device_put`."""
    if not copies_measured(device):
        return jax.device_put(src, device_sharding(device))
    return _land(device)(src)


def tree_nbytes(tree) -> int:
    """Bytes of the arrays in a pytree, from the arrays themselves."""
    return sum(int(x.nbytes) for x in jax.tree.leaves(tree))


def delete_arrays(tree) -> None:
    """Free every jax.Array of `tree` now (not at garbage collection) and check it is gone."""
    leaves = [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)]
    for x in leaves:
        x.delete()
    still = [x.shape for x in leaves if not x.is_deleted()]
    if still:
        raise RuntimeError(f"arrays of shapes {still} were not freed")


class DeviceBlock:
    """What every on-device representation shares: a dict of leaves (arrays or low-bit / low-rank weights)."""

    where = "device"

    @functools.cached_property
    def nbytes(self) -> int:
        """Bytes of the leaves' arrays, read once: a representation's arrays never change (the ledger reads this at
        every access; summing ~200 jax `nbytes` each time cost 0.7 ms an access on a 62-block model)."""
        return tree_nbytes(self.leaves)

    def arrays(self) -> list[jax.Array]:
        return jax.tree.leaves(self.leaves)

    def dequantize(self) -> dict[str, jax.Array]:
        """Float32 `[K, N]` / `[D]` approximations of the source leaves (the leaves themselves when exact)."""
        return {k: v if isinstance(v, jax.Array) else v.dequantize() for k, v in self.leaves.items()}

    def materialize(self) -> dict:
        return dict(self.leaves)

    def free(self) -> None:
        delete_arrays(self.leaves)


class FullPrecisionBlock(DeviceBlock):
    """S0. `leaves: {name: f32[K, N] | f32[D]}` on device."""

    state = State.S0

    def __init__(self, leaves: dict[str, jax.Array]):
        self.leaves = leaves

    @classmethod
    def from_pinned_host(cls, host, device: jax.Device, into: dict | None = None) -> "FullPrecisionBlock":
        """Copy an S3 block (PinnedHostBlock) host->device; the host copy is left for the caller to free. `into`:
        held device arrays (same shape and dtype) the named leaves are copied into (`copy_into`)."""
        into = into or {}
        leaves = {k: copy_into(into[k], v, device) if k in into else land(v, device) for k, v in host.leaves.items()}
        jax.block_until_ready(leaves)
        return cls(leaves)
