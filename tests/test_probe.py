"""probe.py: scikit-learn parity, AUC, the feature cache, the probe on the real SmolLM2."""

import os
import pytest
import torch
from conftest import SMOLLM2, SHARED
from swatkit import data
import model
import probe


def gaussian(n, d, shift, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2 * n, d, generator=g) * torch.linspace(0.1, 3, d)
    y = torch.cat([torch.ones(n), torch.zeros(n)])
    X[:n] += shift * torch.randn(d, generator=torch.Generator().manual_seed(99))
    return X, y


def sklearn_acc(X, y, Xt, yt):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    s = StandardScaler().fit(X.numpy())
    m = LogisticRegression(C=1.0, max_iter=5000).fit(s.transform(X.numpy()), y.numpy())
    return m.score(s.transform(Xt.numpy()), yt.numpy())


@pytest.mark.parametrize("d,shift", [(20, 0.3), (300, 0.08)])
def test_probe_matches_sklearn(d, shift):
    X, y = gaussian(150, d, shift, 0)
    Xt, yt = gaussian(150, d, shift, 1)
    p = probe.LogisticProbe().fit(X, y)
    ours = p.score(Xt, yt)["acc"]
    assert abs(ours - sklearn_acc(X, y, Xt, yt)) <= 0.02
    assert 0.6 < ours < 1.0  # a problem that is neither trivial nor hopeless
    assert (
        p.predict_proba(Xt).shape == (300,)
        and ((p.predict_proba(Xt) > 0.5).float() == (p.logits(Xt) > 0)).all()
    )
    q = probe.LogisticProbe().fit(X.numpy(), y.tolist())  # numpy and lists work as well
    assert torch.allclose(q.predict_proba(Xt.numpy()), p.predict_proba(Xt))


def test_auc():
    assert probe.auc(torch.tensor([0.9, 0.8, 0.1, 0.2]), torch.tensor([1, 1, 0, 0])) == 1.0
    assert probe.auc(torch.tensor([0.1, 0.8, 0.9, 0.2]), torch.tensor([1, 1, 0, 0])) == 0.25
    from sklearn.metrics import roc_auc_score  # and scikit-learn's, ties included

    g = torch.Generator().manual_seed(0)
    s, y = (
        torch.randint(0, 6, (300,), generator=g).float(),
        torch.randint(0, 2, (300,), generator=g),
    )
    assert abs(probe.auc(s, y) - roc_auc_score(y.numpy(), s.numpy())) < 1e-12


def test_feature_cache_follows_the_weights(tmp_path, tiny):
    net, tok = model.load(tiny)
    xs, c = ["one thing", "another thing"], str(tmp_path / "c")
    first = probe.features(net, tok, xs, cache_dir=c)
    assert torch.equal(probe.features(net, tok, xs, cache_dir=c), first) and len(os.listdir(c)) == 1
    with (
        torch.no_grad()
    ):  # a change far from the start of a tensor makes a new entry, not a stale hit
        net.model.layers[1].mlp.down_proj.weight.view(-1)[-1] += 1.0
    assert torch.equal(probe.features(net, tok, xs, cache_dir=c), probe.features(net, tok, xs))
    assert len(os.listdir(c)) == 2
    (tmp_path / "f").write_text("")
    with pytest.raises(model.SwatError, match="f: not a directory \\(the feature cache\\)"):
        probe.features(net, tok, xs, cache_dir=str(tmp_path / "f"))


def test_smollm2_probe_accuracy():
    if not os.path.exists(os.path.join(SMOLLM2, "model.safetensors")):
        pytest.skip(
            f"no SmolLM2 checkpoint at {SMOLLM2}: run ../shared/tools/get_smollm2.sh to build it"
        )
    net, tok = model.load(SMOLLM2)
    f = lambda xs: probe.features(net, tok, xs)
    X, y = probe.labelled(f(data.builtin("harmful", "train")), f(data.builtin("harmless", "train")))
    held_harmless = f(data.builtin("harmless", "test"))
    Xt, yt = probe.labelled(f(data.builtin("harmful", "test")), held_harmless)
    probes = probe.fit_layers(X, y)
    accs = [p.score(x, yt)["acc"] for p, x in zip(probes, Xt)]
    best = max(range(len(accs)), key=accs.__getitem__)
    assert accs[best] >= 0.90
    assert abs(accs[best] - sklearn_acc(X[best], y, Xt[best], yt)) <= 0.02
    adv = os.path.join(SHARED, "data/advbench/harmful_behaviors_dev.csv")
    if os.path.exists(adv):
        Xa, ya = probe.labelled(f(data.read_instructions(adv)[:100]), held_harmless)
        # the same layer, on data it never saw
        assert probes[best].score(Xa[best], ya)["acc"] >= 0.90
