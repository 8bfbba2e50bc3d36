"""A mesh of devices on the simulator (`models/shard_spec.py`, `simulation/mesh.py`): what each device holds,
per-device budgets and links, the mesh's step from the devices' layer spans, and the one-line refusals."""

import json
import threading

import pytest

from vorch_jax.config import ConfigError, load_config
from vorch_jax.errors import ProfileError
from vorch_jax.models.errors import ModelError
from vorch_jax.models.registry import get
from vorch_jax.models.shard_spec import ShardSpec
from vorch_jax.runtime.run import run
from vorch_jax.simulation.hardware import load_profile
from vorch_jax.simulation.mesh import LayerBarrier

SIM = ["executor=sim", "dtype=bfloat16", "prompt_tokens=8", "new_tokens=4"]


def test_tensor_parallel_shards_split_every_matrix_and_replicate_the_norms():
    base = get("llama-3-8b")
    shard = ShardSpec(base, tp=4)
    for b in ("layers.0.attn", "layers.0.mlp", "lm_head"):
        two_d = sum(s.size * 4 for s in base.block_shapes(b).values() if len(s.shape) == 2)
        one_d = sum(s.size * 4 for s in base.block_shapes(b).values() if len(s.shape) == 1)
        assert shard.block_info[b].nbytes == two_d // 4 + one_d
    assert shard.block_shapes("layers.0.mlp")["w_down"].shape == (14336 // 4, 4096)  # row-parallel
    assert shard.block_shapes("layers.0.mlp")["w_up"].shape == (4096, 14336 // 4)  # column-parallel
    assert shard.collective_bytes(shard.skeleton()[1], 1, 2) == 2 * 3 / 4 * 4096 * 2  # a ring all-reduce of x
    with pytest.raises(ModelError, match="does not divide"):
        ShardSpec(base, tp=3)  # 14336 MLP units
    with pytest.raises(ModelError, match="must divide"):
        ShardSpec(base, ep=2)


def test_expert_parallel_devices_hold_and_run_their_own_experts():
    base = get("mixtral-8x7b")
    shard = ShardSpec(base, ep=4, device=1)
    experts = [b for b in shard.blocks() if b.kind == "expert"]
    assert len(experts) == base.n_layers * 2 and {b.expert for b in experts} == {1, 5}
    assert [p.expert for p in shard.experts(0, [True] * 8)] == [1, 5]
    assert len([b for b in shard.blocks() if b.kind != "expert"]) == len([b for b in base.blocks()
                                                                         if b.kind != "expert"])


def test_a_tensor_parallel_mesh_keeps_each_budget_and_its_own_link(tmp_path):
    cfg = load_config(None, SIM + ["model=llama-3-8b", "policy=lru", "hbm_budget=0.5", "mesh.tp=4",
                                   "hardware=8x-h100-pcie-shared"])
    s = run(cfg, tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text())["mesh"]["tp"] == 4
    m = s["mesh"]
    assert m["simulated_devices"] == [0] and len(m["per_device"]) == 1
    dev = m["per_device"][0]
    assert dev["shard_bytes"] == ShardSpec(get("llama-3-8b"), tp=4).model_bytes // 2  # bf16 on the device
    assert dev["peak_device_bytes"] <= dev["hbm_budget_bytes"] == int(0.5 * dev["shard_bytes"])
    assert dev["bytes_moved"] >= dev["belady_bytes"] > 0
    assert s["bytes_moved"] == 4 * dev["bytes_moved"]  # four equal devices
    assert m["host_link_gbps"] == pytest.approx(48.3 / 2)  # two GPUs behind each switch uplink
    assert (tmp_path / "device-0" / "trace.jsonl").exists()
    from vorch_jax.tooling.report import report

    md = report(tmp_path).read_text()  # a simulated mesh: figures from device 0's trace, no quality
    assert "tp 4 x ep 1" in md and "not measured: a simulated run" in md


def test_an_expert_parallel_mesh_runs_every_device_in_step(tmp_path):
    cfg = load_config(None, SIM + ["model=mixtral-8x7b", "policy=lfu", "hbm_budget=0.5", "mesh.ep=4",
                                   "hardware=8x-h100-sxm"])
    s = run(cfg, tmp_path)
    m = s["mesh"]
    assert m["simulated_devices"] == [0, 1, 2, 3]
    assert all(d["peak_device_bytes"] <= d["hbm_budget_bytes"] for d in m["per_device"])
    assert s["bytes_moved"] == sum(d["bytes_moved"] for d in m["per_device"])
    steps = [d["decode_step_s"] for d in m["per_device"]]
    assert s["decode_step_s"] == max(steps)
    assert max(steps) - min(steps) < 0.05 * max(steps)  # meeting at every layer, they step together
    assert len({d["bytes_moved"] for d in m["per_device"]}) > 1  # yet each read and loaded its own experts


def test_the_layer_barrier_hands_every_device_the_latest_stream_time():
    barrier, got = LayerBarrier(3), {}

    def device(d, times):
        got[d] = [barrier.meet(t) for t in times]

    threads = [threading.Thread(target=device, args=(d, [1.0 + d, 10.0 - d])) for d in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == {d: [3.0, 10.0] for d in range(3)}


def test_a_simulated_mesh_needs_a_mesh_profile_and_a_real_one_lossless_states(tmp_path):
    with pytest.raises(ProfileError, match="describes one device"):
        run(load_config(None, SIM + ["model=llama-3-8b", "mesh.tp=2", "hardware=h100-sxm"]), tmp_path)
    with pytest.raises(ProfileError, match="has 8"):
        run(load_config(None, SIM + ["model=llama-3-8b", "mesh.tp=16", "hardware=8x-h100-sxm"]), tmp_path / "b")
    with pytest.raises(ConfigError, match="runs lossless on real devices"):
        load_config(None, ["mesh.tp=2", "lossy=true"])
    assert load_profile("8x-h100-sxm").device_view(8).host_to_device.bandwidth_bytes_per_s == 48.3e9


@pytest.mark.parametrize("mesh, one", [("8x-h100-sxm", "h100-sxm"), ("8x-h100-pcie-shared", "h100-pcie")])
def test_a_mesh_profile_is_its_one_device_profile_plus_a_mesh(mesh, one):
    """Every section but `mesh` is copied from the one-GPU profile: this keeps the two in step."""
    import dataclasses

    m, o = load_profile(mesh), load_profile(one)
    assert m.mesh is not None and o.mesh is None
    assert dataclasses.replace(m, name=o.name, device=o.device, source=o.source, mesh=None) == o
