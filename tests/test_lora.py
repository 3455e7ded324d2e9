"""lora.py: adapters written by hand, checked against the merged model and against peft."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from swatkit import lora
import model
import train
from swatkit import batches
from swatkit.files import SwatError
from test_train import CHATS

TARGETS = ["q", "k", "v", "o", "gate", "up", "down"]


def ids_of(tok):
    return torch.tensor([tok.encode_chat([{"role": "user", "content": "How do locks work?"}])])


def test_zero_b_is_the_base_model_and_the_adapted_forward_is_the_merged_one(tiny):
    net, tok = model.load(tiny)
    ids = ids_of(tok)
    before = net(ids)
    lora.add(net, rank=4, alpha=8, targets=TARGETS)
    assert torch.equal(net(ids), before)  # B = 0: exactly the base model
    assert all(not p.requires_grad for n, p in net.named_parameters() if ".lora_" not in n)
    with torch.no_grad():
        for m in lora.adapters(net).values():
            m.lora_B.normal_(0, 0.1)
    adapted = net(ids)
    assert (adapted - before).abs().max() > 1e-3  # the adapters do something
    merged = lora.merge(net)
    assert not lora.adapters(merged)
    torch.testing.assert_close(merged(ids), adapted, atol=1e-5, rtol=0)


def test_bad_lora_settings_are_one_line(tiny):
    net, _ = model.load(tiny)
    for rank, alpha, targets, words in [
        (4, 8, ["q", "attn"], "unknown module 'attn'"),
        (33, 8, ["q", "k"], "larger than module 'k' allows"),  # k of the tiny model: 32 x 64
        (0, 8, ["q"], "--lora-rank must be a whole number"),
        (4, float("nan"), ["q"], "--lora-alpha must be a number > 0"),
    ]:
        with pytest.raises(SwatError, match=words):
            lora.add(net, rank, alpha, targets)


def test_lora_settings_are_completed_or_refused(tiny, tmp_path, capsys):
    """train(lora={"r": 2}) was a KeyError: alpha and targets now default; unknown keys and a
    missing rank are one line; --lora-alpha or --lora-targets without --lora-rank are refused."""
    import swat_min

    net, tok = model.load(tiny)
    chats = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]] * 4
    train.train(net, tok, chats, str(tmp_path / "a"), steps=1, batch_size=2, lora={"r": 2})
    config = json.load(open(tmp_path / "a" / "adapter" / "adapter_config.json"))
    assert config["r"] == 2 and config["lora_alpha"] == lora.ALPHA
    assert sorted(config["target_modules"]) == sorted(lora.MODULES[t].split(".")[-1]
                                                      for t in lora.TARGETS.split(","))  # fmt: skip
    for bad, words in (({"alpha": 4}, "at least 'r'"), ({"r": 2, "rank": 2}, "unknown settings")):
        with pytest.raises(SwatError, match=words):
            train.train(net, tok, chats, str(tmp_path / "b"), steps=1, lora=bad)
    assert not (tmp_path / "b").exists()
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    for flag, value in (("--lora-alpha", "8"), ("--lora-targets", "q")):
        with pytest.raises(SystemExit, match=f"{flag} needs --lora-rank"):
            swat_min.main(["train", "--model", tiny, "--data", str(data), "--out",
                           str(tmp_path / "c"), flag, value])  # fmt: skip
    assert not (tmp_path / "c").exists()


def lora_run(tiny, out, strategy="ift", mods=(), steps=3, warmup_steps=0, **kw):
    net, tok = model.load(tiny)
    settings = {"r": 4, "alpha": 8, "targets": TARGETS}
    train.train(
        net, tok, CHATS, out, strategy, mods, steps=steps, warmup_steps=warmup_steps,
        lr=1e-2, batch_size=4, seed=3, lora=settings, **kw,
    )  # fmt: skip
    return net


def test_swat_lora_phase_1_trains_only_mods_rob_adapters(tiny, tmp_path):
    mods = {(0, "q"), (2, "down")}
    out = str(tmp_path / "swat")
    net = lora_run(tiny, out, "swat", mods, steps=0, warmup_steps=3)  # phase 1 only
    assert not lora.adapters(net)  # the returned model is merged
    saved = load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))
    fresh, _ = model.load(tiny)
    lora.add(fresh, 4, 8, TARGETS, seed=3)  # the adapters as they started
    start = lora.peft_files(fresh, None)["adapter_model.safetensors"]
    assert saved.keys() == start.keys()
    moved = set()
    for key, value in saved.items():
        if not torch.equal(value, start[key]):
            moved.add(key)
    wanted = {"model.layers.0.self_attn.q_proj", "model.layers.2.mlp.down_proj"}
    assert {k.removeprefix(lora.PEFT_PREFIX).rsplit(".", 2)[0] for k in moved} == wanted
    # and the merged checkpoint: every other weight bit-identical to the base model's
    base = model.load(tiny)[0].state_dict()
    tuned = model.load(out)[0].state_dict()
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed == {f"{m}.weight" for m in wanted}


def test_peft_loads_the_adapter_with_the_same_logits(tiny, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    out = str(tmp_path / "ift")
    lora_run(tiny, out)
    config = json.load(open(os.path.join(out, "adapter", "adapter_config.json")))
    assert config["r"] == 4 and config["lora_alpha"] == 8
    ours, tok = model.load(out)  # the merged checkpoint
    ids = ids_of(tok)
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(base, os.path.join(out, "adapter")).eval()
    with torch.no_grad():
        theirs = adapted(ids).logits
        assert (theirs - ours(ids)).abs().max() <= 1e-4
    # the adapter is not a no-op: without it the logits differ
    again = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    with torch.no_grad():
        assert (again(ids).logits - theirs).abs().max() > 1e-3


def test_lora_resume_equals_uninterrupted(tiny, tmp_path, monkeypatch):
    kw = dict(strategy="mllr", mods={(1, "v")}, steps=4, save_every=2)
    lora_run(tiny, str(tmp_path / "a"), **kw)
    real_order = batches.order
    calls = []

    def dying(*a):  # the run dies fetching data for step 3 (the checkpoint is step 2's)
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return real_order(*a)

    monkeypatch.setattr(batches, "order", dying)
    with pytest.raises(KeyboardInterrupt):
        lora_run(tiny, str(tmp_path / "b"), **kw)
    monkeypatch.setattr(batches, "order", real_order)
    lora_run(tiny, str(tmp_path / "b"), resume=True, **kw)
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        a = load_file(os.path.join(tmp_path, "a", name))
        b = load_file(os.path.join(tmp_path, "b", name))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    # resuming with other LoRA settings is refused
    with pytest.raises(SwatError, match="another strategy"):
        net, tok = model.load(tiny)
        settings = {"r": 2, "alpha": 8, "targets": TARGETS}
        train.train(
            net, tok, CHATS, str(tmp_path / "b"), "mllr", {(1, "v")}, steps=4, lr=1e-2,
            batch_size=4, seed=3, lora=settings, resume=True, save_every=2,
        )  # fmt: skip


def test_lora_on_bf16_base_weights(tiny, tmp_path):
    """The base may stay in bf16: it is not touched; the adapters are fp32 and train."""
    net, tok = model.load(tiny, dtype=torch.bfloat16)
    base = {k: v.clone() for k, v in net.state_dict().items()}
    settings = {"r": 2, "alpha": 4, "targets": ["q", "v"]}
    rows = train.train(
        net, tok, CHATS, str(tmp_path / "bf16"), steps=2, lr=1e-2, batch_size=4, lora=settings
    )
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    tuned = load_file(str(tmp_path / "bf16" / "adapter" / "adapter_model.safetensors"))
    assert all(v.dtype == torch.float32 for v in tuned.values())
    assert any(v.abs().sum() > 0 for k, v in tuned.items() if "lora_B" in k)  # B has moved
    merged = model.load(str(tmp_path / "bf16"), dtype=torch.bfloat16)[0].state_dict()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(".q_proj." in k or ".v_proj." in k for k in changed)
