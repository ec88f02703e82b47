"""The committed notebooks execute from top to bottom (at reduced sizes: JAXLEAK_NOTEBOOK_SMALL=1)."""

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")


@pytest.mark.parametrize("name", ["quickstart", "paper_findings", "training_monitor"])
def test_notebook_executes(name, monkeypatch):
    monkeypatch.setenv("JAXLEAK_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    path = os.path.join(NOTEBOOKS, f"{name}.ipynb")
    book = nbformat.read(path, as_version=4)
    assert any(c.get("outputs") for c in book.cells if c.cell_type == "code"), f"{name} is committed without outputs"
    client = nbclient.NotebookClient(book, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": NOTEBOOKS}})
    client.execute()  # raises CellExecutionError with the failing cell's traceback
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    assert "small sizes" in "".join(o.get("text", "") for o in book.cells[1].outputs)
