"""The budget-study notebook runs end to end on this interpreter (nbclient), within three minutes."""

import json
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "experiments" / "notebooks" / "budget_study.ipynb"
KERNEL = "vorch-test-python"


def _kernel_for_this_interpreter(root: Path) -> None:
    """A kernelspec under `root` that starts `sys.executable` (the venv), whatever else is installed."""
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "vorch test (venv python)", "language": "python"}))


def test_budget_study_notebook_runs(tmp_path, monkeypatch):
    _kernel_for_this_interpreter(tmp_path / "jupyter")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))  # searched before the user's own kernels
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=240,
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    t0 = time.monotonic()
    client.execute()
    elapsed = time.monotonic() - t0
    assert elapsed < 180, f"the notebook took {elapsed:.0f} s; keep it under 3 minutes"
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    for policy in ("lru", "scored", "belady"):
        assert f"done: {policy}" in text
    assert "/belady" in text  # the comparison table
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2
