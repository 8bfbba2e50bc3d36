"""The summary of a run, real or simulated: every figure computed from the events the engine recorded and the
accesses the ledger recorded, never from the plan.

  * traffic is counted from a cold device: the initial placement's loads belong to the run;
  * `belady_bytes` replays the run's own access stream of generation with furthest-next-use eviction under the
    same budget and guardrails (a lossy block travels full precision and converts on device);
    `lower_bound_bytes` is the LP relaxation's optimum over the same stream (`policies/lower_bound.py`): no policy
    loads less, where Belady (optimal only for blocks of one size) can be beaten; `link_seconds` prices the same
    loads by what the run probed a load of each block to take, beside the LP bound priced alike (bytes do not
    price a load alone: README, "Loads priced in seconds");
  * the floor of a decode step is max(the resident compute-only step, the host->device bytes the measured steps
    moved per step / the fastest link rate measured): the probe of the link alone (a real run; the profile's link on
    a simulated one), the whole run's rate while its link was busy, or the measured steps' own rate, whichever is
    highest. The last one alone keeps the floor at or below the measured step (its copies cannot have taken longer
    than the steps they ran in);
  * a routed plan adds a `routing` section: expert hit rate and bytes, the speculative prefetch as measured;
  * reads computed in place (`runtime/in_place.py`) load nothing: they are out of Belady's and the bound's stream
    and out of the hit rate (the `in_place` section counts them); so are token-routed lookups (Gemma's vocabulary
    shards), which read their tokens' rows where the shard is, on the device or in host memory (`lookups` counts
    them: `Ledger._gather`).
"""

from __future__ import annotations

import dataclasses

from vorch_jax.config import config_to_dict
from vorch_jax.tiers.state import State
from vorch_jax.versions import environment

from vorch_jax.runtime import telemetry as T
from vorch_jax.runtime.state_report import home_formats
from vorch_jax.policies.belady import belady_bytes
from vorch_jax.policies.lower_bound import lower_bound


def core_summary(cfg, setup, policy, ledger, counters, events, gen, *, t_place0: float, t_gen1: float,
                 resident_step_s: float, probe_h2d: float | None, load_s: dict | None = None) -> dict:
    """The fields every run reports (see the module docstring); `gen`: the `driver.Generation`; `counters`: the
    ledger's counters as generation ended (the quality pass comes after)."""
    t_gen0 = gen.marks[0]
    gen_events = T.window(events, t_gen0, t_gen1)
    n_gen = sum(1 for a in ledger.accesses if t_gen0 <= a.start < t_gen1)
    first = next((i for i, a in enumerate(ledger.accesses) if a.start >= t_gen0), len(ledger.accesses))
    # the reads on the device: one computed in place (read in S3, `runtime/in_place.py`) loads nothing, so the
    # oracle and the bound are not charged for it either
    window = [a for a in ledger.accesses[first:first + n_gen] if a.state != State.S3.name]
    stream = [a.block for a in window]
    # what each access's block occupied from then on, in the state it was read in (a lossy run's change states)
    occupied = [setup.state_bytes[a.block].get(State[a.state], setup.device_bytes[a.block]) for a in window]
    moved = T.link_bytes(T.window(events, t_place0, t_gen1))
    used = {b: setup.state_bytes[b][policy.device_state(b)] for b in setup.block_ids}
    # a load moves full precision, or a compressed home's bytes where the block keeps one
    loads = {b: setup.state_bytes[b][setup.packed[b]] if b in setup.packed else setup.device_bytes[b]
             for b in setup.block_ids}
    bel = belady_bytes(stream, used, setup.hbm_budget, [], pinned=setup.protected, load_bytes=loads)
    bound = lower_bound(stream, used, setup.hbm_budget, pinned=setup.protected, load_bytes=loads,
                        access_bytes=occupied)
    priced = link_seconds_section(T.window(events, t_place0, t_gen1), stream, used, setup, loads, occupied, load_s)
    w0, w1, decode_n = gen.measured_window()  # the first decode step is warm-up
    decode_s = w1 - w0
    missed_per_step = T.link_bytes(T.window(events, w0, w1)).get("host->device", 0) / max(1, decode_n)
    run_rate = T.link_rate(events, "host->device", t_place0, t_gen1)
    rates = [r for r in (probe_h2d, run_rate, T.link_rate(events, "host->device", w0, w1)) if r]
    h2d_bw = max(rates) if rates else float("inf")
    c = counters
    return {
        "complete": True,
        "config": config_to_dict(cfg),
        "model": cfg.model,
        "policy": cfg.policy,
        "lossy": cfg.lossy,
        "home_formats": home_formats(setup),
        "hbm_budget_bytes": setup.hbm_budget,
        "dram_budget_bytes": setup.dram_budget,
        "model_bytes": setup.model_bytes,
        "prompt_tokens": len(setup.prompt_ids),
        "prefill_s": gen.prefill_s,
        "decode_tok_s": decode_n / decode_s if decode_s > 0 else float("nan"),
        "decode_step_s": decode_s / decode_n if decode_s > 0 else float("nan"),
        "resident_step_s": resident_step_s,
        "floor_step_s": max(resident_step_s, missed_per_step / h2d_bw),
        "decode_h2d_bytes_per_step": missed_per_step,
        "wall_s": t_gen1 - t_gen0,
        "stall_s": T.stall_seconds(gen_events),
        "transfer_s": T.link_seconds(gen_events, "host->device") + T.link_seconds(gen_events, "nvme->host"),
        "controller_s": c.controller_s,
        "peak_device_bytes": c.peak_device_bytes,
        "link_bytes": moved,
        "bytes_moved": moved.get("host->device", 0),
        "belady_bytes": bel,
        "lower_bound_bytes": bound.bytes,
        "moved_over_belady": moved.get("host->device", 0) / bel if bel else float("nan"),
        "moved_over_lower_bound": moved.get("host->device", 0) / bound.bytes if bound.bytes else float("nan"),
        "lower_bound": bound.to_dict(),
        "link_seconds": priced,
        "hits": c.hits,
        "misses": c.misses,
        "lookups": {"on_device": c.lookups_on_device, "in_place": c.lookups_in_place, "loaded": c.lookups_loaded},
        "prefetch": {"issued": c.prefetch_issued, "useful": c.prefetch_useful, "wasted_bytes": c.prefetch_wasted_bytes,
                     "victims_read_within": policy.prefetch_victims_read_within,
                     "window_counts": policy.prefetch_window_counts,
                     "victim_size_power": getattr(policy, "victim_size_power", 0.0),
                     "follows_plan": getattr(getattr(policy, "_plan", None), "name", ""),  # '': no plan
                     "choice_s": round(getattr(policy, "choice_s", 0.0), 3),
                     "window_replays": [dataclasses.asdict(r) for r in getattr(policy, "window_replays", [])]},
        "transitions": T.transition_counts(gen_events),
        "transition_reasons": T.transition_reasons(gen_events),
        "controller_decisions": dict(getattr(policy, "decisions", {})),
        "controller_ticks_deferred": getattr(policy, "ticks_deferred", 0),
        "controller_ticks_quiet": getattr(policy, "ticks_quiet", 0),
        "calibration": getattr(policy, "calibration", None),
        "host_to_device_gbps_in_run": (run_rate or float("nan")) / 1e9,
        "floor_link_gbps": h2d_bw / 1e9,
        "initial_placement_s": t_gen0 - t_place0,
        "versions": environment(),
    }


def routing_section(setup, ledger, spec: dict, events, t_gen0: float, t_gen1: float) -> dict:
    """Routed plans: expert hit rate, expert bytes, and the speculative prefetch as measured.

    Speculative precision = speculative loads read by their layer / loads issued; recall = those reads / the
    experts the speculated layers then selected (loads are issued only for experts off device, so recall is
    bounded by the miss share). `prediction_*` compare the predicted set with the selected one, loaded or not.
    Each load issued is checked against the engine's events (a host->device transition of that block). `spec`: the
    ledger's speculation counters as generation ended."""
    gen = [a for a in ledger.accesses if t_gen0 <= a.start < t_gen1]
    in_place = [a for a in gen if setup.kinds[a.block] == "expert" and a.state == State.S3.name]
    experts = [a for a in gen if setup.kinds[a.block] == "expert" and a.state != State.S3.name]  # read on device
    h2d = [e for e in T.window(events, t_gen0, t_gen1) if e.kind == "transition" and e.link_bytes.get("host->device")]
    expert_bytes = sum(e.link_bytes["host->device"] for e in h2d if setup.kinds[e.block] == "expert")
    landed = {e.block for e in h2d}
    nan = float("nan")
    return {
        "n_experts": setup.spec.n_experts,
        "top_k": setup.spec.top_k,
        "expert_accesses": len(experts) + len(in_place),
        "expert_reads_in_place": len(in_place),
        "expert_hits": sum(a.hit for a in experts),
        "expert_hit_rate": (sum(a.hit for a in experts) / len(experts)) if experts else nan,  # of the device reads
        "expert_bytes_moved": expert_bytes,
        "p_selected_estimator": _estimator_name(ledger.router),
        "speculative": {
            "enabled": ledger.speculative,
            **ledger.speculation_basis,  # what `moe.speculative: auto` decided on (`inputs.speculative`)
            "issued": spec["issued"],
            "issued_bytes": spec["issued_bytes"],
            "issued_with_engine_event": sum(1 for _, b in spec["loads"] if b in landed),
            "used": spec["used"],
            "precision": spec["used"] / spec["issued"] if spec["issued"] else nan,
            "recall": spec["used"] / spec["actual"] if spec["actual"] else nan,
            "prediction_precision": spec["predicted_and_actual"] / spec["predicted"] if spec["predicted"] else nan,
            "prediction_recall": spec["predicted_and_actual"] / spec["actual"] if spec["actual"] else nan,
        },
    }


def _estimator_name(router) -> str | None:
    """Which P(expert selected) estimator the run read at its end (`routing.ESTIMATORS`)."""
    from vorch_jax.runtime.routing import ESTIMATORS

    if router is None:
        return None
    w = ESTIMATORS[router.estimator]
    return "run mean" if w is None else f"ema {w}"


def link_seconds_section(events, stream, used, setup, loads, occupied, load_s: dict | None) -> dict | None:
    """The run's host->device loads priced by what each block's load was measured to take (`load_s`: {block:
    seconds of its full precision}, scaled by the bytes a load moved), against the LP bound priced the same way
    (`lower_bound_seconds`), and `load_s` itself (what the scored policy's plans are priced by): bytes alone do not
    say what a load costs where small blocks land slower per byte. None without `load_s`."""
    if load_s is None:
        return None
    from vorch_jax.policies.lower_bound import lower_bound_seconds

    per_byte = {b: load_s[b] / setup.device_bytes[b] for b in setup.block_ids}
    moved = sum(n * per_byte[e.block] for e in events if e.kind in ("transition", "recovered")
                for link, n in e.link_bytes.items() if link == "host->device")
    bound = lower_bound_seconds(stream, used, setup.hbm_budget, {b: loads[b] * per_byte[b] for b in loads},
                                pinned=setup.protected, access_bytes=occupied)
    return {"moved": moved, "lower_bound": bound, "over_bound": moved / bound if bound else None, "load_s": load_s}
