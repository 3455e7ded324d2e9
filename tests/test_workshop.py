"""workshop.ipynb runs clean, top to bottom, in a fresh kernel on the toy model, and its outputs
hold the pictures and the numbers each step promises."""

import json
import os
import shutil

import pytest

from conftest import ROOT


def test_the_workshop_notebook_runs_clean(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(os.path.join(ROOT, "workshop.ipynb"), as_version=4)
    # run where a participant would: in a copy of the repository's folder layout
    for name in os.listdir(ROOT):
        if name.endswith(".py") or name == "data":
            source = os.path.join(ROOT, name)
            (shutil.copytree if os.path.isdir(source) else shutil.copy)(source, tmp_path / name)
    client = nbclient.NotebookClient(
        notebook, timeout=1200, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    )
    client.execute()  # raises CellExecutionError at the first failing cell
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    pictures = [o for o in outputs if "image/svg+xml" in o.get("data", {})]
    assert len(pictures) == 4  # probe accuracy, the scan's heat map, two update-magnitude maps
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "held-out accuracy" in text and "Mods_Rob (" in text and "rank stability" in text
    for strategy in ("original", "ift", "swat"):
        assert f"{strategy}: ASR" in text
    assert "mean |dW|/|W| of Mods_Rob" in text
    # a second run over the same folder: the notebook's outputs are swat-min's to replace
    manifest = json.load(open(tmp_path / "workshop_out" / "swat-min.json"))
    assert {"scan.svg", "ift", "swat", "toy-model"} <= set(manifest["files"])
