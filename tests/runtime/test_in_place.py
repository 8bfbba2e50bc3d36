"""Compute in place (`runtime/in_place.py`): reads run where the weights live, in host DRAM, and move activations.

Real runs on this CPU (SmolLM2, lossless): MLPs a rule computes on the host, and `in_place: auto` under LRU, both
generate the resident tokens within the HBM budget; every read in place is an `in_place` event whose activation
bytes are the arrays' and no such block ever loads. The choice's rule on its own; and the simulator at Mixtral
scale: experts computed on the host move no expert bytes, each read is priced by the profile's host section.
"""

import dataclasses
import json
from types import SimpleNamespace

import pytest

from vorch_jax.config import PlacementRule, load_config
from vorch_jax.runtime.in_place import InPlaceChoice, InPlacePrices
from vorch_jax.runtime.run import run, simulate
from vorch_jax.simulation.backend import in_place_seconds
from vorch_jax.simulation.hardware import load_profile

PROTECT = "{path: embed, state: S0, protect: true}, {path: final_norm, state: S0, protect: true}"
HOST_EXPERTS = PlacementRule(path=r"layers\.\d+\.expert\.\d+", compute="host")
MLPS_ON_HOST = f"placement=[{PROTECT}, {{path: 'layers\\.[0-9]+\\.mlp', compute: host}}]"


def _records(out):
    return [json.loads(line) for line in (out / "trace.jsonl").read_text().splitlines()]


def test_mlps_computed_on_the_host_generate_the_resident_tokens(tmp_path, small_config, reference):
    cfg = small_config("policy=static", "hbm_budget=0.3", MLPS_ON_HOST)
    s = run(cfg, tmp_path, reference=reference)
    assert s["tokens"] == reference.tokens
    assert s["peak_device_bytes"] <= s["hbm_budget_bytes"]
    recs = _records(tmp_path)
    assert not [r for r in recs if ".mlp" in r["block"] and r["link"] == "host->device"]  # never loaded
    mlp = [r for r in recs if ".mlp" in r["block"] and r["step"] < cfg.new_tokens]  # generation (then: quality pass)
    in_place = [r for r in mlp if r["event"] == "in_place"]
    assert in_place[-1]["activation_bytes"] == {"device->host": 576 * 4, "host->device": 576 * 4}  # a decode step
    reads = [r for r in mlp if r["event"] == "access"]
    assert len(in_place) == len(reads) == s["in_place"]["reads"] == 30 * cfg.new_tokens
    assert {r["to"] for r in reads} == {"S3"}
    # activation bytes: x [1, T, 576] float32 each way, T = the prompt (with BOS) and then 1 per decode step
    tokens = (cfg.prompt_tokens + 1) + (cfg.new_tokens - 1)
    assert s["in_place"]["activation_bytes"] == {"device->host": 30 * tokens * 576 * 4,
                                                 "host->device": 30 * tokens * 576 * 4}
    assert s["in_place"]["blocks_host"] == 30 and s["in_place"]["host_compute_s"] > 0
    # the oracle and the bound are charged for the device reads only: they still bound what the run loaded
    assert 0 < s["lower_bound_bytes"] <= s["belady_bytes"] <= s["bytes_moved"] * 1.0001


def test_in_place_auto_is_lossless_within_budget(tmp_path, small_config, reference, monkeypatch):
    """Priced with a link ten times slower than probed, so that some reads surely run in place: which do depends on
    this CPU's timings, and with the probed rate a run read none in place one time in three (measured at af8f349
    and since)."""
    import vorch_jax.runtime.run as R

    probed = R.measured_prices
    monkeypatch.setattr(R, "measured_prices", lambda backend, link_bw: dataclasses.replace(
        probed(backend, link_bw), move_s=lambda nbytes: 10 * nbytes / link_bw["host->device"]))
    s = run(small_config("policy=lru", "hbm_budget=0.3", "in_place=auto"), tmp_path, reference=reference)
    assert s["tokens"] == reference.tokens
    assert s["peak_device_bytes"] <= s["hbm_budget_bytes"]
    ip = s["in_place"]
    assert ip["mode"] == "auto" and ip["blocks_auto"] == 30 and ip["reads"] > 0
    recs = _records(tmp_path)
    assert {r["block"] for r in recs if r["event"] == "in_place"} <= {f"layers.{i}.mlp" for i in range(30)}
    # a dense pass: the cursor knows every block's next read, so no background load pushes out one needed sooner
    assert ip["background_loads"] == s["transition_reasons"].get("prefetch:in-place", 0) == 0


def _choice(mode, host_s, move_bytes_per_s=100.0):
    prices = InPlacePrices(host_s=lambda position, tokens: host_s * tokens, move_s=lambda n: n / move_bytes_per_s)
    return InPlaceChoice({"b": mode}, prices), SimpleNamespace(block="b")


def test_the_choice_runs_in_place_what_a_load_would_make_wait_longer():
    choice, p = _choice("auto", host_s=0.5)  # a load of 100 bytes: 1 s
    assert choice.choose(p, 1, landed=False, in_flight_for=None, load_bytes=100)  # 0.5 s < 1 s
    assert not choice.choose(p, 4, landed=False, in_flight_for=None, load_bytes=100)  # 2 s > 1 s: load it
    assert not choice.choose(p, 1, landed=False, in_flight_for=0.8, load_bytes=100)  # lands in 0.2 s: wait
    assert not choice.choose(p, 1, landed=True, in_flight_for=None, load_bytes=100)  # a hit
    assert not choice.loads_pay(p, 1, 100) and choice.loads_pay(p, 4, 100)
    host, p = _choice("host", host_s=9.0)
    assert host.choose(p, 1, landed=True, in_flight_for=None, load_bytes=1) and host.host_only == {"b"}
    assert not host.loads_pay(p, 1, 1)
    with pytest.raises(ValueError, match="unknown in-place mode"):
        InPlaceChoice({"b": "sometimes"}, None)


def test_simulated_experts_on_the_host_move_no_expert_bytes(tmp_path):
    cfg = load_config(None, ["model=mixtral-8x7b", "executor=sim", "hardware=h100-pcie", "dtype=bfloat16",
                             "policy=static", "new_tokens=3", "prompt_tokens=8", "hbm_budget=0.1",
                             "placement=[{path: 'layers\\.[0-9]+\\.expert\\.[0-9]+', compute: host}]"])
    s = simulate(cfg, tmp_path)
    recs = _records(tmp_path)
    experts = [r for r in recs if ".expert." in r["block"]]
    assert not [r for r in experts if r["event"] == "transition" and r["link"] == "host->device"]
    in_place = [r for r in experts if r["event"] == "in_place"]
    assert len(in_place) == s["in_place"]["reads"] > 0
    assert s["peak_device_bytes"] <= s["hbm_budget_bytes"]
    # each read lasts at least its modelled activations + host op (more where it queued behind the previous one)
    from vorch_jax.models.registry import get
    from vorch_jax.models.spec import Position
    from vorch_jax.runtime.setup import build_setup

    spec, hw = get("mixtral-8x7b"), load_profile("h100-pcie")
    sb = build_setup(cfg).state_bytes
    decode = [r for r in in_place if r["step"] is not None and r["t"] > 0]
    one = sum(in_place_seconds(hw, spec, Position(decode[-1]["block"], "expert", 0), 1, sb, "bfloat16")[:3])
    assert min(r["dur_s"] for r in decode) >= one * (1 - 1e-9)


def test_simulated_mix_loads_in_the_background_and_beats_all_on_host(tmp_path):
    """Mixtral on the H100 PCIe profile, a quarter of the experts' bytes: the mix computes misses on the host, loads
    experts in the background while the link is idle, stays within budget and decodes faster than all on host."""
    from vorch_jax.models.registry import get
    from vorch_jax.runtime.setup import build_setup, expert_budget, protect_all_but

    spec = get("mixtral-8x7b")
    base = ["model=mixtral-8x7b", "executor=sim", "hardware=h100-pcie", "dtype=bfloat16", "new_tokens=6",
            "prompt_tokens=8"]
    rules = protect_all_but(spec, "expert")
    budget = expert_budget(build_setup(dataclasses.replace(load_config(None, base), placement=rules)), 0.25, 1)[0]
    runs = {}
    for name, extra, more in (("mix", ["policy=lfu", "in_place=auto"], ()),
                              ("all-host", ["policy=static"], (HOST_EXPERTS,))):
        cfg = dataclasses.replace(load_config(None, base + extra + [f"hbm_budget={budget}B"]),
                                  placement=rules + more)
        runs[name] = simulate(cfg, tmp_path / name, write_traces=False)
    mix = runs["mix"]
    assert mix["in_place"]["reads"] > 0 and mix["in_place"]["background_loads"] > 0
    assert mix["in_place"]["background_loads"] == mix["transition_reasons"]["prefetch:in-place"]
    assert mix["peak_device_bytes"] <= budget
    assert mix["decode_tok_s"] > runs["all-host"]["decode_tok_s"]
