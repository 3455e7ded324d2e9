"""model.py against transformers: logits, hidden states, padded batches, generation, save/load,
errors."""

import json
import os
import shutil
import pytest
import torch
from conftest import SMOLLM2, tiny_hf
import model
from swatkit import generation

FAMILIES = {
    "llama_gqa_untied": ("llama", dict(tie_word_embeddings=False)),
    "llama_rope3_bias": (
        "llama",
        dict(
            attention_bias=True,
            rope_theta=5000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    "mistral": ("mistral", dict(sliding_window=None)),
    "mistral_headdim_window": (
        "mistral",
        dict(head_dim=32, sliding_window=4096),
    ),  # head_dim != hidden / heads
    "qwen2_tied": ("qwen2", dict(tie_word_embeddings=True)),
}


def batch(rows):
    """Left-padded ids and mask, as a user would build them for transformers."""
    L = max(map(len, rows))
    ids = torch.tensor([[0] * (L - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def hf_padded(
    ref, ids, mask
):  # positions counted from the first real token, as transformers' generate does
    return ref(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits


@pytest.mark.parametrize("name", FAMILIES)
def test_tiny_parity(tmp_path, name):
    kind, kw = FAMILIES[name]
    ref = tiny_hf(str(tmp_path), kind, **kw)
    net, tok = model.load(str(tmp_path))
    assert net.cfg.tie == (kind == "qwen2") and net.cfg.qkv_bias == (
        kind == "qwen2" or "attention_bias" in kw
    )
    g = torch.Generator().manual_seed(1)
    x = torch.randint(3, 512, (2, 40), generator=g)
    with torch.no_grad():
        ours, hs = net(x, hidden=True)
        theirs = ref(x, output_hidden_states=True)
    assert (ours - theirs.logits).abs().max() <= 1e-4
    assert len(hs) == len(theirs.hidden_states)
    assert max((a - b).abs().max() for a, b in zip(hs, theirs.hidden_states)) <= 1e-4
    rows = [x[0, :40].tolist(), x[1, :7].tolist(), x[0, 5:25].tolist()]
    ids, mask = batch(rows)
    with torch.no_grad():
        ours, theirs = net(ids, mask), hf_padded(ref, ids, mask)
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max() <= 1e-4
    outs = model.generate(net, rows, max_new_tokens=12, stop_ids=[])
    ref_out = ref.generate(
        ids, attention_mask=mask, max_new_tokens=12, do_sample=False, min_new_tokens=12
    )
    assert outs == ref_out[:, ids.shape[1] :].tolist()


def test_rope_config_spellings(tmp_path):
    from transformers import AutoConfig

    scaling = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    base = {
        "model_type": "llama",
        "vocab_size": 8,
        "hidden_size": 64,
        "intermediate_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
    }
    freqs = []
    for extra in (
        {"rope_theta": 5e3, "rope_scaling": dict(scaling, type="llama3")},
        {"rope_theta": 5e3, "rope_scaling": dict(scaling, rope_type="llama3")},
        {"rope_parameters": dict(scaling, rope_type="llama3", rope_theta=5e3)},
        # both (a hand-edited or mixed file): rope_scaling's type wins, as transformers reads it
        {
            "rope_parameters": {"rope_type": "default", "rope_theta": 5e3},
            "rope_scaling": dict(scaling, type="llama3"),
        },
    ):
        p = tmp_path / "config.json"
        p.write_text(json.dumps(dict(base, **extra)))
        freqs.append(model.rope_inv_freq(model.read_config(str(p))))
        assert AutoConfig.from_pretrained(str(tmp_path)).rope_parameters["rope_type"] == "llama3"
    assert all(torch.equal(freqs[0], f) for f in freqs[1:])
    plain = dict(base, rope_theta=5e3)
    p.write_text(json.dumps(plain))
    assert not torch.equal(freqs[0], model.rope_inv_freq(model.read_config(str(p))))


def test_save_roundtrip_and_sharded(tmp_path):
    from transformers import AutoModelForCausalLM

    ref = tiny_hf(str(tmp_path / "a"), "llama", tie_word_embeddings=False)
    ref.save_pretrained(str(tmp_path / "sharded"), max_shard_size="100KB")
    shutil.copy(tmp_path / "a" / "tokenizer.json", tmp_path / "sharded")
    assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    net, tok = model.load(tmp_path / "sharded")  # paths may be pathlib.Paths
    out = model.save(net, tok, tmp_path / "saved")
    assert json.load(open(os.path.join(out, "swat-min.json")))["from"] == str(tmp_path / "sharded")
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    x = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert torch.equal(back(x).logits, net(x)) or (back(x).logits - net(x)).abs().max() == 0
        assert (ref(x).logits - net(x)).abs().max() <= 1e-5
    assert os.path.exists(os.path.join(out, "tokenizer.json"))
    assert not os.path.exists(out + ".tmp")
    with pytest.raises(model.SwatError, match="refusing to overwrite"):
        model.save(net, tok, str(tmp_path / "sharded"))


def test_bf16_load(tiny):
    net, _ = model.load(tiny, dtype=torch.bfloat16)
    assert next(net.parameters()).dtype == torch.bfloat16
    assert net(torch.tensor([[1, 2, 3]])).dtype == torch.bfloat16


def _smollm2():
    if not os.path.exists(os.path.join(SMOLLM2, "model.safetensors")):
        pytest.skip(
            f"no SmolLM2 checkpoint at {SMOLLM2}: run ../shared/tools/get_smollm2.sh to build it"
        )
    return SMOLLM2


PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about rain.",
    "Tell me a joke about cats.",
    "How many legs does a spider have?",
    "Give me three tips for sleeping better.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Name a famous painter.",
]


def test_smollm2_parity_and_generation():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = _smollm2()
    net, tok = model.load(d)
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(d)
    prompts = [tok.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    for p, ids in zip(PROMPTS, prompts):
        assert ids == list(
            hf_tok.apply_chat_template(
                [{"role": "user", "content": p}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
            )["input_ids"]
        )
    ids, mask = batch(prompts)
    with torch.no_grad():
        ours, theirs = net(ids, mask.bool()), hf_padded(ref, ids, mask)
        real = mask.bool()
        assert (ours[real] - theirs[real]).abs().max() <= 1e-4
        one = torch.tensor([prompts[0]])
        assert (net(one) - ref(one).logits).abs().max() <= 1e-4
    outs = model.generate(net, prompts, max_new_tokens=24)
    ref_out = ref.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    for o, r in zip(outs, ref_out[:, ids.shape[1] :].tolist()):
        assert o == (r[: r.index(2)] if 2 in r else r)
    assert "Paris" in tok.decode(outs[0])


def test_sampling_is_seeded_and_varies(tiny):
    net, _ = model.load(tiny)
    p = [[5, 6, 7], [8, 9]]
    a = model.generate(net, p, 10, temperature=1.0, seed=3, stop_ids=[])
    assert a == model.generate(net, p, 10, temperature=1.0, seed=3, stop_ids=[])
    assert a != model.generate(net, p, 10, temperature=1.0, seed=4, stop_ids=[])
    assert model.generate(net, p, 10, temperature=1.0, top_p=1e-6, stop_ids=[]) == model.generate(
        net, p, 10, stop_ids=[]
    )


def test_generation_stops_per_row(tiny):
    net, _ = model.load(tiny)
    p = [[5, 6, 7], [9, 10, 11, 12]]
    free = model.generate(net, p, 8, stop_ids=[])
    stop = free[0][2]
    cut = model.generate(net, p, 8, stop_ids=[stop])
    assert cut[0] == free[0][: free[0].index(stop)]
    assert cut[1] == (free[1][: free[1].index(stop)] if stop in free[1] else free[1])
    with pytest.raises(model.SwatError, match="generate: prompt 2 has no tokens"):
        model.generate(net, [[5], []], 4)
    with pytest.raises(
        model.SwatError, match="generate: prompt 1 has a token id outside the vocabulary"
    ):
        model.generate(net, [[5, net.cfg.vocab_size]], 4)
    for flat in ([5, 6, 7], torch.tensor([5, 6, 7])):  # one prompt, not a list of them
        with pytest.raises(model.SwatError, match=r"a list of prompts .*e.g. \[ids\]"):
            model.generate(net, flat, 4)


def test_generation_config_eos_and_plain_inputs(tmp_path):
    """transformers' generate stops at generation_config.json's eos_token_id; so must ours. Tensors
    and
    dtype names are accepted as inputs, and zero new tokens give empty answers."""
    from transformers import AutoModelForCausalLM

    d = str(tmp_path)
    tiny_hf(d)
    net, _ = model.load(d)
    p = [[5, 6, 7], [9, 10, 11, 12], [20, 21]]
    free = model.generate(net, p, 10, stop_ids=[])
    stop = free[1][3]
    with open(os.path.join(d, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": [stop, 2], "pad_token_id": 0}, f)
    net, _ = model.load(d)
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ids, mask = batch(p)
    ref_out = ref.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)[
        :, ids.shape[1] :
    ].tolist()
    ours = model.generate(net, p, 10)
    assert ours[1] == free[1][:3]
    assert ours == [next((r[:i] for i, x in enumerate(r) if x in (stop, 2)), r) for r in ref_out]
    assert model.generate(net, [torch.tensor(x) for x in p], 10) == ours
    assert model.generate(net, p, 0) == [[], [], []]
    assert next(model.load(d, dtype="bf16")[0].parameters()).dtype == torch.bfloat16
    with pytest.raises(model.SwatError, match="unknown dtype 'int8'"):
        model.load(d, dtype="int8")


# ---- bad input: one clear SwatError naming the file ----


def test_bad_inputs(tmp_path, tiny):
    with pytest.raises(model.SwatError, match="not a model directory"):
        model.load(str(tmp_path / "nope"))
    d = tmp_path / "c"
    shutil.copytree(tiny, d)
    os.remove(d / "config.json")
    with pytest.raises(model.SwatError, match="config.json: not found"):
        model.load(str(d))

    def broken(edit):
        d = tmp_path / f"b{len(os.listdir(tmp_path))}"
        shutil.copytree(tiny, d)
        edit(d)
        return str(d)

    def set_cfg(**kv):
        def edit(d):
            c = json.loads((d / "config.json").read_text())
            c.update(kv)
            (d / "config.json").write_text(json.dumps(c))

        return edit

    with pytest.raises(model.SwatError, match="model_type='gpt2'"):
        model.load(broken(set_cfg(model_type="gpt2")))
    with pytest.raises(model.SwatError, match="rope_type='yarn'"):
        model.load(broken(set_cfg(rope_parameters={"rope_type": "yarn", "factor": 2.0})))
    with pytest.raises(model.SwatError, match="mlp_bias=True"):
        model.load(broken(set_cfg(mlp_bias=True)))
    with pytest.raises(model.SwatError, match="no model.safetensors"):
        model.load(broken(lambda d: os.remove(d / "model.safetensors")))

    def truncate(d):
        b = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(b[: len(b) // 2])

    with pytest.raises(model.SwatError, match="model.safetensors: cannot read"):
        model.load(broken(truncate))
    with pytest.raises(model.SwatError, match="has shape"):
        model.load(broken(set_cfg(intermediate_size=100)))
    with pytest.raises(model.SwatError, match="tokenizer.json: not found"):
        model.load(broken(lambda d: os.remove(d / "tokenizer.json")))
    with pytest.raises(model.SwatError, match="config.json: unreadable"):
        model.load(broken(lambda d: (d / "config.json").write_text("{oops")))
    with pytest.raises(model.SwatError, match="config.json: not a JSON object"):
        model.load(broken(lambda d: (d / "config.json").write_text("[1, 2]")))
    with pytest.raises(
        model.SwatError, match="config.json: num_hidden_layers must be a positive integer, not '3'"
    ):
        model.load(broken(set_cfg(num_hidden_layers="3")))
    with pytest.raises(
        model.SwatError,
        match="config.json: eos_token_id must be a token id or a list of them, not '2'",
    ):
        model.load(broken(set_cfg(eos_token_id="2")))
    with pytest.raises(model.SwatError, match="generation_config.json: eos_token_id must be"):
        model.load(
            broken(
                lambda d: (d / "generation_config.json").write_text('{"eos_token_id": [2, null]}')
            )
        )
    with pytest.raises(model.SwatError, match="model.safetensors.index.json: no weight_map"):
        model.load(
            broken(lambda d: (d / "model.safetensors.index.json").write_text('{"metadata": {}}'))
        )
    with pytest.raises(
        model.SwatError, match="index.json: a shard that is not a .safetensors file of this folder"
    ):
        model.load(
            broken(
                lambda d: (d / "model.safetensors.index.json").write_text(
                    '{"weight_map": {"a": "../x.safetensors"}}'
                )
            )
        )

    def bad_jinja(d):
        (d / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>"}')
        (d / "chat_template.jinja").write_bytes(b"\xff\xfe\x81")

    with pytest.raises(model.SwatError, match="chat_template.jinja: unreadable"):
        model.load(broken(bad_jinja))
    with pytest.raises(
        model.SwatError, match="tokenizer_config.json: chat_template must be a template string"
    ):
        model.load(
            broken(lambda d: (d / "tokenizer_config.json").write_text('{"chat_template": 5}'))
        )
    with pytest.raises(
        model.SwatError,
        match="tokenizer_config.json: bos_token and eos_token must be token strings",
    ):
        model.load(
            broken(lambda d: (d / "tokenizer_config.json").write_text('{"eos_token": ["</s>"]}'))
        )
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    for kv, bad in (
        (
            {"rope_theta": "1e4", "rope_parameters": None},
            "rope_theta must be a positive number, not '1e4'",
        ),
        ({"rms_norm_eps": None}, "rms_norm_eps must be a positive number, not None"),
        (
            {"rope_parameters": llama3},
            "original_max_position_embeddings must be a positive number, not None",
        ),
    ):
        with pytest.raises(model.SwatError, match="config.json: " + bad):
            model.load(broken(set_cfg(**kv)))


def test_readme_api_example_runs(tiny, tmp_path, monkeypatch):
    """The README's Python API block, run as written on a tiny checkpoint (only MODEL filled in),
    so that the documented calls cannot drift from the code. It builds its own training data."""
    import re

    from conftest import ROOT

    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = text.split("## Python API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert "model.load(" in block and "model.generate(" in block and "LogisticProbe" in block
    code = re.sub(r'MODEL = "[^"]*"', f"MODEL = {tiny!r}", block)
    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(compile(code, "README.md (Python API)", "exec"), ns)
    assert ns["logits"].shape[-1] == 512 and len(ns["hidden"]) == 4 and len(ns["outs"]) == 2
    assert ns["X_train"].shape == (4, 4, 64) and ns["p"].predict_proba(ns["X_train"][-1]).shape == (
        4,
    )
    assert 0 <= ns["row"]["asr"] <= 1 and ns["row"]["drift"] >= 0
    saved = model.load(str(tmp_path / "saved"))[0]
    assert torch.equal(saved(torch.tensor([[5, 6]])), ns["net"](torch.tensor([[5, 6]])))
    assert os.path.exists(tmp_path / "tuned" / "trainer.json")


def test_sampling_matches_transformers_warpers():
    """Temperature + top-p sampling draws from the distribution transformers' warpers define: only
    their kept tokens, at their renormalised probabilities."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(1, 12) * 2
    for t, top_p in ((0.7, 0.8), (1.3, 0.5), (1.0, 1.0)):
        ref = torch.softmax(
            TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(t)(None, logits.clone())), -1
        )[0]
        gen = torch.Generator().manual_seed(1)
        draws = torch.stack(
            [generation.sample(logits.expand(500, -1), t, top_p, gen) for _ in range(20)]
        ).flatten()
        freq = torch.bincount(draws, minlength=12).float() / len(draws)
        assert set(draws.tolist()) <= set(ref.nonzero().flatten().tolist())
        assert (freq - ref).abs().max() < 0.015, (t, top_p, freq, ref)
