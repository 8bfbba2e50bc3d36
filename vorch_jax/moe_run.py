"""One run of the MoE SmolLM2 (`model: smollm2-135m-moe`) under a budget and a policy: `run_moe(cfg, out_dir)`.

The MoE twin of `runner.run`, writing the same `summary.json` / `trace.jsonl` / `trace.perfetto.json` (plus a `moe`
section). What differs from the dense run:
  * the model is `models.moe.moe_source` over the dense GGUF (partition and routers built once and cached by
    `moe_build.build_or_load`); its MoE knobs come from the router config, not from RunConfig:
    E = `n_experts`, and the run's top_k = `target_top_k` (the k the routers were trained for), both read from
    `configs/moe/router.yaml` unless `router_config=` names another file; `top_k=` overrides k for one run;
  * the executor is `moe_executor.RoutedExecutor` (schedule chosen by the router, speculative prefetch of the next
    layer's experts, λ from router probabilities for the scored controller);
  * "the future" is not a formula: the resident reference run records its access stream (generation, then the
    quality pass), and that stream is what `BeladyPolicy` and `belady_bytes` read. A lossless run routes exactly as
    the reference (same greedy tokens, same block functions), which `stream_matches_resident` checks.

Besides the runner's outputs it writes `routing.json` (`routing_trace.py`): the experts each generation pass read
and the speculative predictions made, which the simulator replays (`executor=sim routing_trace=RUN/routing.json`).

Dispatch from `runner.run`: `if cfg.model == "smollm2-135m-moe": return moe_run.run_moe(cfg, out_dir, ...)`.
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import yaml

from vorch_jax.config import RunConfig, config_to_dict
from vorch_jax.errors import QualityError
from vorch_jax.models import moe
from vorch_jax.models import moe_build as mb
from vorch_jax.models.llama import KVCache
from vorch_jax.tiers.link_probe import probe_bandwidths
from vorch_jax.tiers.state import State

from . import moe_executor as MX
from . import telemetry as T
from .executor import check_fits, greedy_generate
from .policies import PolicyContext
from .moe_policy import MoEScoredPolicy
from .routing_trace import routing_from_stream, write_routing_trace
from .outputs import check_out_dir, nvme_store_dir, writing
from .runner import RunError, Setup, build_setup, build_summary, make_policy, uses_lossy_states

MOE_MODEL = "smollm2-135m-moe"
ROUTER_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "moe" / "router.yaml"


@dataclasses.dataclass
class MoESetup(Setup):
    """`runner.Setup` plus the MoE's own: experts per layer and the run's top_k. `schedule` is the full pass order
    (every expert, then the head's `embed`)."""

    n_experts: int = 8
    top_k: int = 2


_MODELS: dict = {}


def load_moe_model(router_config: str, say=lambda m: None):
    """(MoE source, tokenizer) for a router config, loaded once per process (the source is read-only)."""
    from vorch_jax.corpus import kjv_text
    from vorch_jax.models.smollm2 import bos_id, load_smollm2_source
    from vorch_jax.models.tokenizer import tokenizer_from_gguf_metadata

    if router_config not in _MODELS:
        rcfg = mb.load_router_config(router_config)
        dense = load_smollm2_source()
        tok = tokenizer_from_gguf_metadata(dense.tokenizer_metadata())
        partition, routers = mb.build_or_load(dense, tok, lambda n: kjv_text(max_chars=n), bos_id(tok), rcfg,
                                              say=say)
        _MODELS[router_config] = (moe.moe_source(dense, partition, routers), tok)
    return _MODELS[router_config]


def prepare_moe(cfg: RunConfig, *, router_config=None, top_k: int | None = None, say=lambda m: None) -> MoESetup:
    """Everything the run needs, before any timing (the MoE is built on first use: about 2 minutes)."""
    if cfg.model != MOE_MODEL:
        raise RunError(f"model '{cfg.model}' is not the MoE model ({MOE_MODEL})")
    if cfg.executor != "real":
        raise RunError(f"executor '{cfg.executor}' is not available for {MOE_MODEL} (only real)")
    rcfg = mb.load_router_config(router_config or ROUTER_CONFIG)
    k = rcfg.target_top_k if top_k is None else int(top_k)
    if not 1 <= k <= rcfg.n_experts:
        raise RunError(f"top_k must lie in [1, {rcfg.n_experts}], got {k}")
    source, tok = load_moe_model(str(Path(router_config or ROUTER_CONFIG).resolve()), say)
    return build_setup(cfg, source, tok, source.block_ids, source.block_kind_layer, source.block_ids + ["embed"],
                       setup_cls=MoESetup, n_experts=rcfg.n_experts, top_k=k)


def dense_protect_rules():
    """Placement rules keeping every dense block (embedding, attention, router gates, final norm) on device in S0:
    the experts alone compete for the rest of the budget."""
    from vorch_jax.config import PlacementRule

    return (PlacementRule(path=r"embed|final_norm|layers\.\d+\.(attn|moe_gate)", state="S0", protect=True),)


def expert_budget(setup: MoESetup, expert_fraction: float, reserve_experts: int) -> tuple[int, str]:
    """(bytes, how): protected blocks + `expert_fraction` of all expert bytes + `reserve_experts` experts of
    streaming room (the blocks in flight beside the cache)."""
    prot = sum(setup.state_bytes[b][setup.forced.get(b, State.S0)] for b in setup.protected)
    experts = [setup.device_bytes[b] for b in setup.block_ids if setup.kinds[b] == "expert"]
    cache = int(expert_fraction * sum(experts))
    reserve = reserve_experts * max(experts)
    how = (f"{prot} protected (dense) + {expert_fraction:.0%} of {sum(experts)} expert bytes ({cache}, "
           f"{cache / max(experts):.1f} of {len(experts)} experts) + reserve {reserve_experts} x {max(experts)} "
           f"= {prot + cache + reserve} bytes")
    return prot + cache + reserve, how


# ------------------------------------------------------------------------------------------------ the reference


@dataclasses.dataclass(frozen=True)
class MoEReference:
    """The all-resident MoE run: quality logits, greedy tokens, decode step time, and the access stream in run order
    (prefill, decode steps, then the quality pass): the recorded future of every lossless run."""

    logits: np.ndarray  # [T, V] float32 on the evaluation text
    step_s: float
    tokens: list
    stream: tuple  # block ids, one per position
    gen_positions: int  # positions of generation (the rest is the quality pass)
    speculation: tuple | None = None  # generation's passes: ResidentMoE.speculation (with speculation=True)


def moe_reference(setup: MoESetup, dtype, new_tokens: int, *, speculation: bool = False) -> MoEReference:
    """`speculation`: also record the speculative predictions of generation (for the simulator; each layer then
    runs one more router call, so the reference step time includes them)."""
    weights = {b: {k: jnp.asarray(v) for k, v in setup.source(b).items()} for b in setup.block_ids}
    ref = MX.ResidentMoE(setup.model_cfg, weights, setup.n_experts, setup.top_k, dtype,
                         record_speculation=speculation)
    gen = greedy_generate(ref, setup.prompt_ids, new_tokens)
    tokens, step_s = gen.tokens, gen.step_s
    n_gen = len(ref.stream)
    spec = tuple(ref.speculation) if speculation else None
    ref.record_speculation = False
    cache = KVCache.zeros(setup.model_cfg, 1, len(setup.eval_ids) - 1, dtype)
    logits, _ = ref.forward(np.asarray([setup.eval_ids[:-1]]), cache, 0)
    logits = np.asarray(logits[0])
    for w in weights.values():
        for a in w.values():
            a.delete()
    step = statistics.median(step_s[1:] or step_s) if step_s else float("nan")
    return MoEReference(logits, step, tokens, tuple(ref.stream), n_gen, spec)


# ------------------------------------------------------------------------------------------------ the run


def moe_scored_inputs(cfg: RunConfig, setup: MoESetup, store_dir: Path) -> dict:
    """`runner.scored_inputs` for the MoE's block kinds (δ measured on one block of each kind when lossy)."""
    from vorch_jax.tiers.dequant_cost import measure_dequant_seconds

    bw = probe_bandwidths(store_dir)
    delta = None
    if cfg.lossy:
        delta = {setup.kinds[b]: measure_dequant_seconds(setup.source(b), int4_group_size=cfg.quant.int4_group_size,
                                                         lowrank_rank=cfg.quant.lowrank_rank)
                 for b in ("embed", "layers.0.attn", moe.expert_block_id(0, 0))}
    return dict(state_bytes=setup.state_bytes, homes=setup.homes, kinds=setup.kinds, layers=setup.layer_of,
                placement=setup.placement, h2d_bytes_per_s=bw["host->device"], nvme_bytes_per_s=bw["nvme->host"],
                delta=delta, calibration=None)


def run_moe(cfg: RunConfig, out_dir, *, progress=None, reference: MoEReference | None = None,
            router_config=None, top_k: int | None = None, speculative: bool | None = None) -> dict:
    """Run `cfg` on the MoE model, write summary.json (last), trace.jsonl, trace.perfetto.json; return the summary.

    `reference`: a resident MoE reference for the same prompt, evaluation text and token count (shared by a sweep
    or tests); computed here when None. `speculative`: speculative expert prefetch (default: on for `scored`,
    off otherwise, so the baselines are the plain caches). `router_config`, `top_k`: see the module docstring.
    """
    out_dir = check_out_dir(Path(out_dir))
    say = progress or (lambda msg: None)
    setup = prepare_moe(cfg, router_config=router_config, top_k=top_k, say=say)
    if uses_lossy_states(cfg, setup.forced):
        raise QualityError(f"lossy states of {cfg.model} need a measured ΔKL of its experts, which `vorch calibrate` "
                           f"does not measure yet: run it with lossy=false")
    with writing(out_dir):
        (out_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))  # what it was
    dtype = jnp.dtype(cfg.dtype)
    if reference is None:
        say("resident reference")
        reference = moe_reference(setup, dtype, cfg.new_tokens)
    store_dir, scratch = nvme_store_dir(cfg.nvme_dir, out_dir)
    ctx = PolicyContext(block_ids=tuple(setup.block_ids), device_bytes=setup.device_bytes,
                        budget_bytes=setup.hbm_budget, schedule=tuple(setup.schedule),
                        prefetch_depth=cfg.prefetch_depth, protected=setup.protected, future=reference.stream,
                        forced=setup.forced, state_bytes=setup.state_bytes)
    extras = moe_scored_inputs(cfg, setup, store_dir) if cfg.policy == "scored" else None
    policy = MoEScoredPolicy(ctx, cfg, **extras) if cfg.policy == "scored" else make_policy(cfg, ctx, extras)
    check_fits(policy, setup.device_bytes, setup.hbm_budget, setup.state_bytes)

    from vorch_jax.tiers.engine import MovementEngine

    engine = MovementEngine(setup.source, store_dir, int4_group_size=cfg.quant.int4_group_size,
                            lowrank_rank=cfg.quant.lowrank_rank, keep_home=True)
    spec = (cfg.policy == "scored") if speculative is None else speculative
    try:
        return _run_with_engine(cfg, setup, engine, policy, out_dir, dtype, reference, say, spec)
    finally:
        engine.close()
        if scratch:
            shutil.rmtree(store_dir, ignore_errors=True)


def _run_with_engine(cfg, setup, engine, policy, out_dir, dtype, reference, say, speculative):
    link_bw = probe_bandwidths(engine.store_dir)
    say("registering blocks at their homes")
    for b in setup.block_ids:
        engine.register(b, setup.homes[b])
    ex = MX.RoutedExecutor(setup.model_cfg, engine, policy, n_experts=setup.n_experts, top_k=setup.top_k,
                           speculative=speculative, budget_bytes=setup.hbm_budget, device_bytes=setup.device_bytes,
                           homes=setup.homes, layer_of=setup.layer_of, tick_every_n_layers=cfg.tick_every_n_layers,
                           dtype=dtype, state_bytes=setup.state_bytes)
    say("compiling")
    P, n_eval = len(setup.prompt_ids), len(setup.eval_ids) - 1
    MX.compile_on_zeros(setup.model_cfg, setup.source, setup.n_experts, setup.top_k, {P, 1}, P + cfg.new_tokens,
                        dtype)
    MX.compile_on_zeros(setup.model_cfg, setup.source, setup.n_experts, setup.top_k, {n_eval}, n_eval, dtype)

    say("initial placement")
    t_place0 = time.perf_counter()
    ex.place_initial()
    t_gen0 = time.perf_counter()
    n_acc0, spec0 = len(ex.accesses), len(ex.spec["loads"])
    say("generating")
    gen = greedy_generate(ex, setup.prompt_ids, cfg.new_tokens)
    t_gen1 = gen.marks[-1]
    n_gen = len(ex.accesses) - n_acc0
    gen_counters = dataclasses.replace(ex.counters)
    gen_spec = {k: (v if not isinstance(v, list) else list(v)) for k, v in ex.spec.items()}
    say("quality pass")
    cache = KVCache.zeros(setup.model_cfg, 1, n_eval, dtype)
    run_logits, _ = ex.forward(np.asarray([setup.eval_ids[:-1]]), cache, 0)
    run_logits = np.asarray(run_logits[0])
    t_q1 = time.perf_counter()

    events = engine.events.snapshot()
    stream = [a.block for a in ex.accesses[n_acc0:]]
    summary = build_summary(cfg, setup, policy, reference, events, ex.accesses[n_acc0:], gen_counters, link_bw,
                            gen=gen, t_place0=t_place0, t_gen1=t_gen1, t_q1=t_q1, run_logits=run_logits,
                            n_gen=n_gen)
    summary["stream_matches_resident"] = stream == list(reference.stream)
    summary["moe"] = moe_section(setup, ex, gen_spec, spec0, events, t_gen0, t_gen1, speculative)
    records = T.trace_records(ex.accesses, events, t_gen0, ex.score_samples)
    L = setup.model_cfg.n_layers  # what the simulator replays (routing_trace.py): generation's routing, speculation
    spec = [[ex.spec_trace.get((j, i)) for i in range(L)] for j in range(cfg.new_tokens)] if speculative else None
    with writing(out_dir):
        T.write_trace(out_dir, records)
        write_routing_trace(out_dir, model=cfg.model, n_layers=L, n_experts=setup.n_experts,
                            passes=routing_from_stream(stream[:n_gen]), speculation=spec)
        T.write_json_atomic(out_dir / "summary.json", summary)  # last: its presence means the run completed
    return summary


def moe_section(setup, ex, spec, spec0, events, t_gen0, t_gen1, speculative) -> dict:
    """MoE figures of generation: expert hit rate, expert bytes, and the speculative prefetch as measured.

    Speculative precision = speculative loads read by their layer / loads issued; recall = those reads / the
    experts the speculated layers then selected (loads are issued only for experts off device, so recall is
    bounded by the miss share). `prediction_*` compare the predicted set with the selected one, loaded or not.
    Each load issued is checked against the engine's events (a host->device transition of that block)."""
    gen = [a for a in ex.accesses if t_gen0 <= a.start < t_gen1]
    experts = [a for a in gen if ".expert." in a.block]
    gen_events = T.window(events, t_gen0, t_gen1)
    h2d = [e for e in gen_events if e.kind == "transition" and e.link_bytes.get("host->device")]
    expert_bytes = sum(e.link_bytes["host->device"] for e in h2d if ".expert." in e.block)
    loads = spec["loads"][spec0:]
    landed = {e.block for e in h2d}
    return {
        "n_experts": setup.n_experts,
        "top_k": setup.top_k,
        "expert_accesses": len(experts),
        "expert_hits": sum(a.hit for a in experts),
        "expert_hit_rate": (sum(a.hit for a in experts) / len(experts)) if experts else float("nan"),
        "expert_bytes_moved": expert_bytes,
        "speculative": {
            "enabled": speculative,
            "issued": spec["issued"],
            "issued_bytes": spec["issued_bytes"],
            "issued_with_engine_event": sum(1 for _, b in loads if b in landed),
            "used": spec["used"],
            "precision": spec["used"] / spec["issued"] if spec["issued"] else float("nan"),
            "recall": spec["used"] / spec["actual"] if spec["actual"] else float("nan"),
            "prediction_precision": (spec["predicted_and_actual"] / spec["predicted"]) if spec["predicted"]
            else float("nan"),
            "prediction_recall": (spec["predicted_and_actual"] / spec["actual"]) if spec["actual"] else float("nan"),
        },
    }
