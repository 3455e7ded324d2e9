"""workshop.ipynb runs clean, top to bottom, in a fresh kernel on the toy model; its outputs hold
the pictures and the numbers each step promises, and a second run gives the same numbers."""

import json
import os
import shutil

import pytest

from conftest import ROOT


def execute(folder):
    """Run the notebook in a fresh kernel inside folder (a copy of the repository's method files and
    its support package, where a participant runs it) -> the executed notebook."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    os.makedirs(folder)
    for name in os.listdir(ROOT):
        if name.endswith(".py") or name == "swatkit":
            source = os.path.join(ROOT, name)
            skip = shutil.ignore_patterns("__pycache__")
            if os.path.isdir(source):
                shutil.copytree(source, folder / name, ignore=skip)
            else:
                shutil.copy(source, folder / name)
    notebook = nbformat.read(os.path.join(ROOT, "workshop.ipynb"), as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=1200, kernel_name="python3", resources={"metadata": {"path": folder}}
    )
    client.execute()  # raises CellExecutionError at the first failing cell
    return notebook


def printed(notebook):
    """Everything the code cells printed (not the progress bars)."""
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    return "".join(o.get("text", "") for o in outputs if o.get("name") == "stdout")


def test_the_workshop_notebook_runs_clean_and_gives_the_same_numbers_twice(tmp_path):
    notebook = execute(tmp_path / "first")
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    pictures = [o for o in outputs if "image/svg+xml" in o.get("data", {})]
    assert len(pictures) == 4  # probe accuracy, the scan's heat map, two update-magnitude maps
    text = printed(notebook)
    assert "held-out accuracy" in text and "Mods_Rob (" in text and "rank stability" in text
    for strategy in ("original", "ift", "swat"):
        assert f"{strategy}: ASR" in text
    assert "mean |dW|/|W| of Mods_Rob" in text
    # what the notebook wrote is listed in its folder's manifest: a re-run may replace it
    manifest = json.load(open(tmp_path / "first" / "workshop_out" / "swat-min.json"))
    assert {"scan.svg", "ift", "swat", "toy-model"} <= set(manifest["files"])
    # a reader running it again, on the same installs, gets the same numbers
    assert printed(execute(tmp_path / "second")) == text
