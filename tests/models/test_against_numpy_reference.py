"""The NNX model against an independent float64 numpy implementation sharing only the weights."""

import importlib.util
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from vorch_jax.models.generate import forward, generate_greedy, sequence_nll
from vorch_jax.models.llama import KVCache

_spec = importlib.util.spec_from_file_location("numpy_llama_reference", Path(__file__).with_name("numpy_llama_reference.py"))
_ref_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_ref_mod)


@pytest.fixture(scope="module")
def reference(smollm2_source):
    return _ref_mod.NumpyLlama(smollm2_source.path)


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("seed", [0, 1])
def test_logits_match_float64_reference_on_random_prompts(smollm2, reference, seed):
    model, _, _ = smollm2
    ids = np.random.default_rng(seed).integers(0, model.cfg.vocab_size, size=12).tolist()
    logits, _ = forward(model, np.asarray([ids]), KVCache.zeros(model.cfg, 1, len(ids)), 0)
    assert _rel(np.asarray(logits[0], np.float64), reference.logits(ids)) < 1e-4


def test_decode_with_cache_matches_full_prefill(smollm2, reference):
    """Prefill 6 tokens, then decode 4 one at a time: each step's logits equal the reference's at that position."""
    model, _, _ = smollm2
    ids = np.random.default_rng(7).integers(0, model.cfg.vocab_size, size=10).tolist()
    full = reference.logits(ids)
    cache = KVCache.zeros(model.cfg, 1, len(ids))
    logits, cache = forward(model, np.asarray([ids[:6]]), cache, 0)
    for pos in range(6, 10):
        logits, cache = forward(model, np.asarray([[ids[pos]]]), cache, pos)
        assert _rel(np.asarray(logits[0, -1], np.float64), full[pos]) < 1e-4


def test_greedy_continuation_of_capital_of_france_is_paris(smollm2):
    model, tok, _ = smollm2
    out = generate_greedy(model, tok.encode("The capital of France is").ids, 3)
    assert tok.decode(out).startswith(" Paris")


def test_nll_matches_reference(smollm2, reference):
    model, tok, _ = smollm2
    ids = [0] + tok.encode("In the beginning God created the heaven and the earth.").ids
    nll, n = sequence_nll(model, ids)
    logits = reference.logits(ids[:-1])
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    ref_nll = -logp[np.arange(n), ids[1:]].sum()
    assert n == len(ids) - 1
    assert abs(nll - ref_nll) / ref_nll < 1e-4


def test_bfloat16_forward_stays_close(smollm2, reference):
    model, _, _ = smollm2
    ids = np.random.default_rng(3).integers(0, model.cfg.vocab_size, size=8).tolist()
    logits, _ = forward(model, np.asarray([ids]), KVCache.zeros(model.cfg, 1, len(ids), jnp.bfloat16), 0, jnp.bfloat16)
    assert _rel(np.asarray(logits[0], np.float64), reference.logits(ids)) < 5e-2
