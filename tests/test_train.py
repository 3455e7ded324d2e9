"""train.py: AdamW against torch.optim.AdamW, the loss and its gradients against transformers,
frozen modules, activation checkpointing, resume, masked loss, data readers, errors."""

import json
import os
import pytest
import torch
from conftest import SHARED, SMOLLM2, tiny_hf
from swatkit import data
import model
import train
from swatkit import batches

CHATS = [
    [
        {"role": "user", "content": f"What is {a} plus {b}?"},
        {"role": "assistant", "content": f"{a + b}"},
    ]
    for a in range(6)
    for b in range(4)
]


@pytest.mark.parametrize("impl", ["reference", "foreach", "fused"])  # fused: the GPU default
def test_adamw_matches_torch(tiny, impl):
    fused = impl == "fused"
    torch.manual_seed(0)
    nets = [model.load(tiny)[0] for _ in range(3)]

    def groups(net):
        ps = list(net.named_parameters())
        return [
            {"params": [p for n, p in ps if p.ndim >= 2], "weight_decay": 0.1},
            {
                "params": [p for n, p in ps if p.ndim < 2],
                "lr": 3e-3,
                "weight_decay": 0.0,
                "betas": (0.8, 0.99),
                "eps": 1e-6,
            },
        ]

    ours = train.AdamW(
        groups(nets[0]), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, impl=impl
    )
    # against torch's implementation of the same kind: its fused and foreach AdamW themselves differ
    # by over 1e-6 here (rows of the embedding that rarely get a gradient, where eps dominates)
    ref = torch.optim.AdamW(
        groups(nets[1]), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=fused
    )
    for step in range(20):
        x = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(step))
        for net, opt in ((nets[0], ours), (nets[1], ref)):
            net(x).float().logsumexp(-1).mean().backward()
            opt.step()
            opt.zero_grad()
    for (n, a), b in zip(nets[0].named_parameters(), nets[1].parameters()):
        assert not torch.equal(a, nets[2].state_dict()[n])  # it did move
        rel = ((a - b).norm() / b.norm()).item()
        assert rel <= 1e-6, (n, rel)


def test_adamw_speedups_equal_the_reference_update(tiny):
    """foreach computes the reference's lines over all tensors at once: the same numbers, bit for
    bit on a CPU; fused is torch's kernel of the same update, equal to rounding."""
    torch.manual_seed(0)
    nets = {impl: model.load(tiny)[0] for impl in ("reference", "foreach", "fused")}
    opts = {
        impl: train.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1, impl=impl)
        for impl, net in nets.items()
    }
    for step in range(5):
        x = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(step))
        for impl, net in nets.items():
            net(x).float().logsumexp(-1).mean().backward()
            opts[impl].step()
            opts[impl].zero_grad()
    for (name, ref), fe, fu in zip(
        nets["reference"].named_parameters(),
        nets["foreach"].parameters(),
        nets["fused"].parameters(),
    ):
        assert torch.equal(ref, fe), name
        assert ((ref - fu).norm() / ref.norm()).item() <= 1e-5, name


def test_adamw_plain_list_and_lr_change_match_torch(tiny):
    """torch-style use: a plain parameter list, a learning rate changed through param_groups, and a
    step given a closure that computes the loss and its gradients (every other step)."""
    nets = [model.load(tiny)[0] for _ in range(2)]
    opts = (
        train.AdamW(nets[0].parameters(), lr=1e-3, weight_decay=0.01),
        torch.optim.AdamW(nets[1].parameters(), lr=1e-3),
    )
    for step in range(10):
        x = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(step))
        losses = []
        for net, opt in zip(nets, opts):
            if step == 5:
                opt.param_groups[0]["lr"] = 3e-4

            def closure():
                loss = net(x).float().logsumexp(-1).mean()
                loss.backward()
                return loss

            losses.append(opt.step(closure) if step % 2 else (closure(), opt.step())[0])
            opt.zero_grad()
        assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-5)
    assert (
        max(
            ((a - b).norm() / b.norm()).item()
            for a, b in zip(nets[0].parameters(), nets[1].parameters())
        )
        <= 1e-6
    )
    nets[0](x).float().logsumexp(-1).mean().backward()
    opts[0].zero_grad(set_to_none=False)  # torch's other way: gradients kept, as zeros
    assert all(p.grad is not None and not p.grad.any() for p in nets[0].parameters())
    with pytest.raises(model.SwatError, match="no parameters"):
        train.AdamW([], lr=1e-3)


def test_swat_warmup_freezes_the_rest(tiny, tmp_path):
    net, tok = model.load(tiny)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    mods = train.parse_mods("0-1:q,k", net.cfg.n_layers)
    train.train(
        net,
        tok,
        CHATS,
        str(tmp_path / "o"),
        "swat",
        mods,
        steps=0,
        warmup_steps=3,
        lr=1e-3,
        batch_size=4,
    )
    for n, p in net.named_parameters():
        sel = any(n.startswith(f"model.layers.{l}.self_attn.{m}_proj") for l, m in mods)
        assert torch.equal(p, before[n]) != sel, n


@pytest.mark.parametrize("scope", ["all", "modules"])
def test_mllr_rates(tiny, scope):
    """Mods_Rob at lr; the rest at lr * ratio: every other parameter, or (scope "modules") only the
    other modules of Mods_Rob's kinds, here v and o of every layer."""
    net, _ = model.load(tiny)
    mods = {(0, "v"), (1, "o")}
    gs = train.param_groups(net, "mllr", mods, 1e-3, 0.1, 0.01, scope)
    assert sorted(n for g in gs for n in g["names"]) == sorted(n for n, _ in net.named_parameters())
    for g in gs:
        assert (g["weight_decay"] == 0.0) == all(p.ndim == 1 for p in g["params"])
        for n in g["names"]:
            sel = n.startswith(
                ("model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.o_proj")
            )
            slow = not sel and (
                scope == "all" or ".self_attn.v_proj" in n or ".self_attn.o_proj" in n
            )
            assert g["selected"] == sel and g["lr"] == (1e-4 if slow else 1e-3), n


def test_resume_equals_uninterrupted(tiny, tmp_path, monkeypatch):
    kw = dict(
        strategy="swat",
        mods={(0, "q"), (2, "o")},
        steps=4,
        warmup_steps=2,
        lr=1e-3,
        batch_size=4,
        save_every=3,
        seed=5,
        weight_decay=0.01,
    )
    net, tok = model.load(tiny)
    train.train(net, tok, CHATS, str(tmp_path / "a"), **kw)
    real_order, calls = batches.order, []

    def dying(
        *a,
    ):  # the run dies while fetching data for step 5 (the checkpoint is step 3's, the log has 4)
        calls.append(1)
        if len(calls) > 4:
            raise KeyboardInterrupt
        return real_order(*a)

    monkeypatch.setattr(batches, "order", dying)  # the data order lives in swatkit.batches
    net, tok = model.load(tiny)
    with pytest.raises(KeyboardInterrupt):
        train.train(net, tok, CHATS, str(tmp_path / "b"), **kw)
    assert json.load(open(tmp_path / "b" / "trainer.json"))["step"] == 3
    monkeypatch.setattr(batches, "order", real_order)
    net, tok = model.load(tiny)
    train.train(net, tok, CHATS, str(tmp_path / "b"), resume=True, **kw)
    a, b = model.load(str(tmp_path / "a"))[0], model.load(str(tmp_path / "b"))[0]
    for (n, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), n
    logs = [
        [(r["step"], r["loss"]) for r in map(json.loads, open(tmp_path / d / "log.jsonl"))]
        for d in "ab"
    ]
    # the log outlives every save
    assert [s for s, _ in logs[0]] == list(range(1, 7)) and logs[0] == logs[1]
    tiny_hf(tmp_path / "wide", hidden_size=32)  # the same parameter names, other shapes
    for d, other in (
        (tiny, dict(kw, strategy="ift", mods=())),
        (tiny, dict(kw, mods={(1, "q"), (2, "o")})),
        (tiny, dict(kw, steps=kw["steps"] + 1)),
        (tmp_path / "wide", kw),
        (tiny, dict(kw, lr=2e-3)),
        (tiny, dict(kw, batch_size=2)),
        (tiny, dict(kw, seed=6)),
        (tiny, dict(kw, weight_decay=0.0)),
        (tiny, dict(kw, warmup_steps=3, steps=3)),
    ):  # the same 6 steps, split otherwise
        net, tok = model.load(d)
        with pytest.raises(
            model.SwatError,
            match="b: its checkpoint was trained with another strategy, module set, number of "
            "steps,",
        ):
            train.train(net, tok, CHATS, str(tmp_path / "b"), resume=True, **other)
    net, tok = model.load(tiny)  # other data: the same examples in another order
    with pytest.raises(model.SwatError, match="model, data or settings"):
        train.train(net, tok, CHATS[::-1], str(tmp_path / "b"), resume=True, **kw)


def test_nonfinite_loss_stops_and_keeps_the_last_checkpoint(tiny, tmp_path, monkeypatch):
    real_loss, calls = train.loss_fn, []

    def poisoned(*a):  # the loss turns NaN at step 3, after the checkpoint of step 2
        calls.append(1)
        return real_loss(*a) * (float("nan") if len(calls) == 3 else 1.0)

    monkeypatch.setattr(train, "loss_fn", poisoned)
    net, tok = model.load(tiny)
    with pytest.raises(
        model.SwatError,
        match="non-finite loss or gradient at step 3;.* keeps the checkpoint of step 2",
    ):
        train.train(
            net, tok, CHATS, str(tmp_path / "o"), steps=4, lr=1e-3, batch_size=4, save_every=2
        )
    assert json.load(open(tmp_path / "o" / "trainer.json"))["step"] == 2
    saved = model.load(str(tmp_path / "o"))[0]
    assert all(torch.isfinite(v).all() for v in saved.state_dict().values())


def test_loss_counts_only_the_response(tiny):
    net, tok = model.load(tiny)
    chat = CHATS[7]
    ids, labels = train.encode(tok, chat, 512)
    n = len(tok.encode_chat(chat[:-1]))
    assert labels[:n] == [-100] * n and labels[n:] == ids[n:] and len(ids) > n
    x, y = train.collate([(ids, labels)], "cpu")
    base = train.loss_fn(net, x, y)

    class Scrambled(torch.nn.Module):  # garbage predictions at every prompt position
        def forward(self, i):
            out = net(i)
            noise = torch.randn_like(out) * 100
            return torch.cat([noise[:, : n - 1], out[:, n - 1 :]], 1)

    assert torch.allclose(train.loss_fn(Scrambled(), x, y), base)
    y2 = y.clone()
    y2[0, n + 1] = (y2[0, n + 1] + 1) % 512  # a response label does count
    assert not torch.allclose(train.loss_fn(net, x, y2), base)


def test_gradients_match_transformers(tmp_path):
    """The response-only loss and its gradients against transformers' own causal-LM loss (labels
    -100 on the prompt) on the same weights: forward and backward of every parameter, padded batch
    included."""
    ref = tiny_hf(str(tmp_path), "qwen2")  # biases and a tied head: every kind of parameter
    net, tok = model.load(str(tmp_path))
    rows = [train.encode(tok, c, 512) for c in CHATS[3:6]] + [
        train.encode(tok, CHATS[7] + CHATS[8], 512)
    ]
    ids, labels = train.collate(rows, "cpu")
    loss = train.loss_fn(net, ids, labels) / (labels[:, 1:] != -100).sum()
    loss.backward()
    theirs = ref(ids, labels=labels).loss
    theirs.backward()
    assert abs(loss.item() - theirs.item()) <= 1e-5
    grads = dict(ref.named_parameters())
    for n, p in net.named_parameters():
        g = grads[n].grad
        assert (p.grad - g).abs().max() <= 1e-5 * max(1.0, g.abs().max().item()), n


def test_activation_checkpointing_changes_nothing(tiny, tmp_path):
    outs = []
    for ckpt in (False, True):
        net, tok = model.load(tiny)
        train.train(
            net,
            tok,
            CHATS,
            str(tmp_path / f"o{ckpt}"),
            steps=3,
            lr=1e-3,
            batch_size=4,
            grad_ckpt=ckpt,
        )
        outs.append(dict(net.named_parameters()))
    assert all(torch.allclose(p, outs[1][n], atol=1e-6) for n, p in outs[0].items())
    assert any(
        not torch.equal(p, q) for p, q in zip(outs[0].values(), model.load(tiny)[0].parameters())
    )


def test_readers(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps([{"instruction": "Add", "input": "2 and 3", "output": "5"}]))
    assert data.read_examples(str(p)) == [
        [{"role": "user", "content": "Add\n\n2 and 3"}, {"role": "assistant", "content": "5"}]
    ]
    p = tmp_path / "g.jsonl"
    p.write_text(json.dumps({"question": "1+1?", "answer": "2\n#### 2"}) + "\n")
    assert data.read_examples(str(p))[0][1]["content"] == "2\n#### 2"
    p = tmp_path / "c.jsonl"
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    p.write_text(json.dumps({"messages": chat}) + "\n")
    assert data.read_examples(str(p)) == [chat]
    sharegpt = [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "hi"},
        {"from": "gpt", "value": "hello"},
    ]
    p.write_text(json.dumps({"id": "x", "conversations": sharegpt}) + "\n")
    # a pathlib.Path too
    assert data.read_examples(p) == [[{"role": "system", "content": "Be brief."}] + chat]
    p = tmp_path / "d.jsonl"  # Dolly; prompt/completion
    p.write_text(
        json.dumps({"instruction": "Sum", "context": "2, 3", "response": "5", "category": "qa"})
        + "\n"
        + json.dumps({"prompt": "Hi", "completion": "Hello"})
        + "\n"
    )
    assert [[m["content"] for m in c] for c in data.read_examples(str(p))] == [
        ["Sum\n\n2, 3", "5"],
        ["Hi", "Hello"],
    ]
    for f in (
        "gsm8k/train.jsonl",
        "alpaca_eval/alpaca_eval.jsonl",
    ):  # the shared benign sets, when present
        path = os.path.join(SHARED, "data", f)
        if os.path.exists(path):
            assert len(data.read_examples(path)) > 500


def test_bad_inputs(tiny, tmp_path):
    with pytest.raises(model.SwatError, match="nope.json: unreadable"):
        data.read_examples(str(tmp_path / "nope.json"))
    p = tmp_path / "e.jsonl"
    p.write_text("")
    with pytest.raises(model.SwatError, match="e.jsonl: no examples"):
        data.read_examples(str(p))
    p.write_text(
        json.dumps({"instruction": "a", "output": "b"})
        + "\n"
        + json.dumps({"instruction": "c"})
        + "\n"
    )
    with pytest.raises(model.SwatError, match="e.jsonl: record 2 has no 'output' or 'answer'"):
        data.read_examples(str(p))
    # the bad line is named
    p.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n\n{oops\n")
    with pytest.raises(model.SwatError, match="e.jsonl: line 3 is not valid JSON"):
        data.read_examples(str(p))
    (tmp_path / "o.json").write_text(json.dumps({"instruction": "a", "output": "b"}))
    with pytest.raises(
        model.SwatError, match="o.json: expected a JSON list of records, found dict"
    ):
        data.read_examples(str(tmp_path / "o.json"))
    p.write_text(
        json.dumps(
            {"messages": [{"from": "human", "value": "hi"}, {"role": "assistant", "content": "a"}]}
        )
    )
    with pytest.raises(
        model.SwatError, match="e.jsonl: record 1: 'messages' must be turns with a role"
    ):
        data.read_examples(str(p))
    p.write_text(
        json.dumps(
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "a"}]}
        )
    )
    with pytest.raises(
        model.SwatError, match="e.jsonl: record 1: 'conversations' must be turns with a role"
    ):
        data.read_examples(str(p))
    net, tok = model.load(tiny)
    with pytest.raises(model.SwatError, match=r"the first: example 1\).*--long skip"):
        train.train(net, tok, CHATS, str(tmp_path / "o"), max_len=8, steps=1)
    with pytest.raises(model.SwatError, match="no example fits max length 8"):
        train.train(net, tok, CHATS, str(tmp_path / "o"), max_len=8, steps=1, long="skip")
    # a scan of a 30-layer model
    (tmp_path / "big.json").write_text('{"mods_rob": [[1, "q"], [29, "k"]]}')
    (tmp_path / "odd.json").write_text('{"mods_rob": [[1, "qq"]]}')
    for spec, msg in (
        ("q,x", "unknown module 'x'"),
        ("0-99:q", "layer 3 out of range"),
        ("a-b:q", "bad layer range"),
        ("0-1:q:k", "bad layer range '0-1:q'"),
        (str(tmp_path / "big.json"), "big.json: layer 29 out of range 0-2"),
        (str(tmp_path / "odd.json"), "odd.json: unknown module 'qq'"),
        ("1-0:q", "selects nothing"),
    ):
        with pytest.raises(model.SwatError, match=msg):
            train.parse_mods(spec, net.cfg.n_layers)
    with pytest.raises(model.SwatError, match="refusing to overwrite the input model"):
        train.train(net, tok, CHATS, tiny, steps=1)


@pytest.mark.parametrize("strategy", ["ift", "swat", "mllr"])
def test_smollm2_strategies_reload_in_transformers(tmp_path, strategy):
    from transformers import AutoModelForCausalLM

    if not os.path.exists(os.path.join(SMOLLM2, "model.safetensors")):
        pytest.skip(
            f"no SmolLM2 checkpoint at {SMOLLM2}: run ../shared/tools/get_smollm2.sh to build it"
        )
    net, tok = model.load(SMOLLM2)
    path = os.path.join(SHARED, "data/gsm8k/train.jsonl")
    chats = data.read_examples(path)[:16] if os.path.exists(path) else CHATS
    rows = train.train(
        net,
        tok,
        chats,
        str(tmp_path / "o"),
        strategy,
        train.parse_mods("q,k", 30),
        steps=2,
        warmup_steps=1,
        batch_size=2,
        max_len=96,
        lr=1e-4,
        long="skip",
    )
    assert len(rows) == (3 if strategy == "swat" else 2) and all(r["loss"] > 0 for r in rows)
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path / "o"), dtype=torch.float32)
    x = torch.tensor([tok.encode_chat([{"role": "user", "content": "What is 3 + 4?"}])])
    with torch.no_grad():
        assert (ref(x).logits - net(x)).abs().max() <= 1e-4


def test_stochastic_rounding_is_unbiased():
    ulp = 2.0**-7  # bf16's spacing in [1, 2)
    for value, spacing in [(1 + 0.3 * ulp, ulp), (-(3 + 0.8 * 2 * ulp), 2 * ulp)]:
        x = torch.full((200_000,), value)
        rounded = train.stochastic_round(x).float()
        assert rounded.dtype == torch.float32 and set(rounded.unique().abs().tolist()) == {
            abs(value) - (abs(value) % spacing),
            abs(value) - (abs(value) % spacing) + spacing,
        }
        assert abs(rounded.mean().item() - value) < 0.01 * spacing  # nearest: 0.3 or 0.2 off
    exact = torch.tensor([1.0, -2.5, 0.0, 3.140625])
    assert torch.equal(train.stochastic_round(exact).float(), exact)


def test_bf16_with_stochastic_rounding_tracks_fp32_where_plain_bf16_stalls(
    tiny, tmp_path, monkeypatch
):
    """Updates far below half a bf16 step: rounded to nearest they vanish, rounded stochastically
    they add up as in fp32."""
    gained = {}
    for way in ("fp32", "stochastic", "nearest"):
        net, tok = model.load(tiny, dtype=torch.float32 if way == "fp32" else torch.bfloat16)
        data_ = train.encode_all(tok, CHATS, 512)
        ids, labels = train.collate(data_, "cpu")

        def loss(net):
            with torch.no_grad():
                return train.loss_fn(net.float(), ids, labels).item()

        start = loss(model.load(tiny, dtype=net.model.embed_tokens.weight.dtype)[0])
        if way == "nearest":
            monkeypatch.setattr(train, "stochastic_round", lambda x: x.to(torch.bfloat16))
        train.train(net, tok, CHATS, str(tmp_path / way), steps=40, lr=1e-5, batch_size=8)
        monkeypatch.undo()
        gained[way] = start - loss(net)
    assert gained["fp32"] > 0
    assert abs(gained["stochastic"] - gained["fp32"]) < 0.25 * gained["fp32"]
    assert gained["nearest"] < 0.5 * gained["fp32"]


def test_long_records_stop_skip_or_truncate(tiny, tmp_path, capsys):
    """--long: stop names how many and the first; skip leaves them out and says so; truncate keeps
    every record with its prompt cut from the start (its reply still learnt)."""
    import swat_min

    net, tok = model.load(tiny)
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    long_prompt = [{"role": "user", "content": "word " * 200}, short[1]]
    chats = [short, long_prompt, short, long_prompt]
    with pytest.raises(model.SwatError, match=r"2 of 4 .*the first: example 2\).*--long"):
        batches.encode_all(tok, chats, 96)
    kept = batches.encode_all(tok, chats, 96, long="skip")
    assert len(kept) == 2 and "left out 2 of 4" in capsys.readouterr().out
    cut = batches.encode_all(tok, chats, 96, long="truncate")
    assert len(cut) == 4 and all(len(ids) <= 96 for ids, _ in cut)
    reply = tok.encode_chat(short, add_generation_prompt=False)[-3:]
    for ids, labels in cut:  # the reply's last tokens are still there and still learnt
        assert ids[-3:] == reply and labels[-3:] == reply
    assert labels.count(-100) == 48  # the cut prompt is half of max_len
    with pytest.raises(model.SwatError, match="long must be one of stop, skip, truncate"):
        batches.encode_all(tok, chats, 96, long="cut")
    # the command line: --long and the older --skip-long
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    base = ["train", "--model", tiny, "--data", str(path), "--steps", "1", "--max-len", "96"]
    parser = swat_min.build_parser(swat_min.__doc__, swat_min.COMMANDS)
    assert parser.parse_args(base + ["--out", "o"]).long == "stop"
    assert parser.parse_args(base + ["--out", "o", "--skip-long"]).long == "skip"
    assert parser.parse_args(base + ["--out", "o", "--long", "truncate"]).long == "truncate"
    with pytest.raises(SystemExit) as stop:
        swat_min.main(base + ["--out", str(tmp_path / "a")])
    assert "--long skip" in str(stop.value.code) and "\n" not in str(stop.value.code)
    swat_min.main(base + ["--out", str(tmp_path / "b"), "--long", "truncate"])
    assert os.path.exists(tmp_path / "b" / "model.safetensors")


def test_restore_is_task_arithmetic_and_refuses_other_shapes(tiny, tmp_path):
    """restore writes T + alpha (A - U) exactly (numpy as the reference, every parameter), and a
    model of other shapes is one line, nothing written."""
    import numpy as np

    import swat_min

    generator = torch.Generator().manual_seed(1)
    nets = {}
    for name in ("aligned", "unaligned", "tuned"):  # three models of one architecture
        net, tok = model.load(tiny)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
        model.save(net, tok, str(tmp_path / name))
        nets[name] = dict(net.named_parameters())
    argv = ["restore", "--alpha", "0.7", "--out", str(tmp_path / "r")]
    for name in nets:
        argv += [f"--{name}", str(tmp_path / name)]
    swat_min.main(argv)
    restored, _ = model.load(str(tmp_path / "r"))
    for name, p in restored.named_parameters():
        t, a, u = (nets[k][name].detach().numpy() for k in ("tuned", "aligned", "unaligned"))
        assert np.array_equal(p.detach().numpy(), t + np.float32(0.7) * (a - u)), name
    tiny_hf(str(tmp_path / "other"), hidden_size=32, intermediate_size=48)
    argv[argv.index(str(tmp_path / "unaligned"))] = str(tmp_path / "other")
    argv[argv.index(str(tmp_path / "r"))] = str(tmp_path / "r2")
    with pytest.raises(SystemExit, match=r"restore: model.embed_tokens.weight is \[512, 64\]"):
        swat_min.main(argv)
    assert not (tmp_path / "r2").exists()


def test_vaccine_perturbation_has_its_norm_and_is_worse_than_random(tiny):
    """Vaccine's perturbation of the blocks' outputs has norm rho (all blocks together), leaves no
    weight gradient, and raises the loss more than random perturbations of the same norm; the
    perturbed loss's gradient reaches every weight, and rho = 0 is plain training."""
    net, tok = model.load(tiny)
    ids, labels = batches.collate([batches.encode(tok, c, 128) for c in CHATS[:4]], "cpu")
    rho = 2.0
    noise = train.vaccine_perturbation(net, ids, labels, rho)
    assert len(noise) == net.cfg.n_layers
    assert torch.sqrt(sum(e.pow(2).sum() for e in noise)).item() == pytest.approx(rho, rel=1e-5)
    assert all(p.grad is None for p in net.parameters())
    with torch.no_grad():
        clean = train.loss_fn(net, ids, labels).item()
        worst = train.vaccine_loss(net, ids, labels, rho).item()
    generator = torch.Generator().manual_seed(0)
    randoms = []
    for _ in range(5):
        draws = [torch.randn(e.shape, generator=generator) for e in noise]
        scale = rho / torch.sqrt(sum(d.pow(2).sum() for d in draws))
        hooks = [block.register_forward_hook(lambda m, a, out, d=d: out + scale * d)
                 for block, d in zip(net.model.layers, draws)]  # fmt: skip
        with torch.no_grad():
            randoms.append(train.loss_fn(net, ids, labels).item())
        for hook in hooks:
            hook.remove()
    assert worst > max(randoms) and worst > clean
    with torch.no_grad():  # the hooks are gone: the plain loss again
        assert train.loss_fn(net, ids, labels).item() == clean
    train.vaccine_loss(net, ids, labels, rho).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    with pytest.raises(model.SwatError, match="vaccine works without grad_ckpt"):
        train.train(net, tok, CHATS, "unused", steps=1, vaccine=0.1, grad_ckpt=True)


def test_vaccine_training_differs_from_plain_and_its_loss_is_the_perturbed_one(tiny, tmp_path):
    """train(vaccine=rho): each step's loss is the loss under the perturbation (above the plain
    loss at the same weights), and the weights it reaches differ from plain training's."""
    rows = {}
    weights = {}
    for rho in (0.0, 1.0):
        net, tok = model.load(tiny)
        rows[rho] = train.train(net, tok, CHATS, str(tmp_path / f"v{rho}"), steps=2, lr=1e-3,
                                batch_size=4, max_len=128, vaccine=rho)  # fmt: skip
        weights[rho] = net.model.layers[0].self_attn.q_proj.weight.detach().clone()
    assert rows[1.0][0]["loss"] > rows[0.0][0]["loss"]  # the same weights at step 1
    assert not torch.equal(weights[0.0], weights[1.0])


def test_safe_lora_projects_the_unlike_updates_and_keeps_the_others(tiny, tmp_path):
    """Each linear module's update dW = T - A against numpy's C dW, C = V V^T / ||V||_F, V = A - U:
    projected exactly where the cosine of dW and C dW is below the threshold, kept elsewhere; the
    threshold set between the two middle cosines, so that both cases occur."""
    import numpy as np

    import swat_min

    generator = torch.Generator().manual_seed(2)
    nets = {}
    for name in ("aligned", "unaligned", "tuned"):
        net, tok = model.load(tiny)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
            if name == "tuned":  # some updates along the alignment direction, the others not
                a, u = (dict(nets[k].named_parameters()) for k in ("aligned", "unaligned"))
                for n, p in net.named_parameters():
                    if n.endswith(("q_proj.weight", "up_proj.weight")):
                        p.copy_(a[n] + 0.5 * (a[n] - u[n]) + 0.01 * torch.randn(p.shape))
        model.save(net, tok, str(tmp_path / name))
        nets[name] = net
    weights = {k: {n: p.detach().double().numpy() for n, p in net.named_parameters()}
               for k, net in nets.items()}  # fmt: skip
    linear = [n for n in weights["tuned"] if n.endswith("_proj.weight")]
    expected = {}
    for n in linear:
        t, a, u = (weights[k][n] for k in ("tuned", "aligned", "unaligned"))
        v = a - u
        onto = (v @ v.T / np.linalg.norm(v)) @ (t - a)
        cosine = (onto * (t - a)).sum() / (np.linalg.norm(onto) * np.linalg.norm(t - a))
        expected[n] = (cosine, a + onto, t)
    cosines = sorted(c for c, _, _ in expected.values())
    middle = len(cosines) // 2
    threshold = float(cosines[middle - 1] + cosines[middle]) / 2  # between two modules' cosines
    argv = ["restore", "--method", "safelora", "--threshold", str(threshold), "--out",
            str(tmp_path / "safe")]  # fmt: skip
    for name in nets:
        argv += [f"--{name}", str(tmp_path / name)]
    swat_min.main(argv)
    safe = {
        n: p.detach().double().numpy()
        for n, p in model.load(str(tmp_path / "safe"))[0].named_parameters()
    }
    kept = projected = 0
    for n, (cosine, onto, t) in expected.items():
        want = onto if cosine < threshold else t
        assert np.allclose(safe[n], want, atol=1e-6), n
        kept += cosine >= threshold
        projected += cosine < threshold
    assert kept and projected
    for n in safe:  # norms, embeddings: untouched
        if n not in expected:
            assert np.array_equal(safe[n], weights["tuned"][n])
