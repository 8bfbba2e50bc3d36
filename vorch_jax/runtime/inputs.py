"""A run's policy and what the scored policy measures before it starts: written once for real and simulated runs.

The scored policy's inputs (ψ, δ, τ's link rates, each lossy state's value loss) come from:
  * the stored calibration of the model on this machine (`vorch calibrate`) when there is one;
  * otherwise, for a real run, probes of the links now (a lossless run needs no ψ);
  * for a simulated run, the hardware profile (links, δ from its dequant rates), with ψ from the model's
    calibration where its weights are here.
The seconds a load of each block takes (`load_s`, what the scored policy's plans are priced in) are probed at the
start of every real run, per block shape (`link_probe.probe_block_loads`), and taken from the profile's
host->device link (latency + bytes / bandwidth) in a simulated one.
A run that can hold blocks in lossy states is guarded by measurement (`quality_guard`): its calibration (measured
first when none is stored) and the lossy states its quality budget allows each block (`quality_budget.allocate`).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from vorch_jax.config import RunConfig
from vorch_jax.errors import QualityError, RunError
from vorch_jax.tiers.state import LOSSY, State

from vorch_jax.policies.belady import BeladyPolicy
from vorch_jax.policies.baselines import LFUPolicy, LRUPolicy, PolicyContext, ResidentPolicy, StaticPolicy


def make_policy(cfg: RunConfig, ctx: PolicyContext, extras: dict | None = None):
    name = cfg.policy
    if name == "resident":
        return ResidentPolicy(ctx)
    if name == "static":
        return StaticPolicy(ctx, prefetch_depth=0)
    if name == "static-prefetch":
        return StaticPolicy(ctx, prefetch_depth=cfg.prefetch_depth)
    if name == "lru":
        return LRUPolicy(ctx)
    if name == "lfu":
        return LFUPolicy(ctx)
    if name == "belady":
        return BeladyPolicy(ctx, prefetch_depth=cfg.prefetch_depth)
    if name == "scored":
        from vorch_jax.controller.scored_policy import ScoredPolicy

        return ScoredPolicy(ctx, cfg, **(extras or {}))
    raise RunError(f"unknown policy '{name}'")


def policy_context(cfg: RunConfig, setup, future) -> PolicyContext:
    """What a policy plans with. Blocks a rule computes on the host never load: they are out of the schedule a
    static placement fills and the initial placement follows, so no budget is held for them."""
    host_only = {b for b, m in setup.in_place.items() if m == "host"}
    return PolicyContext(block_ids=tuple(setup.block_ids), device_bytes=setup.device_bytes,
                         budget_bytes=setup.hbm_budget, schedule=tuple(b for b in setup.pass_order if b not in host_only),
                         prefetch_depth=cfg.prefetch_depth, protected=setup.protected, future=tuple(future),
                         forced=setup.forced, state_bytes=setup.state_bytes, packed=setup.packed,
                         packed_where=setup.packed_where)


SPECULATION_MIN_LOAD_OF_LAYER = 0.5  # `auto` speculates where loading an expert takes at least this much of a layer


def speculative(cfg: RunConfig, expert_load_s: float | None = None, layer_s: float | None = None) -> bool:
    """Whether the next layer's router speculates (`moe.speculative`). `auto`: for the scored policy, where loading
    one expert (`expert_load_s`: its bytes over the measured host->device rate) takes at least
    SPECULATION_MIN_LOAD_OF_LAYER of a layer's resident compute (`layer_s`: the resident decode step over the
    layers). A speculated load starts one layer early, so it can hide at most a layer's compute per expert, and
    each speculation costs a router call and a host read whatever it hides. On this project's CPU speculation cost
    11% of the shared-expert MoE's decode tok/s at 50% of the experts (15.42 against 17.33 without,
    experiments/results/moe_policies.txt at 06c3af7), where an expert loads in 0.12-0.40 ms against a 1.1-1.3 ms
    layer (the same file since: the probe varies ~3x); on Mixtral's 176 MB experts over a 44 GB/s link a load lasts
    several layers. Unmeasured (either None or not finite: a run of one token has no decode step): `auto` is on
    for scored."""
    if cfg.moe.speculative != "auto":
        return cfg.moe.speculative == "on"
    if cfg.policy != "scored":
        return False
    if expert_load_s is None or layer_s is None or not math.isfinite(expert_load_s) or not math.isfinite(layer_s):
        return True
    return expert_load_s >= SPECULATION_MIN_LOAD_OF_LAYER * layer_s


def speculation_choice(cfg: RunConfig, setup, h2d_bytes_per_s: float, layer_s: float) -> tuple[bool, dict]:
    """(`speculative`'s answer, what it read): the largest expert's device bytes over `h2d_bytes_per_s`, and
    `layer_s`, both for the run's summary."""
    experts = [setup.device_bytes[b] for b in setup.block_ids if setup.kinds[b] == "expert"]
    load_s = max(experts) / h2d_bytes_per_s if experts and h2d_bytes_per_s > 0 else None
    basis = {"expert_load_s": load_s, "layer_s": layer_s}
    return speculative(cfg, load_s, layer_s), basis


# ------------------------------------------------------------------------------------------------ calibration


def stored_calibration(cfg: RunConfig, setup):
    """The stored calibration of this model on this machine covering every block in the run's formats, or None."""
    from vorch_jax.controller.calibrate import covers, load_calibration, machine_key, model_key, supports

    if not supports(setup.spec):
        return None
    source = setup.source
    cal = load_calibration(None, model_key(source), machine_key(), source=source,
                           int4_group_size=cfg.quant.int4_group_size, lowrank_rank=cfg.quant.lowrank_rank)
    if cal is None or covers(cal, tokens=cal.tokens, blocks=list(setup.block_ids),
                             int4_group_size=cfg.quant.int4_group_size, lowrank_rank=cfg.quant.lowrank_rank) is not None:
        return None
    return cal


def uses_lossy_states(cfg: RunConfig, forced: dict, packed: dict | None = None) -> bool:
    """Whether a run can hold a block in a lossy state: the scored policy with lossy allowed, or a placement rule
    (a lossy state, or a compressed home that every load of the block lands in)."""
    return cfg.lossy and (cfg.policy == "scored" or any(State(s) in LOSSY for s in forced.values()) or bool(packed))


def with_quality_budget_homes(cfg: RunConfig, setup, lossy_states: dict | None, psi: dict | None):
    """A lossy scored run with `quant.compressed_homes`: each block the quality budget allows lossy states keeps a
    compressed home in the best-quality of them (`quality_budget.compressed_home_states`), and streams in it, among
    the states the controller's ladder would give it too: none for protected or rule-fixed blocks, none below a rule's
    floor, int8 at worst for a block the ψ guardrail holds (`scored_policy.sensitive_blocks`), none for a block a rule
    computes on the host. Else `setup`."""
    from vorch_jax.controller.quality_budget import compressed_home_states
    from vorch_jax.controller.scored_policy import sensitive_blocks
    from vorch_jax.controller.state_ids import QUALITY_RANK

    if not (cfg.lossy and cfg.policy == "scored" and cfg.quant.compressed_homes and lossy_states):
        return setup
    hot = sensitive_blocks(psi, cfg.guardrail.psi_threshold, setup.block_ids, setup.forced)

    def ladder(b):
        floor = setup.placement[b].floor
        return tuple(s for s in lossy_states.get(b, ()) if not (b in hot and s in (State.S2, State.S6))
                     and (not floor or QUALITY_RANK[s] >= QUALITY_RANK[State.parse(floor)]))

    free = [b for b in setup.block_ids if b not in setup.protected and b not in setup.forced
            and setup.placement[b].compute != "host"]  # read in place from its lossless home: never streams
    return setup.with_compressed_homes(compressed_home_states({b: ladder(b) for b in free}))


def lossy_allowance(cfg: RunConfig, setup, cal):
    """(the lossy states each block may take under quality.max_kl, the calibrated ΔKL placement rules already spend):
    one computation for real and simulated runs. The rules' fixed states and compressed homes spend first; the rest of
    the budget is allocated over the other blocks (`quality_budget.allocate`)."""
    from vorch_jax.controller.quality_budget import allocate, forced_lossy_kl

    q = cfg.quality
    forced_kl = forced_lossy_kl(cal.kl, {**setup.packed, **setup.forced})
    free = [b for b in setup.block_ids if b not in setup.forced and b not in setup.packed]
    allowance = allocate(cal.kl, setup.state_bytes, max(q.max_kl - forced_kl, 0.0), share=q.kl_share, blocks=free)
    return dataclasses.replace(allowance, max_kl=q.max_kl), forced_kl


@dataclasses.dataclass(frozen=True)
class QualityGuard:
    """What a lossy run may trade, decided before it starts from measurement: the calibration, the lossy states the
    quality budget allows each block (`quality_budget.allocate`) and the ΔKL placement rules already spend."""

    calibration: object
    allowance: object
    forced_kl: float

    def summary(self, kl_measured: float | None = None) -> dict:
        out = {**self.allowance.summary(), "forced_kl": self.forced_kl,
               "calibration": f"{self.calibration.model_key} @ {self.calibration.machine_key}, "
                              f"{self.calibration.created}",
               "measured_by": self.calibration.measured_by}
        if kl_measured is not None:
            out |= {"kl_measured": kl_measured, "within_budget": kl_measured <= self.allowance.max_kl}
        return out


def quality_guard(cfg: RunConfig, setup, say=lambda m: None) -> QualityGuard | None:
    """For a real run that can use lossy states: the stored calibration of this model on this machine, or
    (quality.calibration=auto) one measured now and stored; then the lossy states each block may take under
    quality.max_kl. None for a lossless run. QualityError when no calibration may be measured or placement rules
    alone exceed the budget."""
    from vorch_jax.controller.calibrate import CalibrationMismatchError, load_or_calibrate, supports

    if not uses_lossy_states(cfg, setup.forced, setup.packed):
        return None
    if not supports(setup.spec):
        raise QualityError(f"lossy states of {cfg.model} need its measured ΔKL per block and state, which `vorch "
                           f"calibrate` does not measure for this model yet: run it with lossy=false")
    q = cfg.quality
    try:
        cal = stored_calibration(cfg, setup)
    except CalibrationMismatchError as e:
        if q.calibration == "stored":
            raise
        say(f"the stored calibration does not fit ({e}): recalibrating")
        cal = None
    if cal is None:
        if q.calibration == "stored":
            raise QualityError(f"a lossy run of {cfg.model} needs its measured sensitivity and none is stored for this "
                               f"machine: run `vorch calibrate` (about a minute) or set quality.calibration=auto")
        say(f"no stored calibration of {cfg.model} on this machine: measuring ΔKL of every block and lossy state on "
            f"{q.calibration_tokens} tokens first (stored for later runs)")
        cal = load_or_calibrate(setup.source, None, force=True, progress=say, spec=setup.spec,
                                tokens=q.calibration_tokens, int4_group_size=cfg.quant.int4_group_size,
                                lowrank_rank=cfg.quant.lowrank_rank)
    allowance, forced_kl = lossy_allowance(cfg, setup, cal)
    if forced_kl > q.max_kl:
        raise QualityError(f"placement rules fix lossy states (or compressed homes) whose calibrated ΔKL sums to "
                           f"{forced_kl:.4f} nats, above quality.max_kl={q.max_kl}: raise it (e.g. "
                           f"quality.max_kl={2 * forced_kl:.3g}) or place fewer blocks in lossy states")
    say(f"quality budget: max_kl {q.max_kl} nats; {sum(bool(v) for v in allowance.states.values())} blocks may take "
        f"lossy states, bound {allowance.bound_kl + forced_kl:.4f} nats (calibrated ΔKL)")
    return QualityGuard(cal, allowance, forced_kl)


# ------------------------------------------------------------------------------------------- the scored inputs


def _common(setup) -> dict:
    return dict(state_bytes=setup.state_bytes, homes=setup.homes, kinds=setup.kinds, layers=setup.layer_of,
                placement=setup.placement)


def scored_inputs(cfg: RunConfig, setup, store_dir: Path, load_s: dict, guard: QualityGuard | None = None,
                  device=None) -> dict:
    """The scored policy's measured inputs for a real run (see the module docstring); `load_s`: the run's probe of
    each block's load, and where the run holds dropped memory, a probe of the same landing in new memory too."""
    import jax

    from vorch_jax.tiers.full_precision import copies_measured
    from vorch_jax.tiers.link_probe import probe_bandwidths, probe_block_loads

    prices = dict(load_s=load_s)
    if copies_measured(device or jax.devices()[0]):  # the run holds dropped memory: a load may land fresh too
        prices["fresh_load_s"] = probe_block_loads(setup.spec.leaf_shapes, device=device, fresh=True)
    cal = guard.calibration if guard is not None else stored_calibration(cfg, setup)
    if cal is not None:
        return dict(_common(setup), **prices, h2d_bytes_per_s=cal.bandwidths["host->device"],
                    nvme_bytes_per_s=cal.bandwidths["nvme->host"], psi=cal.psi, delta=cal.policy_delta(),
                    lossy_loss=cal.tick_lossy_loss(), calibration=f"{cal.model_key} @ {cal.machine_key}, {cal.created}",
                    lossy_states=guard.allowance.states if guard is not None else None)
    bw = probe_bandwidths(store_dir, device=device)
    return dict(_common(setup), **prices, h2d_bytes_per_s=bw["host->device"], nvme_bytes_per_s=bw["nvme->host"],
                delta=None, calibration=None)


def simulated_lossy_states(cfg: RunConfig, setup, cal) -> dict | None:
    """A simulated lossy run's quality budget, the real run's (`lossy_allowance`): the lossy states each block may use
    (None: no calibration, every lossy state allowed, quality not simulated)."""
    if cal is None or not cfg.lossy:
        return None
    return lossy_allowance(cfg, setup, cal)[0].states


def profile_load_seconds(setup, hw) -> dict:
    """{block: seconds} a load of each block's full precision takes over the profile's host->device link."""
    return {b: hw.host_to_device.seconds(setup.device_bytes[b]) for b in setup.block_ids}


def simulated_scored_inputs(cfg: RunConfig, setup, hw, cal, lossy_states: dict | None = None) -> dict:
    """The scored policy's inputs on a hardware profile: links and δ (from its dequant rates) from the profile; ψ,
    the per-state value loss and the quality budget's lossy states from the model's calibration when it has one."""
    lowbit = {State.S1: "int8", State.S2: "int4"}
    delta = None
    if cfg.lossy:
        delta = {}
        for b in setup.block_ids:
            kind = setup.kinds[b]
            if kind not in delta:
                delta[kind] = {State.S0: 0.0, State.S6: 0.0}
                for s, fmt in lowbit.items():
                    delta[kind][s] = setup.state_bytes[b][s] / hw.dequant_bytes_per_s[fmt]
    from_cal = {} if cal is None else dict(psi=cal.psi, lossy_loss=cal.tick_lossy_loss(),
                                           calibration=f"ψ: {cal.model_key} @ {cal.machine_key}, {cal.created}")
    if lossy_states is not None:  # computed once, before the compressed homes they decide (`simulated_lossy_states`)
        from_cal["lossy_states"] = lossy_states
    return dict(_common(setup), load_s=profile_load_seconds(setup, hw),
                h2d_bytes_per_s=hw.host_to_device.bandwidth_bytes_per_s,
                nvme_bytes_per_s=hw.nvme_read_bytes_per_s, delta=delta, **from_cal)
