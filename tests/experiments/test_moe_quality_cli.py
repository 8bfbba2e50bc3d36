"""experiments/moe_quality.py: bad input is one line on stderr and exit status 2, before any model loads."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("argv, fragment", [
    (["configs/moe/router_shared.yaml", "--eval-tokens", "0"], "--eval-tokens must be >= 1, got 0"),
    (["configs/moe/nope.yaml"], "cannot read router config"),
])
def test_bad_input_is_one_line_and_exit_2(argv, fragment):
    done = subprocess.run([sys.executable, "experiments/moe_quality.py", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [l for l in done.stderr.splitlines() if l.startswith("moe_quality:")]
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in done.stderr
