"""robustness.py: the scan's exact restore and prefix reuse, per-module noise, Mods_Rob."""

import torch
import data
import model
import probe
import robustness as rb


def tiny_scan(net, tok, naive=False, seed=0, modules=("q", "k", "v", "o", "down")):
    H, S = data.builtin("harmful", "train")[:12], data.builtin("harmless", "train")[:12]
    X, y = probe.labelled(probe.features(net, tok, H), probe.features(net, tok, S))
    probes = probe.fit_layers(X, y)
    return rb.scan(
        net,
        probes,
        rb.prefix(net, tok, H + S, batch_size=8),
        y,
        modules,
        scale=0.5,
        seed=seed,
        naive=naive,
    )


def test_scan_exact_restore_and_prefix_reuse(tiny):
    net, tok = model.load(tiny)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fast = tiny_scan(net, tok)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    # cached prefix: the same table as full recomputes
    assert fast == tiny_scan(net, tok, naive=True)
    assert fast == tiny_scan(net, tok)  # fixed seed: the same table twice
    assert fast != tiny_scan(net, tok, seed=1)
    # noise per module
    assert tiny_scan(net, tok, modules=("down", "k")) == {
        "down": fast["down"],
        "k": fast["k"],
    }
    assert len(set(fast["q"] + fast["v"])) > 4  # perturbations do move the probes
    rob, fragile = rb.choose(fast, 4)
    every = sorted(v for row in fast.values() for v in row)
    assert (
        sorted(fast[m][l] for l, m in rob) == every[:4]
        and sorted(fast[m][l] for l, m in fragile) == every[-4:]
    )
    assert len(rb.heatmap(fast).splitlines()) == 7


def test_scan_on_qwen2_biases(tmp_path):
    from conftest import tiny_hf

    tiny_hf(str(tmp_path), "qwen2", tie_word_embeddings=True)
    net, tok = model.load(str(tmp_path))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    # the bias is part of the module
    assert any(p.ndim == 1 for p in rb.module(net, 1, "q").parameters())
    tiny_scan(net, tok)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
