"""A real mesh on 2 CPU devices (`runtime/mesh_run.py`, `models/shard_compute.py`): SmolLM2 at tp=2 and its MoE at
ep=2, every device under its own budget, then the same run as two processes through jax.distributed. Two devices,
not the experiment's four: every device compiles its own programs, and four took this file 262-290 s of the suite
on CI's two cores.

JAX takes its device count before it starts, so the mesh runs in a subprocess: `experiments/mesh_real.py`, which
also writes the results table; the tests read what it wrote (each device's summary and trace).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
POLICIES = ("lru", "scored")  # scored: the expert-parallel devices speculate on their own experts
DEVICES = 2


@pytest.fixture(scope="module")
def mesh_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("mesh")
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "mesh_real.py"), "--tokens", "3",
                           "--policies", ",".join(POLICIES), "--two-process", "--devices", str(DEVICES),
                           "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def _summary(path: Path) -> dict:
    return json.loads((path / "summary.json").read_text())


@pytest.mark.parametrize("model, devices", [("smollm2-135m", DEVICES), ("smollm2-135m-moe", DEVICES)])
def test_each_device_keeps_its_budget_and_generates_the_one_device_tokens(mesh_runs, model, devices):
    out, _ = mesh_runs
    for policy in POLICIES:
        s = _summary(out / model / policy)
        assert s["tokens_match_resident"] is True and len(s["tokens"]) == 3
        rows = s["mesh"]["per_device"]
        assert [r["device"] for r in rows] == list(range(devices))
        for r in rows:
            d = _summary(out / model / policy / f"device-{r['device']}")
            assert d["tokens"] == s["tokens"] and d["tokens_match_resident"] is True
            assert d["jax_device"] == f"cpu:{r['device']}"  # each run on its own device
            assert 0 < r["peak_device_bytes"] <= r["hbm_budget_bytes"] < r["shard_bytes"]
            assert r["bytes_moved"] >= r["lower_bound_bytes"] > 0  # the LP bound over the device's own reads
            if policy == "lru":
                assert r["bytes_moved"] >= r["belady_bytes"]  # Belady over the device's own reads
        assert s["bytes_moved"] == sum(r["bytes_moved"] for r in rows)


def test_each_devices_traffic_is_its_own_trace(mesh_runs):
    out, _ = mesh_runs
    for model in ("smollm2-135m", "smollm2-135m-moe"):
        for d in range(DEVICES):
            run = out / model / "lru" / f"device-{d}"
            s = _summary(run)
            recs = [json.loads(line) for line in (run / "trace.jsonl").read_text().splitlines()]
            h2d = sum(r["bytes"] for r in recs if r["event"] == "transition" and r["link"] == "host->device"
                      and -s["initial_placement_s"] <= r["t"] <= s["wall_s"])
            assert h2d == s["link_bytes"]["host->device"]
            if model.endswith("moe"):  # expert parallel: a device reads only its own experts
                experts = {r["block"] for r in recs if r["event"] == "access" and ".expert." in r["block"]}
                assert experts and all(int(b.rsplit(".", 1)[1]) % DEVICES == d for b in experts)


def test_a_mesh_run_is_reported_from_its_first_devices_trace(mesh_runs):
    from vorch_jax.tooling.report import report

    out, _ = mesh_runs
    md = report(out / "smollm2-135m-moe" / "lru").read_text()
    assert f"tp 1 x ep {DEVICES}" in md and "device 0's trace" in md and "x the LP lower bound" in md


def test_tensor_parallel_shards_are_split_mlps_and_replicated_attention(mesh_runs):
    """SmolLM2's 9 attention heads (3 key-value heads) do not split 2 ways: each device holds all of attention, a
    half of each MLP and of the embedding."""
    out, _ = mesh_runs
    whole = _summary(out / "smollm2-135m" / "lru" / "device-0")
    shard = whole["model_bytes"]
    from vorch_jax.models.registry import get
    from vorch_jax.models.shard_spec import ShardSpec

    spec = ShardSpec(get("smollm2-135m"), tp=DEVICES)
    assert shard == spec.model_bytes
    norm = 576 * 4  # ffn_norm, replicated
    whole_mlp = get("smollm2-135m").block_info["layers.0.mlp"].nbytes
    assert spec.block_info["layers.0.mlp"].nbytes * DEVICES == whole_mlp + (DEVICES - 1) * norm
    assert spec.block_info["layers.0.attn"].nbytes == get("smollm2-135m").block_info["layers.0.attn"].nbytes


def test_two_processes_give_the_one_process_run(mesh_runs):
    out, stdout = mesh_runs
    one = _summary(out / "smollm2-135m" / POLICIES[0])["mesh"]["per_device"]
    two = []
    for i in range(2):
        s = _summary(out / "smollm2-135m-two-process" / f"process-{i}")
        per = DEVICES // 2
        assert s["mesh"]["processes"] == 2 and s["mesh"]["local_devices"] == list(range(per * i, per * (i + 1)))
        two += s["mesh"]["per_device"]
    keys = ("device", "tokens_match_resident", "bytes_moved", "peak_device_bytes", "belady_bytes")
    assert [{k: r[k] for k in keys} for r in sorted(two, key=lambda r: r["device"])] == \
        [{k: r[k] for k in keys} for r in one]
    assert "identical to one process: True" in stdout
