"""The argument checks of swat-min's public Python entry points, in one place: what a caller passes
to AdamW, train, generate and LogisticProbe (the CLI's numbers are checked in options.py). A mistake
is one clear line (SwatError) before any work, so the maths behind these entry points can trust its
inputs."""

import math

import torch

from .batches import LONG
from .files import SwatError
from .modules import MODULES


def finite(value, least=0):
    """True for a real number >= least (NaN and inf are not)."""
    return isinstance(value, (int, float)) and math.isfinite(value) and value >= least


def optimizer_args(groups, lr, betas, eps, weight_decay, impl):
    """AdamW's arguments, checked once where a user passes them (the update itself trusts them)."""
    if impl not in (None, "reference", "foreach", "fused"):
        raise SwatError(f"AdamW: impl must be reference, foreach or fused, not {impl!r}")
    tensors = [p for g in groups for p in g["params"]]
    if len({id(p) for p in tensors}) != len(tensors):
        raise SwatError("AdamW: a parameter is listed twice (it would be updated twice per step)")
    for g in groups:
        values = {
            "lr": g.get("lr", lr),
            "eps": g.get("eps", eps),
            "weight_decay": g.get("weight_decay", weight_decay),
        }
        for name, value in values.items():
            if not finite(value):
                raise SwatError(f"AdamW: {name} must be a finite number >= 0, not {value!r}")
        if not all(0 <= b < 1 for b in g.get("betas", betas)):
            raise SwatError(f"AdamW: betas must be in [0, 1), not {g.get('betas', betas)!r}")


def train_args(args):
    """train()'s arguments, checked where a user passes them, so that a mistake is one line, not
    garbage."""
    strategy = args["strategy"]
    if strategy not in ("ift", "swat", "mllr"):
        raise SwatError(f"unknown strategy {strategy!r}; choose ift, swat or mllr")
    if args["long"] not in (*LONG, True, False):  # True / False: the older skip_long spelling
        raise SwatError(f"train: long must be one of {', '.join(LONG)}, not {args['long']!r}")
    if strategy != "ift" and not args["mods"]:
        raise SwatError(f"strategy {strategy} needs a module set (--mods)")
    n_layers = args["net"].cfg.n_layers
    for layer, kind in args["mods"]:  # (layer, module) pairs, as parse_mods makes them
        if kind not in MODULES or not (type(layer) is int and 0 <= layer < n_layers):
            raise SwatError(
                f"train: mods holds ({layer!r}, {kind!r}); a module is (layer 0-{n_layers - 1}, "
                f"one of {', '.join(MODULES)})"
            )
    # the counts and the least each may be
    counts = {"steps": 0, "batch_size": 1, "accum": 1, "warmup_steps": 0, "max_len": 1}
    counts["save_every"] = 0
    for name, least in counts.items():
        value = args[name]
        if type(value) is not int or value < least:
            raise SwatError(f"train: {name} must be an integer >= {least}, not {value!r}")
    if args["vaccine"] and (args["grad_ckpt"] or args["lora"]):  # hooks on recomputed blocks
        raise SwatError("train: vaccine works without grad_ckpt and lora (full tuning only)")
    for name in ("lr", "ratio", "weight_decay", "clip", "vaccine"):  # finite, >= 0
        if not finite(args[name]):
            raise SwatError(f"train: {name} must be a finite number >= 0, not {args[name]!r}")


def sampling_args(temperature, top_p, max_new_tokens, batch_size):
    """generate()'s numbers, checked where a user passes them: NaN or a negative top_p is no
    sampling."""
    if not finite(temperature):
        raise SwatError(f"generate: temperature must be a finite number >= 0, not {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0 <= top_p <= 1):
        raise SwatError(f"generate: top_p must be a number in [0, 1], not {top_p!r}")
    if type(max_new_tokens) is not int or type(batch_size) is not int or batch_size < 1:
        raise SwatError(
            "generate: max_new_tokens and batch_size must be integers (batch_size >= 1)"
        )
    if max_new_tokens < 0:
        raise SwatError(f"generate: max_new_tokens must be >= 0, not {max_new_tokens}")


def probe_args(C, max_iter):
    """LogisticProbe's settings: C = 0 would divide the penalty by zero (NaN weights)."""
    if not (finite(C) and C > 0):
        raise SwatError(f"probe: C must be a finite number > 0, not {C!r}")
    if type(max_iter) is not int or max_iter < 1:
        raise SwatError(f"probe: max_iter must be an integer >= 1, not {max_iter!r}")


def prompts(prompts, vocab_size):
    """generate()'s prompts: a list of token-id lists (or 1-D tensors), each non-empty and in the
    vocabulary -> lists of ints."""
    prompts = [p.tolist() if torch.is_tensor(p) else p for p in prompts]
    if any(
        isinstance(p, int) for p in prompts
    ):  # generate(net, ids) instead of generate(net, [ids])
        raise SwatError(
            "generate: prompts must be a list of prompts (lists of token ids), e.g. [ids]"
        )
    prompts = [list(p) for p in prompts]
    for i, p in enumerate(prompts):
        if not p:
            raise SwatError(f"generate: prompt {i + 1} has no tokens")
        if not all(0 <= t < vocab_size for t in p):
            raise SwatError(
                f"generate: prompt {i + 1} has a token id outside the vocabulary "
                f"(0..{vocab_size - 1})"
            )
    return prompts


def probe_data(X, y):
    """LogisticProbe.fit's data: features [N, D], finite, with N labels of 0 and 1, both present."""
    if X.ndim != 2 or len(X) != len(y) or len(X) == 0:
        raise SwatError(
            f"probe: features must be [N, D] with N labels, not {list(X.shape)} and {len(y)} labels"
        )
    if not (((y == 0) | (y == 1)).all() and X.isfinite().all()):
        raise SwatError(
            "probe: labels must be 0 (harmless) or 1 (harmful), and the features finite numbers"
        )
    if not (0 < y.sum() < len(y)):
        raise SwatError(
            "probe: training data holds only one class; it needs harmful and harmless examples"
        )


def scan_args(n, scale, repeats, metric, select, tolerance):
    """select_mods_rob's settings, as the CLI checks them: zero noise would rank by index, zero
    prompts would score nothing."""
    if type(n) is not int or n < 1 or type(repeats) is not int or repeats < 1:
        raise SwatError(f"scan: n and repeats must be integers >= 1, not {n!r} and {repeats!r}")
    if not (finite(scale) and scale > 0):
        raise SwatError(f"scan: scale must be a finite number > 0 (the noise), not {scale!r}")
    if metric not in ("readout", "later") or select not in ("search", "topk"):
        raise SwatError(
            f"scan: metric must be readout or later, and select search or topk, not {metric!r} "
            f"and {select!r}"
        )
    if not finite(tolerance):
        raise SwatError(f"scan: tolerance must be a finite number >= 0, not {tolerance!r}")


def prompt_sets(harmful, harmless, max_new_tokens):
    """evaluate()'s prompts and answer length: both sets non-empty lists of text, answers of at
    least one token (a rate over no prompts is no number)."""
    for name, prompts in (("harmful", harmful), ("harmless", harmless)):
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise SwatError(f"evaluate: {name} must be a list of prompts (text)")
        if not len(prompts):
            raise SwatError(f"evaluate: no {name} prompts to score")
    if type(max_new_tokens) is not int or max_new_tokens < 1:
        raise SwatError(f"evaluate: max_new_tokens must be an integer >= 1, not {max_new_tokens!r}")


def tuned_from(base_cfg, cfg, base_path, path):
    """eval --base: the model `path` was tuned from has its depth and width (one line if not)."""
    if (base_cfg.n_layers, base_cfg.dim) != (cfg.n_layers, cfg.dim):
        raise SwatError(
            f"{base_path}: {base_cfg.n_layers} layers of width {base_cfg.dim}, {path} has "
            f"{cfg.n_layers} of {cfg.dim}; --base must be the model it was tuned from"
        )
