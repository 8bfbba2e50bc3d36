"""A run: a model under a budget and a policy, generating for real or on a modelled machine, measured.

`run(cfg, out_dir)` is what `vorch run` calls, for every registered model; `executor: sim` runs the same setup,
policy, ledger and driver on the simulated backend (`simulate`). It writes `summary.json` (last, atomically, with
`"complete": true`), `trace.jsonl`, `trace.perfetto.json` and, for a routed model, `routing.json` (the experts each
generation pass read and the speculative predictions made: what the simulator replays). Phases of a real run, each
timed on its own: set-up (register blocks at their homes, compile on zero weights: never timed), initial
placement, prefill, decode, then the quality pass on the evaluation text (its traffic reported apart).
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from vorch_jax.config import RunConfig, apply_overrides, config_to_dict
from vorch_jax.errors import BudgetError
from vorch_jax.outputs import check_out_dir, nvme_store_dir, writing

from vorch_jax.runtime import telemetry as T
from vorch_jax.simulation.routing_trace import read_routing_trace, write_routing_trace
from vorch_jax.runtime.cursor import PassCursor
from vorch_jax.runtime.driver import Driver, greedy_generate
from vorch_jax.runtime.in_place import in_place_choice, in_place_section, measured_prices
from vorch_jax.runtime.inputs import (make_policy, policy_context, profile_load_seconds, quality_guard, scored_inputs,
                                      simulated_lossy_states, simulated_scored_inputs, speculation_choice,
                                      stored_calibration, with_quality_budget_homes)
from vorch_jax.runtime.ledger import Ledger
from vorch_jax.runtime.real import RealBackend
from vorch_jax.runtime.reference import Reference, quality, resident_reference
from vorch_jax.runtime.setup import build_setup
from vorch_jax.tiers.host_memory import return_freed_memory
from vorch_jax.runtime.state_report import states_section
from vorch_jax.runtime.summary import core_summary, routing_section
from vorch_jax.tiers.state import State


def run(cfg: RunConfig, out_dir, *, progress=None, reference: Reference | None = None) -> dict:
    """Run `cfg`, write the outputs to `out_dir`, return the summary.

    `reference`: a resident reference computed earlier for the same model, prompt, evaluation text and token count
    (a sweep, a compare or a test may share it); computed here when None.
    """
    if cfg.executor == "sim":
        if cfg.mesh.devices > 1:
            from vorch_jax.simulation.mesh import simulate_mesh

            return simulate_mesh(cfg, out_dir, simulate, progress=progress)
        return simulate(cfg, out_dir, progress=progress)
    try:
        if cfg.mesh.devices > 1:
            from vorch_jax.runtime.mesh_run import run_mesh

            return run_mesh(cfg, out_dir, _run, progress=progress, reference=reference)
        return _run(cfg, out_dir, progress, reference)
    finally:  # the run's blocks are garbage now (some in reference cycles): collect, give the memory back
        return_freed_memory(collect=True)


def _run(cfg: RunConfig, out_dir, progress, reference: Reference | None, seat=None) -> dict:
    """One device's run; `seat`: its place on a real mesh (`mesh_run.Seat`: index, jax device, collectives)."""
    out_dir = check_out_dir(Path(out_dir))
    say = progress or (lambda msg: None)
    setup = build_setup(cfg, device=seat.index if seat is not None else 0)
    with writing(out_dir):
        (out_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))  # what it was
    dtype = jnp.dtype(cfg.dtype)
    guard = quality_guard(cfg, setup, say)
    if guard is not None:
        setup = with_quality_budget_homes(cfg, setup, guard.allowance.states, guard.calibration.psi)
    store_dir, scratch = nvme_store_dir(cfg.nvme_dir, out_dir)
    if reference is None:
        say("resident reference")
        reference = resident_reference(setup, dtype, cfg.new_tokens)
    if seat is not None:
        reference = reference.held_by(setup.info)
    cursor = PassCursor(setup.spec)
    from vorch_jax.tiers.engine import MovementEngine
    from vorch_jax.tiers.full_precision import copies_measured
    from vorch_jax.tiers.link_probe import probe_bandwidths, probe_block_loads

    device = seat.device if seat is not None else None
    load_s = probe_block_loads(setup.spec.leaf_shapes, device=device)  # what the plans and the summary price loads by
    extras = None
    if cfg.policy == "scored":
        extras = scored_inputs(cfg, setup, store_dir, load_s, guard, device) | {"pass_compute_s": reference.step_s}
    policy = make_policy(cfg, policy_context(cfg, setup, reference.stream), extras)

    engine = MovementEngine(setup.source, store_dir, int4_group_size=cfg.quant.int4_group_size,
                            lowrank_rank=cfg.quant.lowrank_rank, keep_home=True, device=device)
    try:
        link_bw = probe_bandwidths(engine.store_dir, device=engine.device)  # for the floor: measured now
        backend = RealBackend(setup.spec, dtype, seat.collectives if seat is not None else None)
        spec_on, spec_basis = speculation_choice(cfg, setup, link_bw["host->device"],
                                                 reference.step_s / setup.spec.n_layers)
        ledger = Ledger(setup.info, cursor, engine, policy, budget_bytes=setup.hbm_budget,
                        device_bytes=setup.device_bytes, homes=setup.homes, state_bytes=setup.state_bytes,
                        tick_every_n_layers=cfg.tick_every_n_layers, speculative=spec_on,
                        speculation_basis=spec_basis,
                        in_place=in_place_choice(setup, measured_prices(backend, link_bw)))
        if copies_measured(engine.device):  # accelerators pool their own memory; held copies there are unmeasured
            engine.hold_dropped_memory(ledger.free_bytes)
        return _run_real(cfg, setup, engine, backend, ledger, policy, out_dir, dtype, reference, say, guard, link_bw,
                         load_s, seat)
    finally:
        engine.close()
        if scratch:
            shutil.rmtree(store_dir, ignore_errors=True)


def _run_real(cfg, setup, engine, backend, ledger, policy, out_dir, dtype, reference: Reference, say, guard,
              link_bw, load_s, seat):
    say("registering blocks at their homes")
    for b in setup.block_ids:
        engine.register(b, setup.homes[b])
    if setup.packed:
        on_disk = sum(w == "disk" for w in setup.packed_where.values())
        say(f"staging {len(setup.packed)} compressed homes ({setup.packed_bytes / 1e6:.1f} MB, {on_disk} on NVMe)")
    for b, state in setup.packed.items():
        engine.stage_compressed(b, state, setup.packed_where[b])
    driver = Driver(setup.spec, ledger, backend)
    say("compiling")
    P, n_eval = len(setup.prompt_ids), len(setup.eval_ids) - 1
    states = run_states(cfg, setup, guard)
    lookups = {p.op for p in setup.spec.skeleton() if setup.spec.token_routed(p)}  # gathered in place (`Ledger`)
    in_place_ops = tuple(sorted(set(setup.spec.in_place_ops if setup.in_place else ()) | lookups))
    backend.compile({P, 1}, P + cfg.new_tokens, states, cfg.quant, in_place_ops)
    backend.compile({n_eval}, n_eval, states, cfg.quant, in_place_ops)

    say("initial placement")
    # Traffic is counted from a cold device: the initial placement's loads belong to the run (and the oracle starts
    # from an empty device too), so policies that front-load bytes are not flattered.
    t_place0 = time.perf_counter()
    ledger.place_initial()
    say("generating")
    gen = greedy_generate(driver, setup.prompt_ids, cfg.new_tokens, dtype)
    t_gen0, t_gen1 = gen.marks[0], gen.marks[-1]
    counters, spec = dataclasses.replace(ledger.counters), {k: (list(v) if isinstance(v, list) else v)
                                                            for k, v in ledger.spec.items()}
    say("quality pass")
    cache = setup.spec.new_cache(1, n_eval, dtype)
    run_logits, _ = driver.forward(np.asarray([setup.eval_ids[:-1]]), cache, 0)
    run_logits = np.asarray(run_logits[0])
    t_q1 = time.perf_counter()

    events = engine.events.snapshot()
    s = core_summary(cfg, setup, policy, ledger, counters, events, gen, t_place0=t_place0, t_gen1=t_gen1,
                     resident_step_s=reference.step_s, probe_h2d=link_bw["host->device"], load_s=load_s)
    stream = [a.block for a in ledger.accesses if a.start >= t_gen0]
    q = quality(run_logits, reference.logits, setup.eval_ids, setup.spec.note)
    q["budget"] = guard.summary(q["kl_mean"]) if guard is not None else None
    s["states"] = states_section(setup, ledger.accesses, events, t_gen0, t_gen1,
                                guard.calibration.kl if guard is not None else None)
    s["in_place"] = in_place_section(setup, counters, events, gen)
    s |= {"tokens": gen.tokens, "tokens_match_resident": gen.tokens == reference.tokens,
          "stream_matches_resident": stream == list(reference.stream),
          "text": setup.tokenizer.decode(gen.tokens), "quality": q,
          "quality_pass_link_bytes": T.link_bytes(T.window(events, t_gen1, t_q1)),
          "link_gbps": {k: v / 1e9 for k, v in link_bw.items()}, "backend": jax.default_backend(),
          # leaves of full-precision loads landed in a dropped block's held memory, or fresh, over the whole run
          "held_memory": None if engine.held is None else {
              "leaves_reused": engine.held.reused, "leaves_fresh": engine.held.fresh,
              "bytes_reused": engine.held.reused_bytes, "bytes_fresh": engine.held.fresh_bytes}}
    if seat is not None:
        s |= {"mesh_device": seat.index, "jax_device": str(seat.device)}
    if ledger.routed:
        s["routing"] = routing_section(setup, ledger, spec, events, t_gen0, t_gen1)
    if q["budget"] is not None and not q["budget"]["within_budget"]:
        say(f"warning: measured KL {q['kl_mean']:.4f} nats exceeds quality.max_kl {q['budget']['max_kl']}")
    records = T.trace_records(ledger.accesses, events, t_gen0, ledger.score_samples)
    with writing(out_dir):
        T.write_trace(out_dir, records)
        if ledger.routed:
            L = setup.spec.n_layers
            spec_trace = [[ledger.spec_trace.get((j, i)) for i in range(L)] for j in range(cfg.new_tokens)] \
                if ledger.speculative else None
            write_routing_trace(out_dir, model=cfg.model, n_layers=L, n_experts=setup.spec.n_experts,
                                passes=driver.routing[:cfg.new_tokens], speculation=spec_trace)
        T.write_json_atomic(out_dir / "summary.json", s)  # last: its presence means the run completed
    return s


# ------------------------------------------------------------------------------------------------- simulated


def plan_stream(spec, routing=None, passes: int = 1, prompt_ids=None) -> list[str]:
    """The blocks a run of `passes` passes reads, in order (`routing[pass][layer]`: the experts each routed layer
    runs): a simulated run's, whose first pass reads `prompt_ids` and every other token 0 (None: every position of
    the skeleton in every pass). A token-routed lookup is no read (`Ledger._gather`): not in it."""
    out = []
    for j in range(passes):
        out += [p.block for p in _pass_positions(spec, None if routing is None else routing[j],
                                                 _simulated_ids(prompt_ids, j)) if not spec.token_routed(p)]
    return out


def _simulated_ids(prompt_ids, j: int):
    """The token ids of a simulated run's pass `j` (the simulated backend's next token is always 0)."""
    if prompt_ids is None:
        return None
    return np.asarray([prompt_ids]) if j == 0 else np.zeros((1, 1), np.int64)


def simulate(cfg: RunConfig, out_dir, *, hardware=None, routing=None, speculation=None, progress=None,
             write_traces: bool = True, device: int = 0, barrier=None) -> dict:
    """Run `cfg` on the simulated backend of `hardware` (a profile, its name or path; default `cfg.hardware`).

    `routing`: for a routed model, [pass][layer] -> expert ids (default: `cfg.routing_trace`, else Zipf seeded by
    `cfg.seed`); `speculation`: the real run's speculative predictions for the same passes ([pass][layer] ->
    (expert ids, mean probabilities)), which the scored policy replays (none: no speculation). `write_traces=False`
    writes only `summary.json` (sweeps that need no trace: serialising ~10^5 records costs more than simulating
    them). On a mesh (`cfg.mesh`), the run of device `device` (`simulation.mesh` runs them all, each in a thread):
    its shard, its host link as shared, meeting the others at each layer's end at `barrier`. Returns the summary."""
    from vorch_jax.errors import RoutingTraceError
    from vorch_jax.simulation.hardware import load_profile

    from vorch_jax.simulation.sim_engine import Clock, SimEngine
    from vorch_jax.simulation.backend import SimBackend, simulated_prices, zipf_routing

    out_dir = check_out_dir(Path(out_dir))
    say = progress or (lambda msg: None)
    hw = load_profile(hardware if hardware is not None else cfg.hardware)
    if cfg.mesh.devices > 1:
        from vorch_jax.simulation.mesh import device_profile

        hw = device_profile(hw, cfg.mesh.devices)
    setup = build_setup(cfg, simulated=True, device=device)
    spec = setup.spec
    if setup.hbm_budget > hw.hbm_capacity_bytes:
        raise BudgetError(f"hbm_budget of {setup.hbm_budget} bytes exceeds {hw.name}'s {hw.hbm_capacity_bytes:.0f} "
                          f"bytes of HBM")
    cursor = PassCursor(spec)
    n = cfg.new_tokens  # prefill + (new_tokens - 1) decode steps
    source = "given by the caller" if routing is not None else None
    if cfg.routing_trace and routing is None:
        if not cursor.routed:
            raise RoutingTraceError(f"routing_trace is set but {cfg.model} has no experts to route: drop "
                                    f"routing_trace or choose an MoE model")
        routing, recorded = read_routing_trace(cfg.routing_trace, n_layers=spec.n_layers, n_experts=spec.n_experts,
                                               passes=n)
        speculation = speculation if speculation is not None else recorded
        source = f"trace {cfg.routing_trace}"
    if cursor.routed and routing is None:
        routing = zipf_routing(spec, n, seed=cfg.seed, tokens_per_pass=[cfg.prompt_tokens + 1] + [1] * (n - 1))
        source = f"zipf (seed {cfg.seed})"
    if cursor.routed and len(routing) < n:
        raise RoutingTraceError(f"the routing trace has {len(routing)} passes; the run needs {n} (new_tokens)")
    stream = plan_stream(spec, routing, n, setup.prompt_ids)
    cal = stored_calibration(cfg, setup) if spec.has_weights else None
    lossy_states = simulated_lossy_states(cfg, setup, cal)
    setup = with_quality_budget_homes(cfg, setup, lossy_states, cal.psi if cal is not None else None)
    clock = Clock()
    engine = SimEngine(hw, setup.state_bytes, setup.homes, clock, packed=setup.packed, packed_where=setup.packed_where)
    backend = SimBackend(spec, hw, engine, setup.state_bytes, setup.weight_dtype, routing=routing,
                         speculation=speculation, barrier=barrier)
    P = len(setup.prompt_ids)
    decode_positions = _pass_positions(spec, routing[-1] if cursor.routed else None,
                                       _simulated_ids(setup.prompt_ids, 1))
    extras = None
    if cfg.policy == "scored":
        extras = simulated_scored_inputs(cfg, setup, hw, cal, lossy_states)
        extras["pass_compute_s"] = backend.resident_step_s(decode_positions, P)
    policy = make_policy(cfg, policy_context(cfg, setup, stream), extras)
    spec_on, spec_basis = speculation_choice(cfg, setup, hw.host_to_device.bandwidth_bytes_per_s,
                                             backend.resident_step_s(decode_positions, P) / spec.n_layers)
    ledger = Ledger(setup.info, cursor, engine, policy, budget_bytes=setup.hbm_budget, device_bytes=setup.device_bytes,
                    homes=setup.homes, state_bytes=setup.state_bytes, tick_every_n_layers=cfg.tick_every_n_layers,
                    now=lambda: clock.now, settle_ticks=True,
                    speculative=speculation is not None and spec_on, speculation_basis=spec_basis,
                    in_place=in_place_choice(setup, simulated_prices(hw, spec, setup.state_bytes, setup.weight_dtype)))
    driver = Driver(spec, ledger, backend)
    wall0 = time.perf_counter()
    t_place0 = clock.now
    ledger.place_initial()  # traffic counted from a cold device, as the real run does; timed apart (t < 0)
    gen = greedy_generate(driver, setup.prompt_ids, n, cfg.dtype,
                          on_step=lambda k: say(f"simulated pass {k}/{n}"))
    t_gen1 = gen.marks[-1] + 1e-9  # windows are half-open; the last drop happens at the end
    events = engine.events.snapshot()
    resident_step = backend.resident_step_s(decode_positions, P + n - 1) if n > 1 else float("nan")
    s = core_summary(cfg, setup, policy, ledger, ledger.counters, events, gen, t_place0=t_place0, t_gen1=t_gen1,
                     resident_step_s=resident_step, probe_h2d=hw.host_to_device.bandwidth_bytes_per_s,
                     load_s=profile_load_seconds(setup, hw))
    gen_accesses = [a for a in ledger.accesses if a.start >= gen.marks[0]]
    s["states"] = states_section(setup, ledger.accesses, events, gen.marks[0], t_gen1, cal.kl if cal else None)
    s["in_place"] = in_place_section(setup, ledger.counters, events, gen)
    if cfg.mesh.devices > 1:
        s["mesh_device"] = device
    s |= {"simulated": True, "executor": "sim", "hardware": hw.name, "tokens": None, "tokens_match_resident": None,
          "text": None, "compute_s": sum(d for _, b, d in backend.compute_spans if b >= gen.marks[0]),
          "quality": {"simulated": True, "note": "quality is not simulated",
                      "psi_estimate": psi_quality_estimate(cal, gen_accesses) if cal is not None else None,
                      "psi_note": f"none: no ψ calibration exists for {cfg.model}" if cal is None else
                      "calibrated ΔKL per block and state (vorch calibrate), summed over the states blocks were read in"},
          "quality_pass_link_bytes": None,
          "link_gbps": {"host->device": hw.host_to_device.bandwidth_bytes_per_s / 1e9,
                        "nvme->host": hw.nvme_read_bytes_per_s / 1e9},
          "backend": "sim",
          "routing": None if not cursor.routed else {"source": source, "speculation": ledger.speculative,
                                                     "speculative_loads": ledger.spec["issued"]},
          "sim_wall_s": time.perf_counter() - wall0}
    with writing(out_dir):
        if write_traces:
            T.write_trace(out_dir, T.trace_records(ledger.accesses, events, gen.marks[0], ledger.score_samples))
        T.write_json_atomic(out_dir / "summary.json", s)
    return s


def run_states(cfg, setup, guard) -> set:
    """Every on-device state a run's blocks may take (what is compiled before timing): S0, the states placement
    rules and compressed homes fix, and with `lossy` on the scored policy the ones its quality budget allows."""
    states = {State.S0, *setup.forced.values(), *setup.packed.values()}
    if guard is not None and cfg.policy == "scored":
        states |= {s for allowed in guard.allowance.states.values() for s in allowed}
    return states


def _pass_positions(spec, experts_per_layer, ids_BxT) -> list:
    """The positions of a pass over `ids_BxT` (None: every skeleton position) whose routed layers run
    `experts_per_layer[layer]` (None: a dense model)."""
    out = []
    for p in (spec.skeleton() if ids_BxT is None else spec.pass_positions(ids_BxT)):
        out.append(p)
        if p.op == "route":
            sel = np.zeros(spec.n_experts, bool)
            sel[list(experts_per_layer[p.layer])] = True
            out += spec.experts(p.layer, sel)
    return out


def psi_quality_estimate(cal, accesses) -> dict:
    """ΔKL estimated from the calibration: Σ over blocks of the measured ΔKL of the lossy state each block was last
    read in (an additive, first-order estimate; lossless states add 0)."""
    last = {a.block: a.state for a in accesses}
    lossy = {b: st for b, st in last.items() if st in cal.states and b in cal.kl}
    return {"kl_estimate": float(sum(cal.kl[b][st] for b, st in lossy.items())), "lossy_blocks": len(lossy),
            "source": f"{cal.model_key} @ {cal.machine_key}, {cal.created}"}


# ----------------------------------------------------------------------------------------------------- compare


SCORED_COMPANIONS = ("static-prefetch", "belady")  # beside the controller in every compare: the baseline it must beat
# (a fixed set with the same prefetch) and the offline heuristic with the recorded future


def with_companions(policies: list[str]) -> list[str]:
    """`policies`, and where the scored controller is among them, the companions it is judged against."""
    if "scored" not in policies:
        return list(policies)
    return list(policies) + [p for p in SCORED_COMPANIONS if p not in policies]


def compare(cfg: RunConfig, policies: list[str], out_dir, *, progress=None) -> list[dict]:
    """Run `cfg` under each policy (resident at the full budget), sharing one resident reference; a compare that
    reports the scored controller also runs static-prefetch and belady (`with_companions`)."""
    from vorch_jax.tooling.compare_report import write_manifest

    out_dir = check_out_dir(Path(out_dir))
    say = progress or (lambda msg: None)
    policies = with_companions(policies)
    reference = None
    if cfg.executor != "sim":  # a simulation has no quality to compare
        from vorch_jax.runtime.mesh_run import whole_model

        say("resident reference")
        reference = resident_reference(build_setup(whole_model(cfg)), jnp.dtype(cfg.dtype), cfg.new_tokens)
    stale = out_dir / "compare.json"
    if stale.exists():
        stale.unlink()  # written again once every policy has run
    summaries = []
    for p in policies:
        overrides = [f"policy={p}"] + (["hbm_budget=1.0"] if p == "resident" else [])
        say(f"policy {p}")
        summaries.append(run(apply_overrides(cfg, overrides), out_dir / p, progress=progress, reference=reference))
    with writing(out_dir):
        write_manifest(out_dir, policies, config_to_dict(cfg))
    return summaries
