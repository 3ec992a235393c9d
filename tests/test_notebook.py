"""docs/notebook.ipynb runs top to bottom on this checkout (its outputs are not committed).

The kernel is this interpreter: a kernelspec written to a temp JUPYTER_PATH points at
``sys.executable``, so the notebook sees the same venv and the same ``attn_harness`` as the tests.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "docs" / "notebook.ipynb"
KERNEL = "attn-harness-tests"


def test_the_notebook_is_committed_without_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


@pytest.fixture
def venv_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return KERNEL


def test_the_notebook_reproduces_the_seed_figures_and_table(tmp_path: Path, venv_kernel: str) -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    work = tmp_path / "run"
    work.mkdir()
    NotebookClient(nb, timeout=300, kernel_name=venv_kernel, resources={"metadata": {"path": str(work)}}).execute()
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    tables = [out for out in outputs if '<table class="stats">' in out.get("data", {}).get("text/html", "")]
    assert len(images) >= 5  # two head grids (latent, pixel frames), bars, and the legacy file's two
    assert len(tables) == 2  # the extraction's statistics table and the imported file's
    saved = sorted(p.name for p in (work / "attention_analysis").iterdir())
    assert saved == ["layer3.pt", "layer3_2d_heatmap_all_heads.svg", "layer3_perhead_grid.svg", "tiny_trained.nc"]
