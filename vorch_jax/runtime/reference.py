"""The resident reference: the run every policy is compared with, through the same driver with every block resident.

Same prompt, same evaluation text, same ops: its greedy tokens, its logits on the evaluation text, its
compute-only decode step (the floor's compute term), and the access stream it read in run order (generation, then
the quality pass): the recorded future every lossless run reproduces and Belady replays. With `speculation`, also
what the next layer's router would have predicted after each routed layer (for the simulator's replay).
"""

from __future__ import annotations

import dataclasses
import math
import statistics

import jax.numpy as jnp
import numpy as np

from vorch_jax.runtime.cursor import PassCursor
from vorch_jax.runtime.driver import Driver, greedy_generate
from vorch_jax.runtime.real import RealBackend
from vorch_jax.runtime.resident import ResidentWeights


@dataclasses.dataclass(frozen=True)
class Reference:
    logits: np.ndarray  # [T, V] float32 logits on the evaluation text
    step_s: float  # median compute-only decode step
    tokens: list  # greedy tokens
    stream: tuple  # block ids, one per position: generation, then the quality pass
    gen_positions: int  # positions of generation
    routing: tuple = ()  # generation's passes: [pass][layer] -> expert ids (routed plans)
    speculation: tuple | None = None  # generation's passes: [pass][layer] -> (ids, probs) or None

    def held_by(self, blocks) -> "Reference":
        """The reference as a mesh device holding `blocks` sees it: its stream, the reads of its own blocks."""
        keep = [b in blocks for b in self.stream]
        return dataclasses.replace(self, stream=tuple(b for b, k in zip(self.stream, keep) if k),
                                   gen_positions=sum(keep[:self.gen_positions]))


def resident_reference(setup, dtype, new_tokens: int, *, speculation: bool = False) -> Reference:
    spec = setup.spec
    source = spec.source()
    weights = {b: {k: jnp.asarray(v) for k, v in source(b).items()} for b in setup.block_ids}
    res = ResidentWeights(PassCursor(spec), weights, record_speculation=speculation)
    driver = Driver(spec, res, RealBackend(spec, dtype))
    gen = greedy_generate(driver, setup.prompt_ids, new_tokens, dtype)
    n_gen, routing = len(res.stream), tuple(driver.routing)
    recorded = tuple(res.speculation) if speculation else None
    res.record_speculation = False
    cache = spec.new_cache(1, len(setup.eval_ids) - 1, dtype)
    logits, _ = driver.forward(np.asarray([setup.eval_ids[:-1]]), cache, 0)
    logits = np.asarray(logits[0])
    for w in weights.values():
        for a in w.values():
            a.delete()
    steps = gen.step_s
    step = statistics.median(steps[1:] or steps) if steps else float("nan")
    return Reference(logits, step, gen.tokens, tuple(res.stream), n_gen, routing, recorded)


class ResidentModel:
    """A spec with every block resident, through the driver: greedy generation and the likelihood of a text
    (`vorch generate`, `vorch ppl`) for any registered model with weights."""

    def __init__(self, spec, dtype):
        source = spec.source()
        self.spec, self.dtype = spec, jnp.dtype(dtype)
        self.weights = {b.id: {k: jnp.asarray(v) for k, v in source(b.id).items()} for b in spec.blocks()}
        self.driver = Driver(spec, ResidentWeights(PassCursor(spec), self.weights), RealBackend(spec, self.dtype))

    def generate(self, prompt_ids: list[int], new_tokens: int) -> list[int]:
        return greedy_generate(self.driver, prompt_ids, new_tokens, self.dtype).tokens

    def nll(self, ids: list[int]) -> tuple[float, int]:
        """Total negative log-likelihood (nats) of ids[1:] given the tokens before, and the count scored."""
        cache = self.spec.new_cache(1, len(ids) - 1, self.dtype)
        logits, _ = self.driver.forward(np.asarray([ids[:-1]]), cache, 0)
        z = np.asarray(logits[0], np.float64)
        z = z - z.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        return float(-logp[np.arange(len(ids) - 1), ids[1:]].sum()), len(ids) - 1


def quality(logits_run: np.ndarray, logits_ref: np.ndarray, eval_ids: list, note: str = "") -> dict:
    """ppl of both on the evaluation text, mean KL(resident || run) per token and top-1 agreement (float64)."""
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
            "note": note}
