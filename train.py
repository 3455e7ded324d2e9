"""Instruction fine-tuning with a hand-written AdamW, and the three strategies:

  ift   all parameters at the base learning rate (plain IFT, the baseline).
  swat  phase 1 (warm-up): only the Mods_Rob modules train; phase 2: all parameters, exactly as ift.
  mllr  Mods_Rob at the base learning rate, every other parameter (scope "modules": every other
        module of Mods_Rob's kinds) at base * ratio.

SWAT's switch to phase 2 is one named step of the loop (enter_phase): the Mods_Rob groups keep their
Adam moments (their optimisation just goes on), the released groups start from zero moments and
their own bias correction (as if just created), and the learning-rate schedule starts again, so
phase 2 is plain IFT from a better start.

With LoRA (lora.py) the same holds for the adapters: the base weights are frozen throughout.
"""

import hashlib
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import checks
import distributed
import lora as lora_adapters
from checkpoint import fingerprint, load_trainer, read_log, recover, save_trainer
from files import SwatError, check_folder, claim, read_json, write_text
from model import MODULES


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


def stochastic_round(x):
    """fp32 -> bf16, rounded up or down at random, up with the probability of x's distance from the
    lower neighbour: the mean of many roundings is x. (bf16 keeps fp32's top 16 bits; an update
    smaller than half their last place would always round back to the old weight and vanish.)"""
    bits = x.view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def adamw_foreach(ps, grads, ms, vs, lr, beta1, beta2, eps, weight_decay, step):
    """Speed-up: adamw_update's lines, each over all tensors of a group at once."""
    torch._foreach_lerp_(ms, grads, 1 - beta1)
    torch._foreach_mul_(vs, beta2)
    torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
    if weight_decay:
        torch._foreach_mul_(ps, 1 - lr * weight_decay)
    denom = torch._foreach_sqrt(vs)
    torch._foreach_div_(denom, math.sqrt(1 - beta2**step))
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(ps, ms, denom, value=-lr / (1 - beta1**step))


def adamw_fused(ps, grads, ms, vs, lr, beta1, beta2, eps, weight_decay, step):
    """Speed-up: adamw_update as torch's fused kernel, one pass over the state (GPU)."""
    steps = [torch.tensor(float(step), device=ps[0].device)] * len(ps)
    torch._fused_adamw_(
        ps,
        grads,
        ms,
        vs,
        [],
        steps,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        weight_decay=weight_decay,
        eps=eps,
        amsgrad=False,
        maximize=False,
    )


# ---- examples -> batches ----


def encode(tok, chat, max_len, where="example"):
    """-> (ids, labels): labels are -100 on the prompt, so the loss counts only the response
    tokens."""
    full = tok.encode_chat(chat, add_generation_prompt=False)
    # the reply starts where the same chat with an empty reply stops agreeing (not where the
    # generation prompt ends: some templates rearrange a chat that ends with a reply, e.g. Mistral
    # v0.3 drops the system prompt)
    empty_reply = chat[:-1] + [dict(chat[-1], content="")]
    empty = tok.encode_chat(empty_reply, add_generation_prompt=False)
    n = next((i for i, (a, b) in enumerate(zip(empty, full)) if a != b), len(empty))
    if n >= max_len:
        raise SwatError(f"{where}: prompt of {n} tokens does not fit max length {max_len}")
    full = full[:max_len]
    return full, [-100] * n + full[n:]


def encode_all(tok, chats, max_len, skip_long=False, what="example"):
    """Encode every chat; one whose prompt does not fit max_len is an error, or, with skip_long,
    left
    out (and counted, so nothing is dropped silently)."""
    out = []
    for i, chat in enumerate(chats):
        try:
            out.append(encode(tok, chat, max_len, f"{what} {i + 1}"))
        except SwatError:
            if not skip_long:
                raise
    if len(out) < len(chats):
        left_out = len(chats) - len(out)
        print(f"left out {left_out} of {len(chats)} {what}s whose prompt exceeds {max_len} tokens")
    if not out:
        raise SwatError(f"no {what} fits max length {max_len}")
    return out


def collate(rows, device):
    """Right padding: causal attention never looks ahead, so pads need no mask and sdpa stays
    fast."""
    width = max(len(ids) for ids, _ in rows)
    ids = [i + [0] * (width - len(i)) for i, _ in rows]
    labels = [l + [-100] * (width - len(l)) for _, l in rows]
    return torch.tensor(ids, device=device), torch.tensor(labels, device=device)


def loss_fn(net, ids, labels):
    """The summed cross-entropy of the response tokens (the prompt's labels are -100)."""
    logits = net(ids[:, :-1])
    targets = labels[:, 1:].flatten()
    return F.cross_entropy(
        logits.float().flatten(0, 1), targets, ignore_index=-100, reduction="sum"
    )


def order(n, seed, epoch):
    """The data order of an epoch: a pure function of (seed, epoch), so a resumed run sees the
    same."""
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n, generator=generator).tolist()


# ---- modules, strategies and phases ----


def parse_mods(spec, n_layers, key="mods_rob"):
    """'q,k' (all layers), '0-11:q,k;12-29:v', or a scan JSON (its mods_rob list) -> {(layer,
    m)}."""
    spec = os.fspath(spec)
    if spec.endswith(".json"):
        try:
            pairs = [(int(layer), m, spec) for layer, m in read_json(spec)[key]]
        except (KeyError, TypeError, ValueError):
            raise SwatError(f"{spec}: no '{key}' list of [layer, module] pairs") from None
    else:
        pairs = []  # (layer, module, the part of the selector that named it)
        for part in filter(None, spec.replace(" ", "").split(";")):
            layers_text, _, names = part.rpartition(":")
            lo, _, hi = (layers_text or f"0-{n_layers - 1}").partition("-")
            try:
                layers = range(int(lo), int(hi or lo) + 1)
            except ValueError:
                raise SwatError(
                    f"module selector {part!r}: bad layer range {layers_text!r}"
                ) from None
            where = f"module selector {part!r}"
            pairs += [(layer, m, where) for m in names.split(",") for layer in layers]
    for layer, m, where in pairs:  # a scan of another model is caught here too
        if m not in MODULES:
            raise SwatError(f"{where}: unknown module {m!r}; choose from {', '.join(MODULES)}")
        if not 0 <= layer < n_layers:
            raise SwatError(f"{where}: layer {layer} out of range 0-{n_layers - 1}")
    if not pairs:
        raise SwatError(f"module selector {spec!r} selects nothing")
    return {(layer, m) for layer, m, _ in pairs}


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
    skip_long=False,  # leave out (and count) examples whose prompt exceeds max_len
    scope="all",  # mllr: "all" other parameters are slowed, or only other "modules" of its kinds
    keep_optimizer=False,  # keep the Adam moments in the final checkpoint (only resume needs them)
    label=None,  # the progress bar's name (default: the strategy)
    lora=None,  # LoRA instead of full tuning: {"r": rank, "alpha": alpha, "targets": [q, ...]}
    watch=None,  # (N, fn): every N steps, fn(net)'s numbers join the step's log row
):
    """Tune net on chats; write an HF checkpoint (plus optimizer state) to out. -> the log rows.

    steps: of normal training; swat adds warmup_steps of phase 1 before them.
    """
    checks.train_args(dict(locals()))  # every argument, before anything else is defined
    out = os.path.abspath(os.fspath(out))
    main = distributed.rank() == 0  # under torchrun (distributed.py) only the first one writes
    if main:
        recover(out)  # a save that a fault interrupted is finished (or rolled back) first
    check_folder(out, tok)  # checked now, not after the training
    device = net.model.embed_tokens.weight.device
    if net.model.embed_tokens.weight.dtype != torch.float32 and not lora:
        print("bf16 weights: fp32 Adam moments, each update rounded stochastically into bf16")
    if strategy == "swat" and warmup_steps == 0:
        print("swat with 0 warm-up steps is plain ift (raise --warmup-frac or --warmup-steps)")
    data = encode_all(tok, chats, max_len, skip_long)
    source = fingerprint(net)  # the weights it starts from: resume checks them
    if lora:  # adapters on the target modules; every other parameter frozen (lora.py)
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
    # what the updates depend on besides the groups: saved with every checkpoint and checked by
    # resume, so that a run is never continued with another model, data or settings unsaid
    data_hash = hashlib.sha256(json.dumps(data).encode()).hexdigest()[:16]
    opt.settings = dict(
        phases=[phase1, steps],
        lr=lr,
        batch_size=batch_size,
        accum=accum,
        ratio=ratio,
        weight_decay=weight_decay,
        clip=clip,
        seed=seed,
        model=source,
        data=data_hash,
        lora=lora,
    )
    log = os.path.join(out, "log.jsonl")
    step = 0
    rows = []
    if resume and os.path.exists(os.path.join(out, "trainer.json")):
        step = load_trainer(opt, net, out)
        # the log up to the checkpoint: the steps after it are done again
        rows = read_log(log, step)
        if step == total:  # a finished run: its final checkpoint stands as it is
            print(f"{out}: already complete ({total} steps)")
            return finish(net, rows)
    elif resume:
        print(f"{out}: no checkpoint to resume from; starting afresh")
    if main:  # the folder is swat-min's from now on; the log grows at every step
        claim(out, "log.jsonl")
    if main and step == 0:
        write_text(log, "")
    saved = step  # the step of the checkpoint in out (0: none yet)
    if device.type == "cuda":
        amp = torch.autocast("cuda", torch.bfloat16)  # fp32 weights, bf16 matrix products
    else:
        amp = torch.autocast("cpu", enabled=False)
    enter_phase(opt, 1 if step < phase1 else 2)
    per_epoch = max(1, len(data) // batch_size)
    bar = tqdm(
        range(step, total), desc=label or strategy, initial=step, total=total, disable=not main
    )
    for step in bar:
        if step == phase1 and phase1 > 0:
            enter_phase(opt, 2)  # SWAT's switch: the rest is released
        if step < phase1:
            opt.scale = schedule(step, phase1)
        else:  # the schedule starts again in phase 2
            opt.scale = schedule(step - phase1, steps)
        start_time = time.time()
        # the micro-batches of this step: k-th slice of the seeded order of its epoch
        micro = []
        for k in range(step * accum, (step + 1) * accum):
            idx = order(len(data), seed, k // per_epoch)[(k % per_epoch) * batch_size :][
                :batch_size
            ]
            micro.append([data[i] for i in idx])
        # the loss is a mean over every response token of the step
        n_resp = sum(sum(t != -100 for t in labels[1:]) for mb in micro for _, labels in mb)
        loss_sum = 0.0
        n_tokens = 0
        for mb in micro:
            ids, labels = collate(distributed.share(mb), device)  # this process's part
            with amp:
                # FSDP averages the processes' gradients: each one's part counts size() times
                loss = loss_fn(net, ids, labels) * distributed.size() / max(1, n_resp)
            loss.backward()
            loss_sum += loss.item()
            n_tokens += ids.numel()
        loss_sum = distributed.total(loss_sum) / distributed.size()  # the whole step's loss
        with_grad = [p for p in net.parameters() if p.grad is not None]
        grad_norm = distributed.whole(torch.nn.utils.clip_grad_norm_(with_grad, clip))
        if not (math.isfinite(loss_sum) and grad_norm.isfinite()):
            # stopped before the update: the weights and the checkpoint stay whole
            kept = (
                f"{out} keeps the checkpoint of step {saved}"
                if saved
                else "no checkpoint was saved"
            )
            raise SwatError(
                f"non-finite loss or gradient at step {step + 1} (lr too high?); stopped "
                f"before updating the weights; {kept}"
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
        if main:
            with open(log, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        if save_every and (step + 1) % save_every == 0 and step + 1 < total:
            save_trainer(net, tok, opt, out, step + 1, rows)
            saved = step + 1
    save_trainer(net, tok, opt, out, total, rows, moments=keep_optimizer)
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
