"""What `vorch run` writes (summary, trace, Perfetto), and the bad inputs it refuses before any work."""

import json
import os

import pytest

from vorch_jax.runtime import run as runner
from vorch_jax.cli import main
from vorch_jax.config import ConfigError
from vorch_jax.errors import RunError
from vorch_jax.runtime.run import run

TRACE_KEYS = {"t", "step", "layer", "block", "event", "from", "to", "bytes", "link", "dur_s"}


@pytest.fixture(scope="module")
def lru_run(reference, small_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("lru")
    return out, run(small_config("policy=lru", "hbm_budget=0.5"), out, reference=reference)


def test_summary_has_every_field_and_figures_come_from_events(lru_run):
    out, s = lru_run
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(s))
    for key in ("model", "policy", "hbm_budget_bytes", "dram_budget_bytes", "model_bytes", "tokens", "prefill_s",
                "decode_tok_s", "wall_s", "stall_s", "controller_s", "peak_device_bytes", "link_bytes", "bytes_moved",
                "belady_bytes", "lower_bound_bytes", "moved_over_lower_bound", "lower_bound", "link_seconds", "hits",
                "misses", "prefetch", "transitions", "quality"):
        assert key in s, key
    assert set(s["prefetch"]) == {"issued", "useful", "wasted_bytes", "victims_read_within", "window_counts",
                                  "victim_size_power", "follows_plan", "choice_s", "window_replays"}
    assert set(s["states"]) == {"per_state", "block_seconds", "lossy_blocks", "compressed_homes"}
    assert sum(v["reads"] for v in s["states"]["per_state"].values()) == s["hits"] + s["misses"]
    assert s["home_formats"] == "" and s["states"]["compressed_homes"]["blocks"] == 0  # a lossless run
    assert set(s["quality"]) >= {"ppl", "ppl_resident", "kl_mean", "top1_agree"}
    # The trace accounts for exactly the summary's traffic: from a cold device (initial placement, t < 0) to the end.
    recs = [json.loads(line) for line in (out / "trace.jsonl").read_text().splitlines()]
    gen_h2d = sum(r["bytes"] for r in recs if r["event"] == "transition" and r["link"] == "host->device"
                  and -s["initial_placement_s"] <= r["t"] <= s["wall_s"])
    assert gen_h2d == s["link_bytes"]["host->device"]
    assert sum(r["event"] == "access" and not r["hit"] and 0 <= r["t"] <= s["wall_s"] for r in recs) == s["misses"]
    # its loads priced by what the run probed a load of each block to take: no less than the LP bound priced alike
    priced = s["link_seconds"]
    loaded = {r["block"] for r in recs if r["event"] == "transition" and r["link"] == "host->device"}
    assert loaded <= set(priced["load_s"]) and all(t > 0 for t in priced["load_s"].values())
    assert 0 < priced["lower_bound"] <= priced["moved"]
    assert priced["over_bound"] == priced["moved"] / priced["lower_bound"]


def test_trace_lines_and_perfetto_tracks(lru_run):
    out, _ = lru_run
    lines = (out / "trace.jsonl").read_text().splitlines()
    assert lines and all(TRACE_KEYS <= set(json.loads(line)) for line in lines)
    events = {json.loads(line)["event"] for line in lines}
    assert {"access", "transition"} <= events
    perfetto = json.loads((out / "trace.perfetto.json").read_text())
    tracks = {e["args"]["name"] for e in perfetto["traceEvents"] if e["ph"] == "M"}
    assert {"compute", "stall", "host->device"} <= tracks
    assert all(e["dur"] >= 0 for e in perfetto["traceEvents"] if e["ph"] == "X")


def test_unknown_policy_and_unknown_key_fail_at_load(small_config):
    with pytest.raises(ConfigError, match="policy"):
        small_config("policy=fifo")
    with pytest.raises(ConfigError, match="hbm_budgte"):
        small_config("hbm_budgte=0.5")


def test_budget_below_protected_set_fails_before_any_work(small_config, tmp_path, monkeypatch):
    def no_reference(*a, **k):
        raise AssertionError("the run started working before checking the budget")

    monkeypatch.setattr(runner, "resident_reference", no_reference)
    with pytest.raises(RunError, match="protected"):
        run(small_config("policy=static", "hbm_budget=50MiB"), tmp_path)
    assert not (tmp_path / "summary.json").exists()


def test_unwritable_out_is_a_clear_one_line_error(capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        if os.access(locked / "x", os.W_OK) or os.geteuid() == 0:
            target = "/proc/vorch-not-writable"  # root ignores permission bits: use a path nobody can create
        else:
            target = str(locked / "out")
        rc = main(["run", "configs/smoke.yaml", "--out", target])
    finally:
        os.chmod(locked, 0o700)
    err = capsys.readouterr().err
    assert rc == 2 and "not writable" in err and err.count("\n") == 1


def test_interrupt_mid_run_leaves_no_summary(reference, small_config, tmp_path, monkeypatch):
    (tmp_path / "summary.json").write_text('{"complete": true, "stale": true}')  # from an earlier run

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "greedy_generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(small_config("policy=static"), tmp_path, reference=reference)
    assert not (tmp_path / "summary.json").exists(), "a stale or partial summary must not claim completion"


def test_the_floor_stays_below_a_run_whose_copies_overlap(reference, small_config, tmp_path):
    """static-prefetch issues loads ahead on the engine's two workers, so copies overlap: a link rate taken as bytes
    over summed copy durations would halve the link and put the "floor" above the run. The floor uses the fastest
    rate measured (probe, whole run, the measured steps), so it bounds the measured step."""
    s = run(small_config("policy=static-prefetch", "hbm_budget=0.3"), tmp_path, reference=reference)
    recs = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]
    spans = sorted((r["t"], r["t"] + r["dur_s"]) for r in recs
                   if r["event"] == "transition" and r["link"] == "host->device" and r["t"] >= 0)
    overlapping = sum(b[0] < a[1] for a, b in zip(spans, spans[1:]))
    assert overlapping > 0, "the run was meant to overlap its copies"
    assert s["decode_step_s"] >= s["floor_step_s"], (s["decode_step_s"], s["floor_step_s"])
    assert s["floor_link_gbps"] >= max(s["link_gbps"]["host->device"], s["host_to_device_gbps_in_run"])
