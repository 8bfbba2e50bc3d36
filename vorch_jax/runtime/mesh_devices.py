"""What a mesh's runs share, real or simulated: its devices' runs side by side in threads, and one summary of them.

A mesh run is one run per device (its shard, budget, link, policy and driver), the devices meeting where their
compute streams must (a collective: `collectives.py` on a real mesh, `simulation.mesh.LayerBarrier` on a modelled
one). `run_devices` runs them in threads and re-raises the first device's error after releasing the others;
`mesh_summary` is the mesh's `summary.json`: the step of the slowest device, bytes and counts summed over the
devices, and a row per device (budget, peak, bytes moved, Belady's bytes for its own stream, its floor).
"""

from __future__ import annotations

import threading


def run_devices(run_one, devices: list, release) -> list:
    """`run_one(d)` for each device index in `devices`, each in a thread; `release()` frees the others when one
    fails (their meeting raises `threading.BrokenBarrierError`), and the first real error is re-raised. Returns the
    runs' results in `devices` order."""
    runs, errors = {}, []

    def one(d):
        try:
            runs[d] = run_one(d)
        except BaseException as err:  # noqa: BLE001 - handed to the caller below, the other devices released
            errors.append(err)
            release()

    threads = [threading.Thread(target=one, args=(d,), name=f"mesh-device-{d}") for d in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0] if errors else None)
    if first is not None:
        raise first
    return [runs[d] for d in devices]


ROW_FIELDS = ("hbm_budget_bytes", "peak_device_bytes", "bytes_moved", "belady_bytes", "moved_over_belady",
              "lower_bound_bytes",
              "decode_step_s", "floor_step_s", "decode_h2d_bytes_per_step", "stall_s")


def device_row(run: dict) -> dict:
    """A device's row of the mesh's table, from its own run's summary."""
    return {"device": run["mesh_device"], "shard_bytes": run["model_bytes"], **{k: run[k] for k in ROW_FIELDS},
            "tokens_match_resident": run.get("tokens_match_resident")}


def mesh_summary(cfg, runs: list, copies: int, mesh: dict) -> dict:
    """The mesh's summary from its devices' runs (each standing for `copies` devices: a tensor-parallel simulation
    runs one for all); `mesh`: what the caller adds to its `mesh` section."""
    rows = [device_row(r) for r in runs]
    step = max(r["decode_step_s"] for r in runs)
    base, slowest = runs[0], max(runs, key=lambda r: r["decode_step_s"])
    s = {k: base[k] for k in ("complete", "config", "model", "policy", "lossy", "home_formats", "dram_budget_bytes",
                              "prompt_tokens", "simulated", "executor", "hardware", "quality", "tokens", "versions",
                              "resident_step_s", "backend")
         if k in base}
    s |= {k: slowest[k] for k in ("stall_s", "transfer_s", "controller_s", "wall_s", "prefill_s") if k in slowest}
    s |= {k: sum(r[k] for r in runs) * copies for k in ("hits", "misses") if all(k in r for r in runs)}
    links = sorted({link for r in runs for link in r.get("link_bytes", {})})
    s["link_bytes"] = {link: sum(r.get("link_bytes", {}).get(link, 0) for r in runs) * copies for link in links}
    s |= {"hbm_budget_bytes": base["hbm_budget_bytes"], "model_bytes": base["model_bytes"],  # one device's shard
          "decode_step_s": step, "decode_tok_s": 1.0 / step if step > 0 else float("nan"),
          "floor_step_s": max(r["floor_step_s"] for r in rows),
          "bytes_moved": sum(r["bytes_moved"] for r in rows) * copies,
          "belady_bytes": sum(r["belady_bytes"] for r in rows) * copies,
          "lower_bound_bytes": sum(r["lower_bound_bytes"] for r in rows) * copies,
          "peak_device_bytes": max(r["peak_device_bytes"] for r in rows),
          "tokens_match_resident": all(r.get("tokens_match_resident") is not False for r in runs)
          if base.get("tokens_match_resident") is not None else None,
          "mesh": {"tp": cfg.mesh.tp, "ep": cfg.mesh.ep, "devices": cfg.mesh.devices, **mesh, "per_device": rows}}
    s["moved_over_belady"] = s["bytes_moved"] / s["belady_bytes"] if s["belady_bytes"] else float("nan")
    return s
