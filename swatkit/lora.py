"""LoRA, written by hand: a frozen Linear plus a trainable low-rank update.

    y = W x + b + (alpha / r) * B (A x)        A [r, in] random, B [out, r] zeros

B starts at zero, so a fresh adapter leaves the model exactly as it was. The base weights stay
frozen (and may stay in bf16); A and B are fp32 and are what the optimizer sees. SWAT and ML-LR
keep their meaning: an adapter belongs to the module it wraps, so Mods_Rob selects adapters by the
same names (model.layers.L.self_attn.q_proj.lora_A, ...).

A tuned model is saved twice over: merged (W + scale * B A, an ordinary checkpoint) and as a PEFT
adapter folder (adapter_config.json, adapter_model.safetensors with PEFT's names) that
peft.PeftModel.from_pretrained loads onto the base model.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .modules import MODULES
from .files import SwatError

PEFT_PREFIX = "base_model.model."  # PEFT's name for the wrapped model, before HF's own names


class LoRALinear(nn.Linear):
    """An nn.Linear (same weight and bias, frozen) with a LoRA adapter; its state names are the
    Linear's plus lora_A and lora_B."""

    def __init__(self, base, rank, alpha, generator):
        # nn.Linear's own __init__ would allocate a new weight: the base's tensors are reused
        nn.Module.__init__(self)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))
        # A as PEFT initialises it (Kaiming-uniform), from a seeded generator
        bound = 1 / math.sqrt(self.in_features)
        values = torch.rand(self.lora_A.shape, generator=generator) * 2 * bound - bound
        with torch.no_grad():
            self.lora_A.copy_(values)
        self.scaling = alpha / rank

    def forward(self, x):
        # the frozen layer in its own dtype, the low-rank update in fp32, added in the input's dtype
        y = F.linear(x, self.weight, self.bias)
        update = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return y + (self.scaling * update).to(y.dtype)

    def merged_weight(self):
        """W + scale * B A, in W's dtype."""
        delta = self.scaling * (self.lora_B @ self.lora_A)
        return (self.weight.float() + delta).to(self.weight.dtype)


ALPHA = 16.0  # the adapters' scale is alpha / r
TARGETS = "q,k,v,o,gate,up,down"  # every linear module of a block


def settings(lora):
    """train()'s lora argument, completed and checked: {"r": rank} at least; alpha and targets
    default to ALPHA and TARGETS. Keys it does not know are an error, not ignored."""
    if not isinstance(lora, dict) or "r" not in lora:
        raise SwatError(f"train: lora must be a dict with at least 'r' (the rank), not {lora!r}")
    unknown = set(lora) - {"r", "alpha", "targets"}
    if unknown:
        raise SwatError(
            f"train: lora has unknown settings {sorted(unknown)}; use r, alpha, targets"
        )
    alpha = lora.get("alpha", ALPHA)
    return {"r": lora["r"], "alpha": alpha, "targets": parse_targets(lora.get("targets", TARGETS))}


def parse_targets(spec):
    """'q,k,v,o,gate,up,down' (or a list of names) -> the module names (keys of MODULES),
    checked."""
    names = spec.replace(" ", "").split(",") if isinstance(spec, str) else spec
    targets = [t for t in names if t]
    unknown = [t for t in targets if t not in MODULES]
    if unknown or not targets:
        name = unknown[0] if unknown else spec
        raise SwatError(
            f"--lora-targets: unknown module {name!r}; choose from {', '.join(MODULES)}"
        )
    return list(dict.fromkeys(targets))


def check(net, rank, alpha, targets):
    """One line for settings that cannot make an adapter on net, before any work."""
    if not (isinstance(rank, int) and rank >= 1):
        raise SwatError(f"--lora-rank must be a whole number >= 1, not {rank!r}")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise SwatError(f"--lora-alpha must be a number > 0, not {alpha!r}")
    for name in parse_targets(targets):
        linear = net.model.layers[0].get_submodule(MODULES[name])
        smallest = min(linear.in_features, linear.out_features)
        if rank > smallest:
            raise SwatError(
                f"--lora-rank {rank} is larger than module {name!r} allows ({linear.out_features}"
                f" x {linear.in_features}: at most {smallest})"
            )


def add(net, rank, alpha, targets, seed=0):
    """Wrap the target Linears of every layer with adapters; freeze every other parameter.
    -> net (changed in place)."""
    check(net, rank, alpha, targets)
    for p in net.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for layer in net.model.layers:
        for name in targets:
            parent_path, _, child = MODULES[name].rpartition(".")
            parent = layer.get_submodule(parent_path)
            setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, generator))
    net.lora = {"r": rank, "alpha": alpha, "targets": list(targets)}
    return net


def adapters(net):
    """{name: LoRALinear} of net's adapters (empty without LoRA)."""
    return {name: m for name, m in net.named_modules() if isinstance(m, LoRALinear)}


def merged_state(net):
    """net's state under the plain model's names, each adapter merged into its weight."""
    state = {k: v.detach() for k, v in net.state_dict().items() if ".lora_" not in k}
    for name, m in adapters(net).items():
        state[f"{name}.weight"] = m.merged_weight().detach()
    return state


@torch.no_grad()
def merge(net):
    """Fold every adapter into its weight and put plain Linears back. -> net (in place)."""
    for name, m in adapters(net).items():
        parent_path, _, child = name.rpartition(".")
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        plain = plain.to(device=m.weight.device, dtype=m.weight.dtype)
        plain.weight.copy_(m.merged_weight())
        if m.bias is not None:
            plain.bias.copy_(m.bias)
        setattr(net.get_submodule(parent_path), child, plain)
    net.lora = None
    return net


def peft_files(net, base_path):
    """The PEFT adapter folder's two files: {"adapter_config.json": config, and
    "adapter_model.safetensors": tensors under PEFT's names}."""
    settings = net.lora
    tensors = {}
    for name, m in adapters(net).items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_path,
        "r": settings["r"],
        "lora_alpha": settings["alpha"],
        "lora_dropout": 0.0,
        "bias": "none",
        # the Linear's own names (q_proj, ...), as PEFT matches them
        "target_modules": [MODULES[t].rpartition(".")[2] for t in settings["targets"]],
        "fan_in_fan_out": False,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
    }
    return {"adapter_config.json": config, "adapter_model.safetensors": tensors}


@torch.no_grad()
def load_adapters(net, tensors, where):
    """Copy PEFT-named adapter tensors into net's adapters (resume); a mismatch is one line."""
    for name, m in adapters(net).items():
        for part in ("lora_A", "lora_B"):
            key = f"{PEFT_PREFIX}{name}.{part}.weight"
            target = getattr(m, part)
            if key not in tensors or tensors[key].shape != target.shape:
                raise SwatError(f"{where}: no adapter {key} of shape {list(target.shape)}")
            target.copy_(tensors[key])
