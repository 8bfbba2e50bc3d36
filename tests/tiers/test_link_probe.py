"""The probe of a block's load: one measurement per set of leaf shapes, through the engine's own landing."""

import jax
import numpy as np

from vorch_jax.tiers.link_probe import probe_block_loads


def test_blocks_of_the_same_shapes_share_one_measured_load_time():
    f32 = np.dtype("float32")
    shapes = {"a": {"w": jax.ShapeDtypeStruct((64, 32), f32), "n": jax.ShapeDtypeStruct((32,), f32)},
              "b": {"w": jax.ShapeDtypeStruct((64, 32), f32), "n": jax.ShapeDtypeStruct((32,), f32)},
              "c": {"w": jax.ShapeDtypeStruct((512, 256), f32)}}
    load_s = probe_block_loads(shapes, repeats=3)
    assert set(load_s) == {"a", "b", "c"}
    assert load_s["a"] == load_s["b"] and all(0 < s < 1 for s in load_s.values())
    assert load_s["c"] != load_s["a"]  # measured apart (equal only by a coincidence of the clock)
