"""A mesh of devices, simulated: each device runs its shard under its own budget and link, the mesh steps together.

`simulate_mesh(cfg, out_dir)` runs `cfg` on `cfg.mesh.tp` x `cfg.mesh.ep` devices of a multi-device profile (its
`mesh` section: each device its own host link, or sharing a switch uplink, all of them together capped by the
host's DRAM; the interconnect the collectives use):
  * each device is a run of its own: its shard of the model (`models.shard_spec.ShardSpec`), the run's
    `hbm_budget` as a fraction of that shard's bytes, the policy deciding for it alone, the collectives after its
    positions on its compute stream, its host link as shared by the devices that load at once (all of them: they
    run the same schedule). With tp alone every device runs the same schedule on an equal shard, so device 0 is
    simulated for all (the summary says so); with ep each device holds other experts and sees other reads, and each
    is simulated (the same routing trace for all);
  * the mesh's decode step: the devices meet at every layer (its collective), so a step lasts, layer by layer, as
    long as the slowest device's span of that layer (`layer_segments`); also reported: the slowest device's whole
    step (no barrier: a lower bracket, as if the devices could run ahead of each other);
  * `summary.json` in `out_dir`: the mesh's figures (bytes summed over all devices; stall, transfer and controller
    time the slowest device's) and a row per device (budget, peak, bytes moved, Belady's bytes for its own stream,
    its floor); each device's own run (summary and trace) under `device-<d>/`.
"""

from __future__ import annotations

import statistics
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


def layer_segments(accesses, gen) -> list[list[float]]:
    """Per measured decode step (`Generation.measured_window`), the seconds from the step's start to its first read
    of layer 0, from each layer's first read to the next layer's, and from the last one to the step's end."""
    w0, w1, n = gen.measured_window()
    first = len(gen.marks) - 1 - n  # decode step k spans marks[k] .. marks[k + 1]
    starts: dict[int, dict[int, float]] = {}
    for a in accesses:
        if first <= a.step < first + n and a.layer >= 0:
            starts.setdefault(a.step, {}).setdefault(a.layer, a.start)
    out = []
    for k in range(first, first + n):
        layers = starts.get(k, {})
        bounds = [gen.marks[k]] + [layers[i] for i in sorted(layers)] + [gen.marks[k + 1]]
        out.append([b - a for a, b in zip(bounds, bounds[1:])])
    return out


def barrier_step_s(segments_per_device: list) -> float | None:
    """The mesh's mean decode step when the devices meet at every layer: per step, Σ over segments of the slowest
    device's; None when the devices' steps do not line up segment by segment."""
    steps = list(zip(*segments_per_device))
    if any(len({len(seg) for seg in step}) != 1 for step in steps):
        return None
    return statistics.fmean(sum(max(col) for col in zip(*step)) for step in steps)


def simulate_mesh(cfg, out_dir, *, hardware=None, progress=None) -> dict:
    """Simulate `cfg` on its mesh (see the module docstring); returns the mesh's summary."""
    from vorch_jax.runtime import telemetry as T
    from vorch_jax.runtime.run import simulate

    out_dir = check_out_dir(Path(out_dir))
    say = progress or (lambda msg: None)
    hw = load_profile(hardware if hardware is not None else cfg.hardware)
    device_profile(hw, cfg.mesh.devices)
    simulated = list(range(cfg.mesh.ep)) if cfg.mesh.ep > 1 else [0]
    runs = []
    for d in simulated:
        say(f"device {d} of {cfg.mesh.devices}")
        runs.append(simulate(cfg, out_dir / f"device-{d}", hardware=hw, device=d, progress=progress))
    alone = max(r["decode_step_s"] for r in runs)
    barrier = barrier_step_s([r["mesh_device"]["layer_segments"] for r in runs])
    step = barrier if barrier is not None else alone
    rows = [{"device": r["mesh_device"]["device"], "hbm_budget_bytes": r["hbm_budget_bytes"],
             "shard_bytes": r["model_bytes"], "peak_device_bytes": r["peak_device_bytes"],
             "bytes_moved": r["bytes_moved"], "belady_bytes": r["belady_bytes"],
             "moved_over_belady": r["moved_over_belady"], "decode_step_s": r["decode_step_s"],
             "floor_step_s": r["floor_step_s"], "decode_h2d_bytes_per_step": r["decode_h2d_bytes_per_step"],
             "stall_s": r["stall_s"]} for r in runs]
    base, slowest = runs[0], max(runs, key=lambda r: r["decode_step_s"])
    copies = cfg.mesh.devices // len(rows)  # devices each simulated run stands for
    s = {k: base[k] for k in ("complete", "config", "model", "policy", "lossy", "home_formats", "hbm_budget_bytes",
                              "dram_budget_bytes", "model_bytes", "prompt_tokens", "simulated", "executor", "hardware",
                              "quality", "tokens", "tokens_match_resident", "versions")}
    s |= {k: slowest[k] for k in ("stall_s", "transfer_s", "controller_s", "wall_s")}  # the slowest device's
    s |= {"decode_step_s": step, "decode_tok_s": 1.0 / step if step > 0 else float("nan"),
          "floor_step_s": max(r["floor_step_s"] for r in rows),
          "bytes_moved": sum(r["bytes_moved"] for r in rows) * copies,
          "belady_bytes": sum(r["belady_bytes"] for r in rows) * copies,
          "lower_bound_bytes": sum(r["lower_bound_bytes"] for r in runs) * copies,
          "peak_device_bytes": max(r["peak_device_bytes"] for r in rows),
          "mesh": {"tp": cfg.mesh.tp, "ep": cfg.mesh.ep, "devices": cfg.mesh.devices,
                   "profile_devices": hw.mesh.devices, "host_link_gbps": device_profile(
                       hw, cfg.mesh.devices).host_to_device.bandwidth_bytes_per_s / 1e9,
                   "simulated_devices": simulated,
                   "note": ("tensor parallel alone: every device runs the same schedule on an equal shard; device 0 "
                            "was simulated for all" if len(simulated) == 1 else
                            "each device simulated with its own experts, the same routing for all"),
                   "decode_step_s_barrier": barrier, "decode_step_s_no_barrier": alone, "per_device": rows}}
    s["moved_over_belady"] = s["bytes_moved"] / s["belady_bytes"] if s["belady_bytes"] else float("nan")
    with writing(out_dir):
        T.write_json_atomic(out_dir / "summary.json", s)
    return s
