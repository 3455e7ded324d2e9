"""Shared test helpers: tiny random checkpoints written by transformers, small trained
tokenizers."""

import json
import os
import sys
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
SMOLLM2 = os.path.join(
    os.environ.get("SWAT_MODEL_CACHE", os.path.expanduser("~/.cache/swat-min")),
    "SmolLM2-135M-Instruct",
)

SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<s>",
    "</s>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "How do I bake bread at home?",
    "Write a poem about the sea and the sky.",
    "You are a helpful assistant.",
    "Explain photosynthesis to a child in two sentences.",
    "[INST] <<SYS>> <</SYS>> [/INST]",
    "Cutting Knowledge Date: December 2023 Today Date: 26 Jul 2024",
    "1 2 3 4 5 6 7 8 9 0 + - = ?",
]


def make_tokenizer(d, chat_template="", bos="<|im_start|>", eos="<|im_end|>", vocab=400):
    """A byte-level BPE trained on a few sentences, saved the way HF checkpoints ship it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(
        TEXT * 4,
        trainers.BpeTrainer(
            vocab_size=vocab,
            special_tokens=SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    os.makedirs(d, exist_ok=True)
    tk.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(
            {
                "bos_token": bos,
                "eos_token": eos,
                "chat_template": chat_template,
                "tokenizer_class": "PreTrainedTokenizerFast",
            },
            f,
        )
    return tk


CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tiny_hf(d, kind="llama", **kw):
    """Random-weight transformers model of the given family, saved to d with a tokenizer."""
    import transformers as tf

    torch.manual_seed(0)
    base = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
    )
    base.update(kw)
    cfg = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[kind](
        **base
    )
    m = tf.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # random norms and biases too, so that a wrong one is seen
        for n, p in m.named_parameters():
            if n.endswith("norm.weight") or n.endswith("bias"):
                p.copy_(
                    1 + 0.2 * torch.randn_like(p)
                    if n.endswith("norm.weight")
                    else 0.2 * torch.randn_like(p)
                )
    m.save_pretrained(d)
    make_tokenizer(d, CHATML)
    return m


def data_file(tmp_path):
    """16 short arithmetic examples (Alpaca format) as tmp_path/d.jsonl -> its path."""
    path = tmp_path / "d.jsonl"
    rows = [
        {"instruction": f"What is {i} plus {i % 3}?", "output": f"{i + i % 3}"} for i in range(16)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def tiny(tmp_path):
    d = str(tmp_path / "tiny")
    tiny_hf(d)
    return d
