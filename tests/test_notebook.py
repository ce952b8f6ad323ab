"""The quick-start notebook runs end to end (Python API, CPU) and shows a grid."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_notebook_executes(tmp_path):
    nb = nbformat.read(ROOT / "notebooks/quickstart.ipynb", as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    last = nb.cells[-1]["outputs"]
    assert any("image/png" in o.get("data", {}) for o in last)
    store_out = "".join(o.get("text", "") for o in nb.cells[5]["outputs"])
    assert "uint16" in store_out
