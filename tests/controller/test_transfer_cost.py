"""τ prices a load in the bytes that will move: a block with a compressed home costs its compressed bytes over the
link (and no NVMe read, the copy is in DRAM); one without costs full precision from its home."""

import numpy as np

from vorch_jax.config import load_config
from vorch_jax.controller import state_ids as sid
from vorch_jax.runtime.inputs import make_policy, policy_context, simulated_scored_inputs
from vorch_jax.runtime.setup import build_setup
from vorch_jax.simulation.hardware import load_profile
from vorch_jax.tiers.state import State


def test_tau_is_the_bytes_a_load_moves_over_the_link():
    cfg = load_config("configs/demo.yaml", ["policy=scored", "lossy=true", "hbm_budget=0.3", "dram_budget=0.5",
                                            "executor=sim", "hardware=h100-pcie"])
    hw = load_profile("h100-pcie")
    plain = build_setup(cfg)
    packed = plain.with_compressed_homes({b: State.S2 for b in plain.block_ids if b.endswith(".mlp")})
    assert any(packed.homes[b] == State.S4 for b in packed.packed)  # some lossless homes spilled to NVMe
    tau = {}
    for name, setup in (("plain", plain), ("packed", packed)):
        policy = make_policy(cfg, policy_context(cfg, setup, []), simulated_scored_inputs(cfg, setup, hw, None))
        tau[name] = np.asarray(policy.table.tau)
        ids = policy.ids
    h2d, nvme = hw.host_to_device.bandwidth_bytes_per_s, hw.nvme_read_bytes_per_s
    for i, b in enumerate(ids):
        s0 = plain.state_bytes[b][State.S0]
        assert np.isclose(tau["plain"][i, sid.S3], s0 / h2d, rtol=1e-5)
        if b in packed.packed:
            s2 = packed.state_bytes[b][State.S2]
            assert np.isclose(tau["packed"][i, sid.S3], s2 / h2d, rtol=1e-5)
            assert np.isclose(tau["packed"][i, sid.S4], s2 / h2d, rtol=1e-5)  # from DRAM, whatever the home
            assert tau["packed"][i, sid.S3] < tau["plain"][i, sid.S3] / 4
        else:
            assert np.isclose(tau["packed"][i, sid.S4], s0 / nvme + s0 / h2d, rtol=1e-5)


def test_tau_of_a_compressed_home_on_nvme_adds_its_read():
    cfg = load_config("configs/demo.yaml", ["policy=scored", "lossy=true", "hbm_budget=0.3", "dram_budget=0.01",
                                            "executor=sim", "hardware=h100-pcie"])
    hw = load_profile("h100-pcie")
    setup = build_setup(cfg).with_compressed_homes({b: State.S1 for b in build_setup(cfg).block_ids
                                                    if b.startswith("layers.")})
    assert set(setup.packed_where.values()) == {"host", "disk"}
    policy = make_policy(cfg, policy_context(cfg, setup, []), simulated_scored_inputs(cfg, setup, hw, None))
    tau = np.asarray(policy.table.tau)
    h2d, nvme = hw.host_to_device.bandwidth_bytes_per_s, hw.nvme_read_bytes_per_s
    for i, b in enumerate(policy.ids):
        if b in setup.packed:
            s1 = setup.state_bytes[b][State.S1]
            want = s1 / h2d + (s1 / nvme if setup.packed_where[b] == "disk" else 0.0)
            assert np.isclose(tau[i, sid.S3], want, rtol=1e-5) and np.isclose(tau[i, sid.S4], want, rtol=1e-5)
