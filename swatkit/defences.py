"""Post-tuning defences to combine with SWAT's in-training one (swat-min restore, run --defences):
they repair a tuned model with the alignment direction, the aligned model's weights less the
unaligned model's. Plain tensor arithmetic on three models of one architecture."""

import torch

from . import checks
from . import lora
from .files import SwatError
from .modules import MODULES


def restore(tuned, aligned, unaligned, method="resta", alpha=0.5, threshold=0.5):
    """`swat-min restore`: repair tuned, in place, with the alignment direction aligned -
    unaligned: "resta" adds alpha times it (restore_safety), "safelora" projects each module's
    update onto it where the two are unlike (safe_lora) -> what was done, in words. A LoRA run's
    adapters are merged into their weights first: both act on the merged weights."""
    if method not in ("resta", "safelora"):
        raise SwatError(f"restore: unknown method {method!r}; choose resta or safelora")
    if lora.adapters(tuned):
        lora.merge(tuned)
    if method == "resta":
        restore_safety(tuned, aligned, unaligned, alpha)
        return f"added {alpha:g} x (aligned - unaligned)"
    projected, modules = safe_lora(tuned, aligned, unaligned, threshold)
    return f"projected {projected} of {modules} modules' updates onto the alignment direction"


def restore_safety(tuned, aligned, unaligned, alpha):
    """RESTA-style safety restore (Bhardwaj et al. 2024, task arithmetic): add alpha times the
    safety vector, the aligned model's weights less the unaligned model's, to the tuned model's,
    parameter by parameter, in place -> tuned (the other two may sit on another device)."""
    if not checks.finite(alpha):
        raise SwatError(f"restore: alpha must be a finite number >= 0, not {alpha!r}")
    weights = same_shapes(tuned, aligned, unaligned)
    with torch.no_grad():
        for name, p in weights[0].items():
            p.add_(alpha * (weights[1][name] - weights[2][name]).to(p.device))
    return tuned


def same_shapes(tuned, aligned, unaligned):
    """The three models' {name: parameter}, checked to be one architecture (one line naming the
    first parameter that differs)."""
    weights = [dict(net.named_parameters()) for net in (tuned, aligned, unaligned)]
    for name, p in weights[0].items():
        shapes = [w[name].shape if name in w else None for w in weights]
        if shapes[1] != p.shape or shapes[2] != p.shape:
            raise SwatError(
                f"restore: {name} is {list(p.shape)} in the tuned model but "
                f"{[list(s) if s else 'missing' for s in shapes[1:]]} in the aligned and unaligned"
            )
    return weights


def safe_lora(tuned, aligned, unaligned, threshold):
    """Safe LoRA's projection (Hsu et al. 2024): each linear module's update dW = T - A (a LoRA
    run's merged adapter, or any tuning's change) is replaced by C dW, C = V V^T / ||V||_F with V
    = A - U the module's alignment direction, where dW and C dW are less similar (cosine over all
    entries) than threshold; the others are kept. In place -> (modules projected, modules)."""
    # (the aligned and unaligned models may sit on another device: the sums run on the tuned one's)
    weights = same_shapes(tuned, aligned, unaligned)
    kinds = tuple(f".{path}.weight" for path in MODULES.values())
    names = [name for name in weights[0] if name.endswith(kinds)]
    projected = 0
    with torch.no_grad():
        for name in names:
            device = weights[0][name].device
            t, a, u = (w[name].to(device, torch.float64) for w in weights)
            update = t - a
            v = a - u
            onto = (v @ v.T / v.norm()) @ update
            similarity = (update * onto).sum() / (update.norm() * onto.norm() + 1e-30)
            if similarity < threshold:
                weights[0][name].copy_(a + onto)
                projected += 1
    return projected, len(names)


def run_inputs(args, net, load):
    """run --defences, checked before any tuning: the starts ({row-name prefix: model}: --model,
    and Vaccine's start, --vaccine-model), the post-tuning repairs ({name: restore()'s settings},
    a row each per tuned model) and the unaligned model they need (None without one), each model
    of net's architecture; load(path) -> a model."""
    starts = {"": args.model}
    if args.vaccine_model:  # Vaccine's rows, named vaccine+..., tune from its own start
        starts["vaccine+"] = args.vaccine_model
    methods = {  # each post-tuning repair as restore() does it
        "restore": dict(method="resta", alpha=args.alpha),
        "safelora": dict(method="safelora", threshold=args.threshold),
    }
    chosen = args.defences or []  # none given: the plain rows alone
    repairs = {name: methods[name] for name in chosen if name in methods}
    needs = {"--vaccine-model": "vaccine" in chosen, "--unaligned": bool(repairs)}
    for flag, needed in needs.items():
        given = getattr(args, flag[2:].replace("-", "_"))
        if needed != bool(given):  # a model given for nothing is a mistake too
            what = "needs" if needed else "does not use"
            raise SwatError(f"--defences {','.join(chosen) or '(none)'} {what} {flag}")
    others = {path: load(path) for path in (args.vaccine_model, args.unaligned) if path}
    for other in others.values():
        same_shapes(net, other, other)  # one line naming the first parameter that differs
    unaligned = others.get(args.unaligned)  # read only by the repairs: it waits on the CPU
    return starts, repairs, None if unaligned is None else unaligned.to("cpu")
