"""memory.py: the plan counts what is really allocated, and a run that cannot fit is refused in one
line before anything is written; the 8B plans of the paper's scale."""

import os

import pytest
import torch

from swatkit import lora
from swatkit import memory
import model
import swat_min
from conftest import tiny_hf


def llama_8b():
    """Llama-3.1-8B's shape."""
    return model.ModelConfig(
        vocab_size=128256, dim=4096, hidden_dim=14336, n_layers=32, n_heads=32, n_kv_heads=8,
        head_dim=128,
    )  # fmt: skip


def test_parameter_counts_match_the_models(tmp_path):
    import transformers as tf

    for kind, extra in [("llama", {}), ("qwen2", {"tie_word_embeddings": True})]:
        folder = str(tmp_path / kind)
        tiny_hf(folder, kind, **extra)
        net, _ = model.load(folder)
        assert memory.n_params(net.cfg) == sum(p.numel() for p in net.parameters())
    # and at 8B, against transformers' own model (made on the meta device: no memory)
    hf = tf.LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8,
    )  # fmt: skip
    with torch.device("meta"):
        reference = tf.LlamaForCausalLM(hf)
    assert memory.n_params(llama_8b()) == sum(p.numel() for p in reference.parameters())


def test_the_plan_counts_the_trained_tensors(tiny):
    net, _ = model.load(tiny)
    full = memory.plan(net.cfg, batch=4, seq=64)
    numel = sum(p.numel() for p in net.parameters())
    assert full["weights"] == 4 * numel and full["gradients"] == 4 * numel
    assert full["moments"] == 8 * numel
    targets = ["q", "v", "down"]
    adapted = memory.plan(net.cfg, 4, 64, lora={"r": 4, "targets": targets})
    lora.add(net, 4, 8, targets)
    trained = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert adapted["trained_params"] == trained and adapted["moments"] == 8 * trained
    # activations grow with the tokens, and checkpointing keeps fewer
    twice = memory.plan(net.cfg, batch=8, seq=64)
    assert twice["activations"] == 2 * full["activations"]
    assert memory.plan(net.cfg, 4, 64, grad_ckpt=True)["activations"] < full["activations"]


def test_the_paper_scale_plans():
    cfg = llama_8b()
    adapters = {"r": 8, "targets": ["q", "k", "v", "o", "gate", "up", "down"]}
    small = memory.plan(cfg, 8, 1024, 2, adapters, grad_ckpt=True, on_gpu=True)
    assert small["total"] < 40e9  # 8B LoRA, batch 8 x 1024, on one GPU
    full = memory.plan(cfg, 8, 1024, 2, None, grad_ckpt=True, on_gpu=True)
    per_param = (full["weights"] + full["gradients"] + full["moments"]) / full["params"]
    assert per_param == 12 and full["total"] < 141e9  # bf16 + stochastic rounding: one H200
    fp32 = memory.plan(cfg, 8, 1024, 4, None, grad_ckpt=True, on_gpu=True)
    assert fp32["total"] > 128e9


def test_dry_run_prints_the_plan_and_a_run_too_big_is_refused(tiny, tmp_path, capsys, monkeypatch):
    tune = tmp_path / "d.jsonl"
    tune.write_text('{"question": "1?", "answer": "1"}\n' * 8)
    argv = ["train", "--model", tiny, "--data", tune, "--steps", 1, "--batch", 2]
    swat_min.main([str(a) for a in argv + ["--out", tmp_path / "dry", "--dry-run"]])
    out = capsys.readouterr().out
    assert "memory plan:" in out and "fits" in out and not os.path.exists(tmp_path / "dry")
    monkeypatch.setattr(memory, "capacity", lambda device: 10_000)  # a device of 10 kB
    with pytest.raises(SystemExit) as exit:
        swat_min.main([str(a) for a in argv + ["--out", tmp_path / "big"]])
    message = str(exit.value.code)
    assert message.startswith("error: memory plan:") and "does not fit" in message
    assert "\n" not in message and not os.path.exists(tmp_path / "big")
