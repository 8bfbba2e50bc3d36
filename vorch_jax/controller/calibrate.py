"""Calibration: each block's measured sensitivity ψ to its lossy states, the links and δ of this machine, cached.

What is measured, on `tokens` tokens of the KJV text (BOS prepended), all in float32 on the default device:
  * ΔKL(b, s): mean over tokens of KL(full ‖ perturbed) when block b ALONE is held in lossy state s (S1 int8, S2
    int4, S6 low-rank, through the tiers' own conversions; 1-D leaves stay exact). The full model's KL to itself is
    0, so the "increase" is the KL itself. The forward is per block over `models.llama_compute` (the runtime's jitted
    functions): one compile per (kind, format); the activations entering every block are recorded once at full
    precision, so swapping block b re-runs only b and what follows it (plus the tied head).
  * est(b, s): a cheap second-order estimate from gradients, ½ Σ F̂ ⊙ (W − deq_s(W))², with F̂ the diagonal
    empirical Fisher of the mean NLL. Why this and not the first-order |Σ g·ΔW|: KL(full ‖ perturbed) is minimal
    (zero) at ΔW = 0, so its first-order term vanishes identically; what the KL sees is ½ ΔWᵀ F ΔW. The data
    gradient's first-order term predicts the change of NLL on this text, not the KL (it can even be negative).
    F̂ is estimated as `n_c · mean_c g_c²` over `grad_chunks` chunks of tokens (g_c: gradient of chunk c's mean
    NLL; n_c tokens per chunk, the factor undoes the averaging inside a chunk), so the estimate is in nats like
    ΔKL. With grad_chunks=1 it is ½·T·Σ (g ⊙ ΔW)², the Fisher-weighted error of one mean gradient up to a
    constant; more chunks estimate the diagonal better (a square of one mean gradient is a rank-1 Fisher). The
    backward is hand-written over the schedule from the recorded activations (one jitted vjp per kind, the chunks'
    cotangents batched by vmap), so it compiles per kind like the forward.
  * Spearman rank correlation of ΔKL against est, per state and over all (block, state) pairs.
  * link bandwidths (`tiers.link_probe`) and δ per kind (`tiers.dequant_cost`) on this machine.

ψ(b) = ΔKL(b, S2): int4 is the middle state, the one whose loss the controller trades against bytes most often.
S1's ΔKL is tiny everywhere (its ranking is mostly rounding noise) and S6's saturates on the few blocks it breaks
(the embedding), so S2 ranks blocks best. lossy_loss(s) = min(0.95, m_s / (m_s + kl_tolerance)), m_s the median
over blocks of ΔKL(b, s): a saturating map from nats to the value fraction TickParams.lossy_loss expects in [0, 1);
a state whose typical block costs `kl_tolerance` nats loses half its value; the median keeps the embedding's outlier
from setting the state's loss (ψ then scales it per block in `score.quality`).

Stored with orbax (`checkpoints.py`) per (model, machine): `load_or_calibrate` reuses a record that covers the
request; a record whose blocks or shapes differ from the current model raises CalibrationMismatchError.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from vorch_jax.controller import sensitivity as S
from vorch_jax.controller.checkpoints import RecordMismatchError, restore_record, save_record
from vorch_jax.models.user_cache import cache_root
from vorch_jax.errors import VorchError
from vorch_jax.controller.calibration_record import (  # noqa: F401 - re-exported: calibrate.X stays valid
    KL_TOLERANCE, PSI_STATE, STATES, Calibration, lossy_loss_of, machine_key, model_key,
    probe_links as _probe,
)
from vorch_jax.models.llama import block_ids as model_block_ids, block_kind_layer

FORMAT_VERSION = 2  # 2: measured on text disjoint from the runs' evaluation text (sensitivity.CALIBRATION_OFFSET_CHARS)


class CalibrationMismatchError(RecordMismatchError):
    """A stored calibration describes other blocks or shapes than the current model."""


def supports(spec) -> bool:
    """Whether `spec` can be calibrated: a dense model whose weights are here. Llama's ops get the full calibration
    (ΔKL and the gradient estimate, this module); other families ΔKL through their own ops (`ops_calibration`).
    Routed models' lossy runs stop with a one-line error until experts have a calibration, and so do models whose
    weights come from no file (a user's in-memory source: a calibration is stored per model file, `model_key`)."""
    return spec.top_k == 0 and spec.has_weights and getattr(spec.source(), "path", None) is not None


# ---------------------------------------------------------------- statistics

def spearman(x, y) -> float:
    """Spearman rank correlation (scipy's, ties at their average rank); NaN with < 3 points or a constant side."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} vs {len(y)} values")
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


# ---------------------------------------------------------------- calibrate

def calibrate(source, *, tokens: int = 64, states=STATES, blocks=None, int4_group_size: int = 64,
              lowrank_rank: int = 32, grad_chunks: int = 8, kl_tolerance: float = KL_TOLERANCE,
              probe_links: bool = True, store_dir=None, progress=None) -> Calibration:
    """Measure ΔKL, the gradient estimate, Spearman, links and δ for `blocks` (default: all) of `source`.

    progress: callable(str) told after the set-up and each block (done / total, elapsed).
    store_dir: where the NVMe link probe writes its scratch file (default: the system temp dir).
    """
    t0 = time.perf_counter()
    say = progress or (lambda msg: None)
    states = tuple(states)
    bad = [s for s in states if s not in ("S0",) + STATES]
    if bad:
        raise ValueError(f"unknown state(s) {bad}: expected a subset of {STATES} (or S0, the identity control)")
    cfg = source.config
    order = model_block_ids(cfg)
    blocks = list(order if blocks is None else blocks)
    unknown = [b for b in blocks if b not in order]
    if unknown:
        raise ValueError(f"unknown block(s) {unknown[:3]} (the model has {len(order)} blocks)")
    blocks = [b for b in order if b in set(blocks)]  # execution order, no duplicates
    ids = S.calibration_ids(source, tokens)
    inp = jnp.asarray(ids[None, :-1])
    W = {b: {k: jnp.asarray(v) for k, v in source(b).items()} for b in order}
    shapes = {b: {k: list(v.shape) for k, v in W[b].items()} for b in blocks}

    record: list = []
    ref = S.run_from(cfg, W, order, inp, record=record)[0]  # logits [T, V] at full precision
    say(f"weights and reference ready ({time.perf_counter() - t0:.1f} s)")
    F = S.fisher_diag(cfg, W, order, record, ids, blocks, grad_chunks)
    say(f"gradients ready ({time.perf_counter() - t0:.1f} s)")

    kl, est = {}, {}
    for n, b in enumerate(blocks):
        pos = order.index(b)
        start, x_in = (0, None) if b == "embed" else (pos, record[pos])  # the embedding also feeds the tied head
        kl[b], est[b] = {}, {}
        for s in states:
            ws = S.convert(W[b], s, int4_group_size=int4_group_size, lowrank_rank=lowrank_rank)
            logits = S.run_from(cfg, {**W, b: ws}, order, inp, start=start, x_1xTxD=x_in)[0]
            kl[b][s] = float(S.kl_mean(ref, logits))
            est[b][s] = float(sum(S.fisher_term(F[b][k], W[b][k], S.dequantized(ws[k]))
                                  for k in ws if W[b][k].ndim == 2))
            del ws, logits
        say(f"blocks {n + 1}/{len(blocks)} ({b}) {time.perf_counter() - t0:.1f} s")
    del F, record

    lossy = [b for b in blocks if any(len(v) == 2 for v in shapes[b].values())]  # blocks a lossy state changes
    ranked = [s for s in states if s != "S0"]  # S0 is the identity control: 0 everywhere, nothing to rank
    rho = {s: spearman([kl[b][s] for b in lossy], [est[b][s] for b in lossy]) for s in ranked}
    rho["all"] = spearman([kl[b][s] for b in lossy for s in ranked], [est[b][s] for b in lossy for s in ranked])
    psi_state = PSI_STATE if PSI_STATE in ranked else (ranked[len(ranked) // 2] if ranked else states[0])
    loss = lossy_loss_of(kl, lossy, ranked, kl_tolerance)

    bandwidths, delta = {}, {}
    if probe_links:
        say("probing links and dequant cost")
        bandwidths = {k: float(v) for k, v in _probe(store_dir).items()}
        delta = _measure_delta(source, cfg, int4_group_size, lowrank_rank, states)
    for w in W.values():
        for a in w.values():
            a.delete()
    return Calibration(
        psi={b: kl[b][psi_state] for b in blocks}, kl=kl, grad_estimate=est, spearman=rho, bandwidths=bandwidths,
        delta=delta, lossy_loss=loss, tokens=tokens, model_key=model_key(source), machine_key=machine_key(),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        settings=dict(states=list(states), int4_group_size=int4_group_size, lowrank_rank=lowrank_rank,
                      grad_chunks=grad_chunks, kl_tolerance=kl_tolerance, psi_state=psi_state),
        block_shapes=shapes, elapsed_s=time.perf_counter() - t0)


def _measure_delta(source, cfg, int4_group_size, lowrank_rank, states) -> dict:
    """{kind: {state: seconds}} from one representative block per kind (embed, layer 0's attn and mlp)."""
    from vorch_jax.tiers.dequant_cost import measure_dequant_seconds

    out = {}
    for b in ("embed", "layers.0.attn", "layers.0.mlp"):
        sec = measure_dequant_seconds(source(b), int4_group_size=int4_group_size, lowrank_rank=lowrank_rank)
        kind = block_kind_layer(cfg, b)[0]
        out[kind] = {s.name: float(v) for s, v in sec.items() if s.name in states and s.name != "S0"}
    return out


# ---------------------------------------------------------------- storage

def _to_record(cal: Calibration) -> tuple[dict, dict]:
    blocks, states = list(cal.kl), list(cal.states)
    def table(d):  # float64[B, S]
        return np.asarray([[d[b][s] for s in states] for b in blocks], np.float64).reshape(-1, len(states))

    arrays = {"kl_BxS": table(cal.kl), "grad_BxS": table(cal.grad_estimate),
              "psi_B": np.asarray([cal.psi[b] for b in blocks], np.float64)}
    meta = dict(format_version=FORMAT_VERSION, blocks=blocks, states=states, block_shapes=cal.block_shapes,
                spearman=cal.spearman, bandwidths=cal.bandwidths, delta=cal.delta, lossy_loss=cal.lossy_loss,
                tokens=cal.tokens, created=cal.created, settings=cal.settings, elapsed_s=cal.elapsed_s)
    return arrays, meta


def record_key(machine_key: str, int4_group_size: int, lowrank_rank: int) -> str:
    """The record a calibration is kept under beside its model: the machine and the lossy formats it measured, so that
    calibrations of several formats (int4 g64 and g128: the uniform baselines) live side by side."""
    return f"{machine_key}~int4g{int4_group_size}~rank{lowrank_rank}"


def save_calibration(cal: Calibration, dir=None) -> Path:
    """Save under `dir` (default: $VORCH_CACHE/calibration or ~/.cache/vorch_jax/calibration); returns the step dir."""
    arrays, meta = _to_record(cal)
    key = record_key(cal.machine_key, cal.settings["int4_group_size"], cal.settings["lowrank_rank"])
    return save_record(calibration_dir(dir), cal.model_key, key, arrays, meta)


def calibration_dir(dir) -> Path:
    return cache_root(dir, "calibration") if dir is None else Path(dir).expanduser()


def current_shapes(source) -> dict:
    """{block: {leaf: [dims]}} of the model as it is now (from the GGUF header; nothing is read)."""
    return {b: {k: list(v.shape) for k, v in source.block_shapes(b).items()} for b in source.block_ids}


def _check_model(meta: dict, arrays: dict, shapes_now: dict) -> None:
    blocks = meta["blocks"]
    for b in blocks:
        if b not in shapes_now:
            raise CalibrationMismatchError(f"stored calibration has block '{b}', which the current model lacks "
                                           f"({len(shapes_now)} blocks): recalibrate with --force")
        stored = meta["block_shapes"].get(b)
        if stored is None:
            raise CalibrationMismatchError(f"stored calibration lists block '{b}' without its shapes")
        for leaf in sorted(set(stored) | set(shapes_now[b])):
            have, want = stored.get(leaf), shapes_now[b].get(leaf)
            if have != want:
                raise CalibrationMismatchError(f"stored calibration's block '{b}' leaf '{leaf}' has shape {have}, "
                                               f"the current model {want}: recalibrate with --force")
    n, S = len(blocks), len(meta["states"])
    for name in ("kl_BxS", "grad_BxS"):
        if arrays[name].shape != (n, S):
            raise CalibrationMismatchError(f"stored '{name}' has shape {arrays[name].shape}, expected {(n, S)}")


def load_calibration(dir, model_key: str, machine_key: str, *, source=None, int4_group_size: int = 64,
                     lowrank_rank: int = 32) -> Calibration | None:
    """The stored calibration for (model, machine, formats), or None. With `source`, its blocks and shapes are checked
    against the current model (CalibrationMismatchError on any difference)."""
    try:
        got = restore_record(calibration_dir(dir), model_key, record_key(machine_key, int4_group_size, lowrank_rank))
    except RecordMismatchError as e:
        raise CalibrationMismatchError(str(e)) from None
    if got is None:
        return None
    arrays, meta = got
    if meta.get("format_version") != FORMAT_VERSION:
        raise CalibrationMismatchError(f"stored calibration has format {meta.get('format_version')}, this code reads "
                                       f"{FORMAT_VERSION}: recalibrate with --force")
    if source is not None:
        _check_model(meta, arrays, current_shapes(source))
    blocks, states = meta["blocks"], meta["states"]
    kl = {b: {s: float(arrays["kl_BxS"][i, j]) for j, s in enumerate(states)} for i, b in enumerate(blocks)}
    est = {b: {s: float(arrays["grad_BxS"][i, j]) for j, s in enumerate(states)} for i, b in enumerate(blocks)}
    return Calibration(psi={b: float(arrays["psi_B"][i]) for i, b in enumerate(blocks)}, kl=kl, grad_estimate=est,
                       spearman=meta["spearman"], bandwidths=meta["bandwidths"], delta=meta["delta"],
                       lossy_loss=meta["lossy_loss"], tokens=meta["tokens"], model_key=meta["model_key"],
                       machine_key=machine_key, created=meta["created"], settings=meta["settings"],
                       block_shapes=meta["block_shapes"], elapsed_s=meta["elapsed_s"])


def covers(cal: Calibration, *, tokens: int = 64, states=STATES, blocks=None, int4_group_size: int = 64,
           lowrank_rank: int = 32, **_ignored) -> str | None:
    """None when `cal` answers this request; else why not (one line)."""
    s = cal.settings
    if cal.tokens != tokens:
        return f"stored calibration used {cal.tokens} tokens, {tokens} asked"
    for key, want in (("int4_group_size", int4_group_size), ("lowrank_rank", lowrank_rank)):
        if s.get(key) != want:
            return f"stored calibration used {key}={s.get(key)}, {want} asked"
    missing = [x for x in states if x not in cal.states]
    if missing:
        return f"stored calibration lacks state(s) {missing}"
    if blocks is not None and [b for b in blocks if b not in cal.kl]:
        return "stored calibration lacks some of the asked blocks"
    return None


def load_or_calibrate(source, dir=None, *, force: bool = False, progress=None, spec=None, **kw) -> Calibration:
    """The stored calibration for this model and machine when it covers the request, else a fresh one (saved).

    `kw` as for `calibrate`. With blocks=None a stored calibration must cover every block of the model. `spec`: the
    model's spec; one computed by other ops than Llama's is measured through them (`ops_calibration`).
    Sets `reused` on the result.
    """
    say = progress or (lambda msg: None)
    root = calibration_dir(dir)
    mk, hk = model_key(source), machine_key()
    if not force:
        cal = load_calibration(root, mk, hk, source=source, int4_group_size=kw.get("int4_group_size", 64),
                               lowrank_rank=kw.get("lowrank_rank", 32))
        if cal is not None:
            want = dict(kw)
            want.setdefault("blocks", None)
            if want["blocks"] is None:
                want["blocks"] = source.block_ids
            why = covers(cal, **want)
            if why is None:
                cal.reused = True
                return cal
            say(f"recalibrating: {why}")
    kw.setdefault("store_dir", root)  # the NVMe probe writes where the cache lives
    if spec is not None and spec.ops != "llama":
        from vorch_jax.controller.ops_calibration import calibrate_by_ops

        cal = calibrate_by_ops(spec, progress=progress, **kw)
    else:
        cal = calibrate(source, progress=progress, **kw)
    save_calibration(cal, root)
    return cal


# ---------------------------------------------------------------- report and CLI

def format_table(cal: Calibration, n: int = 10) -> str:
    """Top and bottom `n` blocks by ψ, with ΔKL and the gradient estimate per state; Spearman, links and δ."""
    states = cal.states
    head = f"{'block':<16} " + " ".join(f"{'ΔKL ' + s:>11}" for s in states) + " " + \
        " ".join(f"{'est ' + s:>11}" for s in states)

    def row(b):
        return f"{b:<16} " + " ".join(f"{cal.kl[b][s]:>11.3e}" for s in states) + " " + \
            " ".join(f"{cal.grad_estimate[b][s]:>11.3e}" for s in states)

    ranked = sorted(cal.psi, key=lambda b: -cal.psi[b])
    psi_state = cal.settings.get("psi_state", PSI_STATE)
    lines = [f"calibration of {cal.model_key} on {cal.machine_key}: {cal.tokens} tokens, {len(ranked)} blocks, "
             f"{cal.elapsed_s:.1f} s, {cal.created}",
             f"ψ = ΔKL at {psi_state} (nats, mean per token); est = ½ Σ F̂ ΔW² (diagonal empirical Fisher)",
             f"top {min(n, len(ranked))} by ψ", head] + [row(b) for b in ranked[:n]]
    if len(ranked) > n:
        lines += [f"bottom {min(n, len(ranked) - n)} by ψ", head] + [row(b) for b in ranked[-n:][::-1]]
    lines.append("spearman(ΔKL, est): " + ", ".join(f"{k} {v:+.3f}" for k, v in cal.spearman.items()))
    lines.append("lossy_loss: " + ", ".join(f"{k} {v:.3f}" for k, v in cal.lossy_loss.items()))
    if cal.bandwidths:
        lines.append("links: " + ", ".join(f"{k} {v / 1e9:.2f} GB/s" for k, v in cal.bandwidths.items()))
    for kind, d in cal.delta.items():
        lines.append(f"δ {kind:<6}: " + ", ".join(f"{s} {v * 1e6:8.1f} µs" for s, v in d.items()))
    return "\n".join(lines)


def cmd_calibrate(args) -> int:
    from vorch_jax.models import registry

    spec = registry.get(args.model)
    if not supports(spec):
        why = ("shape-only: its weights are not here" if not spec.has_weights else "routed" if spec.top_k else
               "held in memory, not in a model file a calibration could be stored for")
        raise VorchError(f"vorch calibrate measures dense models with weights; {args.model} is {why}: "
                         f"run it lossless (lossy=false), or calibrate a dense model")
    if args.tokens < 2:
        raise VorchError(f"--tokens must be at least 2, got {args.tokens}")
    states = tuple(s.strip().upper() for s in args.states.split(",") if s.strip())
    if not states or any(s not in STATES for s in states):
        raise VorchError(f"--states must be a comma list drawn from {','.join(STATES)}, got '{args.states}'")
    source = spec.source()
    blocks = None
    if args.blocks:
        try:
            pat = re.compile(args.blocks)
        except re.error as e:
            raise VorchError(f"--blocks '{args.blocks}' is not a regular expression: {e}") from None
        blocks = [b for b in source.block_ids if pat.search(b)]
        if not blocks:
            raise VorchError(f"--blocks '{args.blocks}' matches none of the model's {len(source.block_ids)} blocks")
    t0 = time.perf_counter()

    def say(msg):
        print(f"[calibrate] {msg}", file=sys.stderr, flush=True)

    cal = load_or_calibrate(source, args.dir, force=args.force, progress=say, spec=spec, tokens=args.tokens,
                            states=states, blocks=blocks)
    if cal.reused:
        say(f"reused the stored calibration from {cal.created} (pass --force to recompute)")
    else:
        say(f"calibrated in {time.perf_counter() - t0:.1f} s; saved under {calibration_dir(args.dir)}")
    if blocks is not None:
        cal = dataclasses.replace(cal, psi={b: cal.psi[b] for b in blocks})
    print(format_table(cal))
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("calibrate", help="measure per-block sensitivity ψ, links and δ on this machine; cache")
    p.add_argument("--model", default="smollm2-135m", help="a registered model (default smollm2-135m)")
    p.add_argument("--tokens", type=int, default=64, help="calibration tokens of the KJV text (default 64)")
    p.add_argument("--blocks", default=None, help="regex: calibrate only the matching block ids")
    p.add_argument("--states", default=",".join(STATES), help="comma list of lossy states (default S1,S2,S6)")
    p.add_argument("--dir", default=None, help="cache directory (default $VORCH_CACHE/calibration or "
                                               "~/.cache/vorch_jax/calibration)")
    p.add_argument("--force", action="store_true", help="recompute even when a stored calibration covers the request")
    p.set_defaults(func=cmd_calibrate)
