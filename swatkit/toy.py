"""The offline demo's model organism: a BPE tokenizer and a 4-layer LLaMA trained from scratch, in a
few minutes on a CPU, to refuse the built-in harmful train split and answer the harmless one, so
that it starts aligned and SWAT has something to protect. Also a benign tuning task it never saw:
two-digit addition. A toy: its numbers show the pipeline working, not the method's merit."""

import json
import os
import random
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from . import data, tokenizer
from .checkpoint import read_config
from .modules import ModelConfig
from .files import claim, write_text


# what `swat-min demo` says first: what the toy is, and what it is not
BANNER = (
    "swat-min demo on a TOY model organism (4 layers, trained here in a few minutes to refuse the\n"
    "built-in harmful prompts). Its numbers show the pipeline working, not the method's merit.\n"
    "For the real thing: swat-min align --model <hf dir or org/name> --out aligned, then\n"
    "swat-min run --model aligned --data <benign data> --out results\n"
    "On SmolLM2-135M (RESULTS.md) ML-LR keeps 7-8 points more refusals than plain IFT at the\n"
    "same task loss, but as much with a random set as with the scan's Mods_Rob or with the groups\n"
    "tuning itself measures as least fragile; SWAT keeps none with the paper's selection, but\n"
    "cut a short benign GSM8K tuning's rise by 54 % with the least fragile third's attention\n"
    "(layers 10-19; five seeds; a random 60 cut nothing), and nothing under Attack IFT nor tuned\n"
    "to convergence. `swat-min fragility` measures what tuning each group costs on your model.\n"
)


def build(out, network, train, seed=0, steps=400):
    """-> (model directory, tuning data file) under out. Deterministic for a seed and library
    versions. network: the model class (model.LLaMA); train: the trainer (train.train); both are
    passed in, as this package never imports the method files."""
    rng = random.Random(seed)
    refusals = data.lines("refusals.txt")
    helpful = data.lines("helpful_toy.txt")
    harmful = data.builtin("harmful", "train")
    harmless = data.builtin("harmless", "train")
    # it learns to refuse the harmful train split and to answer the harmless one
    chats = data.chats(
        [(h, rng.choice(refusals)) for h in harmful] + [(s, rng.choice(helpful)) for s in harmless]
    )
    sums = [(rng.randint(1, 99), rng.randint(1, 99)) for _ in range(1200)]
    task = [
        {"instruction": f"What is {x} plus {y}?", "output": f"Sure! {x} plus {y} is {x + y}."}
        for x, y in sums
    ]
    tdir = os.path.join(out, "toy-tokenizer")
    mdir = os.path.join(out, "toy-model")
    for entry in ("toy-tokenizer", "toy-task.jsonl", "toy-model"):  # listed in out's manifest first
        claim(out, entry)
    os.makedirs(tdir, exist_ok=True)
    write_text(os.path.join(out, "toy-task.jsonl"), "".join(json.dumps(t) + "\n" for t in task))
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    texts = (
        data.builtin("harmful")
        + data.builtin("harmless")
        + refusals
        + helpful
        + [t["output"] for t in task]
    )
    tk.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=1024,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tk.save(os.path.join(tdir, "tokenizer.json"))
    template = (
        "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + "
        "'<|im_end|>\\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n'}}{% endif %}"
    )
    write_text(
        os.path.join(tdir, "tokenizer_config.json"),
        json.dumps(
            {
                "bos_token": "<|im_start|>",
                "eos_token": "<|im_end|>",
                "pad_token": "<|im_end|>",
                "chat_template": template,
            }
        ),
    )
    cfg = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": tk.get_vocab_size(),
        "hidden_size": 128,
        "intermediate_size": 352,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
    }
    write_text(os.path.join(tdir, "config.json"), json.dumps(cfg))
    torch.manual_seed(seed)
    net = network(ModelConfig(**read_config(os.path.join(tdir, "config.json"))))
    tok = tokenizer.Tok(tdir)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.02) if p.ndim == 2 else torch.nn.init.ones_(p)
    print("== the toy model: trained here to refuse the harmful prompts and answer the harmless")
    train(
        net,
        tok,
        chats,
        mdir,
        "ift",
        steps=steps,
        lr=3e-3,
        batch_size=32,
        max_len=96,
        seed=seed,
        label="toy model",
    )
    return mdir, os.path.join(out, "toy-task.jsonl")
