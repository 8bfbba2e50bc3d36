"""Calibration of any dense model with weights, through its spec's own ops: measured ΔKL per block and lossy state.

`calibrate.calibrate` measures Llama-family models with Llama's layer functions and a hand-written backward (the
gradient estimate beside ΔKL). A model computed by other ops (Gemma 3) is measured here with what every registered
spec already has: its tokenizer, its weights' source and its jitted ops (`spec.compute`: start / run / finish over
the skeleton of a pass). What is measured is what the quality budget allocates by:

  * ΔKL(b, s): mean over tokens of KL(full ‖ perturbed) when block b alone is held in lossy state s (the tiers' own
    conversions), on `tokens` tokens of the KJV text from `sensitivity.CALIBRATION_OFFSET_CHARS` on (text no run's
    prompt or evaluation reads), BOS first. The full-precision pass keeps a copy of the carry entering each
    position; a (block, state) re-runs the pass from the block's first position on (nothing assumes which op reads
    which part of the carry: everything after it runs again).
  * links and δ per kind, as for Llama (one block of each kind).

Not measured: the gradient estimate and its rank correlation (NaN: they need a backward of the family's ops).
"""

from __future__ import annotations

import copy
import datetime
import time

import jax.numpy as jnp
import numpy as np

from vorch_jax.controller import sensitivity as S


def text_ids(spec, tokens: int) -> np.ndarray:
    """int32[tokens + 1]: BOS, then `tokens` tokens of the KJV from the calibration offset, by the spec's tokenizer."""
    from vorch_jax.models.corpus import kjv_text

    if tokens < 2:
        raise ValueError(f"calibration needs at least 2 tokens, got {tokens}")
    text = kjv_text(max_chars=S.CALIBRATION_OFFSET_CHARS + 8 * tokens + 1000)
    text = text[text.index("\n", S.CALIBRATION_OFFSET_CHARS) + 1:]
    body = spec.tokenizer().encode(text).ids[:tokens]
    if len(body) < tokens:
        raise ValueError(f"the calibration text has only {len(body)} tokens, fewer than {tokens}")
    return np.asarray([spec.bos_id()] + list(body), np.int32)


def pass_logits_TxV(spec, compute, W: dict, ids_T, *, start: int = 0, carry=None, record: list | None = None):
    """Logits [T, V] of one pass over `ids_T` with block weights `W` (block -> leaves, any representation), from
    skeleton position `start` on with `carry` (a copy of the one entering it; None: from the start). `record`
    receives a copy of the carry entering each position."""
    if carry is None:
        carry = compute.start(jnp.asarray(ids_T)[None], spec.new_cache(1, len(ids_T), jnp.float32), 0)
    for p in spec.skeleton()[start:]:
        if record is not None:
            record.append(copy.deepcopy(carry))
        compute.run(p, W[p.block], carry)
    return compute.finish(carry)[0][0]


def calibrate_by_ops(spec, *, tokens: int = 64, states=("S1", "S2", "S6"), blocks=None, int4_group_size: int = 64,
                     lowrank_rank: int = 32, probe_links: bool = True, store_dir=None, progress=None, **_ignored):
    """A `calibrate.Calibration` of `spec` (dense, with weights) from its own ops (see the module docstring)."""
    from vorch_jax.controller.calibration_record import (
        KL_TOLERANCE, PSI_STATE, Calibration, lossy_loss_of, machine_key, model_key,
    )
    from vorch_jax.controller.calibration_record import probe_links as link_bandwidths  # the flag has its name
    from vorch_jax.tiers.dequant_cost import measure_dequant_seconds

    t0 = time.perf_counter()
    say = progress or (lambda msg: None)
    source = spec.source()
    order = [b.id for b in spec.blocks()]
    blocks = [b for b in order if blocks is None or b in set(blocks)]
    ids = text_ids(spec, tokens)[:-1]
    compute = spec.compute("float32")
    W = {b: {k: jnp.asarray(v) for k, v in source(b).items()} for b in order}
    entering: list = []
    ref = pass_logits_TxV(spec, compute, W, ids, record=entering)
    first = {}
    for i, p in enumerate(spec.skeleton()):
        first.setdefault(p.block, i)
    say(f"weights and reference ready ({time.perf_counter() - t0:.1f} s)")
    quant = dict(int4_group_size=int4_group_size, lowrank_rank=lowrank_rank)
    kl = {}
    for n, b in enumerate(blocks):
        kl[b] = {}
        for s in states:
            i = first[b]
            logits = pass_logits_TxV(spec, compute, {**W, b: S.convert(W[b], s, **quant)}, ids, start=i,
                                     carry=copy.deepcopy(entering[i]))
            kl[b][s] = float(S.kl_mean(ref, logits))
        say(f"blocks {n + 1}/{len(blocks)} ({b}) {time.perf_counter() - t0:.1f} s")
    loss = lossy_loss_of(kl, [b for b in blocks if any(len(v.shape) == 2 for v in W[b].values())], states)
    bandwidths, delta = {}, {}
    if probe_links:
        say("probing links and dequant cost")
        bandwidths = {k: float(v) for k, v in link_bandwidths(store_dir).items()}
        for b in order:  # one block of each kind
            kind = spec.block_info[b].kind
            if kind not in delta and any(len(v.shape) == 2 for v in W[b].values()):
                sec = measure_dequant_seconds(source(b), **quant)
                delta[kind] = {x.name: float(v) for x, v in sec.items() if x.name in states}
    psi_state = PSI_STATE if PSI_STATE in states else states[len(states) // 2]
    nan = float("nan")
    return Calibration(
        psi={b: kl[b][psi_state] for b in blocks}, kl=kl, grad_estimate={b: {s: nan for s in states} for b in blocks},
        spearman={**{s: nan for s in states}, "all": nan}, bandwidths=bandwidths, delta=delta, lossy_loss=loss,
        tokens=tokens, model_key=model_key(source), machine_key=machine_key(),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        settings=dict(states=list(states), psi_state=psi_state, kl_tolerance=KL_TOLERANCE, grad_chunks=0,
                      measured_by=f"{spec.ops} ops (ops_calibration: ΔKL only, no gradient estimate)", **quant),
        block_shapes={b: {k: list(v.shape) for k, v in W[b].items()} for b in blocks},
        elapsed_s=time.perf_counter() - t0)
