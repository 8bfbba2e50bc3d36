"""A real mesh: each device of `cfg.mesh` runs its own shard under its own budget, the devices joined by collectives.

`run_mesh(cfg, out_dir, run_device)` runs `cfg` on the first `cfg.mesh.devices` JAX devices (a 1-D mesh: axis `tp`
or `ep`; across processes once `jax.distributed` is initialised, each process running its own devices):
  * each device is a run of its own (`run_device`: runtime.run's, passed in so this module does not import the
    runtime that calls it), in a thread of this process under `jax.default_device(device)`: its shard of the model
    (`models.shard_spec.ShardSpec`, weights sliced from the model's), the run's `hbm_budget` as a fraction of that
    shard's bytes checked on its own, its own movement engine moving the shard's arrays between that device's
    memory kinds (`device`, `pinned_host`), its own policy, ledger, trace and Belady over its own reads;
  * the ops are the shard's (`models/shard_compute.py`); where the devices must join (a tensor-parallel sum or
    gather, the expert-parallel sum at a routed layer's end) they meet in `collectives.MeshCollectives`, one
    sharded jitted program over the mesh;
  * the resident reference is computed once, on one device with the whole model: every device's tokens are
    compared with it;
  * `summary.json` in `out_dir`: the mesh's figures and a row per device (`mesh_devices.mesh_summary`); each
    device's own outputs under `device-<d>/`. Across processes (`start_processes`) each process writes the rows
    of its own devices, in `process-<i>/summary.json`.
On CPU the devices are `jax_num_cpu_devices` (set before JAX starts: `ensure_devices` does it when it still can).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax

from vorch_jax.config import MeshConfig
from vorch_jax.errors import ConfigError
from vorch_jax.outputs import check_out_dir, writing


@dataclasses.dataclass(frozen=True)
class Seat:
    """A device's place on a real mesh: its index on the mesh axis, its JAX device, its collectives."""

    index: int
    device: object
    collectives: object


def start_processes(devices: int, *, coordinator: str | None = None, processes: int | None = None,
                    process_id: int | None = None) -> None:
    """Join this process to a multi-process run (`jax.distributed.initialize`) before JAX starts. With all three of
    `coordinator` ("host:port" of process 0), `processes` and `process_id` given, those; with none, JAX's own
    detection (a TPU slice, SLURM, Open MPI). On CPU each process gets `devices // processes` devices and the
    processes' collectives go through gloo."""
    from jax._src import xla_bridge

    given = (coordinator, processes, process_id)
    if any(v is not None for v in given) and any(v is None for v in given):
        raise ConfigError("--coordinator, --processes and --process-id go together (or none of them: JAX detects a "
                          "TPU slice, SLURM or Open MPI itself)")
    if processes is not None and (processes < 1 or devices % processes or not 0 <= process_id < processes):
        raise ConfigError(f"--processes {processes} must divide the mesh's {devices} devices and --process-id "
                          f"{process_id} be one of 0..{processes - 1}")
    if xla_bridge.backends_are_initialized():
        raise ConfigError("jax.distributed must start before any JAX work: run the command in a fresh process")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only the CPU backend reads it
    if processes is not None:
        jax.config.update("jax_num_cpu_devices", devices // processes)
        jax.distributed.initialize(coordinator, num_processes=processes, process_id=process_id)
    else:
        jax.distributed.initialize()
    jax.devices()  # start the backends now, with this process's devices


def ensure_devices(n: int) -> list:
    """The first `n` JAX devices (every process's); on CPU, asks for `n` devices per process first when JAX has not
    started yet. A one-line ConfigError when there are fewer."""
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized() and jax.config.jax_num_cpu_devices < n:
        jax.config.update("jax_num_cpu_devices", n)  # only CPU reads it: a GPU or TPU host keeps its devices
    devices = jax.devices()
    if len(devices) < n:
        raise ConfigError(f"mesh: asks for {n} devices but JAX has {len(devices)} ({devices[0].platform}); on CPU "
                          f"start a fresh process (JAX gives {n} CPU devices when asked before it starts: "
                          f"jax.config.update('jax_num_cpu_devices', {n})), or make the mesh smaller")
    return devices[:n]


def whole_model(cfg):
    """`cfg` on one device (the resident reference's run); on a real mesh, the mesh's devices made available first
    (JAX starts here)."""
    if cfg.mesh.devices == 1:
        return cfg
    if cfg.executor != "sim":
        ensure_devices(cfg.mesh.devices)
    return dataclasses.replace(cfg, mesh=MeshConfig())


def run_mesh(cfg, out_dir, run_device, *, progress=None, reference=None) -> dict:
    """Run `cfg` on its mesh for real (see the module docstring); returns the mesh's summary. `reference`: the
    whole model's resident reference computed earlier (`run`'s), else computed here."""
    from vorch_jax.runtime import telemetry as T
    from vorch_jax.runtime.collectives import MeshCollectives
    from vorch_jax.runtime.mesh_devices import mesh_summary, run_devices
    from vorch_jax.runtime.reference import resident_reference
    from vorch_jax.runtime.setup import build_setup

    out_dir = check_out_dir(Path(out_dir))
    say = progress or (lambda msg: None)
    devices = ensure_devices(cfg.mesh.devices)
    collectives = MeshCollectives(devices, "tp" if cfg.mesh.tp > 1 else "ep")
    local = [i for i, d in enumerate(devices) if d.process_index == jax.process_index()]
    if reference is None:
        say("resident reference (one device, the whole model)")
        whole = build_setup(whole_model(cfg))
        with jax.default_device(devices[local[0]]):
            reference = resident_reference(whole, jax.numpy.dtype(cfg.dtype), cfg.new_tokens)
    say(f"{len(local)} of the mesh's {len(devices)} devices run in this process")

    def one(i):
        with jax.default_device(devices[i]):
            return run_device(cfg, out_dir / f"device-{i}", progress, reference,
                              Seat(i, devices[i], collectives.on(devices[i])))

    runs = run_devices(one, local, collectives.abort)
    s = mesh_summary(cfg, runs, 1, {
        "devices_of_mesh": [str(d) for d in devices], "processes": jax.process_count(),
        "process_index": jax.process_index(), "local_devices": local, "collective_calls": collectives.calls,
        "note": "each device ran for real: its own shard, budget, engine and policy; the devices joined by XLA "
                "collectives over the mesh"})
    where = out_dir if jax.process_count() == 1 else check_out_dir(out_dir / f"process-{jax.process_index()}")
    with writing(where):
        T.write_json_atomic(where / "summary.json", s)
    return s
