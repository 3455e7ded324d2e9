"""robustness.py and figures.py: the scan's exact restore and prefix reuse, per-module
noise, the readout metric, the searched Mods_Rob, rank stability, the pictures."""

import xml.etree.ElementTree as ET

import pytest
import torch

from swatkit import data
from swatkit import figures
import model
import probe
import robustness as rb
from swatkit import scan_cache

METRICS = ("later", "acc_drop", "loss_rise")


def tiny_scan(net, tok, naive=False, seed=0, modules=("q", "k", "v", "o", "down"), repeats=1):
    H, S = data.builtin("harmful", "train")[:12], data.builtin("harmless", "train")[:12]
    X, y = probe.labelled(probe.features(net, tok, H), probe.features(net, tok, S))
    probes = probe.fit_layers(X, y)
    batches = scan_cache.prefix(net, tok, H + S, batch_size=8)
    return rb.scan(net, probes, batches, y, modules, 0.5, repeats, seed, naive=naive)


def test_scan_exact_restore_and_prefix_reuse(tiny):
    net, tok = model.load(tiny)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fast = tiny_scan(net, tok)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    # cached prefix: the same tables as full recomputes
    assert fast == tiny_scan(net, tok, naive=True)
    assert fast == tiny_scan(net, tok)  # fixed seed: the same tables twice
    assert fast != tiny_scan(net, tok, seed=1)
    # noise per module: a module's change is the same whichever others are scanned with it
    two = tiny_scan(net, tok, modules=("down", "k"))
    for metric in METRICS:
        assert two[metric] == {"down": fast[metric]["down"], "k": fast[metric]["k"]}
    assert len(set(fast["later"]["q"] + fast["later"]["v"])) > 4  # perturbations move the probes
    ranked = rb.ranking(fast, "later")
    rob, fragile = ranked[:4], ranked[-4:]
    every = sorted(v for row in fast["later"].values() for v in row)
    assert sorted(fast["later"][m][l] for l, m in rob) == every[:4]
    assert sorted(fast["later"][m][l] for l, m in fragile) == every[-4:]
    # the readout metric: by accuracy drop, then log-loss rise
    keys = [(fast["acc_drop"][m][l], fast["loss_rise"][m][l]) for l, m in rb.ranking(fast)]
    assert keys == sorted(keys)
    assert len(figures.heatmap(fast, rb.ranking(fast, "later")).splitlines()) == 7


def test_scan_cache_equals_the_full_forward(tiny, monkeypatch):
    """The scan's cache (the shared opening computed once) gives the features of a plain forward
    of each whole prompt, and so does a rerun from any layer; prompts with no shared opening too."""
    assert scan_cache.shared_start([[1, 2, 3], [1, 2, 4], [1, 2, 3, 5]]) == 2
    assert scan_cache.shared_start([[7, 8], [7, 8]]) == 1  # every prompt keeps a token of its own
    assert scan_cache.shared_start([[1, 2], [3]]) == 0
    net, tok = model.load(tiny)
    prompts = data.builtin("harmful", "train")[:5] + data.builtin("harmless", "train")[:4]
    for chat in (True, False):
        if not chat:  # the bare instructions: they share no opening
            monkeypatch.setattr(tok, "encode_chat", lambda msgs: tok.encode(msgs[0]["content"]))
        ids = [tok.encode_chat([{"role": "user", "content": s}]) for s in prompts]
        assert (scan_cache.shared_start(ids) > 10) == chat
        full = probe.features(net, tok, prompts, batch_size=4)
        batches = scan_cache.prefix(net, tok, prompts, batch_size=4)
        torch.testing.assert_close(
            scan_cache.features_from(net, batches, 0), full, atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            scan_cache.features_from(net, batches, 2), full, atol=1e-5, rtol=0
        )


def test_scan_on_qwen2_biases(tmp_path):
    from conftest import tiny_hf

    tiny_hf(str(tmp_path), "qwen2", tie_word_embeddings=True)
    net, tok = model.load(str(tmp_path))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    # the bias is part of the module
    assert any(p.ndim == 1 for p in rb.module(net, 1, "q").parameters())
    tiny_scan(net, tok)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def fragile_model(tiny):
    """The tiny model with layer 1's o made fragile by construction: its weights scaled up 30 times,
    so that noise of the same relative size moves the residual stream, and the readout, far more."""
    net, tok = model.load(tiny)
    with torch.no_grad():
        net.model.layers[1].self_attn.o_proj.weight.mul_(30)
    return net, tok


def test_readout_metric_ranks_a_fragile_module_last_and_the_search_leaves_it_out(tiny):
    net, tok = fragile_model(tiny)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    harmful = data.builtin("harmful", "train")
    harmless = data.builtin("harmless", "train")
    X, y = probe.labelled(probe.features(net, tok, harmful), probe.features(net, tok, harmless))
    probes = probe.fit_layers(X, y)
    picked = rb.select_mods_rob(
        net, tok, harmful, harmless, probes, n=24, k=11, repeats=2, tolerance=0.05
    )
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    scan = picked["scan"]
    assert rb.ranking(scan)[-1] == (1, "o")  # the least robust by the readout probe
    assert scan["acc_drop"]["o"][1] == max(v for row in scan["acc_drop"].values() for v in row)
    assert [1, "o"] not in picked["mods_rob"] and [1, "o"] in picked["mods_fragile"]
    curve = picked["selection"]["curve"]
    assert [c["module"] for c in curve if c["kept"]] == picked["mods_rob"]
    assert all(c["change"] <= 0.05 for c in curve if c["kept"])
    stable = picked["stability"]
    assert stable["draws"] == 2 and -1 <= stable["spearman_between_draws"] <= 1
    assert -1 <= stable["spearman_between_prompt_halves"] <= 1
    assert len(stable["spread"]["q"]) == net.cfg.n_layers


def test_the_incremental_search_equals_reruns_from_the_lowest_module(tiny):
    net, tok = fragile_model(tiny)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    H, S = data.builtin("harmful", "train")[:12], data.builtin("harmless", "train")[:12]
    X, y = probe.labelled(probe.features(net, tok, H), probe.features(net, tok, S))
    probes = probe.fit_layers(X, y)
    batches = scan_cache.prefix(net, tok, H + S, batch_size=8)
    order = rb.ranking(rb.scan(net, probes, batches, y))[::-1]  # the fragile module first
    runs = []
    for incremental in (True, False):
        joint = rb.JointChange(net, probes, batches, y, 2, 0.5, 0, incremental)
        runs.append(rb.search(order, joint, tolerance=0.05, max_size=6))
    assert runs[0] == runs[1]  # the same set and curve, number for number
    kept = [c["kept"] for c in runs[0][1]]
    assert True in kept and False in kept  # both paths taken: sets grown and sets refused
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_search_keeps_no_pair_that_is_harmless_alone_but_harmful_together():
    """Modules a and b move the readout by nothing alone and by a lot together: the search, which
    perturbs its whole candidate set at each step, keeps one of them, never both."""
    order = [(0, "a"), (1, "c"), (2, "b"), (3, "d")]

    def joint_change(modules):
        names = {m for _, m in modules}
        return 0.5 if {"a", "b"} <= names else 0.0

    chosen, curve = rb.search(order, joint_change, tolerance=0.02, max_size=10)
    assert chosen == [(0, "a"), (1, "c"), (3, "d")]
    assert [c["kept"] for c in curve] == [True, True, False, True]
    assert curve[2]["change"] == 0.5
    # top-k by single-module change would have kept both
    chosen, _ = rb.search(order, lambda ms: 0.0, tolerance=0.02, max_size=2)
    assert chosen == order[:2]


def test_spearman_matches_scipy():
    from scipy.stats import spearmanr

    first = list("abcdefgh")
    second = list("bacdfehg")
    ranks = [second.index(x) for x in first]
    assert rb.spearman(first, second) == pytest.approx(spearmanr(range(8), ranks)[0])
    assert rb.spearman(first, first) == 1.0
    assert rb.spearman(first, first[::-1]) == -1.0


def test_pictures_are_svg_with_a_cell_per_layer_and_module(tmp_path):
    table = {m: [0.1 * i for i in range(5)] for m in ("q", "k", "v", "o")}
    figures.heatmap_svg(str(tmp_path / "h.svg"), table, "a <title>", "unit", {(1, "q")})
    root = ET.parse(tmp_path / "h.svg").getroot()
    cells = [e for e in root.iter("{http://www.w3.org/2000/svg}rect") if e.get("class") == "cell"]
    assert len(cells) == 5 * 4
    assert sum(1 for c in cells if c.get("stroke") == "black") == 1
    curve = [{"module": [i, "q"], "size": i, "change": 0.01 * i, "kept": i < 3} for i in range(5)]
    figures.curve_svg(str(tmp_path / "c.svg"), curve, 0.02, "search")
    root = ET.parse(tmp_path / "c.svg").getroot()
    circles = root.iter("{http://www.w3.org/2000/svg}circle")
    points = [e for e in circles if e.get("class") == "point"]
    assert len(points) == 5 and sum(p.get("fill") == "black" for p in points) == 3


def test_pictures_hold_every_label_and_show_ticks_and_legends(tmp_path):
    """What a projector shows: each label (estimated 0.55 em per character) inside the frame, ticks
    with values on both axes of the charts, and a legend for every mark and colour."""
    ns = "{http://www.w3.org/2000/svg}"
    long_title = "the original probe's accuracy on the tuned model's features (mean over seeds)"
    table = {m: [0.1 * i for i in range(30)] for m in ("q", "k", "v", "o")}
    figures.heatmap_svg(str(tmp_path / "h.svg"), table, long_title, "|dW|/|W|", {(1, "q")})
    curve = [{"module": [i, "q"], "change": 0.01 * i, "kept": i % 2 == 0} for i in range(40)]
    figures.curve_svg(str(tmp_path / "c.svg"), curve, 0.02, long_title)
    series = {f"{n} (3 seeds)": [(s, 0.9 - 0.002 * s * i) for s in range(-60, 21, 5)]
              for i, n in enumerate(("ift", "swat", "mllr", "control", "random"))}  # fmt: skip
    figures.lines_svg(
        str(tmp_path / "l.svg"), series, long_title, "step (before 0: warm-up)", "acc"
    )
    for name in ("h", "c", "l"):
        root = ET.parse(tmp_path / f"{name}.svg").getroot()
        _, _, width, height = (float(v) for v in root.get("viewBox").split())
        shift = 0.0
        for group in root.iter(ns + "g"):
            shift = float(group.get("transform", "translate(0,0)")[10:].split(",")[0])
        labels = []
        for t in root.iter(ns + "text"):
            size = float(t.get("font-size", 11))
            span = len(t.text) * size * 0.55
            x = float(t.get("x")) + shift
            left = x - {"start": 0, "middle": span / 2, "end": span}[t.get("text-anchor", "start")]
            assert 0 <= left and left + span <= width, (name, t.text, left, span, width)
            assert 0 < float(t.get("y")) <= height, (name, t.text)
            labels.append(t.text)
        if name in ("c", "l"):  # numbers on both axes: at least three on each
            numbers = [float(v) for v in labels if v.replace(".", "").replace("-", "").isdigit()]
            assert len(numbers) >= 6, (name, labels)
        legend = [e for e in root.iter() if e.get("class") == "legend"]
        if name == "h":
            assert len(legend) == 1 and "Mods_Rob" in labels and "|dW|/|W|" in labels
        if name == "c":
            assert {e.get("fill") for e in legend} == {"black", "white"}
            assert "kept in Mods_Rob" in labels and "rejected" in labels
        if name == "l":
            assert len(legend) == 5 and set(series) <= set(labels)


def test_a_ranking_of_ties_says_so(tiny):
    """Read at the embeddings (layer 0) no module's noise can move the probe: every score ties,
    and the scan says that its Mods_Rob is by index, not robustness."""
    from swatkit import scanfile

    net, tok = model.load(tiny)
    harmful, harmless = data.builtin("harmful", "train")[:8], data.builtin("harmless", "train")[:8]
    X, y = probe.labelled(probe.features(net, tok, harmful), probe.features(net, tok, harmless))
    probes = probe.fit_layers(X, y)
    for readout, ties in ((0, True), (None, False)):
        picked = rb.select_mods_rob(net, tok, harmful, harmless, probes, n=8, k=2, readout=readout,
                                    select="topk")  # fmt: skip
        text = scanfile.summary(picked, rb.ranking(picked["scan"]))
        assert ("every module scored the same" in text) == ties
        assert (picked["selection"]["distinct_scores"] == 1) == ties
