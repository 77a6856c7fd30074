"""The tutorial notebooks execute top to bottom against the embedded model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

TUTORIALS = sorted((Path(__file__).resolve().parents[1] / "tutorials").glob("*.ipynb"))


@pytest.fixture
def kernel(tmp_path, monkeypatch):
    """A kernel spec for this interpreter, so notebooks run in the test environment."""
    spec = tmp_path / "kernels" / "captum-vit-tests"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "captum-vit tests", "language": "python",
    }))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the inline backend: figures become outputs
    return "captum-vit-tests"


def test_there_are_three_tutorials():
    assert len(TUTORIALS) == 3


def _outputs_summary(notebook):
    """Per code cell: its source and how many figures and text outputs it shows."""
    summary = []
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        outputs = cell.get("outputs", [])
        figures = sum(1 for o in outputs if "image/png" in o.get("data", {}))
        texts = sum(1 for o in outputs if o.output_type == "stream" and o.get("name") == "stdout")
        summary.append((cell.source, figures, texts > 0))
    return summary


@pytest.mark.notebook
@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_notebook_executes_and_its_committed_outputs_are_current(path, kernel):
    committed = nbformat.read(path, as_version=4)
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, kernel_name=kernel, timeout=600,
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    warnings = [o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])
                if o.output_type == "stream" and o.get("name") == "stderr"]
    assert not any("TqdmWarning" in w or "IProgress not found" in w for w in warnings), warnings
    # the committed file shows what the current code produces: same cells, same figures, text where text is printed
    # (re-run `python tutorials/execute.py` after changing a notebook or what it calls)
    assert _outputs_summary(committed) == _outputs_summary(notebook), f"{path.name}: committed outputs are stale"
    assert sum(f for _, f, _ in _outputs_summary(committed)) >= 1, f"{path.name} was committed without figures"
