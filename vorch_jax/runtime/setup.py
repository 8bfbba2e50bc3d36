"""One set-up for every run: the model's spec, budgets, placement, homes, per-state bytes and texts.

Built from the config before any timing, the same for dense and routed models, real and simulated runs:
  * the spec from the registry (`models.spec.get(cfg.model, **moe options)`); its block table is read from the
    model's tagged parameters;
  * bytes: a real model's blocks live on the device as the source's float32 arrays; a shape-only model's in the
    run's dtype (the simulated device holds them so); the lossy states' sizes come from the conversions' shapes
    (`tiers.footprint`), once per distinct block shape;
  * budgets (fractions of the model's S0 bytes, or bytes), placement rules resolved on the block ids, the
    protected set (rules, and everything for `resident`), compressed homes (`packed`: rules' `home_format`, or a
    lossy scored run's quality budget, `with_compressed_homes`), homes (`lay_out_homes`: DRAM holds the compressed
    copies first, then lossless homes in pass order, those of blocks without a compressed copy first; the rest on
    NVMe);
  * texts (real runs): the prompt and the evaluation text (the KJV from its start), BOS prepended.
"""

from __future__ import annotations

import dataclasses
import re

from vorch_jax.config import RunConfig
from vorch_jax.config_fields import parse_budget
from vorch_jax.errors import RunError
from vorch_jax.models import registry
from vorch_jax.placement import resolve_placement
from vorch_jax.tiers import footprint
from vorch_jax.tiers.state import LOSSY, State

ON_DEVICE_RULE_STATES = ("S0", "S1", "S2", "S6")


@dataclasses.dataclass
class Setup:
    """Everything a run needs, built from the config before any timing."""

    cfg: RunConfig
    spec: object  # models.spec.ModelSpec
    weight_dtype: str  # what the device holds weights in (float32 for a real model's source arrays)
    block_ids: list  # table order
    info: dict  # block -> BlockInfo
    device_bytes: dict  # block -> S0 bytes
    kinds: dict
    layer_of: dict
    model_bytes: int
    hbm_budget: int
    dram_budget: int
    homes: dict
    protected: frozenset
    placement: dict
    forced: dict  # block -> on-device State fixed by a placement rule
    packed: dict  # block -> lossy State of its compressed home (loads move and land that state)
    packed_where: dict  # block -> "host" | "disk": where its compressed home lives
    state_bytes: dict  # block -> {State: device bytes}
    pass_order: list  # one pass touching every block (what static placement fills in order)
    prompt_ids: list
    eval_ids: list

    def with_compressed_homes(self, packed: dict) -> "Setup":
        """This set-up with compressed homes `packed` (block -> S1 | S2 | S6) added to the rules' ones, and the
        homes laid out again (the compressed copies take DRAM first)."""
        packed = {**packed, **self.packed}
        homes, where = lay_out_homes(self.pass_order, self.block_ids, self.placement, self.device_bytes,
                                     {b: self.state_bytes[b][s] for b, s in packed.items()}, self.dram_budget,
                                     self.cfg.model)
        return dataclasses.replace(self, packed=packed, packed_where=where, homes=homes)

    @property
    def in_place(self) -> dict:
        """block -> "host" | "auto": the reads that may run where the block's weights live (`runtime/in_place.py`):
        a rule's `compute: host`; with `in_place: auto`, every block whose op the model can run in place, with its
        lossless home in DRAM and no compressed home, not protected and not ruled `compute: device`. Empty for the
        resident reference."""
        if self.cfg.policy == "resident":
            return {}
        ops, out = self.spec.block_op, {}
        for b in self.block_ids:
            p = self.placement[b]
            if p.compute == "host":
                out[b] = "host"
            elif (self.cfg.in_place == "auto" and p.compute != "device" and ops.get(b) in self.spec.in_place_ops
                  and b not in self.protected and b not in self.packed and self.homes[b] == State.S3):
                out[b] = "auto"
        return out

    @property
    def packed_bytes(self) -> int:
        """Bytes the compressed homes take (DRAM and NVMe)."""
        return sum(self.state_bytes[b][s] for b, s in self.packed.items())

    @property
    def source(self):
        return self.spec.source()

    @property
    def tokenizer(self):
        return self.spec.tokenizer()

    @property
    def model_cfg(self):
        return self.spec.config

    @property
    def schedule(self) -> list:
        return self.pass_order


def model_spec(cfg: RunConfig, device: int = 0):
    """The spec of `cfg.model` with the run's model options (the `moe` section); on a mesh, what device `device`
    holds and runs (`models.shard_spec.ShardSpec`)."""
    spec = registry.get(cfg.model, router_config=cfg.moe.router_config, top_k=cfg.moe.top_k)
    if cfg.mesh.devices == 1:
        return spec
    from vorch_jax.models.shard_spec import ShardSpec

    return ShardSpec(spec, cfg.mesh.tp, cfg.mesh.ep, device)


def _shapes(spec, block: str, dtype: str) -> dict:
    import jax
    import jax.numpy as jnp

    return {k: jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype)) for k, s in spec.block_shapes(block).items()}


def state_bytes_of(spec, ids, dtype: str, quant, lossy: bool) -> dict:
    """{block: {State: device bytes}} for S0, S1, S2, S6 (lossy sizes only where `lossy`; else S0's stands in)."""
    cache, out = {}, {}
    for b in ids:
        shapes = _shapes(spec, b, dtype)
        key = tuple((k, v.shape) for k, v in shapes.items())
        if key not in cache:
            s0 = footprint.state_bytes(shapes, State.S0)
            cache[key] = {State.S0: s0}
            for s in (State.S1, State.S2, State.S6):
                cache[key][s] = footprint.state_bytes(shapes, s, int4_group_size=quant.int4_group_size,
                                                      lowrank_rank=quant.lowrank_rank) if lossy else s0
        out[b] = cache[key]
    return out


def build_setup(cfg: RunConfig, *, simulated: bool | None = None, device: int = 0) -> Setup:
    """The run's set-up (see the module docstring), of device `device` on a mesh (its budget, a fraction of its own
    shard's bytes); every problem is a one-line error before any work."""
    spec = model_spec(cfg, device)
    simulated = cfg.executor == "sim" if simulated is None else simulated
    if not spec.has_weights and not simulated:
        raise RunError(f"model '{cfg.model}' is shape-only (no weights here): run it with executor=sim and a "
                       f"hardware profile, e.g. executor=sim hardware=h100-sxm")
    weight_dtype = "float32" if spec.has_weights else cfg.dtype
    table = spec.blocks()
    ids = [b.id for b in table]
    info = {b.id: b for b in table}
    real_lossy = cfg.lossy or any(r.state in LOSSY_NAMES for r in cfg.placement)
    state_bytes = state_bytes_of(spec, ids, weight_dtype, cfg.quant, lossy=real_lossy or not simulated)
    device_bytes = {b: state_bytes[b][State.S0] for b in ids}
    model_bytes = sum(device_bytes.values())
    hbm = parse_budget(cfg.hbm_budget, model_bytes)
    dram = parse_budget(cfg.dram_budget, model_bytes)
    placement = resolve_placement(cfg.placement, ids)
    # A rule that fixes an on-device state pins the block there in that state; `protect` pins it in S0 (or its state).
    forced = {b: State.parse(p.state) for b, p in placement.items() if p.state in ON_DEVICE_RULE_STATES}
    protected = frozenset(b for b, p in placement.items() if p.protect) | frozenset(forced)
    if cfg.policy == "resident":
        protected = frozenset(ids)
    need = sum(state_bytes[b][forced.get(b, State.S0)] for b in protected)
    if need > hbm:
        raise RunError(f"hbm_budget of {hbm} bytes is below the {need} bytes of the blocks that must stay on device "
                       f"({len(protected)} protected or pinned blocks of {cfg.model})")
    order = spec.pass_order()
    check_host_rules(spec, placement)
    packed = {b: HOME_FORMATS[p.home_format] for b, p in placement.items() if p.home_format and b not in protected}
    homes, where = lay_out_homes(order, ids, placement, device_bytes, {b: state_bytes[b][s] for b, s in packed.items()},
                                 dram, cfg.model)
    prompt_ids, eval_ids = texts(cfg, spec, simulated)
    return Setup(cfg, spec, weight_dtype, ids, info, device_bytes, {b: info[b].kind for b in ids},
                 {b: info[b].layer for b in ids}, model_bytes, hbm, dram, homes, protected, placement, forced,
                 packed, where, state_bytes, order, prompt_ids, eval_ids)


HOME_FORMATS = {"int8": State.S1, "int4": State.S2, "lowrank": State.S6}  # a compressed home's format -> its state


def check_host_rules(spec, placement: dict) -> None:
    """A rule's `compute: host` must match blocks whose op the model can run where the weights live."""
    for b, p in placement.items():
        op = spec.block_op.get(b)
        if p.compute == "host" and op not in spec.in_place_ops:
            raise RunError(f"placement[{p.rule}].compute is host but it matches '{b}', whose op '{op}' cannot run in "
                           f"place in {spec.name} (ops that can: {', '.join(spec.in_place_ops) or 'none'}); narrow "
                           f"its path")


def lay_out_homes(order: list, ids: list, placement: dict, device_bytes: dict, packed_bytes: dict,
                  dram: int, model: str = "the model") -> tuple[dict, dict]:
    """(each block's lossless home, S3 (DRAM) or S4 (NVMe); where each compressed home lives, "host" or "disk").
    DRAM holds the homes of blocks computed on the host first (a rule's `compute: host`: they are read there), then
    the compressed homes, in pass order (what streams), then lossless homes in pass order, those of blocks without a
    compressed copy before the rest (theirs is what loads); what does not fit spills to NVMe. A rule's S3 / S4
    decides its blocks' lossless homes."""
    host = [b for b in ids if placement[b].compute == "host"]
    used = sum(device_bytes[b] for b in host)
    if used > dram:
        raise RunError(f"dram_budget of {dram} bytes cannot hold the {len(host)} blocks of {model} a rule computes "
                       f"on the host ({used} bytes): raise dram_budget")
    where = {}
    for b in dict.fromkeys(order + ids):
        if b in packed_bytes:
            where[b] = "host" if used + packed_bytes[b] <= dram else "disk"
            used += packed_bytes[b] if where[b] == "host" else 0
    homes = {b: State.S3 for b in host}
    for b in sorted(dict.fromkeys(order + ids), key=lambda b: b in packed_bytes):  # stable: pass order kept
        ruled = placement[b].state
        if b in homes:
            continue
        if ruled in ("S3", "S4"):
            homes[b] = State.parse(ruled)
        else:
            homes[b] = State.S3 if used + device_bytes[b] <= dram else State.S4
        used += device_bytes[b] if homes[b] == State.S3 else 0
    return {b: homes[b] for b in ids}, where


LOSSY_NAMES = tuple(s.name for s in LOSSY)


def texts(cfg: RunConfig, spec, simulated: bool) -> tuple[list, list]:
    """(prompt ids, evaluation ids), BOS first. A simulated run has no text: ids of the configured lengths."""
    if simulated:
        return [0] * (cfg.prompt_tokens + 1), [0] * (cfg.eval_tokens + 1)
    tok, bos = spec.tokenizer(), spec.bos_id()
    text_ids = tok.encode(spec.text(16 * (cfg.prompt_tokens + cfg.eval_tokens) + 1000)).ids
    prompt = tok.encode(cfg.prompt).ids if cfg.prompt else text_ids[: cfg.prompt_tokens]
    if not prompt:
        raise RunError("the prompt is empty: give a prompt or prompt_tokens >= 1")
    return [bos] + prompt, [bos] + text_ids[: cfg.eval_tokens]


def protect_all_but(spec, kind: str, state: str = "S0"):
    """Placement rules protecting every block that is not of `kind` (e.g. the MoE studies' "the experts alone
    compete for the budget"): one rule over the spec's own block ids, no id format assumed."""
    from vorch_jax.config import PlacementRule

    ids = [b.id for b in spec.blocks() if b.kind != kind]
    return (PlacementRule(path="|".join(re.escape(b) for b in ids), state=state, protect=True),)


def expert_budget(setup: Setup, expert_fraction: float, reserve_experts: int) -> tuple[int, str]:
    """(bytes, how): protected blocks + `expert_fraction` of all expert bytes + `reserve_experts` experts of
    streaming room (the blocks in flight beside the cache)."""
    prot = sum(setup.state_bytes[b][setup.forced.get(b, State.S0)] for b in setup.protected)
    experts = [setup.device_bytes[b] for b in setup.block_ids if setup.kinds[b] == "expert"]
    cache = int(expert_fraction * sum(experts))
    reserve = reserve_experts * max(experts)
    how = (f"{prot} protected + {expert_fraction:.0%} of {sum(experts)} expert bytes ({cache}, "
           f"{cache / max(experts):.1f} of {len(experts)} experts) + reserve {reserve_experts} x {max(experts)} "
           f"= {prot + cache + reserve} bytes")
    return prot + cache + reserve, how
