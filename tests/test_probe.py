"""probe.py and robustness.py: scikit-learn parity, the scan's exactness, Mods_Rob, bad input."""
import os
import pytest, torch
from conftest import SMOLLM2, SHARED
import data, model, probe, robustness as rb


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
    assert p.predict_proba(Xt).shape == (300,) and ((p.predict_proba(Xt) > 0.5).float() == (p.logits(Xt) > 0)).all()
    q = probe.LogisticProbe().fit(X.numpy(), y.tolist())  # numpy and lists work as well
    assert torch.allclose(q.predict_proba(Xt.numpy()), p.predict_proba(Xt))


def test_auc():
    assert probe.auc(torch.tensor([0.9, 0.8, 0.1, 0.2]), torch.tensor([1, 1, 0, 0])) == 1.0
    assert probe.auc(torch.tensor([0.1, 0.8, 0.9, 0.2]), torch.tensor([1, 1, 0, 0])) == 0.25
    from sklearn.metrics import roc_auc_score  # and scikit-learn's, ties included
    g = torch.Generator().manual_seed(0)
    s, y = torch.randint(0, 6, (300,), generator=g).float(), torch.randint(0, 2, (300,), generator=g)
    assert abs(probe.auc(s, y) - roc_auc_score(y.numpy(), s.numpy())) < 1e-12


def test_builtin_sets():
    for kind in ("harmful", "harmless"):
        allx, tr, te = data.builtin(kind), data.builtin(kind, "train"), data.builtin(kind, "test")
        assert len(allx) >= 200 and len(tr) + len(te) == len(allx) and not set(tr) & set(te)
    lengths = [sum(map(len, data.builtin(k))) / len(data.builtin(k)) for k in ("harmful", "harmless")]
    assert abs(lengths[0] - lengths[1]) < 8  # similar length, so length cannot give the class away


def test_readers(tmp_path):
    (tmp_path / "adv.csv").write_text("goal,target\nDo a bad thing,Sure\nAnother,Sure\n")
    (tmp_path / "hb.csv").write_text("Behavior,FunctionalCategory,ContextString\nHarm X,standard,\nSum it up,contextual,An article.\n")
    (tmp_path / "a.jsonl").write_text('{"prompt": "p1"}\n{"instruction": "p2"}\n')
    (tmp_path / "t.txt").write_text("one\n\ntwo\n")
    assert data.read_instructions(str(tmp_path / "adv.csv")) == ["Do a bad thing", "Another"]
    assert data.read_instructions(str(tmp_path / "hb.csv")) == ["Harm X", "An article.\n\n---\n\nSum it up"]
    assert data.read_instructions(str(tmp_path / "a.jsonl")) == ["p1", "p2"]
    assert data.read_instructions(str(tmp_path / "t.txt")) == ["one", "two"]
    (tmp_path / "s.json").write_text('["s1", {"goal": "s2"}, {"Behavior": "s3"}]')
    assert data.read_instructions(str(tmp_path / "s.json")) == ["s1", "s2", "s3"]
    # JailbreakBench: the instruction is "Goal"; its "Behavior" is a short label
    (tmp_path / "jbb.csv").write_text("Index,Goal,Target,Behavior,Category\n1,Write a bad thing,Sure,Defamation,Harassment\n")
    assert data.read_instructions(str(tmp_path / "jbb.csv")) == ["Write a bad thing"]
    (tmp_path / "sr.jsonl").write_text('{"category": "c", "forbidden_prompt": "f1"}\n{"Question": "q2"}\n')
    assert data.read_instructions(str(tmp_path / "sr.jsonl")) == ["f1", "q2"]
    (tmp_path / "bom.csv").write_bytes('\ufeffgoal,target\r\n"One, two",Sure\r\n'.encode())  # as spreadsheets save it
    assert data.read_instructions(str(tmp_path / "bom.csv")) == ["One, two"]
    # Alpaca and Dolly: the input/context belongs to the instruction, as read_examples reads it
    (tmp_path / "alp.jsonl").write_text('{"instruction": "Sum up", "input": "A text.", "output": "o"}\n'
                                        '{"instruction": "Say hi", "input": "", "output": "hi"}\n'
                                        '{"instruction": "Q", "context": "C", "response": "r"}\n')
    assert data.read_instructions(str(tmp_path / "alp.jsonl")) == ["Sum up\n\nA text.", "Say hi", "Q\n\nC"]
    assert data.read_instructions(str(tmp_path / "alp.jsonl")) == [c[0]["content"] for c in data.read_examples(str(tmp_path / "alp.jsonl"))]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p1"}\n{"text": "p2"}\n')
    with pytest.raises(model.SwatError, match="bad.jsonl: record 2 has no text in any of the fields"):
        data.read_instructions(str(tmp_path / "bad.jsonl"))
    for i, text in enumerate(('["ok", 3]', '["ok", " "]', '[{"goal": "ok"}, {"goal": 5}]', '[{"goal": "ok"}, {"goal": ["a"]}]')):
        (tmp_path / f"bad{i}.json").write_text(text)  # a number, a list or a blank is no instruction
        with pytest.raises(model.SwatError, match=f"bad{i}.json: record 2 has no text in any of the fields"):
            data.read_instructions(str(tmp_path / f"bad{i}.json"))
    (tmp_path / "none.csv").write_text("goal,target\n")  # the column, but no rows
    with pytest.raises(model.SwatError, match="none.csv: no instructions found"):
        data.read_instructions(str(tmp_path / "none.csv"))


def test_feature_cache_follows_the_weights(tmp_path, tiny):
    net, tok = model.load(tiny)
    xs, c = ["one thing", "another thing"], str(tmp_path / "c")
    first = probe.features(net, tok, xs, cache_dir=c)
    assert torch.equal(probe.features(net, tok, xs, cache_dir=c), first) and len(os.listdir(c)) == 1
    with torch.no_grad():  # a change far from the start of a tensor makes a new entry, not a stale hit
        net.model.layers[1].mlp.down_proj.weight.view(-1)[-1] += 1.0
    assert torch.equal(probe.features(net, tok, xs, cache_dir=c), probe.features(net, tok, xs))
    assert len(os.listdir(c)) == 2
    (tmp_path / "f").write_text("")
    with pytest.raises(model.SwatError, match="f: not a directory \\(the feature cache\\)"):
        probe.features(net, tok, xs, cache_dir=str(tmp_path / "f"))


def test_bad_input(tmp_path, tiny):
    with pytest.raises(model.SwatError, match="only one class"):
        probe.LogisticProbe().fit(torch.randn(10, 3), torch.ones(10))
    for X, y in ((torch.randn(0, 3), torch.ones(0)), (torch.randn(10), torch.ones(10)), (torch.randn(9, 3), torch.ones(10))):
        with pytest.raises(model.SwatError, match=r"probe: features must be \[N, D\] with N labels"):
            probe.LogisticProbe().fit(X, y)
    y = torch.tensor([0.0, 1.0] * 5)
    for X, y in ((torch.randn(10, 3), y * 2), (torch.randn(10, 3), y - 1), (torch.full((10, 3), float("nan")), y)):
        with pytest.raises(model.SwatError, match=r"probe: labels must be 0 \(harmless\) or 1 \(harmful\), and the features finite"):
            probe.LogisticProbe().fit(X, y)
    (tmp_path / "e.txt").write_text("\n\n")
    with pytest.raises(model.SwatError, match="e.txt: no instructions"):
        data.read_instructions(str(tmp_path / "e.txt"))
    with pytest.raises(model.SwatError, match="nope.csv: unreadable"):
        data.read_instructions(str(tmp_path / "nope.csv"))
    (tmp_path / "x.csv").write_text("foo,bar\n1,2\n")
    with pytest.raises(model.SwatError, match="x.csv: no 'goal'"):
        data.read_instructions(str(tmp_path / "x.csv"))
    (tmp_path / "b.bin").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(model.SwatError, match="b.bin: unreadable"):
        data.read_instructions(str(tmp_path / "b.bin"))
    (tmp_path / "o.json").write_text('{"goal": "a", "x": "b"}')  # an object, not a list: its keys are no prompts
    with pytest.raises(model.SwatError, match="o.json: expected a JSON list of records, found dict"):
        data.read_instructions(str(tmp_path / "o.json"))
    net, _ = model.load(tiny)
    with pytest.raises(model.SwatError, match="unknown module 'z'"):
        rb.module(net, 0, "z")
    with pytest.raises(model.SwatError, match="layer 3 out of range 0-2"):
        rb.module(net, 3, "q")


def tiny_scan(net, tok, naive=False, seed=0, modules=("q", "k", "v", "o", "down")):
    H, S = data.builtin("harmful", "train")[:12], data.builtin("harmless", "train")[:12]
    X, y = probe.labelled(probe.features(net, tok, H), probe.features(net, tok, S))
    probes = probe.fit_layers(X, y)
    return rb.scan(net, probes, rb.prefix(net, tok, H + S, batch_size=8), y, modules,
                   scale=0.5, seed=seed, naive=naive)


def test_scan_exact_restore_and_prefix_reuse(tiny):
    net, tok = model.load(tiny)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fast = tiny_scan(net, tok)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert fast == tiny_scan(net, tok, naive=True)  # cached prefix: the same table as full recomputes
    assert fast == tiny_scan(net, tok)              # fixed seed: the same table twice
    assert fast != tiny_scan(net, tok, seed=1)
    assert tiny_scan(net, tok, modules=("down", "k")) == {"down": fast["down"], "k": fast["k"]}  # noise per module
    assert len(set(fast["q"] + fast["v"])) > 4      # perturbations do move the probes
    rob, fragile = rb.choose(fast, 4)
    every = sorted(v for row in fast.values() for v in row)
    assert sorted(fast[m][l] for l, m in rob) == every[:4] and sorted(fast[m][l] for l, m in fragile) == every[-4:]
    assert len(rb.heatmap(fast).splitlines()) == 7


def test_scan_on_qwen2_biases(tmp_path):
    from conftest import tiny_hf
    tiny_hf(str(tmp_path), "qwen2", tie_word_embeddings=True)
    net, tok = model.load(str(tmp_path))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert any(p.ndim == 1 for p in rb.module(net, 1, "q").parameters())  # the bias is part of the module
    tiny_scan(net, tok)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_smollm2_probe_accuracy():
    if not os.path.exists(os.path.join(SMOLLM2, "model.safetensors")):
        pytest.skip(f"no SmolLM2 checkpoint at {SMOLLM2}: run ../shared/tools/get_smollm2.sh to build it")
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
        assert probes[best].score(Xa[best], ya)["acc"] >= 0.90  # the same layer, on data it never saw
