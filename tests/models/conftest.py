"""Fixtures of the MoE tests: the real SmolLM2's first two layers as a dense source, and a partition of them (a
shared part of 32 random neurons, 8 experts by weights) with random routers."""

import dataclasses

import numpy as np
import pytest

from vorch_jax.models import moe
from vorch_jax.models import moe_build as mb

MOE_EXPERTS, MOE_LAYERS = 8, 2


class _TwoLayers:
    """The real model's first two layers as a dense source."""

    def __init__(self, source):
        self.source, self.config = source, dataclasses.replace(source.config, n_layers=MOE_LAYERS)

    def __call__(self, block_id):
        return self.source(block_id)


@pytest.fixture(scope="module")
def two(smollm2_source):
    return _TwoLayers(smollm2_source)


@pytest.fixture(scope="module")
def parts(two):
    cfg = two.config
    rng = np.random.default_rng(0)
    shared = np.stack([np.sort(rng.choice(cfg.d_ff, 32, replace=False)).astype(np.int32)
                       for _ in range(MOE_LAYERS)])
    partition = mb.build_partition(two, MOE_EXPERTS, seed=0, iters=3, shared_LxFs=shared)
    routers = moe.Routers(rng.normal(size=(MOE_LAYERS, cfg.d_model, MOE_EXPERTS)).astype(np.float32),
                          np.zeros((MOE_LAYERS, MOE_EXPERTS), np.float32))
    return partition, routers
