"""A tensor-parallel shard's ops (`models/shard_compute.py`) against the whole model's, on one device: the shards of
one pass run in threads whose collectives are plain sums and concatenations, so the split arithmetic (the
embedding's vocabulary slices, split attention heads and their KV caches, the MLP's hidden units, the gathered
logits) is checked without a mesh. tp=3 splits SmolLM2's 9 heads; tp=4 replicates them."""

import threading

import jax.numpy as jnp
import numpy as np
import pytest

from vorch_jax.models.registry import get
from vorch_jax.models.shard_spec import ShardSpec
from vorch_jax.models.spec import Position


class ThreadSums:
    """Collectives of `n` threads on one device: each part handed in, the sum (or concatenation) handed back."""

    def __init__(self, n):
        self.parts, self.out = {}, None
        self.enter = threading.Barrier(n, action=self._combine, timeout=120)
        self.leave = threading.Barrier(n, timeout=120)

    def _combine(self):
        parts = [self.parts[k] for k in sorted(self.parts)]
        self.out = sum(parts[1:], parts[0]) if self.op == "sum" else jnp.concatenate(parts, axis=-1)

    def on(self, d):
        outer = self

        class One:
            def all_reduce(self, x):
                return outer.call(d, "sum", x)

            def all_gather(self, x):
                return outer.call(d, "gather", x)
        return One()

    def call(self, d, op, x):
        self.parts[d], self.op = x, op
        self.enter.wait()
        out = self.out
        self.leave.wait()
        return out


def one_pass(spec, compute, ids, layers):
    """Logits of one prefill pass over the first `layers` layers, the final norm and the head."""
    source = spec.source()
    c = compute.start(ids, spec.new_cache(1, ids.shape[1], jnp.float32), 0)
    for p in spec.skeleton():
        if p.op in ("attn", "mlp") and p.layer >= layers:
            continue
        compute.run(Position(p.block, p.op, p.layer), {k: jnp.asarray(v) for k, v in source(p.block).items()}, c)
    return np.asarray(compute.finish(c)[0])


@pytest.mark.parametrize("tp", [3, 4])
def test_shards_summed_give_the_whole_models_logits(smollm2_source, tp):
    base = get("smollm2-135m")
    ids = jnp.asarray([[1, 504, 3103, 30, 198, 49151]], jnp.int32)  # the last id is in the last vocabulary slice
    whole = one_pass(base, base.compute(jnp.float32), ids, layers=2)
    sums, out = ThreadSums(tp), {}
    shards = [ShardSpec(base, tp=tp, device=d) for d in range(tp)]
    assert shards[0].split_attention == (tp == 3)

    def run(d):
        out[d] = one_pass(shards[d], shards[d].compute(jnp.float32, sums.on(d)), ids, layers=2)

    threads = [threading.Thread(target=run, args=(d,)) for d in range(tp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == tp
    for d in range(tp):
        np.testing.assert_allclose(out[d], whole, atol=2e-3, rtol=1e-4)
        assert (out[d].argmax(-1) == whole.argmax(-1)).all()
