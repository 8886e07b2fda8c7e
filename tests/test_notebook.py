"""The tutorial notebook runs from top to bottom (nbclient) and stays paired with its script.

docs/tutorial.py (jupytext percent format) is the source a diff reads; docs/tutorial.ipynb is
what Jupyter opens. Both must hold the same cells, and the notebook must execute without an
error: it trains a micro zoo, correlates, analyzes, shows a neuron, ablates and plots.
"""

from __future__ import annotations

from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
NOTEBOOK = DOCS / "tutorial.ipynb"
SCRIPT = DOCS / "tutorial.py"

nbformat = pytest.importorskip("nbformat", reason="pip install -e '.[notebook]'")


def test_notebook_and_script_hold_the_same_cells():
    jupytext = pytest.importorskip("jupytext", reason="pip install -e '.[notebook]'")
    paired = jupytext.read(SCRIPT)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    got = [(c.cell_type, c.source.strip()) for c in nb.cells]
    want = [(c.cell_type, c.source.strip()) for c in paired.cells]
    assert got == want, "docs/tutorial.ipynb is out of date: run `jupytext --sync docs/tutorial.py`"
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
        "commit the notebook without outputs (jupytext --to ipynb docs/tutorial.py)"


@pytest.mark.slow
def test_tutorial_notebook_runs(tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[notebook]'")
    pytest.importorskip("ipykernel", reason="pip install -e '.[notebook]'")
    monkeypatch.setenv("UNINEURONS_TUTORIAL_DIR", str(tmp_path / "work"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on an error
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    html = [o.data["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("top contexts" in h and "<mark" in h for h in html), "the neuron card is shown"
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2, "the plots are drawn"
    assert (tmp_path / "work" / "run" / "ablations.parquet").is_file()
    assert (tmp_path / "work" / "top_neurons.csv").read_text().startswith("model,address,")
