"""The quick-start notebook runs end to end (Python API, CPU) and shows a grid."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _execute(tmp_path) -> list:
    # imported here so that `pytest -m gpu` collects on a machine without the notebook tools
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(ROOT / "notebooks/quickstart.ipynb", as_version=4)
    nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    return nb.cells


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell["outputs"])


def _check(cells) -> None:
    assert "psnr" in _text(cells[3])  # the tokenizer's scores
    assert "uint16" in _text(cells[5])  # the code store
    assert "val/loss" in _text(cells[7])  # the AR model validated
    assert any("image/png" in o.get("data", {}) for o in cells[-1]["outputs"])


def test_quickstart_notebook_executes_with_few_steps(tmp_path, monkeypatch):
    """Every cell with a handful of training steps (3 validations of the AR model): the API the
    notebook shows still fits together."""
    monkeypatch.setenv("MOVEGEN_QUICKSTART_STEPS", "6")
    _check(_execute(tmp_path))


@pytest.mark.slow
def test_quickstart_notebook_executes_as_shipped(tmp_path, monkeypatch):
    """The notebook as a user runs it (its default step count)."""
    monkeypatch.delenv("MOVEGEN_QUICKSTART_STEPS", raising=False)
    _check(_execute(tmp_path))
