"""The CPU dry run of experiments/gpu_check_run.py (issue 19's one GPU script), so it cannot rot between GPU sessions.

One dry run in process (tiny shapes, float32, 3 tokens: about 25 s alone on 2 cores, most of it loading SmolLM2 and
compiling its whole-model step) writes its four tables into a temporary folder; the tests read those files back:
each part's columns, lossless rows with resident's tokens, finite positive ratios, a PASS / MISS verdict per target.
Bad input ends with exit status 2 and one line, before any work.
"""

import contextlib
import io
import math
import re

import pytest

from vorch_jax.experiments import gpu_check_run as G

PART_COLUMNS = {
    "compare": G.COMPARE_HEADER,
    "driver": ["model", "fused ms", "driver ms", "driver/fused"],
    "sim": ["model", "budget", "policy", "measured ms", "simulated ms", "rel err", "within"],
    "kernels": ["model", "format", "M", "layer ms", "GB/s", "of copy BW", "vs full"],
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
        header, rows, _ = table_of(folder, part)
        assert header == columns and rows, part
        assert text.split("\n", 3)[3].strip() in stdout  # the file holds the table printed


@pytest.mark.slow
def test_compare_rows_are_lossless_and_plausible(dry_run):
    _, rows, rest = table_of(dry_run[2], "compare")
    assert [r["policy"] for r in rows] == list(G.DRY_POLICIES)
    for r in rows:
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
    (["--parts", "1,5"], "unknown part '5'"),
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
