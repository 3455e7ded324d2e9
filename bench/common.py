"""Shared by the benchmarks: random-weight models of real shapes, built with transformers, and the
same weights in swat-min's model. Both sides always run in the same process, on the same device and
dtype."""

import argparse
import json
import os
import sys
import time
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model  # noqa: E402


def llama3_rope(factor):
    """Llama 3's long-context RoPE scaling, as its config.json spells it (the factor differs)."""
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


SHAPES = {  # name: transformers LlamaConfig keywords
    "smollm2-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
        rope_theta=1e5,
    ),
    "llama-3.2-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
        rope_theta=5e5,
        rope_scaling=llama3_rope(32.0),
    ),
    "llama-3.1-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
        rope_theta=5e5,
        rope_scaling=llama3_rope(8.0),
    ),
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
}


def reference(shape, device, dtype=torch.float32, seed=0):
    """A transformers LlamaForCausalLM (sdpa attention) of the given shape with seeded random
    weights."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="sdpa",
        **SHAPES[shape],
    )
    with torch.device(
        device
    ):  # initialised where it runs: a 1B model's random init on the CPU takes long
        return tf.LlamaForCausalLM(cfg).to(dtype=dtype).eval()


def ours(ref, device, dtype=torch.float32):
    """swat-min's model with the reference's config and weights."""
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"swat-bench-{os.getpid()}-config.json")
    with open(path, "w", encoding="utf-8") as f:
        f.write(ref.config.to_json_string())
    net = model.LLaMA(model.read_config(path))
    os.remove(path)
    sd = {k: v for k, v in ref.state_dict().items() if not (net.cfg.tie and k == "lm_head.weight")}
    net.load_state_dict(sd)
    return net.to(device=device, dtype=dtype).eval()


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat):
    sync(device)
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - t) / repeat


def peak_reset(device):
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device):
    return (
        round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if torch.device(device).type == "cuda"
        else None
    )


def parse_args(extra=None):
    """The command line every benchmark shares (--device, --tiny), plus `extra` options."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes for a CPU smoke test")
    if extra:
        extra(ap)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    return args


def emit(**row):
    row["device"] = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available() and row.get("device") != "cpu"
        else "cpu"
    )
    row["date"] = time.strftime("%Y-%m-%d")
    print(json.dumps(row), flush=True)
