"""Instruction fine-tuning with a hand-written AdamW, and the three strategies:

  ift   all parameters at the base learning rate (plain IFT, the baseline).
  swat  phase 1 (warm-up): only the Mods_Rob modules train; phase 2: all parameters, exactly as ift.
  mllr  Mods_Rob at the base learning rate, every other parameter (scope "modules": every other
        module of Mods_Rob's kinds) at base * ratio.

SWAT's switch to phase 2 is one named step of the loop (enter_phase): the Mods_Rob groups keep their
Adam moments (their optimisation just goes on), the released groups start from zero moments and
their own bias correction (as if just created), and the learning-rate schedule starts again, so
phase 2 is plain IFT from a better start.

With LoRA (swatkit/lora.py) the same holds for the adapters: the base weights are frozen throughout.
"""

import math
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model import MODULES
from robustness import parse_mods  # noqa: F401 (train.parse_mods: Mods_Rob as the trainer takes it)
from swatkit import checks, distributed
from swatkit import lora as lora_adapters
from swatkit.batches import collate, encode, encode_all, order, step_batches  # noqa: F401
from swatkit.defences import restore  # noqa: F401 (train.restore: the post-tuning defences)
from swatkit.checkpoint import fingerprint
from swatkit.files import SwatError
from swatkit.runlog import RunLog
from swatkit.speedups import adamw_foreach, adamw_fused, stochastic_round


class AdamW:
    """AdamW (decoupled weight decay) over parameter groups.

    Each group may carry its own lr, betas, eps, weight_decay and a "trainable" flag, and counts its
    own steps (for the bias correction). The trainer scales every group's lr by .scale (the
    schedule). impl: "reference" (the update below, tensor by tensor), or two speed-ups computing
    the same: "foreach" (each line over all tensors at once) and "fused" (torch's one-kernel AdamW,
    the default on a GPU: one pass over the state instead of seven).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, impl=None):
        params = list(params)
        if not params:
            raise SwatError("AdamW: no parameters to optimise")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        checks.optimizer_args(groups, lr, betas, eps, weight_decay, impl)
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, trainable=True, step=0
        )
        self.param_groups = [{**defaults, **g, "params": list(g["params"])} for g in groups]
        self.scale = 1.0
        on_gpu = all(p.is_cuda for g in self.param_groups for p in g["params"])
        self.impl = impl or ("fused" if on_gpu else "reference")
        # m (mean of gradients) and v (mean of squared gradients) of every parameter
        # the two moments of every parameter, fp32 whatever the weights' dtype
        self.state = {
            p: (torch.zeros_like(p, dtype=torch.float32), torch.zeros_like(p, dtype=torch.float32))
            for g in self.param_groups
            for p in g["params"]
        }

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every trainable group; closure re-evaluates the loss, as torch.optim's."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            params = [p for p in g["params"] if p.grad is not None]
            if not g["trainable"] or not params:
                continue
            g["step"] += 1
            lr = g["lr"] * self.scale
            hyper = (lr, *g["betas"], g["eps"], g["weight_decay"], g["step"])
            for p in [p for p in params if p.dtype == torch.bfloat16]:
                # bf16 weights: the update is made in fp32, then rounded stochastically
                weight = p.float()
                adamw_update(weight, p.grad.float(), *self.state[p], *hyper)
                distributed.local(p).copy_(stochastic_round(distributed.local(weight)))
            params = [p for p in params if p.dtype != torch.bfloat16]
            if not params:
                continue
            if self.impl == "reference":
                for p in params:
                    m, v = self.state[p]
                    adamw_update(
                        p, p.grad, m, v, lr, *g["betas"], g["eps"], g["weight_decay"], g["step"]
                    )
            else:
                update = adamw_fused if self.impl == "fused" else adamw_foreach
                moments = [self.state[p] for p in params]
                update(
                    params,
                    [p.grad for p in params],
                    [m for m, _ in moments],
                    [v for _, v in moments],
                    lr,
                    *g["betas"],
                    g["eps"],
                    g["weight_decay"],
                    g["step"],
                )
        return loss

    def zero_grad(self, set_to_none=True):
        for g in self.param_groups:
            for p in g["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()


def adamw_update(p, grad, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """The AdamW update of one tensor, one line per line of the algorithm (Loshchilov & Hutter)."""
    m.lerp_(grad, 1 - beta1)  # m <- beta1 m + (1 - beta1) g
    v.mul_(beta2)
    v.addcmul_(grad, grad, value=1 - beta2)  # v <- beta2 v + (1 - beta2) g^2
    if weight_decay:
        p.mul_(1 - lr * weight_decay)  # decoupled decay: shrink the weight, not the gradient
    # bias correction: m and v start at zero, so early on they are divided by (1 - beta^step)
    denom = v.sqrt()
    denom.div_(math.sqrt(1 - beta2**step))
    denom.add_(eps)
    p.addcdiv_(m, denom, value=-lr / (1 - beta1**step))  # p <- p - lr m_hat / (sqrt(v_hat) + eps)


def loss_fn(net, ids, labels):
    """The summed cross-entropy of the response tokens (the prompt's labels are -100)."""
    logits = net(ids[:, :-1])
    targets = labels[:, 1:].flatten()
    return F.cross_entropy(
        logits.float().flatten(0, 1), targets, ignore_index=-100, reduction="sum"
    )


def vaccine_perturbation(net, ids, labels, rho):
    """Vaccine's worst-case perturbation of the hidden states (Huang et al. 2024, perturbation-
    aware alignment): the loss's gradient with respect to every block's output, scaled so that all
    of them together have norm rho -> one tensor per block (no weight gradient is left behind)."""
    states = []
    keep = [block.register_forward_hook(lambda m, a, out: states.append(out)) for block in
            net.model.layers]  # fmt: skip
    try:
        with torch.enable_grad():  # the gradient is needed even where the caller has none
            grads = torch.autograd.grad(loss_fn(net, ids, labels), states)
    finally:
        for hook in keep:
            hook.remove()
    norm = torch.sqrt(sum(g.float().pow(2).sum() for g in grads))
    return [rho * g / (norm + 1e-12) for g in grads]


def vaccine_loss(net, ids, labels, rho):
    """loss_fn with Vaccine's perturbation added to every block's output: aligning under it makes
    the refusals survive the drift of the hidden states that later fine-tuning brings (two forward
    and backward passes a step instead of one)."""
    noise = vaccine_perturbation(net, ids, labels, rho)
    add = [block.register_forward_hook(lambda m, a, out, e=e: out + e) for block, e in
           zip(net.model.layers, noise)]  # fmt: skip
    try:
        return loss_fn(net, ids, labels)
    finally:
        for hook in add:
            hook.remove()


# ---- modules, strategies and phases ----


def param_groups(net, strategy, mods, lr, ratio, weight_decay, scope="all"):
    """Groups by (selected, slowed, matrix): the selected modules and the rest, matrices decayed,
    norms and biases not. mllr gives the rest lr * ratio: every other parameter (scope "all") or
    only the other modules of Mods_Rob's kinds, e.g. the other q/k/v/o (scope "modules": MLPs,
    embeddings and norms keep lr). swat starts with the rest frozen. With LoRA the parameters are
    the adapters, each belonging to the module it wraps."""
    if scope not in ("all", "modules"):
        raise SwatError(f"unknown mllr scope {scope!r}; choose all or modules")
    chosen = {f"model.layers.{layer}.{MODULES[m]}." for layer, m in mods}
    kinds = {f".{MODULES[m]}." for _, m in mods}
    groups = {}
    for name, p in net.named_parameters():
        if not p.requires_grad:  # frozen before training starts: LoRA's base weights
            continue
        selected = strategy == "ift" or any(name.startswith(c) for c in chosen)
        of_kind = scope == "all" or any(k in name for k in kinds)
        slowed = strategy == "mllr" and not selected and of_kind
        matrix = p.ndim >= 2
        if (selected, slowed, matrix) not in groups:
            groups[(selected, slowed, matrix)] = {
                "params": [],
                "names": [],
                "selected": selected,
                "lr": lr * ratio if slowed else lr,
                "weight_decay": weight_decay if matrix else 0.0,
                "trainable": selected or strategy != "swat",
            }
        groups[(selected, slowed, matrix)]["params"].append(p)
        groups[(selected, slowed, matrix)]["names"].append(name)
    return list(groups.values())


def warmup_length(strategy, steps, warmup_frac=0.2, warmup_steps=None):
    """SWAT's phase 1 length in steps (the one place it is computed): warmup_steps if given, else
    warmup_frac of the steps of normal training. Other strategies have no phase 1."""
    if type(steps) is not int or steps < 0 or not checks.finite(warmup_frac):
        raise SwatError(
            f"warmup_length: steps ({steps!r}) and warmup_frac ({warmup_frac!r}) must be >= 0"
        )
    if strategy not in ("ift", "swat", "mllr"):
        raise SwatError(f"warmup_length: unknown strategy {strategy!r}; choose ift, swat or mllr")
    if strategy != "swat":
        return 0
    return warmup_steps if warmup_steps is not None else round(warmup_frac * steps)


def enter_phase(opt, phase):
    """Phase 1 (SWAT's warm-up): only the selected groups train; the others are frozen (no gradient,
    no update, so their moments stay zero and their step counts 0). Phase 2: every group trains; the
    released groups then start from zero moments and their own bias correction."""
    for g in opt.param_groups:
        g["trainable"] = g["selected"] or phase == 2
        for p in g["params"]:
            p.requires_grad_(g["trainable"])


def schedule(step, total, warmup_frac=0.1):
    """Linear warm-up of the learning rate, then cosine decay to zero."""
    warmup = max(1, int(warmup_frac * total))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ---- the loop ----


def train(
    net,
    tok,
    chats,  # the tuning data: chats that end with the reply to learn
    out,  # the checkpoint folder (new, or one swat-min wrote)
    strategy="ift",  # ift, swat or mllr
    mods=(),  # Mods_Rob: {(layer, module)}, e.g. from parse_mods
    steps=100,  # optimizer steps of normal training (phase 2 of swat)
    lr=2e-5,  # the peak learning rate
    batch_size=8,
    accum=1,  # micro-batches per step
    warmup_steps=0,  # swat: steps of phase 1, before `steps`
    ratio=0.1,  # mllr: the rest's learning rate is lr * ratio
    weight_decay=0.0,  # on matrices only
    clip=1.0,  # the gradient norm is clipped to this
    max_len=512,  # tokens per example
    seed=0,  # the data order
    save_every=0,  # a checkpoint every N steps (0: at the end only)
    resume=False,  # go on from the checkpoint in out
    grad_ckpt=False,  # recompute activations in the backward pass (less memory)
    compile=False,  # torch.compile each block
    long="stop",  # a prompt of max_len tokens or more: "stop", "skip" (counted) or "truncate"
    scope="all",  # mllr: "all" other parameters are slowed, or only other "modules" of its kinds
    keep_optimizer=False,  # keep the Adam moments in the final checkpoint (only resume needs them)
    label=None,  # the progress bar's name (default: the strategy)
    lora=None,  # LoRA instead of full tuning: {"r": rank, "alpha": alpha, "targets": [q, ...]}
    watch=None,  # (N, fn): every N steps, fn(net)'s numbers join the step's log row
    vaccine=0.0,  # align: Vaccine's perturbation norm rho (0: plain training)
):
    """Tune net on chats; write an HF checkpoint (plus optimizer state) to out. -> the log rows.

    steps: of normal training; swat adds warmup_steps of phase 1 before them.
    """
    checks.train_args(dict(locals()))  # every argument, before anything else is defined
    book = RunLog(out, tok)  # the folder's bookkeeping: recovery, resume, log, checkpoints
    device = net.model.embed_tokens.weight.device
    if net.model.embed_tokens.weight.dtype != torch.float32 and not lora:
        print("bf16 weights: fp32 Adam moments, each update rounded stochastically into bf16")
    if strategy == "swat" and warmup_steps == 0:
        print("swat with 0 warm-up steps is plain ift (raise --warmup-frac or --warmup-steps)")
    data = encode_all(tok, chats, max_len, long)
    source = fingerprint(net)  # the weights it starts from (before any adapter): resume checks them
    lora = lora and lora_adapters.settings(lora)  # alpha and targets may be left to defaults
    if lora:  # adapters on the target modules; every other parameter frozen (swatkit/lora.py)
        lora_adapters.add(net, lora["r"], lora["alpha"], lora["targets"], seed)
    if distributed.size() > 1:  # FSDP2: each process keeps a shard of every block
        distributed.shard(net, lora, batch_size)
    net.train()
    net.grad_ckpt = grad_ckpt
    if compile:  # per block, so parameter names (and checkpoints) stay those of the checkpoint
        for layer in net.model.layers:
            layer.compile()
    opt = AdamW(param_groups(net, strategy, mods, lr, ratio, weight_decay, scope), lr)
    phase1 = warmup_steps if strategy == "swat" else 0
    total = phase1 + steps
    # what the updates depend on besides the groups, saved with every checkpoint for resume
    book.settings(opt, source, data, phases=[phase1, steps], lr=lr, batch_size=batch_size,
                  accum=accum, ratio=ratio, weight_decay=weight_decay, clip=clip, seed=seed,
                  lora=lora)  # fmt: skip
    step, rows = book.start(opt, net, resume, total)
    if step == total:
        return finish(net, rows)
    if device.type == "cuda":
        amp = torch.autocast("cuda", torch.bfloat16)  # fp32 weights, bf16 matrix products
    else:
        amp = torch.autocast("cpu", enabled=False)
    enter_phase(opt, 1 if step < phase1 else 2)
    bar = tqdm(range(step, total), desc=label or strategy, initial=step, total=total,
               disable=not book.main)  # fmt: skip
    for step in bar:
        if step == phase1 and phase1 > 0:
            enter_phase(opt, 2)  # SWAT's switch: the rest is released
        if step < phase1:
            opt.scale = schedule(step, phase1)
        else:  # the schedule starts again in phase 2
            opt.scale = schedule(step - phase1, steps)
        start_time = time.time()
        micro = step_batches(data, seed, step, accum, batch_size)
        # the loss is a mean over every response token of the step
        n_resp = sum(sum(t != -100 for t in labels[1:]) for mb in micro for _, labels in mb)
        loss_sum = 0.0
        n_tokens = 0
        for mb in micro:
            ids, labels = collate(distributed.share(mb), device)  # this process's part
            with amp:
                # FSDP averages the processes' gradients: each one's part counts size() times
                if vaccine:  # aligned under the worst hidden-state drift of norm `vaccine`
                    loss = vaccine_loss(net, ids, labels, vaccine)
                else:
                    loss = loss_fn(net, ids, labels)
                loss = loss * distributed.size() / max(1, n_resp)
            loss.backward()
            loss_sum += loss.item()
            n_tokens += ids.numel()
        loss_sum = distributed.total(loss_sum) / distributed.size()  # the whole step's loss
        with_grad = [p for p in net.parameters() if p.grad is not None]
        grad_norm = distributed.whole(torch.nn.utils.clip_grad_norm_(with_grad, clip))
        if not (math.isfinite(loss_sum) and grad_norm.isfinite()):
            # stopped before the update: the weights and the checkpoint stay whole
            raise SwatError(
                f"non-finite loss or gradient at step {step + 1}; stopped before updating the "
                f"weights (lower --lr); {book.kept()}"
            )
        first = rows[0]["loss"] if rows else loss_sum  # this run's first loss
        if loss_sum > 4 * first + 2:  # far above where it began: the rate is too high
            raise SwatError(
                f"the loss exploded at step {step + 1} ({first:.3g} at the start, now "
                f"{loss_sum:.3g}); stopped before updating the weights (lower --lr); {book.kept()}"
            )
        opt.step()
        opt.zero_grad()
        row = {
            "step": step + 1,
            "phase": "warmup" if step < phase1 else "main",
            "loss": loss_sum,
            "lr": lr * opt.scale,
            "grad_norm": grad_norm.item(),
            "tokens_per_s": n_tokens / (time.time() - start_time),
        }
        if watch and (step + 1) % watch[0] == 0:  # e.g. the probe's accuracy on the model now
            row.update(watch[1](net))
        rows.append(row)
        bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{row['lr']:.2e}")
        book.record(row)
        if save_every and (step + 1) % save_every == 0 and step + 1 < total:
            book.save(net, opt, step + 1, rows)
    book.save(net, opt, total, rows, moments=keep_optimizer)
    return finish(net, rows)


def finish(net, rows):
    """The trained net (LoRA adapters merged in), back to evaluation mode with every parameter
    trainable; -> the log rows."""
    lora_adapters.merge(net)
    for p in net.parameters():
        p.requires_grad_(True)
    net.eval()
    net.grad_ckpt = False
    return rows
