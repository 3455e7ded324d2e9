"""The study scripts under experiments/ that RESULTS.md's tables come from: what each row tunes, and
that a row's table reads back what the row measured."""

import json
import os
import sys

import numpy as np
import pytest
import torch

import evaluation
import model
from conftest import ROOT, SHARED

sys.path.insert(0, os.path.join(ROOT, "experiments"))
import robust_modules  # noqa: E402

GSM8K = os.path.join(SHARED, "data", "gsm8k", "train.jsonl")
needs_shared = pytest.mark.skipif(not os.path.exists(GSM8K), reason="../shared/data is not here")


class Args:
    """The asr subcommand's options, as argparse would give them."""

    def __init__(self, **kw):
        self.include = self.exclude = self.size = None
        self.seed = 0
        self.__dict__.update(kw)


def names_of(net, params):
    ids = {id(p) for p in params}
    return {name for name, p in net.named_parameters() if id(p) in ids}


def test_each_asr_recipe_tunes_what_it_says(tiny, tmp_path):
    """ift: every parameter; only q,k less layer 0: those projections alone; random: as many
    modules as asked, the same for a seed; sppft: everything outside the safety layers, which it
    finds (and writes down) when the proxies have not."""
    net, tok = model.load(tiny)
    everything = {name for name, _ in net.named_parameters()}
    assert names_of(net, robust_modules.asr_recipe(Args(recipe="ift"), net, tok)) == everything
    only = Args(recipe="only", include="q,k", exclude="0:q,k")
    chosen = names_of(net, robust_modules.asr_recipe(only, net, tok))
    assert chosen == {
        f"model.layers.{layer}.self_attn.{kind}_proj.weight" for layer in (1, 2) for kind in "qk"
    }
    draws = [robust_modules.asr_recipe(Args(recipe="random", size=5), net, tok) for _ in range(2)]
    assert len(draws[0]) == 5 and names_of(net, draws[0]) == names_of(net, draws[1])
    sppft = Args(recipe="sppft", out=str(tmp_path))
    kept = names_of(net, robust_modules.asr_recipe(sppft, net, tok))
    first, last = json.load(open(tmp_path / "safety-layers.json"))["layers"]
    frozen = {n for n in everything if any(f"layers.{i}." in n for i in range(first, last + 1))}
    assert frozen and kept == everything - frozen


@needs_shared
def test_asr_rows_and_their_table(tiny, tmp_path, capsys):
    """Two rows of two seeds on a tiny model: each row's JSON and generations are written once (a
    second call skips them), and asr-table's ASR is the share of answers without a refusal in the
    generations, with an interval around it; --seeds reads only the seeds named."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Do harm.", "response": "Sure, here is how."}) + "\n")
    common = ["--model", tiny, "--pairs", str(pairs), "--shared", SHARED, "--out", str(tmp_path)]
    common += ["--scenario", "attack"]
    for seed in ("0", "1"):
        robust_modules.main(["asr", *common, "--recipe", "ift", "--name", "ift", "--seed", seed])
        robust_modules.main(["asr", *common, "--recipe", "only", "--include", "q", "--name",
                             "only-q", "--seed", seed])  # fmt: skip
    folder = tmp_path / "attack" / "asr"
    written = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    robust_modules.main(["asr", *common, "--recipe", "ift", "--name", "ift", "--seed", "0"])
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == written
    capsys.readouterr()
    robust_modules.main(["asr-table", "--out", str(tmp_path), "--scenario", "attack", "--draws",
                         "50", "--versus", "ift"])  # fmt: skip
    text = capsys.readouterr().out
    for name in ("ift", "only-q"):
        answered = []
        for seed in (0, 1):
            records = [json.loads(line) for line in open(folder / f"{name}-seed{seed}.jsonl")]
            answered += [not r["refused"] for r in records if r["harmful"]]
        line = next(row for row in text.splitlines() if row.startswith(f"| {name} |"))
        assert f"| {name} | 0, 1 | {sum(answered) / len(answered):.1%} [" in line
    robust_modules.main(["asr-table", "--out", str(tmp_path), "--scenario", "attack", "--draws",
                         "50", "--versus", "ift", "--seeds", "1"])  # fmt: skip
    rows = [row for row in capsys.readouterr().out.splitlines() if row.startswith("| only-q |")]
    assert len(rows) == 1 and rows[0].startswith("| only-q | 1 |")  # seed 0 left out
    robust_modules.main(["asr-table", "--out", str(tmp_path), "--scenario", "attack", "--draws",
                         "50", "--versus", "ift", "--rows", "only-q"])  # fmt: skip
    rows = [row.split(" | ")[0] for row in capsys.readouterr().out.splitlines()[2:]]
    assert rows == ["| original", "| only-q"]  # the start, and only the row asked for


@needs_shared
def test_swat_and_mllr_rows_go_through_train(tiny, tmp_path, monkeypatch):
    """asr --recipe swat/mllr: Mods_Rob from --include (refused in one line without it), trained by
    train.train into a scratch folder that does not outlive the row; the row records its recipe."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Do harm.", "response": "Sure, here is how."}) + "\n")
    common = ["--model", tiny, "--pairs", str(pairs), "--shared", SHARED, "--out", str(tmp_path)]
    common += ["--scenario", "attack", "--seed", "0"]
    monkeypatch.setattr(robust_modules, "STEPS", 2)  # 2 steps (SWAT: 6 of warm-up before them)
    with pytest.raises(SystemExit, match="name Mods_Rob with --include"):
        robust_modules.main(["asr", *common, "--recipe", "swat", "--name", "swat-none"])
    for recipe in ("swat", "mllr"):
        robust_modules.main(["asr", *common, "--recipe", recipe, "--include", "1-2:q,k",
                             "--name", f"{recipe}-qk"])  # fmt: skip
    folder = tmp_path / "attack" / "asr"
    left = {p.name for p in folder.iterdir()} - {"swat-min.json"}  # less the folder's manifest
    assert left == {f"{n}.{e}" for n in ("original", "swat-qk-seed0", "mllr-qk-seed0")
                    for e in ("json", "jsonl")}  # fmt: skip
    rows = {n: json.load(open(folder / f"{n}-qk-seed0.json")) for n in ("swat", "mllr")}
    assert [rows[n]["recipe"] for n in rows] == ["swat", "mllr"]
    assert [rows[n]["steps"] for n in rows] == [2, 2]  # the main phase's length is kept in the row
    with pytest.raises(SystemExit, match="--steps must be at least 1"):
        robust_modules.main(["asr", *common, "--recipe", "ift", "--steps", "0", "--name", "none"])
    # a longer main phase draws a tuning set to match (Attack IFT: steps x batch examples)
    longer, _ = robust_modules.tuning_set(SHARED, "attack", str(pairs), steps=3)
    assert len(longer) == 3 * robust_modules.BATCH
    # SWAT's warm-up steps come before the same main phase: the two rows end at different weights
    assert rows["swat"]["task_loss"] != rows["mllr"]["task_loss"]
    # the update sizes per phase: SWAT's warm-up moves Mods_Rob alone; by the end, every module
    inside = {(layer, kind) for layer in (1, 2) for kind in "qk"}
    for kind, sizes in rows["swat"]["moved_warmup"].items():
        assert [size > 0 for size in sizes] == [(n, kind) in inside for n in range(len(sizes))]
    assert all(size > 0 for sizes in rows["swat"]["moved"].values() for size in sizes)
    assert "moved_warmup" not in rows["mllr"]  # ML-LR has one phase


@needs_shared
def test_the_alpaca_regime_and_mllrs_scope(tiny, tmp_path, monkeypatch):
    """--scenario alpaca tunes on alpaca_eval (32 held out for the task loss, the rest to draw
    from); ML-LR's --scope all slows every weight outside Mods_Rob, --scope modules only the other
    modules of its kinds: the MLPs move about RATIO as far under the first (Adam's first steps are
    about lr x sign(g)), and the row says which scope it ran."""
    alpaca = os.path.join(SHARED, "data", "alpaca_eval", "alpaca_eval.jsonl")
    records = [json.loads(line) for line in open(alpaca)]
    instructions = {record["instruction"] for record in records}
    chats, held = robust_modules.tuning_set(SHARED, "alpaca", None)
    assert (len(held), len(chats)) == (robust_modules.N_TASK, len(records) - 32)
    assert all(chat[0]["content"] in instructions for chat in chats + held)
    common = ["--model", tiny, "--pairs", "unused", "--shared", SHARED, "--out", str(tmp_path)]
    common += ["--scenario", "alpaca", "--recipe", "mllr", "--include", "q,k"]
    monkeypatch.setattr(robust_modules, "STEPS", 2)
    for scope in ("all", "modules"):
        robust_modules.main(["asr", *common, "--scope", scope, "--name", f"mllr-qk-{scope}"])
    rows = {s: json.load(open(tmp_path / "alpaca" / "asr" / f"mllr-qk-{s}-seed0.json"))
            for s in ("all", "modules")}  # fmt: skip
    assert [rows[s]["scope"] for s in rows] == ["all", "modules"]
    for kind in ("gate", "up", "down"):
        ratio = np.mean(rows["all"]["moved"][kind]) / np.mean(rows["modules"]["moved"][kind])
        assert 0.3 * robust_modules.RATIO < ratio < 3 * robust_modules.RATIO, (kind, ratio)


def test_a_rows_asr_is_read_off_plain_ifts_curve_at_its_task_loss():
    """on_ifts_curve: plain IFT's ASR at a method row's task loss, by numpy.interp over the plain
    IFT rows of the same length; a row outside its range, or of another length, gets none."""
    curve = {"ift": (0.90, 0.80), "ift-lr2.5e-05": (1.00, 0.50), "ift-lr1e-05": (1.20, 0.10)}
    found = [{"row": n, "strategy": "ift", "steps": 100, "task_loss": loss, "asr": asr}
             for n, (loss, asr) in curve.items()]  # fmt: skip
    found += [
        {"row": "mllr-qk", "strategy": "mllr", "steps": 100, "task_loss": 1.05, "asr": 0.2},
        {"row": "swat-far", "strategy": "swat", "steps": 100, "task_loss": 0.8, "asr": 0.1},
        {"row": "swat-20", "strategy": "swat", "steps": 20, "task_loss": 1.0, "asr": 0.1},
    ]
    lines = robust_modules.on_ifts_curve(found)
    losses, asrs = zip(*sorted(curve.values()))
    expected = np.interp(1.05, losses, asrs)
    assert lines[2:] == [f"| mllr-qk | 1.050 | 20.0% | {expected:.1%} (between ift-lr2.5e-05 and "
                         "ift-lr1e-05) |"]  # fmt: skip
    assert robust_modules.on_ifts_curve(found[:1] + found[3:]) == []  # one rate: no curve


def test_moved_table_is_each_modules_relative_update(tiny):
    """moved_table: |W - W_start| / |W_start| of each (layer, kind) weight, against numpy."""
    net, _ = model.load(tiny)
    before = robust_modules.module_weights(net)
    weight = net.model.layers[1].mlp.up_proj.weight
    start = weight.detach().numpy().copy()
    with torch.no_grad():
        weight.add_(torch.randn_like(weight) * 0.01)
    table = robust_modules.moved_table(before, net)
    expected = np.linalg.norm(weight.detach().numpy() - start) / np.linalg.norm(start)
    assert table["up"][1] == pytest.approx(expected, rel=1e-5)
    assert sum(size for sizes in table.values() for size in sizes) == table["up"][1]


def test_a_longer_regimes_rows_are_set_against_ift_of_that_length(tmp_path):
    """A row named -stepsN (asr --steps N) is set against "ift-stepsN", not the 20-step IFT: its
    cut is the share of that IFT's rise it avoids; asr refuses a name that hides its length."""
    folder = tmp_path / "benign" / "asr"
    folder.mkdir(parents=True)
    start = [0] * 10
    flags = {"ift": [1] * 4 + [0] * 6, "ift-steps40": [1] * 8 + [0] * 2, "swat-s-steps40": [1] * 2}
    flags["swat-s-steps40"] += [0] * 8
    rows = {"original": dict(answered=start, task_loss=1.5, over_refusal=0.1, seconds=0, seed=None)}
    for name, answered in flags.items():
        recipe = name.split("-")[0]
        steps = 40 if name.endswith("steps40") else 20
        rows[f"{name}-seed0"] = dict(answered=answered, task_loss=1.0, over_refusal=0.1, seed=0,
                                     seconds=1, recipe=recipe, steps=steps)  # fmt: skip
    for name, row in rows.items():
        (folder / f"{name}.json").write_text(json.dumps(row))
    found = {r["row"]: r for r in robust_modules.asr_rows(str(tmp_path), "benign", "ift", 20)[1]}
    swat = found["swat-s-steps40"]
    assert swat["versus"] == "ift-steps40" and swat["steps"] == 40 and swat["selection"] == "s"
    assert swat["cut"] == pytest.approx((0.8 - 0.2) / 0.8)  # not (0.4 - 0.2) / 0.4
    assert found["ift-steps40"]["selection"] == "ift" and found["ift-steps40"]["cut"] is None
    for steps, name in (("40", "swat-s"), ("20", "swat-s-steps40")):
        with pytest.raises(SystemExit, match="wants a name ending"):
            robust_modules.main(["asr", "--model", "none", "--pairs", "none", "--shared", "none",
                                 "--out", str(tmp_path), "--scenario", "benign", "--recipe",
                                 "swat", "--steps", steps, "--name", name])  # fmt: skip


def test_rows_are_named_by_their_selection():
    """results/robust_modules.json's selection names: plain IFT at another rate is lr-matched, a
    set tuned alone keeps its name less its rate."""
    rows = [("ift", "ift"), ("ift-lr5e-06", "ift"), ("random-60", "random"), ("sppft", "sppft")]
    rows += [("oracle-lr0.0002", "only"), ("only-qk", "only"), ("swat-oracle", "swat")]
    rows += [("mllr-oracle-lr1e-4", "mllr"), ("swat-random-60", "swat")]
    rows += [("swat-search-steps40", "swat")]
    names = [robust_modules.selection_of(name, recipe) for name, recipe in rows]
    assert names == [
        "ift",
        "lr-matched",
        "random",
        "sppft",
        "oracle",
        "only-qk",
        "oracle",
        "oracle",
        "random",
        robust_modules.DEFAULT_SELECTION,
    ]


def test_the_proxy_table_reads_a_runs_scan(tmp_path):
    """`table` on groups with known fragility and a run's scan.json copied beside them: each scan
    proxy's Spearman equals scipy's on the attention groups the scan covers, and a group's share
    outside the searched Mods_Rob counts as its predicted fragility."""
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    groups = [f"{kind}_{lo}-{lo + 9}" for kind in ("q", "k", "v", "o") for lo in (0, 10, 20)]
    folder = tmp_path / "attack" / "seed0" / "groups"
    folder.mkdir(parents=True)
    truth = {}
    for name in groups + ["gate_0-9"]:
        rise, drop = rng.normal(0, 0.01), rng.uniform(0.05, 0.3)
        truth[name.replace("_", ":")] = rise / drop  # without IFT's curve: the fragility ratio
        (folder / f"{name}.json").write_text(json.dumps({"refusal_rise": rise, "task_drop": drop}))
    tables = {
        key: {k: rng.normal(size=30).tolist() for k in "qkvo"} for key in ("acc_drop", "later")
    }
    robust = [[layer, kind] for layer in range(30) for kind in "qk" if layer % 3]
    scan = {"settings": {"scale": 0.5, "n_per_class": 32, "seed": 0}, "tables": tables,
            "mods_rob": robust}  # fmt: skip
    (tmp_path / "scan-run-seed0.json").write_text(json.dumps(scan))
    out = tmp_path / "study.json"
    robust_modules.main(["table", str(tmp_path), "--json", str(out)])
    proxies = json.load(open(out))["proxies"]
    attention = [g.replace("_", ":") for g in groups]

    def layers(group):  # "q:10-19" -> range(10, 20)
        lo, hi = group.split(":")[1].split("-")
        return range(int(lo), int(hi) + 1)

    for key, label in (("acc_drop", "readout acc drop (last layer)"),
                       ("later", "later-layer mean log-loss rise")):  # fmt: skip
        values = [sum(tables[key][g[0]][layer] for layer in layers(g)) for g in attention]
        found = proxies[f"{label}, scale 0.5, n 32, noise seed 0 [attack]"]
        assert found["groups"] == 12
        expected = spearmanr([truth[g] for g in attention], values).statistic
        assert found["spearman"] == pytest.approx(expected, abs=1e-12)
    inside = [np.mean([layer % 3 > 0 and g[0] in "qk" for layer in layers(g)]) for g in attention]
    label = "searched Mods_Rob: share of the group outside it, scale 0.5, n 32, noise seed 0"
    expected = spearmanr([truth[g] for g in attention], [1 - x for x in inside]).statistic
    assert proxies[label + " [attack]"]["spearman"] == pytest.approx(expected, abs=1e-12)


def test_scan_agreement_ranks_each_two_scans_modules_alike(tmp_path):
    """scan_agreement: per table, Spearman over every (kind, layer) between each two scans, as
    scipy computes it; a scan that is a monotone map of another agrees +1."""
    from scipy.stats import spearmanr

    rng = np.random.default_rng(2)
    keys = ("acc_drop", "loss_rise", "later")
    first = {key: {k: rng.normal(size=6).tolist() for k in ("q", "v", "up")} for key in keys}
    other = {key: {k: rng.normal(size=6).tolist() for k in ("q", "v", "up")} for key in keys}
    cubed = {key: {k: [v**3 for v in vs] for k, vs in first[key].items()} for key in keys}
    for name, tables in (("0.5-n32", first), ("0.5-n64", cubed), ("1.0-n32", other)):
        (tmp_path / f"scan-scale{name}.json").write_text(json.dumps({"tables": tables}))
    found = robust_modules.scan_agreement(str(tmp_path))
    assert found["scale0.5-n32 vs scale0.5-n64"] == pytest.approx({key: 1.0 for key in keys})
    for key in keys:
        x = [v for k in ("q", "up", "v") for v in first[key][k]]
        y = [v for k in ("q", "up", "v") for v in other[key][k]]
        expected = spearmanr(x, y).statistic
        assert found["scale0.5-n32 vs scale1.0-n32"][key] == pytest.approx(expected, abs=1e-12)


def write_groups(folder, rises, drop=0.2):
    """One seed's measured groups as `truth` writes them, plus plain IFT's curve (one `whole`)."""
    (folder / "groups").mkdir(parents=True)
    for name, rise in rises.items():
        cell = {"refusal_rise": rise, "task_drop": drop}
        (folder / "groups" / (name.replace(":", "_") + ".json")).write_text(json.dumps(cell))
    whole = {"lr": 5e-5, "before": {"task_loss": 2.0, "refusal_loss": 0.1}}
    whole["after"] = {"task_loss": 1.0, "refusal_loss": 0.6}
    (folder / "whole-lr5e-05.json").write_text(json.dumps(whole))


def test_table_sets_the_two_scenarios_truths_side_by_side(tmp_path, capsys):
    """table: each scenario's ground truth is the groups' excess over plain IFT at the same
    progress; with both scenarios it reports their Spearman (checked against scipy's); a scenario
    whose run is cut short is left out, not averaged as NaN."""
    from scipy.stats import spearmanr

    names = list(evaluation.module_groups(6))
    rng = np.random.default_rng(0)
    attack = dict(zip(names, rng.normal(size=len(names))))
    benign = dict(zip(names, rng.normal(size=len(names))))
    write_groups(tmp_path / "attack" / "seed0", attack)
    write_groups(tmp_path / "benign" / "seed0", dict(list(benign.items())[:5]))
    robust_modules.main(["table", str(tmp_path), "--json", str(tmp_path / "a.json")])
    assert "benign: no seed has all 21 groups yet; left out" in capsys.readouterr().out
    assert list(json.load(open(tmp_path / "a.json"))["ground_truth"]) == ["attack"]
    write_groups(tmp_path / "benign" / "seed1", benign)
    robust_modules.main(["table", str(tmp_path), "--json", str(tmp_path / "b.json")])
    result = json.load(open(tmp_path / "b.json"))
    # the same progress for every group: the excess is each rise less one constant
    offset = 0.5 * 0.2
    assert result["ground_truth"]["attack"] == pytest.approx(
        {g: r - offset for g, r in attack.items()}
    )
    expected = spearmanr([attack[g] for g in names], [benign[g] for g in names]).statistic
    both = result["proxies"]["the other scenario's ground truth [attack vs benign]"]
    assert both["spearman"] == pytest.approx(expected) and both["groups"] == len(names)
    assert both["ci"][0] <= both["spearman"] <= both["ci"][1]


def test_table_sets_one_seeds_ground_truth_against_anothers(tmp_path, capsys):
    """table with two seeds of one scenario: the ground truth is their mean excess, each seed's is
    kept, and the two seeds' rankings are compared (Spearman checked against scipy's)."""
    from scipy.stats import spearmanr

    names = list(evaluation.module_groups(6))
    rng = np.random.default_rng(1)
    first = dict(zip(names, rng.normal(size=len(names))))
    second = {g: first[g] + rng.normal(scale=0.5) for g in names}  # the same ranking, noisier
    write_groups(tmp_path / "attack" / "seed0", first)
    write_groups(tmp_path / "attack" / "seed1", second)
    robust_modules.main(["table", str(tmp_path), "--json", str(tmp_path / "a.json")])
    result = json.load(open(tmp_path / "a.json"))
    offset = 0.5 * 0.2  # plain IFT's rise at every group's progress
    assert result["ground_truth_seeds"]["attack"]["seed1"] == pytest.approx(
        {g: r - offset for g, r in second.items()}
    )
    mean = {g: (first[g] + second[g]) / 2 - offset for g in names}
    assert result["ground_truth"]["attack"] == pytest.approx(mean)
    found = result["proxies"]["another seed's ground truth (seed0 vs seed1) [attack]"]
    expected = spearmanr([first[g] for g in names], [second[g] for g in names]).statistic
    assert found["spearman"] == pytest.approx(expected) and found["groups"] == len(names)
    assert found["ci"][0] <= found["spearman"] <= found["ci"][1]
    assert "| group | seed0 | seed1 | mean |" in capsys.readouterr().out


def test_updates_splits_each_rows_update_sizes_by_a_set(tmp_path, capsys):
    """updates: the mean update size inside and outside --include, per phase, over a row's seeds;
    a one-phase row shows "-" for the warm-up, a row without update sizes says so."""
    folder = tmp_path / "benign" / "asr"
    folder.mkdir(parents=True)
    zeros = {kind: [0.0, 0.0] for kind in ("q", "k", "v", "o", "gate", "up", "down")}
    for seed, size in ((0, 0.002), (1, 0.004)):
        warm = {**zeros, "q": [size, 0.0]}  # the warm-up moved 0:q alone
        end = {kind: [size / 2, size / 2] for kind in zeros} | {"q": [size, size / 2]}
        row = {"seed": seed, "moved": end, "moved_warmup": warm}
        (folder / f"swat-x-seed{seed}.json").write_text(json.dumps(row))
        (folder / f"ift-seed{seed}.json").write_text(json.dumps({"seed": seed, "moved": end}))
    (folder / "old-seed0.json").write_text(json.dumps({"seed": 0}))
    robust_modules.main(["updates", "--out", str(tmp_path), "--scenario", "benign", "--include",
                         "0:q", "--rows", "swat-x", "ift", "old"])  # fmt: skip
    lines = {line.split(" | ")[0][2:]: line for line in capsys.readouterr().out.splitlines()}
    # inside: 0:q, mean over the seeds 0.003; the rest: 13 modules a seed
    rest_end = (13 * 0.001 + 13 * 0.002) / 26
    assert lines["swat-x"] == f"| swat-x | 0, 1 | 0.00300 | 0.00000 | 0.00300 | {rest_end:.5f} |"
    assert lines["ift"] == f"| ift | 0, 1 | - | - | 0.00300 | {rest_end:.5f} |"
    assert lines["old"].startswith("| old | none kept")
    with pytest.raises(SystemExit, match="no asr rows here"):  # one line, not a traceback
        robust_modules.main(["updates", "--out", str(tmp_path / "elsewhere"), "--scenario",
                             "benign", "--include", "q", "--rows", "ift"])  # fmt: skip
