"""A mesh of devices, simulated: each device runs its shard under its own budget and link, the mesh steps together.

`simulate_mesh(cfg, out_dir)` runs `cfg` on `cfg.mesh.tp` x `cfg.mesh.ep` devices of a multi-device profile (its
`mesh` section: each device its own host link, or sharing a switch uplink, all of them together capped by the
host's DRAM; the interconnect the collectives use):
  * each device is a run of its own: its shard of the model (`models.shard_spec.ShardSpec`), the run's
    `hbm_budget` as a fraction of that shard's bytes, the policy deciding for it alone, the collectives after its
    positions on its compute stream, its host link as shared by the devices that load at once (all of them: they
    run the same schedule);
  * the devices meet at every layer's end (its collective: `LayerBarrier`): no device's stream goes past it before
    every device's has reached it, so a device stalled on a load holds the others, whose links go on loading
    meanwhile. The devices run in threads side by side, each on its own modelled clock (host time: each thread's
    CPU time). With tp alone every device runs the same schedule on an equal shard, so device 0 is simulated for all
    (the summary says so); with ep each device holds other experts and sees other reads, and all are simulated, on
    the same routing trace;
  * `summary.json` in `out_dir`: the mesh's figures (its step: the slowest device's; bytes summed over all
    devices; stall, transfer and controller time the slowest device's) and a row per device (budget, peak, bytes
    moved, Belady's bytes for its own stream, its floor); each device's own run (summary and trace) under
    `device-<d>/`.
"""
from __future__ import annotations

import threading
from pathlib import Path

from vorch_jax.errors import ProfileError
from vorch_jax.outputs import check_out_dir, writing
from vorch_jax.simulation.hardware import load_profile


def device_profile(hw, devices: int):
    """One device of `hw`'s mesh as the simulator runs it, with `devices` of them loading at once."""
    if hw.mesh is None:
        raise ProfileError(f"hardware profile {hw.name} describes one device; a mesh of {devices} needs a profile with "
                           f"a mesh section (e.g. hardware=8x-h100-sxm)")
    if hw.mesh.devices < devices:
        raise ProfileError(f"the mesh asks for {devices} devices but {hw.name} has {hw.mesh.devices}")
    return hw.device_view(devices)


class LayerBarrier:
    """Where the devices' compute streams meet: each device's `meet(its stream's time)` returns, once all have
    called it for this layer, the latest of those times (the collective ends for all when the last one starts it)."""

    def __init__(self, devices: int, timeout_s: float = 600.0):
        self._barrier = threading.Barrier(devices, timeout=timeout_s)
        self._lock = threading.Lock()
        self._latest: dict[int, float] = {}
        self._round = threading.local()

    def meet(self, stream_time: float) -> float:
        k = getattr(self._round, "k", 0)
        self._round.k = k + 1
        with self._lock:
            self._latest[k] = max(self._latest.get(k, stream_time), stream_time)
        self._barrier.wait()
        return self._latest[k]

    def abort(self) -> None:
        """A device failed: release the others (their `meet` raises BrokenBarrierError)."""
        self._barrier.abort()


def _run_devices(simulate, cfg, out_dir: Path, hw, devices: list, progress) -> list:
    """Each device's simulated run (`simulate`: runtime.run's), side by side in threads meeting at every layer."""
    from vorch_jax.runtime.mesh_devices import run_devices
    from vorch_jax.runtime.setup import model_spec

    base = model_spec(cfg).base
    base.blocks(), base.leaf_shapes  # the shared base spec's tables, built once before the threads read them
    barrier = LayerBarrier(len(devices)) if len(devices) > 1 else None
    return run_devices(lambda d: simulate(cfg, out_dir / f"device-{d}", hardware=hw, device=d, progress=progress,
                                          barrier=barrier),
                       devices, barrier.abort if barrier is not None else lambda: None)


def simulate_mesh(cfg, out_dir, simulate, *, hardware=None, progress=None) -> dict:
    """Simulate `cfg` on its mesh (see the module docstring), each device's run by `simulate` (runtime.run's: passed
    in, so this module does not import the runtime that calls it); returns the mesh's summary."""
    from vorch_jax.runtime import telemetry as T
    from vorch_jax.runtime.mesh_devices import mesh_summary

    out_dir = check_out_dir(Path(out_dir))
    say = progress or (lambda msg: None)
    hw = load_profile(hardware if hardware is not None else cfg.hardware)
    device_profile(hw, cfg.mesh.devices)
    simulated = list(range(cfg.mesh.ep)) if cfg.mesh.ep > 1 else [0]
    say(f"{len(simulated)} of {cfg.mesh.devices} devices simulated")
    runs = _run_devices(simulate, cfg, out_dir, hw, simulated, progress)
    s = mesh_summary(cfg, runs, cfg.mesh.devices // len(simulated), {
        "profile_devices": hw.mesh.devices,
        "host_link_gbps": device_profile(hw, cfg.mesh.devices).host_to_device.bandwidth_bytes_per_s / 1e9,
        "simulated_devices": simulated,
        "note": ("tensor parallel alone: every device runs the same schedule on an equal shard; device 0 was "
                 "simulated for all" if len(simulated) == 1 else
                 "each device simulated with its own experts, the same routing for all, the devices meeting at "
                 "every layer's end")})
    with writing(out_dir):
        T.write_json_atomic(out_dir / "summary.json", s)
    return s
