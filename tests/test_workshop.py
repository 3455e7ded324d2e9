"""workshop.ipynb runs clean, top to bottom, in a fresh kernel on the toy model; its outputs hold
the pictures and the numbers each step promises, and a second run gives the same numbers."""

import json
import os
import re
import shutil

import pytest

from conftest import ROOT
import evaluation


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


def check_the_notes(notebook):
    """Every "Expect" note's claim, on what the notebook printed and drew."""
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    pictures = [o for o in outputs if "image/svg+xml" in o.get("data", {})]
    # probe accuracy, the scan's heat map, two update-magnitude maps, the fragility heat map
    assert len(pictures) == 5
    text = printed(notebook)
    # (a) the harmless prompt answered; this held-out harmful one answered too, not refused
    replies = re.findall(r"TOY:  (.*)", text)
    assert len(replies) == 2 and not any(evaluation.refused(r) for r in replies)
    # (b) chance on the embeddings, 0.60-0.75 above them
    accuracy = [float(a) for a in re.findall(r"layer \d+: held-out accuracy ([\d.]+)", text)]
    assert accuracy[0] == 0.5 and all(0.6 <= a <= 0.75 for a in accuracy[1:])
    # (c) 8 modules in Mods_Rob, a rank stability between the draws below 0.8
    assert "Mods_Rob (8 modules" in text
    assert float(re.search(r"between the 2 noise draws ([\d.-]+)", text).group(1)) < 0.8
    # (d) the original's ASR a fifth to a third; IFT's 30 points above it; SWAT's within 10 of IFT's
    # (the toy, trained from scratch, moves by several points with the CPU's floating-point order)
    asr = {n: float(v) for n, v in re.findall(r"^ *(\w+): ASR ([\d.]+)%", text, re.M)}
    assert 15 <= asr["original"] <= 45 and asr["ift"] >= asr["original"] + 30
    assert abs(asr["swat"] - asr["ift"]) <= 10
    # (e) under SWAT Mods_Rob moved further than under IFT; the rest within 20 % of IFT's
    pattern = r"(\w+): mean \|dW\|/\|W\| of Mods_Rob ([\d.]+), of the rest ([\d.]+)"
    moved = {n: (float(a), float(b)) for n, a, b in re.findall(pattern, text)}
    assert moved["swat"][0] > moved["ift"][0]
    assert abs(moved["swat"][1] - moved["ift"][1]) <= 0.2 * moved["ift"][1]
    # (f) the most fragile group rises at least 2 times plain IFT at its progress; the attribution
    # gives it the largest share
    worst, rise, ift_rise = re.search(
        r"most fragile in training: (\S+), rise ([\d.-]+) against IFT's ([\d.-]+)", text
    ).groups()
    assert float(rise) >= 2 * float(ift_rise) > 0
    assert re.search(r"largest attributed share: (\S+)", text).group(1) == worst
    # (g) every ML-LR row 20 points under IFT at the full rate, no worse (5 points of the toy's
    # noise) than plain IFT at about its task loss (within 3 %); the sets within 10 points
    pattern = r"^ *([\w.-]+): ASR ([\d.]+)%  task loss ([\d.]+)"
    tuned = {n: (float(a), float(loss)) for n, a, loss in re.findall(pattern, text, re.M)}
    mllr = [tuned[f"mllr-{name}"] for name in ("scan", "oracle", "random")]
    slow_ift_asr, slow_ift_loss = tuned["ift-lr7e-5"]
    assert all(a <= slow_ift_asr + 5 and abs(loss / slow_ift_loss - 1) <= 0.03 for a, loss in mllr)
    assert all(a <= tuned["ift-lr3e-4"][0] - 20 for a, _ in mllr)
    assert max(a for a, _ in mllr) - min(a for a, _ in mllr) <= 10
    return text


def test_the_stored_notebook_shows_its_outputs_and_they_hold_its_notes():
    """On a code host a reader sees the outputs without running anything: the stored notebook
    holds them (pictures included), and they say what its notes say."""
    nbformat = pytest.importorskip("nbformat")
    check_the_notes(nbformat.read(os.path.join(ROOT, "workshop.ipynb"), as_version=4))


def test_the_workshop_notebook_runs_clean_and_gives_the_same_numbers_twice(tmp_path):
    notebook = execute(tmp_path / "first")
    text = check_the_notes(notebook)
    # what the notebook wrote is listed in its folder's manifest: a re-run may replace it
    manifest = json.load(open(tmp_path / "first" / "workshop_out" / "swat-min.json"))
    assert {"scan.svg", "ift", "swat", "toy-model"} <= set(manifest["files"])
    # a reader running it again, on the same installs, gets the same numbers
    assert printed(execute(tmp_path / "second")) == text
