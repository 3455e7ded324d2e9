"""The argument checks of swat-min's public entry points, in one place: the CLI's numbers, and what a
Python caller passes to AdamW, train, generate and LogisticProbe. A mistake is one clear line (SwatError)
before any work, so the maths behind these entry points can trust its inputs."""

import argparse
import math

from files import SwatError


def finite(value, least=0):
    """True for a real number >= least (NaN and inf are not)."""
    return isinstance(value, (int, float)) and math.isfinite(value) and value >= least


def number(kind, lo, hi=None):
    """An argparse type: a number in [lo, hi], so that a bad value is a usage error before any work."""
    def parse(text):
        v = kind(text)
        if not math.isfinite(v) or v < lo or (hi is not None and v > hi):  # NaN passes v < lo
            raise argparse.ArgumentTypeError(f"{text} is not in [{lo}, {hi or '...'}]")
        return v
    parse.__name__ = kind.__name__  # argparse's message for "abc": invalid int value
    return parse


def optimizer_args(groups, lr, betas, eps, weight_decay):
    """AdamW's arguments, checked once where a user passes them (the update itself trusts them)."""
    tensors = [p for g in groups for p in g["params"]]
    if len({id(p) for p in tensors}) != len(tensors):
        raise SwatError("AdamW: a parameter is listed twice (it would be updated twice per step)")
    for g in groups:
        values = {"lr": g.get("lr", lr), "eps": g.get("eps", eps),
                  "weight_decay": g.get("weight_decay", weight_decay)}
        for name, value in values.items():
            if not finite(value):
                raise SwatError(f"AdamW: {name} must be a finite number >= 0, not {value!r}")
        if not all(0 <= b < 1 for b in g.get("betas", betas)):
            raise SwatError(f"AdamW: betas must be in [0, 1), not {g.get('betas', betas)!r}")


def train_args(strategy, mods, steps, lr, batch_size, accum, warmup_steps, ratio, weight_decay,
               clip, max_len, save_every):
    """train()'s arguments, checked where a user passes them, so that a mistake is one line, not garbage."""
    if strategy not in ("ift", "swat", "mllr"):
        raise SwatError(f"unknown strategy {strategy!r}; choose ift, swat or mllr")
    if strategy != "ift" and not mods:
        raise SwatError(f"strategy {strategy} needs a module set (--mods)")
    counts = {"steps": (steps, 0), "batch_size": (batch_size, 1), "accum": (accum, 1),
              "warmup_steps": (warmup_steps, 0), "max_len": (max_len, 1), "save_every": (save_every, 0)}
    for name, (value, least) in counts.items():
        if type(value) is not int or value < least:
            raise SwatError(f"train: {name} must be an integer >= {least}, not {value!r}")
    rates = {"lr": lr, "ratio": ratio, "weight_decay": weight_decay, "clip": clip}
    for name, value in rates.items():
        if not finite(value):
            raise SwatError(f"train: {name} must be a finite number >= 0, not {value!r}")


def sampling_args(temperature, top_p, max_new_tokens, batch_size):
    """generate()'s numbers, checked where a user passes them: NaN or a negative top_p is no sampling."""
    if not finite(temperature):
        raise SwatError(f"generate: temperature must be a finite number >= 0, not {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0 <= top_p <= 1):
        raise SwatError(f"generate: top_p must be a number in [0, 1], not {top_p!r}")
    if type(max_new_tokens) is not int or type(batch_size) is not int or batch_size < 1:
        raise SwatError("generate: max_new_tokens and batch_size must be integers (batch_size >= 1)")


def probe_args(C, max_iter):
    """LogisticProbe's settings: C = 0 would divide the penalty by zero (NaN weights)."""
    if not (finite(C) and C > 0):
        raise SwatError(f"probe: C must be a finite number > 0, not {C!r}")
    if type(max_iter) is not int or max_iter < 1:
        raise SwatError(f"probe: max_iter must be an integer >= 1, not {max_iter!r}")
