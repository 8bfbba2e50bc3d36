"""Where a run held its blocks, state by state, and why each lossy block was lossy: the summary's `states` section.

Per state: the blocks read in it during generation, those reads, and the block-seconds spent in it over generation
(from the engine's transition events: a block is in a transition's target state from the moment it landed).
Per lossy block: the states it was read in and the reason, from the set-up that decided it (a placement rule's
state or `home_format`, a compressed home the quality budget allowed, with its calibrated ΔKL) or from the
controller's transitions (their recorded `plan:...` reasons).
"""

from __future__ import annotations

from vorch_jax.tiers.state import LOSSY, State


def block_seconds(events, t0: float, t1: float) -> dict[str, float]:
    """{state name: Σ over blocks of the seconds each spent in it within [t0, t1]}, from `transition` events."""
    where: dict[str, tuple[State, float]] = {}  # block -> (state, since)
    out: dict[str, float] = {}

    def close(block: str, until: float) -> None:
        state, since = where[block]
        span = min(until, t1) - max(since, t0)
        if span > 0:
            out[state.name] = out.get(state.name, 0.0) + span

    for e in sorted((e for e in events if e.kind == "transition" and e.dst is not None), key=lambda e: e.end):
        if e.end > t1:
            break
        if e.block in where:
            close(e.block, e.end)
        where[e.block] = (e.dst, e.end)
    for block in where:
        close(block, t1)
    return out


def lossy_reason(block: str, setup, kl: dict | None, plan_reasons: dict) -> str:
    """Why `block` was held lossy (see the module docstring)."""
    rule = setup.placement[block]
    if block in setup.forced and setup.forced[block] in LOSSY:
        return f"placement[{rule.rule}] fixes {setup.forced[block].name}"
    why = []
    if block in setup.packed:
        state = setup.packed[block]
        if rule.home_format:
            why.append(f"placement[{rule.rule}] home_format {rule.home_format}: streams as {state.name}")
        else:
            dkl = (kl or {}).get(block, {}).get(state.name)
            why.append(f"compressed home {state.name}: the quality budget allows it"
                       + (f" (calibrated ΔKL {dkl:.2g} nats)" if dkl is not None else ""))
    if plan_reasons.get(block):
        why.append("controller " + ", ".join(f"{r} x{n}" for r, n in sorted(plan_reasons[block].items())))
    return "; ".join(why) or "unexplained"


def home_formats(setup) -> str:
    """The compressed homes in one label ("" for none): 'int8', 'int4 g64', or a mix like 'int8 x58 + int4 g64 x2'."""
    from vorch_jax.runtime.setup import HOME_FORMATS

    q = setup.cfg.quant
    detail = {State.S2: f" g{q.int4_group_size}", State.S6: f" r{q.lowrank_rank}"}
    name = {s: fmt + detail.get(s, "") for fmt, s in HOME_FORMATS.items()}
    counts = {name[s]: sum(v == s for v in setup.packed.values()) for s in sorted(set(setup.packed.values()))}
    if len(counts) <= 1:
        return next(iter(counts), "")
    return " + ".join(f"{k} x{n}" for k, n in counts.items())


def states_section(setup, accesses, events, t0: float, t1: float, kl: dict | None = None) -> dict:
    """The summary's `states` section (module docstring); `accesses`: the ledger's, `kl`: the calibration's ΔKL."""
    gen = [a for a in accesses if t0 <= a.start < t1]
    seconds = block_seconds(events, t0, t1)
    per_state: dict[str, dict] = {}
    for a in gen:
        row = per_state.setdefault(a.state, {"blocks": set(), "reads": 0})
        row["blocks"].add(a.block)
        row["reads"] += 1
    plan: dict[str, dict[str, int]] = {}
    for e in events:
        if e.kind == "transition" and e.dst is not None and e.dst in LOSSY and e.reason.startswith("plan:") \
                and t0 <= e.start < t1:
            plan.setdefault(e.block, {}).setdefault(e.reason, 0)
            plan[e.block][e.reason] += 1
    lossy_reads: dict[str, set] = {}
    for a in gen:
        if State[a.state] in LOSSY:
            lossy_reads.setdefault(a.block, set()).add(a.state)
    return {
        "per_state": {s: {"blocks": len(row["blocks"]), "reads": row["reads"], "block_seconds": seconds.get(s, 0.0)}
                      for s, row in sorted(per_state.items())},
        "block_seconds": seconds,
        "lossy_blocks": {b: {"read_in": sorted(states), "why": lossy_reason(b, setup, kl, plan)}
                         for b, states in sorted(lossy_reads.items())},
        "compressed_homes": {"blocks": len(setup.packed), "bytes": setup.packed_bytes,
                             "on_nvme": sum(w == "disk" for w in setup.packed_where.values()),
                             "per_state": {s.name: sum(v == s for v in setup.packed.values()) for s in LOSSY}},
    }
