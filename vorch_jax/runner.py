"""One run: a model under a budget and a policy, generating for real, measured; and the notebook API.

`run(cfg, out_dir)` is what `vorch run` calls. It writes `summary.json` (last, atomically, with
`"complete": true`), `trace.jsonl` and `trace.perfetto.json`. Phases, each timed on its own:
set-up (register blocks at their homes, compile on zero weights: never timed), initial placement, prefill, decode,
then the quality pass on the evaluation text (its traffic reported apart from generation's).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from vorch_jax.config import RunConfig, config_to_dict, parse_budget
from vorch_jax.errors import QualityError, RunError
from vorch_jax.outputs import check_out_dir, nvme_store_dir, writing
from vorch_jax.versions import environment
from vorch_jax.models.llama import KVCache, block_kind_layer, block_ids as model_block_ids
from vorch_jax.placement import resolve_placement
from vorch_jax.tiers import footprint
from vorch_jax.tiers.dequant_cost import measure_dequant_seconds
from vorch_jax.tiers.link_probe import probe_bandwidths
from vorch_jax.tiers.state import LOSSY, State

from . import block_compute as C
from . import telemetry as T
from .belady import BeladyPolicy, belady_bytes
from .executor import Executor, check_fits, greedy_generate
from .policies import LFUPolicy, LRUPolicy, PolicyContext, ResidentPolicy, StaticPolicy
from .schedule import dense_schedule, future_stream


def stored_calibration(cfg: RunConfig, setup: "Setup"):
    """This model's and machine's calibration (`vorch calibrate`) when it exists and matches the run's formats."""
    return calibration_for(cfg, setup.source, setup.block_ids)


def calibration_for(cfg: RunConfig, source, block_ids):
    """The stored calibration of `source`'s model on this machine covering `block_ids` in `cfg`'s formats, or None."""
    from vorch_jax.calibrate import covers, load_calibration, machine_key, model_key

    cal = load_calibration(None, model_key(source), machine_key(), source=source)
    if cal is None or covers(cal, tokens=cal.tokens, blocks=list(block_ids), int4_group_size=cfg.quant.int4_group_size,
                             lowrank_rank=cfg.quant.lowrank_rank) is not None:
        return None
    return cal


def uses_lossy_states(cfg: RunConfig, forced: dict) -> bool:
    """Whether a run can hold a block in a lossy state: the scored policy with lossy allowed, or a placement rule."""
    return cfg.lossy and (cfg.policy == "scored" or any(State(s) in LOSSY for s in forced.values()))


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
                              f"{self.calibration.created}"}
        if kl_measured is not None:
            out |= {"kl_measured": kl_measured, "within_budget": kl_measured <= self.allowance.max_kl}
        return out


def quality_guard(cfg: RunConfig, setup: "Setup", say=lambda m: None) -> QualityGuard | None:
    """For a run that can use lossy states: the stored calibration of this model on this machine, or (quality.
    calibration=auto) one measured now and stored; then the lossy states each block may take under quality.max_kl.
    None for a lossless run. QualityError when no calibration may be measured or placement rules alone exceed the
    budget."""
    from vorch_jax.calibrate import CalibrationMismatchError, load_or_calibrate

    from .quality_budget import allocate, forced_lossy_kl

    if not uses_lossy_states(cfg, setup.forced):
        return None
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
        cal = load_or_calibrate(setup.source, None, force=True, progress=say, tokens=q.calibration_tokens,
                                int4_group_size=cfg.quant.int4_group_size, lowrank_rank=cfg.quant.lowrank_rank)
    forced_kl = forced_lossy_kl(cal.kl, setup.forced)
    if forced_kl > q.max_kl:
        raise QualityError(f"placement rules fix lossy states whose calibrated ΔKL sums to {forced_kl:.4f} nats, above "
                           f"quality.max_kl={q.max_kl}: raise it (e.g. quality.max_kl={2 * forced_kl:.3g}) or place "
                           f"fewer blocks in lossy states")
    free = [b for b in setup.block_ids if b not in setup.forced]
    allowance = allocate(cal.kl, setup.state_bytes, q.max_kl - forced_kl, share=q.kl_share, blocks=free)
    allowance = dataclasses.replace(allowance, max_kl=q.max_kl)
    say(f"quality budget: max_kl {q.max_kl} nats; {sum(bool(v) for v in allowance.states.values())} blocks may take "
        f"lossy states, bound {allowance.bound_kl + forced_kl:.4f} nats (calibrated ΔKL)")
    return QualityGuard(cal, allowance, forced_kl)


def scored_inputs(cfg: RunConfig, setup: "Setup", store_dir: Path, guard: QualityGuard | None = None) -> dict:
    """The scored policy's measured inputs. From the stored calibration when there is one (ψ, δ, per-state value loss,
    link bandwidths); otherwise the links are probed now (a lossless run needs no ψ). A lossy run always has its
    calibration (`quality_guard`), and the lossy states it allows per block."""
    cal = guard.calibration if guard is not None else stored_calibration(cfg, setup)
    if cal is not None:
        return dict(state_bytes=setup.state_bytes, homes=setup.homes, kinds=setup.kinds, layers=setup.layer_of,
                    placement=setup.placement, h2d_bytes_per_s=cal.bandwidths["host->device"],
                    nvme_bytes_per_s=cal.bandwidths["nvme->host"], psi=cal.psi, delta=cal.policy_delta(),
                    lossy_loss=cal.tick_lossy_loss(), calibration=f"{cal.model_key} @ {cal.machine_key}, {cal.created}",
                    lossy_states=guard.allowance.states if guard is not None else None)
    bw = probe_bandwidths(store_dir)
    delta = None
    if cfg.lossy:
        delta = {}
        for b in ("embed", "layers.0.attn", "layers.0.mlp"):
            delta[setup.kinds[b]] = measure_dequant_seconds(setup.source(b), int4_group_size=cfg.quant.int4_group_size,
                                                            lowrank_rank=cfg.quant.lowrank_rank)
    return dict(state_bytes=setup.state_bytes, homes=setup.homes, kinds=setup.kinds, layers=setup.layer_of,
                placement=setup.placement, h2d_bytes_per_s=bw["host->device"], nvme_bytes_per_s=bw["nvme->host"],
                delta=delta, calibration=None)


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
        from .scored_policy import ScoredPolicy

        return ScoredPolicy(ctx, cfg, **(extras or {}))
    raise RunError(f"unknown policy '{name}'")


@dataclasses.dataclass
class Setup:
    """Everything a run needs, built from the config before any timing."""

    cfg: RunConfig
    source: object
    tokenizer: object
    model_cfg: object
    block_ids: list
    device_bytes: dict
    layer_of: dict
    model_bytes: int
    hbm_budget: int
    dram_budget: int
    homes: dict
    protected: frozenset
    placement: dict
    kinds: dict
    state_bytes: dict  # block -> {State: device bytes}, from the conversions' shapes
    forced: dict  # block -> on-device State fixed by a placement rule
    schedule: list
    prompt_ids: list
    eval_ids: list


def prepare(cfg: RunConfig) -> Setup:
    from vorch_jax.models.smollm2 import load_smollm2_source
    from vorch_jax.models.tokenizer import tokenizer_from_gguf_metadata

    if cfg.model != "smollm2-135m":
        raise RunError(f"model '{cfg.model}' is not available in this build (only smollm2-135m)")
    source = load_smollm2_source()
    tok = tokenizer_from_gguf_metadata(source.tokenizer_metadata())
    mcfg = source.config
    return build_setup(cfg, source, tok, model_block_ids(mcfg), lambda b: block_kind_layer(mcfg, b),
                       dense_schedule(mcfg.n_layers))


def build_setup(cfg: RunConfig, source, tok, ids: list, kind_layer, schedule: list, setup_cls=None, **extra):
    """Budgets, placement, homes, per-state bytes, prompt and evaluation text: shared by the dense and MoE runs.

    `kind_layer(block) -> (kind, layer)`; `schedule`: one pass's access order; `setup_cls` (default `Setup`) and
    `extra` let a model family add its own fields."""
    from vorch_jax.corpus import kjv_text
    from vorch_jax.models.smollm2 import bos_id

    device_bytes = {b: source.block_nbytes(b) for b in ids}
    kinds = {b: kind_layer(b)[0] for b in ids}
    layer_of = {b: kind_layer(b)[1] for b in ids}
    model_bytes = sum(device_bytes.values())
    hbm = parse_budget(cfg.hbm_budget, model_bytes)
    dram = parse_budget(cfg.dram_budget, model_bytes)
    placement = resolve_placement(cfg.placement, ids)
    # A rule that fixes an on-device state pins the block there in that state; `protect` pins it in S0 (or its state).
    forced = {b: State.parse(p.state) for b, p in placement.items() if p.state in ("S0", "S1", "S2", "S6")}
    protected = frozenset(b for b, p in placement.items() if p.protect) | frozenset(forced)
    if cfg.policy == "resident":
        protected = frozenset(ids)
    state_bytes = {b: {s: footprint.state_bytes(source.block_shapes(b), s, int4_group_size=cfg.quant.int4_group_size,
                                                lowrank_rank=cfg.quant.lowrank_rank)
                       for s in (State.S0, State.S1, State.S2, State.S6)} for b in ids}
    need = sum(state_bytes[b][forced.get(b, State.S0)] for b in protected)
    if need > hbm:
        raise RunError(f"hbm_budget of {hbm} bytes is below the {need} bytes of the blocks that must stay on device "
                       f"({len(protected)} protected or pinned blocks)")
    homes, used = {}, 0
    for b in ids:  # DRAM filled in execution order; what does not fit spills to NVMe
        ruled = placement[b].state
        if ruled in ("S3", "S4"):
            homes[b] = State.parse(ruled)
        else:
            homes[b] = State.S3 if used + device_bytes[b] <= dram else State.S4
        used += device_bytes[b] if homes[b] == State.S3 else 0
    text_ids = tok.encode(kjv_text(max_chars=16 * (cfg.prompt_tokens + cfg.eval_tokens) + 1000)).ids
    prompt_ids = tok.encode(cfg.prompt).ids if cfg.prompt else text_ids[: cfg.prompt_tokens]
    if not prompt_ids:
        raise RunError("the prompt is empty")
    eval_ids = [bos_id(tok)] + text_ids[: cfg.eval_tokens]
    return (setup_cls or Setup)(cfg, source, tok, source.config, ids, device_bytes, layer_of, model_bytes, hbm, dram,
                                homes, protected, placement, kinds, state_bytes, forced, schedule,
                                [bos_id(tok)] + prompt_ids, eval_ids, **extra)


def compile_on_zeros(mcfg, device_bytes_shapes: dict, seq_lens, max_len: int, dtype):
    """Compile every block function for every sequence length on zero weights: the timed phases never compile."""
    zeros = {b: {k: jnp.zeros(s.shape, s.dtype) for k, s in shapes.items()} for b, shapes in device_bytes_shapes.items()}
    for T_ in seq_lens:
        ids = jnp.zeros((1, T_), jnp.int32)
        x = C.embed_lookup(zeros["embed"], ids, jnp.dtype(dtype).name)
        k = jnp.zeros((1, max_len, mcfg.n_kv_heads, mcfg.head_dim), dtype)
        x, k, v = C.attention(mcfg, zeros["attn"], x, k, jnp.zeros_like(k), jnp.int32(0))
        x = C.mlp(mcfg, zeros["mlp"], x)
        h = C.final_norm(mcfg, zeros["norm"], x)
        C.tied_head(zeros["embed"], h).block_until_ready()
    for z in zeros.values():
        for a in z.values():
            a.delete()


def block_shapes(source) -> dict:
    """Leaf shapes of one block of each kind (from one read of each)."""
    out = {}
    for b, kind in (("embed", "embed"), ("layers.0.attn", "attn"), ("layers.0.mlp", "mlp"), ("final_norm", "norm")):
        out[kind] = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in source(b).items()}
    return out


@dataclasses.dataclass(frozen=True)
class Reference:
    """The all-resident run a policy is compared with: same prompt, same evaluation text."""

    logits: np.ndarray  # [T, V] float32 logits on the evaluation text
    step_s: float  # median compute-only decode step (compiled, every block resident)
    tokens: list  # greedy tokens


def resident_reference(setup: Setup, dtype, new_tokens: int) -> Reference:
    """The resident reference: eval-text logits, greedy tokens and the compute-only decode step time."""
    weights = {b: {k: jnp.asarray(v) for k, v in setup.source(b).items()} for b in setup.block_ids}

    def forward(ids, cache, pos):
        x = C.embed_lookup(weights["embed"], jnp.asarray(ids, jnp.int32), jnp.dtype(dtype).name)
        ks, vs = list(cache.k), list(cache.v)
        for i in range(setup.model_cfg.n_layers):
            x, ks[i], vs[i] = C.attention(setup.model_cfg, weights[f"layers.{i}.attn"], x, ks[i], vs[i], jnp.int32(pos))
            x = C.mlp(setup.model_cfg, weights[f"layers.{i}.mlp"], x)
        h = C.final_norm(setup.model_cfg, weights["final_norm"], x)
        return C.tied_head(weights["embed"], h), KVCache(ks, vs)

    logits, _ = forward(np.asarray([setup.eval_ids[:-1]]), KVCache.zeros(setup.model_cfg, 1, len(setup.eval_ids) - 1, dtype), 0)
    logits = np.asarray(logits[0])
    P = len(setup.prompt_ids)
    cache = KVCache.zeros(setup.model_cfg, 1, P + new_tokens, dtype)
    lg, cache = forward(np.asarray([setup.prompt_ids]), cache, 0)
    nxt, steps, tokens = int(jnp.argmax(lg[0, -1])), [], []
    tokens.append(nxt)
    for i in range(new_tokens - 1):
        t0 = time.perf_counter()
        lg, cache = forward(np.asarray([[nxt]]), cache, P + i)
        nxt = int(jnp.argmax(lg[0, -1]))
        steps.append(time.perf_counter() - t0)
        tokens.append(nxt)
    for w in weights.values():
        for a in w.values():
            a.delete()
    return Reference(logits, statistics.median(steps[1:] or steps) if steps else float("nan"), tokens)


def quality(logits_run: np.ndarray, logits_ref: np.ndarray, eval_ids: list) -> dict:
    def logp(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lr, lp = logp(logits_run.astype(np.float64)), logp(logits_ref.astype(np.float64))
    tgt = np.asarray(eval_ids[1:])
    nll = -lr[np.arange(len(tgt)), tgt].mean()
    nll_ref = -lp[np.arange(len(tgt)), tgt].mean()
    kl = (np.exp(lp) * (lp - lr)).sum(-1)
    return {"ppl": float(math.exp(nll)), "ppl_resident": float(math.exp(nll_ref)), "kl_mean": float(kl.mean()),
            "top1_agree": float((lr.argmax(-1) == lp.argmax(-1)).mean()), "eval_tokens": int(len(tgt)),
            "note": "SmolLM2 weights were 4-bit (Q4_1) to begin with; 'resident' is that model in float32"}


def run(cfg: RunConfig, out_dir, *, progress=None, reference: Reference | None = None) -> dict:
    """Run `cfg`, write the outputs to `out_dir`, return the summary.

    `reference`: a resident reference computed earlier for the same model, prompt, evaluation text and token count
    (a sweep or a test may share it); computed here when None.
    """
    if cfg.executor == "sim":  # the same policies against a modelled machine (hardware profile)
        from .simulator import simulate

        return simulate(cfg, out_dir, progress=progress)
    if cfg.model == "smollm2-135m-moe":  # routed schedule, speculative expert prefetch (moe_run imports this module)
        from . import moe_run

        return moe_run.run_moe(cfg, out_dir, progress=progress, reference=reference)
    out_dir = check_out_dir(Path(out_dir))
    setup = prepare(cfg)
    with writing(out_dir):
        (out_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))  # what it was
    dtype = jnp.dtype(cfg.dtype)
    say = progress or (lambda msg: None)

    store_dir, scratch = nvme_store_dir(cfg.nvme_dir, out_dir)
    guard = quality_guard(cfg, setup, say)
    extras = scored_inputs(cfg, setup, store_dir, guard) if cfg.policy == "scored" else None
    policy = make_policy(cfg, policy_context(cfg, setup), extras)
    check_fits(policy, setup.device_bytes, setup.hbm_budget, setup.state_bytes)  # before any work
    if reference is None:
        say("resident reference")
        reference = resident_reference(setup, dtype, cfg.new_tokens)

    from vorch_jax.tiers.engine import MovementEngine

    engine = MovementEngine(setup.source, store_dir, int4_group_size=cfg.quant.int4_group_size,
                            lowrank_rank=cfg.quant.lowrank_rank, keep_home=True)
    try:
        return _run_with_engine(cfg, setup, engine, policy, out_dir, dtype, reference, say, guard)
    finally:
        engine.close()
        if scratch:
            shutil.rmtree(store_dir, ignore_errors=True)


def policy_context(cfg: RunConfig, setup: Setup) -> PolicyContext:
    passes = cfg.new_tokens  # prefill + (new_tokens - 1) decode steps; +1 for the quality pass
    return PolicyContext(block_ids=tuple(setup.block_ids), device_bytes=setup.device_bytes,
                         budget_bytes=setup.hbm_budget, schedule=tuple(setup.schedule),
                         prefetch_depth=cfg.prefetch_depth, protected=setup.protected,
                         future=tuple(future_stream(setup.schedule, passes + 1)), forced=setup.forced,
                         state_bytes=setup.state_bytes)


def build_summary(cfg, setup, policy, reference, events, accesses, counters, link_bw, *, gen, t_place0, t_gen1, t_q1,
                  run_logits, n_gen, guard: QualityGuard | None = None) -> dict:
    """The summary of a run, every figure computed from the recorded events and accesses (dense and MoE runs alike).

    `accesses`: the executor's accesses from generation on (generation first, then the quality pass); `n_gen`: how
    many of them belong to generation (what the oracle replays, as in the dense run); `gen`: the `Generation`.

    The floor of a decode step is max(the resident compute-only step, the host->device bytes the measured steps
    moved per step / the fastest link rate measured): the probe of the link alone, the whole run's rate while its
    link was busy, or the measured steps' own rate, whichever is highest. The last one alone keeps the floor at or
    below the measured step (its copies cannot have taken longer than the steps they ran in)."""
    t_gen0 = gen.marks[0]
    tokens, prefill_s = gen.tokens, gen.prefill_s
    gen_events = T.window(events, t_gen0, t_gen1)
    stream = [a.block for a in accesses[:n_gen]]
    moved = T.link_bytes(T.window(events, t_place0, t_gen1))  # cold start: the initial placement counts
    loads = sum(v for k, v in moved.items() if k in ("host->device",))
    device_bytes_used = {b: setup.state_bytes[b][policy.device_state(b)] for b in setup.block_ids}
    bel = belady_bytes(stream, device_bytes_used, setup.hbm_budget, [], pinned=setup.protected,
                       load_bytes=setup.device_bytes)  # a lossy block travels full precision, converts on device
    w0, w1, decode_n = gen.measured_window()  # the first decode step is warm-up
    decode_s = w1 - w0
    missed_per_step = T.link_bytes(T.window(events, w0, w1)).get("host->device", 0) / max(1, decode_n)
    run_rate = T.link_rate(events, "host->device", t_place0, t_gen1)
    q = quality(run_logits, reference.logits, setup.eval_ids)
    q["budget"] = guard.summary(q["kl_mean"]) if guard is not None else None
    h2d_bw = max(r for r in (link_bw["host->device"], run_rate, T.link_rate(events, "host->device", w0, w1)) if r)
    return {
        "complete": True,
        "config": config_to_dict(cfg),
        "model": cfg.model,
        "policy": cfg.policy,
        "lossy": cfg.lossy,
        "hbm_budget_bytes": setup.hbm_budget,
        "dram_budget_bytes": setup.dram_budget,
        "model_bytes": setup.model_bytes,
        "prompt_tokens": len(setup.prompt_ids),
        "tokens": tokens,
        "tokens_match_resident": tokens == reference.tokens,
        "text": setup.tokenizer.decode(tokens),
        "prefill_s": prefill_s,
        "decode_tok_s": decode_n / decode_s if decode_s > 0 else float("nan"),
        "decode_step_s": decode_s / decode_n if decode_s > 0 else float("nan"),
        "resident_step_s": reference.step_s,
        "floor_step_s": max(reference.step_s, missed_per_step / h2d_bw),
        "wall_s": t_gen1 - t_gen0,
        "stall_s": T.stall_seconds(gen_events),
        "transfer_s": T.link_seconds(gen_events, "host->device") + T.link_seconds(gen_events, "nvme->host"),
        "controller_s": counters.controller_s,
        "peak_device_bytes": counters.peak_device_bytes,
        "link_bytes": moved,
        "bytes_moved": loads,
        "belady_bytes": bel,
        "hits": counters.hits,
        "misses": counters.misses,
        "prefetch": {"issued": counters.prefetch_issued, "useful": counters.prefetch_useful,
                     "wasted_bytes": counters.prefetch_wasted_bytes},
        "transitions": T.transition_counts(gen_events),
        "transition_reasons": T.transition_reasons(gen_events),
        "controller_decisions": dict(getattr(policy, "decisions", {})),
        "controller_ticks_deferred": getattr(policy, "ticks_deferred", 0),
        "calibration": getattr(policy, "calibration", None),
        "quality": q,
        "quality_pass_link_bytes": T.link_bytes(T.window(events, t_gen1, t_q1)),
        "link_gbps": {k: v / 1e9 for k, v in link_bw.items()},
        "host_to_device_gbps_in_run": (run_rate or float("nan")) / 1e9,
        "floor_link_gbps": h2d_bw / 1e9,
        "initial_placement_s": t_gen0 - t_place0,
        "backend": jax.default_backend(),
        "versions": environment(),
    }



def _run_with_engine(cfg, setup, engine, policy, out_dir, dtype, reference: Reference, say, guard=None):
    link_bw = probe_bandwidths(engine.store_dir)  # for the floor: the links' speed measured now, not a datasheet
    say("registering blocks at their homes")
    for b in setup.block_ids:
        engine.register(b, setup.homes[b])
    ex = Executor(setup.model_cfg, engine, policy, budget_bytes=setup.hbm_budget, device_bytes=setup.device_bytes,
                  homes=setup.homes, layer_of=setup.layer_of, tick_every_n_layers=cfg.tick_every_n_layers, dtype=dtype,
                  state_bytes=setup.state_bytes)
    say("compiling")
    max_len = len(setup.prompt_ids) + cfg.new_tokens
    compile_on_zeros(setup.model_cfg, block_shapes(setup.source), {len(setup.prompt_ids), 1}, max_len, dtype)
    compile_on_zeros(setup.model_cfg, block_shapes(setup.source), {len(setup.eval_ids) - 1}, len(setup.eval_ids) - 1, dtype)

    say("initial placement")
    # Traffic is counted from a cold device: the initial placement's loads belong to the run (and the oracle starts
    # from an empty device too), so policies that front-load bytes are not flattered.
    t_place0 = time.perf_counter()
    ex.place_initial()
    t_gen0 = time.perf_counter()
    n_acc0 = len(ex.accesses)
    say("generating")
    gen = greedy_generate(ex, setup.prompt_ids, cfg.new_tokens)
    t_gen1 = gen.marks[-1]
    gen_accesses = ex.accesses[n_acc0:]
    gen_counters = dataclasses.replace(ex.counters)
    say("quality pass")
    cache = KVCache.zeros(setup.model_cfg, 1, len(setup.eval_ids) - 1, dtype)
    run_logits, _ = ex.forward(np.asarray([setup.eval_ids[:-1]]), cache, 0)
    run_logits = np.asarray(run_logits[0])
    t_q1 = time.perf_counter()

    events = engine.events.snapshot()
    summary = build_summary(cfg, setup, policy, reference, events, ex.accesses[n_acc0:], gen_counters, link_bw,
                            gen=gen, t_place0=t_place0, t_gen1=t_gen1, t_q1=t_q1, run_logits=run_logits,
                            n_gen=len(gen_accesses), guard=guard)
    budget = summary["quality"]["budget"]
    if budget is not None and not budget["within_budget"]:
        say(f"warning: measured KL {budget['kl_measured']:.4f} nats exceeds quality.max_kl {budget['max_kl']}")
    records = T.trace_records(ex.accesses, events, t_gen0, ex.score_samples)
    with writing(out_dir):
        T.write_trace(out_dir, records)
        T.write_json_atomic(out_dir / "summary.json", summary)  # last: its presence means the run completed
    return summary


def compare(cfg: RunConfig, policies: list[str], out_dir, *, progress=None) -> list[dict]:
    """Run `cfg` under each policy (resident at the full budget), sharing one resident reference."""
    from vorch_jax.config import apply_overrides

    out_dir = check_out_dir(Path(out_dir))
    say = progress or (lambda msg: None)
    say("resident reference")
    if cfg.executor == "sim":
        reference = None  # nothing to compare against: quality is not simulated
    elif cfg.model == "smollm2-135m-moe":
        from . import moe_run

        reference = moe_run.moe_reference(moe_run.prepare_moe(cfg), jnp.dtype(cfg.dtype), cfg.new_tokens)
    else:
        reference = resident_reference(prepare(cfg), jnp.dtype(cfg.dtype), cfg.new_tokens)
    from .compare_report import write_manifest

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
