"""Bring your own model: a two-layer NNX model defined here, tagged with `block_param`, registered as a spec, runs
through every policy under a budget with no runtime file changed (the README's "Your own model" section is this).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vorch_jax.config import load_config
from vorch_jax.models import registry
from vorch_jax.models.blocks import block_param
from vorch_jax.models.spec import ModelSpec, Position
from vorch_jax.runtime.reference import resident_reference
from vorch_jax.runtime.run import run
from vorch_jax.runtime.setup import build_setup

V, D, F, L = 256, 64, 256, 2  # bytes as tokens; a tiny residual MLP stack


class TinyLM(nnx.Module):
    """embedding [D, V] (tied head) -> L x (x + W2 relu(W1 norm(x))) -> norm -> logits."""

    def __init__(self, rngs: nnx.Rngs):
        init = lambda *shape: jax.random.normal(rngs.params(), shape) * 0.3  # noqa: E731
        self.embedding = block_param(init(D, V), "embed", "embed", -1)
        self.w1 = nnx.List([block_param(init(D, F), f"layers.{i}.mlp", "mlp", i) for i in range(L)])
        self.w2 = nnx.List([block_param(init(F, D), f"layers.{i}.mlp", "mlp", i) for i in range(L)])
        self.norm = block_param(jnp.ones((D,)), "final_norm", "norm", L)


def _norm(x, w):
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * w


@jax.jit
def _embed(w, ids):
    return jnp.moveaxis(jnp.take(w["embedding"], ids, axis=1), 0, -1)


@jax.jit
def _mlp(w, x):
    return x + jax.nn.relu(_norm(x, 1.0) @ w["w1"]) @ w["w2"]


@jax.jit
def _final_norm(w, x):
    return _norm(x, w["norm"])


@jax.jit
def _head(w, h):
    return h @ w["embedding"]


@dataclasses.dataclass
class Carry:
    ids: jax.Array
    x: jax.Array | None = None
    logits: jax.Array | None = None


class TinyCompute:
    """The ops of a pass over a carry: start, run(position, weights, carry), finish -> (logits, cache). An op uses
    its own block's weights at its own position only: once it returns, the runtime may move them away."""

    def start(self, ids, cache, pos):
        return Carry(jnp.asarray(ids, jnp.int32))

    def run(self, position, w, c):
        if position.op == "embed":
            c.x = _embed(w, c.ids)
        elif position.op == "mlp":
            c.x = _mlp(w, c.x)
        elif position.op == "norm":
            c.x = _final_norm(w, c.x)
        elif position.op == "head":
            c.logits = _head(w, c.x)

    def finish(self, c):
        return c.logits, None


class ByteTokenizer:
    @dataclasses.dataclass
    class Encoding:
        ids: list

    def encode(self, text):
        return self.Encoding(list(text.encode("utf-8")))

    def decode(self, ids):
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class TinySpec(ModelSpec):
    """No KV cache (the model has no attention): every pass reads the whole sequence again."""

    name = "tiny-own"

    def __init__(self):
        self.model = TinyLM(nnx.Rngs(0))
        self._weights = {"embed": {"embedding": np.asarray(self.model.embedding.get_value())},
                         "final_norm": {"norm": np.asarray(self.model.norm.get_value())}}
        for i in range(L):
            self._weights[f"layers.{i}.mlp"] = {"w1": np.asarray(self.model.w1[i].get_value()),
                                                "w2": np.asarray(self.model.w2[i].get_value())}

    def abstract_model(self):
        return nnx.eval_shape(lambda: TinyLM(nnx.Rngs(0)))

    def source(self):
        return lambda block: {k: v.copy() for k, v in self._weights[block].items()}

    def tokenizer(self):
        return ByteTokenizer()

    def bos_id(self):
        return 0

    @property
    def n_layers(self):
        return L

    def skeleton(self):
        return ([Position("embed", "embed", -1)] + [Position(f"layers.{i}.mlp", "mlp", i) for i in range(L)]
                + [Position("final_norm", "norm", L), Position("embed", "head", -1)])

    def compute(self, dtype):
        return TinyCompute()

    def new_cache(self, batch, max_len, dtype):
        return None


registry.register("tiny-own")(lambda **_options: TinySpec())


def test_the_block_table_comes_from_the_tagged_parameters():
    spec = registry.get("tiny-own")
    table = {b.id: b for b in spec.blocks()}
    assert set(table) == {"embed", "layers.0.mlp", "layers.1.mlp", "final_norm"}
    assert table["layers.1.mlp"].nbytes == 4 * 2 * D * F and table["embed"].nbytes == 4 * D * V


@pytest.fixture(scope="module")
def reference():
    cfg = load_config(None, ["model=tiny-own", "new_tokens=4", "prompt_tokens=8", "eval_tokens=16"])
    return resident_reference(build_setup(cfg), jnp.float32, cfg.new_tokens)


@pytest.mark.parametrize("policy", ["static", "static-prefetch", "lru", "lfu", "scored", "belady"])
def test_every_policy_runs_your_model_under_a_budget(policy, reference, tmp_path):
    cfg = load_config(None, ["model=tiny-own", f"policy={policy}", "hbm_budget=0.6", "new_tokens=4",
                             "prompt_tokens=8", "eval_tokens=16", "tick_every_n_layers=1"])
    s = run(cfg, tmp_path, reference=reference)
    assert s["complete"] and s["tokens"] == reference.tokens and s["quality"]["kl_mean"] == 0.0
    assert 0 < s["peak_device_bytes"] <= s["hbm_budget_bytes"] and s["bytes_moved"] > 0
    assert s["link_bytes"]["host->device"] == s["bytes_moved"]
    # Not `belady_bytes <= bytes_moved`: with blocks of unequal sizes furthest-next-use is no lower bound (here
    # static moved 1,115,136 bytes against Belady's 1,311,488); the LP relaxation is one.
    assert s["lower_bound"]["status"] == "optimal"
    assert 0 < s["lower_bound_bytes"] <= min(s["belady_bytes"], s["bytes_moved"])
