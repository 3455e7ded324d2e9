"""The memory plan of a training run, from the model's config alone: weights, gradients, Adam
moments and activations. `train` refuses a run that cannot fit the device, in one line and before
anything is allocated; `train --dry-run` prints the plan and stops.

Bytes per trained parameter: fp32 weights 4 + gradient 4 + two fp32 moments 8 = 16 (128 GB for 8B);
bf16 weights with stochastic rounding 2 + 2 + 8 = 12; LoRA trains only its adapters (fp32), the
frozen base costs its weights alone. Activations are an estimate (the tensors autograd keeps per
token and layer); activation checkpointing keeps one tensor per layer and recomputes the rest.
"""

import os

import torch

from . import hub
from . import lora as adapters
from .checkpoint import read_config
from .modules import ModelConfig
from .files import SwatError

GB = 1e9


def n_params(cfg):
    """The model's parameters, counted from its config."""
    q_out = cfg.n_heads * cfg.head_dim
    kv_out = cfg.n_kv_heads * cfg.head_dim
    attention = cfg.dim * q_out + 2 * cfg.dim * kv_out + q_out * cfg.dim
    if cfg.qkv_bias:
        attention += q_out + 2 * kv_out
    if cfg.o_bias:
        attention += cfg.dim
    mlp = 3 * cfg.dim * cfg.hidden_dim
    layer = attention + mlp + 2 * cfg.dim  # and the two RMSNorm weights
    embeddings = cfg.vocab_size * cfg.dim
    head = 0 if cfg.tie else embeddings
    return embeddings + head + cfg.n_layers * layer + cfg.dim  # and the final norm


def linear_shape(cfg, name):
    """(in, out) features of module `name` (a key of MODULES)."""
    q_out = cfg.n_heads * cfg.head_dim
    kv_out = cfg.n_kv_heads * cfg.head_dim
    shapes = {
        "q": (cfg.dim, q_out),
        "k": (cfg.dim, kv_out),
        "v": (cfg.dim, kv_out),
        "o": (q_out, cfg.dim),
        "gate": (cfg.dim, cfg.hidden_dim),
        "up": (cfg.dim, cfg.hidden_dim),
        "down": (cfg.hidden_dim, cfg.dim),
    }
    return shapes[name]


def plan(cfg, batch, seq, weight_bytes=4, lora=None, grad_ckpt=False, on_gpu=False):
    """-> {part: bytes} for weights, gradients, moments and activations, and their total.

    weight_bytes: 4 (fp32) or 2 (bf16). lora: {"r", "targets"} or None. on_gpu: activations in
    bf16 (autocast) and attention without its [T, T] scores; on the CPU fp32 and with them."""
    total = n_params(cfg)
    if lora:
        trained = 0
        for name in lora["targets"]:
            fan_in, fan_out = linear_shape(cfg, name)
            trained += cfg.n_layers * lora["r"] * (fan_in + fan_out)
        gradient_bytes = 4  # the adapters are fp32
    else:
        trained = total
        gradient_bytes = weight_bytes
    act = 2 if on_gpu else 4
    tokens = batch * seq
    q_out = cfg.n_heads * cfg.head_dim
    kv_out = cfg.n_kv_heads * cfg.head_dim
    # what autograd keeps per token of a block: norms' inputs and outputs, q, k, v (and q, k
    # rotated), the attention output, the MLP's gate, up, their product and its input
    per_token = 6 * cfg.dim + 4 * q_out + 2 * kv_out + 4 * cfg.hidden_dim
    if not on_gpu:  # the CPU's attention keeps its scores
        per_token += cfg.n_heads * seq
    block = tokens * per_token * act
    if grad_ckpt:  # each block's input, and one block recomputed at a time
        activations = cfg.n_layers * tokens * cfg.dim * act + block
    else:
        activations = cfg.n_layers * block
    activations += tokens * cfg.vocab_size * (act + 8)  # the logits, in fp32 for the loss, and grad
    parts = {
        "weights": total * weight_bytes,
        "gradients": trained * gradient_bytes,
        "moments": trained * 8,
        "activations": activations,
    }
    parts["total"] = sum(parts.values())
    parts["trained_params"] = trained
    parts["params"] = total
    return parts


def capacity(device):
    """Bytes of memory on device: a GPU's total, or the machine's RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def describe(parts, device, room):
    """The plan in one line."""
    shown = ", ".join(f"{k} {parts[k] / GB:.2f}" for k in ("weights", "gradients", "moments"))
    return (
        f"memory plan: {parts['total'] / GB:.2f} GB ({shown}, activations about "
        f"{parts['activations'] / GB:.2f}); {device} has {room / GB:.1f} GB; "
        f"{parts['trained_params']:,} of {parts['params']:,} parameters trained"
    )


def check(parts, device, room):
    """Refuse, in one line, a run that cannot fit."""
    if parts["total"] > room:
        raise SwatError(
            f"{describe(parts, device, room)}: it does not fit; try --grad-ckpt, --lora-rank, "
            "--dtype bf16, or a smaller --batch or --max-len"
        )


def from_options(args):
    """The plan of `train`'s options, printed (--dry-run) or checked against the device -> True
    when the run may go on. Activations are those of one micro-batch of --batch: accumulation
    adds none."""
    cfg = ModelConfig(**read_config(os.path.join(hub.resolve(args.model), "config.json")))
    lora = None
    if args.lora_rank:  # its targets checked here: an unknown one is one line, not a KeyError
        lora = {
            "r": args.lora_rank,
            "targets": adapters.parse_targets(args.lora_targets or adapters.TARGETS),
        }
    weight_bytes = 2 if args.dtype == "bf16" else 4
    on_gpu = torch.device(args.device).type == "cuda"
    parts = plan(cfg, args.batch, args.max_len, weight_bytes, lora, args.grad_ckpt, on_gpu)
    room = capacity(args.device)
    if args.dry_run:
        print(describe(parts, args.device, room))
        print("fits" if parts["total"] <= room else "does not fit")
        return False
    check(parts, args.device, room)
    return True
