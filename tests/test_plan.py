"""The evidence run's rows: Mods_Rob chosen several ways from one scan, the random set, the drift
watched during training, and the statistics of experiments/evidence.py against scipy."""

import argparse
import json
import os
import shutil
import sys

import numpy as np
import pytest
import scipy.stats

from swatkit import plan
import robustness as rb
import swat_min
from conftest import ROOT
from swatkit.files import SwatError

sys.path.insert(0, os.path.join(ROOT, "experiments"))
import evidence  # noqa: E402


def run(*argv):
    return swat_min.main([str(a) for a in argv])


def test_random_sets_are_seeded_sized_and_differ_between_seeds():
    kinds = ["q", "k", "v", "o"]
    first = plan.random_set(10, kinds, 6, seed=0)
    assert first == plan.random_set(10, kinds, 6, seed=0) and len(first) == 10
    assert first != plan.random_set(10, kinds, 6, seed=1)
    assert all(0 <= layer < 6 and kind in kinds for layer, kind in first)
    # over many seeds every module is drawn about equally often (uniform: 10 of 24 each time)
    counts = {}
    for seed in range(600):
        for m in plan.random_set(10, kinds, 6, seed):
            counts[m] = counts.get(m, 0) + 1
    assert len(counts) == 24 and all(abs(c / 600 - 10 / 24) < 0.08 for c in counts.values())


def test_rows_name_each_selection_and_keep_the_asked_recipes():
    chosen = {"scan": {(0, "q")}, "later-topk": {(1, "k")}, "q,k": {(0, "q"), (0, "k")}}
    draw = lambda size: {(5, "v")} if size == 1 else None
    rows = plan.rows(
        ["ift", "swat", "control", "random"],
        ["scan", "later-topk", "q,k"],
        chosen,
        {(3, "o")},
        "mllr",
        0,
        draw,
    )
    names = [r[0] for r in rows]
    assert names == ["ift", "swat", "swat-later-topk", "swat-fixed-q-k", "control", "random"]
    by_name = {r[0]: r for r in rows}
    assert by_name["swat-fixed-q-k"][2] == {(0, "q"), (0, "k")}
    assert by_name["control"][1:3] == ("mllr", {(3, "o")})
    assert by_name["random"][1:3] == ("mllr", {(5, "v")})
    assert by_name["swat-later-topk"][4] == "later-topk"


def test_scanned_selections_read_the_scan_and_a_bad_fixed_one_is_one_line():
    table = {m: [[0.1 * i] for i in range(3)] for m in ("q", "k")}
    scan = {"acc_drop": {m: [v[0] for v in t] for m, t in table.items()}}
    scan["loss_rise"] = {m: [0.0, 0.0, 0.0] for m in ("q", "k")}
    scan["later"] = {"q": [0.3, 0.2, 0.1], "k": [0.6, 0.5, 0.4]}
    picked = {"scan": scan, "mods_rob": [[2, "q"]]}
    assert rb.selection_mods("scan", picked, 2, 3) == {(2, "q")}
    assert rb.selection_mods("readout-topk", picked, 2, 3) == set(rb.ranking(scan, "readout")[:2])
    assert rb.selection_mods("later-topk", picked, 2, 3) == {(2, "q"), (1, "q")}
    assert rb.selection_mods("q", None, 2, 3) == {(0, "q"), (1, "q"), (2, "q")}
    assert plan.needs_scan(["q,k"], ["ift", "swat"]) is False
    assert plan.needs_scan(["q,k"], ["ift", "control"]) is True
    assert plan.needs_scan(["scan"], ["ift", "safemix"]) is False
    with pytest.raises(SwatError, match="unknown module 'x'"):
        rb.check_selections(["scan", "q,x"], 3)


def test_run_compares_selections_random_and_control_and_watches_the_drift(
    tmp_path, tiny, monkeypatch, capsys
):
    data = tmp_path / "d.jsonl"
    rows = [{"instruction": f"What is {i} plus 1?", "output": f"{i + 1}"} for i in range(12)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "r"
    argv = ["run", "--model", tiny, "--data", data, "--out", out, "--steps", 2, "--batch", 4]
    argv += ["--n", 4, "--n-eval", 3, "--max-new-tokens", 2, "--n-task", 4, "--n-acc", 0]
    argv += ["--select", "topk", "--k", 4, "--device", "cpu", "--drift-every", 1, "--seeds", 0, 1]
    argv += ["--strategies", "ift", "swat", "control", "random"]
    argv += ["--selections", "scan", "later-topk", "q,k"]
    run(*argv)
    res = json.load(open(out / "results.json"))["rows"]
    names = [r["strategy"] for r in res if r["seed"] == 0]
    assert names == ["ift", "swat", "swat-later-topk", "swat-fixed-q-k", "control", "random"]
    scan = json.load(open(out / "scan.json"))
    by = {(r["strategy"], r["seed"]): r for r in res[1:]}
    rob = {tuple(m) for m in scan["mods_rob"]}
    assert {tuple(m) for m in by["swat", 0]["mods"]} == rob
    assert by["swat", 0]["selection"] == "scan: readout metric, topk"
    later = sorted(scan["tables"]["later"], key=None)  # the kinds scanned
    assert later == ["k", "o", "q", "v"]
    fixed = {tuple(m) for m in by["swat-fixed-q-k", 0]["mods"]}
    n_layers = len(scan["tables"]["later"]["q"])
    assert fixed == {(layer, m) for layer in range(n_layers) for m in ("q", "k")}
    assert {tuple(m) for m in by["control", 0]["mods"]} == {tuple(m) for m in scan["mods_fragile"]}
    # the random row: as many modules as Mods_Rob, its own draw for each seed
    for seed in (0, 1):
        drawn = {tuple(m) for m in by["random", seed]["mods"]}
        assert drawn == plan.random_set(len(rob), ["q", "k", "v", "o"], n_layers, seed)
    # the drift watched at every step, from the original's point; the last is the evaluation's
    for r in res[1:]:
        curve = r["drift_curve"]
        assert [p["step"] for p in curve] == list(range(len(curve)))
        assert curve[-1]["probe_acc"] == pytest.approx(r["probe_acc"], abs=1e-6)
        assert curve[-1]["drift"] == pytest.approx(r["drift"], abs=1e-5)
    assert len(by["swat", 0]["drift_curve"]) == 1 + 2 + by["swat", 0]["warmup_steps"]
    # the evidence table of the run: every row, its interval and its paired tests
    text = evidence.table(out, draws=200)
    for name in names:
        assert f"| {name} | " in text
    assert "| swat | 0, 1 | scan: readout metric, topk |" in text
    assert os.path.exists(out / "evidence.md")
    assert os.path.exists(out / "drift.svg") and "<polyline" in open(out / "drift.svg").read()
    assert open(out / "evidence.md").read() == text
    # the same run made as two (seed 0 here, seed 1 there): the pooled table is the same table
    whole = json.load(open(out / "results.json"))
    settings = whole["rows"][0]["settings"]
    halves = []
    for seed in (0, 1):
        half = tmp_path / f"half{seed}"
        shutil.copytree(out, half)
        part = dict(whole, rows=[whole["rows"][0]] + [r for r in res[1:] if r["seed"] == seed])
        mine = dict(settings, seeds=[seed], out=str(half))
        mine["data"] = os.path.join(f"/elsewhere{seed}", "d.jsonl")  # the same file, elsewhere
        part["rows"][0] = dict(part["rows"][0], settings=mine)
        (half / "results.json").write_text(json.dumps(part))
        halves.append(half)
    assert evidence.table(halves, draws=200, out=tmp_path / "pooled") == text
    assert open(tmp_path / "pooled" / "evidence.md").read() == text
    # ... or by rows (the rest of a cut-short run made with --rows into another folder)
    parts = []
    groups = [["ift", "swat", "swat-later-topk"], ["swat-fixed-q-k", "control", "random"]]
    for i, these in enumerate(groups):
        part_dir = tmp_path / f"rows{i}"
        shutil.copytree(out, part_dir)
        kept = [r for r in res[1:] if r["strategy"] in these]
        mine = dict(settings, strategies=these, out=str(part_dir))
        part = dict(whole, rows=[dict(whole["rows"][0], settings=mine)] + kept)
        (part_dir / "results.json").write_text(json.dumps(part))
        parts.append(part_dir)
    assert evidence.table(parts, draws=200, out=tmp_path / "pooled") == text
    args = argparse.Namespace(model="m", out="o", shared="s", pairs=None, profile="cpu", seeds=None)
    argv = evidence.run_argv("benign-gsm8k-lora", argparse.Namespace(**vars(args), rows=["mllr"]))
    assert argv[argv.index("--strategies") + 1 :][:2] == ["mllr", "--selections"]
    named = argparse.Namespace(**vars(args), rows=["mllr"], selections=["0-1:q,k", "scan"])
    argv = evidence.run_argv("benign-gsm8k-lora", named)  # a named set replaces the profile's
    assert argv[argv.index("--selections") + 1 :] == ["0-1:q,k", "scan"]
    # a row the cpu profile leaves out may be named; a row no profile has is refused
    argv = evidence.run_argv(
        "benign-gsm8k-full", argparse.Namespace(**vars(args), rows=["safemix"])
    )
    assert argv[argv.index("--strategies") + 1] == "safemix"
    with pytest.raises(
        SwatError, match="--rows: sft not among ift swat mllr control random safemix"
    ):
        evidence.run_argv("benign-gsm8k-full", argparse.Namespace(**vars(args), rows=["sft"]))
    # rows made without ift: no table of their own (every row is set against ift), said so
    made = []
    monkeypatch.setattr(evidence.swat_min, "main", made.append)
    evidence.main(["run", "benign-gsm8k-full", "--model", "m", "--out", "o", "--rows", "mllr"])
    assert made  # the rows were made
    assert "rows made; the table: evidence.py table FOLDER_WITH_IFT o" in capsys.readouterr().out
    # a row made twice with the same answers counts once; with other answers, refused
    assert evidence.table([halves[0], halves[1], halves[0]], draws=200) == text
    answers = halves[1] / "ift-seed1" / "generations.jsonl"
    answers.write_text(answers.read_text().replace('"refused": false', '"refused": true', 1))
    with pytest.raises(SwatError, match="half1: ift, seed 1 answered otherwise in .*half1b"):
        shutil.copytree(out, tmp_path / "half1b")
        evidence.table([tmp_path / "half1b", halves[1]], draws=10, out=tmp_path / "pooled")
    part["rows"][0]["settings"]["steps"] = 3  # another run: refused, naming what differs
    (halves[1] / "results.json").write_text(json.dumps(part))
    with pytest.raises(
        SwatError, match=r"half1: not the same run as .*half0 \(settings: \['steps'\]"
    ):
        evidence.table(halves, draws=10, out=tmp_path / "pooled")
    # a run cut short: the last row (random, seed 1) missing; each row keeps its own seeds
    results = json.load(open(out / "results.json"))
    results["rows"] = results["rows"][:-1]
    (out / "results.json").write_text(json.dumps(results))
    text = evidence.table(out, draws=200)
    assert "| random | 0 | random |" in text and "| control | 0, 1 |" in text


def test_paired_sign_flip_test_equals_scipys_exact_permutation_test():
    rng = np.random.default_rng(0)
    for n in (3, 5, 7):
        a = rng.random(n)
        b = a - rng.normal(0.05, 0.1, n)
        ours = evidence.sign_flip_p(a - b)
        ref = scipy.stats.permutation_test(
            (a, b),
            lambda x, y: np.mean(x - y),
            permutation_type="samples",
            alternative="two-sided",
            n_resamples=np.inf,
        ).pvalue
        assert ours == pytest.approx(ref, abs=1e-12)
    assert evidence.sign_flip_p([0.1, 0.2, 0.3]) == pytest.approx(0.25)


def test_bootstrap_interval_agrees_with_scipys_percentile_bootstrap():
    rng = np.random.default_rng(1)
    flags = rng.random((1, 400)) < 0.3  # one seed, 400 prompts: a proportion's interval
    low, high = evidence.bootstrap_interval(
        lambda seeds, prompts: flags[np.ix_(seeds, prompts)].mean(), 1, 400, draws=4000
    )
    ref = scipy.stats.bootstrap(
        (flags[0].astype(float),),
        np.mean,
        method="percentile",
        n_resamples=4000,
        random_state=2,
    ).confidence_interval
    assert low == pytest.approx(ref.low, abs=0.01) and high == pytest.approx(ref.high, abs=0.01)
    # and close to the normal approximation of a proportion's interval
    p = flags.mean()
    half = 1.96 * np.sqrt(p * (1 - p) / 400)
    assert low == pytest.approx(p - half, abs=0.012) and high == pytest.approx(p + half, abs=0.012)
