"""An op computed where its weights live (`models/host_ops.py`) gives what the same op gives on the device: the
MLP of SmolLM2 and an expert of its MoE, on weights in pinned host memory, against the device ops on the same
weights; the activation bytes reported are those of the arrays that moved."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import SingleDeviceSharding

from vorch_jax.models.llama_compute import Carry, LlamaCompute, mlp
from vorch_jax.models.moe_compute import expert_add
from vorch_jax.models.host_ops import on_host
from vorch_jax.models.spec import Position
from vorch_jax.models.registry import get


def _host(tree):
    return jax.device_put(tree, SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host"))


@pytest.fixture(scope="module")
def llama():
    spec = get("smollm2-135m")
    rng = np.random.default_rng(0)
    w = {k: jnp.asarray(rng.standard_normal(s.shape).astype(np.float32) * 0.05)
         for k, s in spec.block_shapes("layers.3.mlp").items()}
    x = jnp.asarray(rng.standard_normal((1, 5, spec.config.d_model)).astype(np.float32))
    return spec, w, x


def test_the_mlp_in_place_matches_the_device_op(llama):
    spec, w, x = llama
    want = mlp(spec.config, w, x)
    got = on_host(mlp, spec.config)(_host(w), x)
    assert got.sharding.memory_kind == "device"  # the result is back on the device
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_run_in_place_updates_the_carry_and_counts_the_moved_bytes(llama):
    spec, w, x = llama
    compute = LlamaCompute(spec.config, jnp.float32)
    on_device, in_place = (Carry(jnp.zeros((1, 5), jnp.int32), jnp.int32(0), [], [], x_BxTxD=x) for _ in range(2))
    compute.run(Position("layers.3.mlp", "mlp", 3), w, on_device)
    moved = compute.run_in_place(Position("layers.3.mlp", "mlp", 3), _host(w), in_place)
    np.testing.assert_allclose(np.asarray(in_place.x_BxTxD), np.asarray(on_device.x_BxTxD), rtol=1e-5, atol=1e-5)
    assert moved == {"device->host": x.nbytes, "host->device": x.nbytes}
    assert moved["device->host"] == spec.activation_bytes(Position("layers.3.mlp", "mlp", 3), 5, 4)[0]
    with pytest.raises(ValueError, match="cannot run in place"):
        compute.run_in_place(Position("layers.3.attn", "attn", 3), _host(w), in_place)


def test_an_expert_in_place_matches_the_device_op():
    rng = np.random.default_rng(1)
    D, F, E = 16, 24, 4
    w = {"w_gate": rng.standard_normal((D, F)), "w_up": rng.standard_normal((D, F)),
         "w_down": rng.standard_normal((F, D))}
    w = {k: jnp.asarray(v.astype(np.float32) * 0.1) for k, v in w.items()}
    h, x = (jnp.asarray(rng.standard_normal((1, 3, D)).astype(np.float32)) for _ in range(2))
    mask = jnp.asarray(rng.random((1, 3, E)) < 0.5)
    want = expert_add(w, h, x, mask, jnp.int32(2))
    got = on_host(expert_add)(_host(w), h, x, mask, jnp.int32(2))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
