"""Instruction fine-tuning with a hand-written AdamW, and the three strategies:

  ift   all parameters at the base learning rate (plain IFT, the baseline).
  swat  phase 1 (warm-up): only the Mods_Rob modules train; phase 2: all parameters, exactly as ift.
  mllr  Mods_Rob at the base learning rate, every other parameter (scope "modules": every other module of
        Mods_Rob's kinds) at base * ratio.

At the SWAT phase boundary the Mods_Rob groups keep their Adam moments (their optimisation just goes
on), the newly released groups start from zero moments and their own bias correction (as if just
created), and the learning-rate schedule starts again, so phase 2 is plain IFT from a better start.
"""
import hashlib, json, math, os, time
import torch
import torch.nn.functional as F
from tqdm import tqdm
import model
from checkpoint import fingerprint, read_log, recover
import checks
from files import SwatError, check_folder, claim, read_json, write_text
from robustness import MODULES


class AdamW:
    """AdamW (decoupled weight decay) over parameter groups; each group may carry its own lr, betas, eps,
    weight_decay and a 'trainable' flag. The trainer scales every group's lr by .scale (the schedule)."""
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=None):
        params = list(params)
        if not params:
            raise SwatError("AdamW: no parameters to optimise")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        checks.optimizer_args(groups, lr, betas, eps, weight_decay)
        self.param_groups = [{"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "trainable": True,
                              "step": 0, **g, "params": list(g["params"])} for g in groups]
        self.scale = 1.0
        self.fused = fused if fused is not None else all(p.is_cuda for g in self.param_groups for p in g["params"])
        self.state = {p: (torch.zeros_like(p), torch.zeros_like(p)) for g in self.param_groups for p in g["params"]}

    @torch.no_grad()
    def step(self, closure=None):  # closure: re-evaluates the loss (with gradients), as torch.optim's
        loss = torch.enable_grad()(closure)() if closure else None
        for g in self.param_groups:
            ps = [p for p in g["params"] if p.grad is not None]
            if not g["trainable"] or not ps:
                continue
            g["step"] += 1
            (b1, b2), eps, lr, grads = g["betas"], g["eps"], g["lr"] * self.scale, [p.grad for p in ps]
            ms, vs = [self.state[p][0] for p in ps], [self.state[p][1] for p in ps]
            if self.fused:  # on a GPU: the update below as torch's fused kernel, one pass over the state
                t = torch.tensor(float(g["step"]), device=ps[0].device)  # instead of 7 (up to 7 % of a step)
                torch._fused_adamw_(ps, grads, ms, vs, [], [t] * len(ps), lr=lr, beta1=b1, beta2=b2,
                                    weight_decay=g["weight_decay"], eps=eps, amsgrad=False, maximize=False)
                continue
            torch._foreach_lerp_(ms, grads, 1 - b1)                     # m <- b1 m + (1 - b1) g
            torch._foreach_mul_(vs, b2)
            torch._foreach_addcmul_(vs, grads, grads, value=1 - b2)     # v <- b2 v + (1 - b2) g^2
            if g["weight_decay"]:
                torch._foreach_mul_(ps, 1 - lr * g["weight_decay"])     # decoupled: shrink the weights
            denom = torch._foreach_sqrt(vs)
            torch._foreach_div_(denom, math.sqrt(1 - b2 ** g["step"]))
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(ps, ms, denom, value=-lr / (1 - b1 ** g["step"]))
        return loss

    def zero_grad(self, set_to_none=True):
        for g in self.param_groups:
            for p in g["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()


# ---- examples -> batches ----

def encode(tok, chat, max_len, where="example"):
    """-> (ids, labels): labels are -100 on the prompt, so the loss counts only the response tokens."""
    full = tok.encode_chat(chat, add_generation_prompt=False)
    # the reply starts where the same chat with an empty reply stops agreeing (not where the generation prompt
    # ends: some templates rearrange a chat that ends with a reply, e.g. Mistral v0.3 drops the system prompt)
    empty = tok.encode_chat(chat[:-1] + [dict(chat[-1], content="")], add_generation_prompt=False)
    n = next((i for i, (a, b) in enumerate(zip(empty, full)) if a != b), len(empty))
    if n >= max_len:
        raise SwatError(f"{where}: prompt of {n} tokens does not fit max length {max_len}")
    full = full[:max_len]
    return full, [-100] * n + full[n:]


def encode_all(tok, chats, max_len, skip_long=False, what="example"):
    """Encode every chat; one whose prompt does not fit max_len is an error, or, with skip_long, left out
    (and counted, so nothing is dropped silently)."""
    out = []
    for i, c in enumerate(chats):
        try:
            out.append(encode(tok, c, max_len, f"{what} {i + 1}"))
        except SwatError:
            if not skip_long:
                raise
    if len(out) < len(chats):
        print(f"left out {len(chats) - len(out)} of {len(chats)} {what}s whose prompt exceeds {max_len} tokens")
    if not out:
        raise SwatError(f"no {what} fits max length {max_len}")
    return out


def collate(rows, device):
    """Right padding: causal attention never looks ahead, so pads need no mask and sdpa stays fast."""
    T = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([i + [0] * (T - len(i)) for i, _ in rows], device=device)
    labels = torch.tensor([l + [-100] * (T - len(l)) for _, l in rows], device=device)
    return ids, labels


def loss_fn(net, ids, labels):
    logits = net(ids[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")


def order(n, seed, epoch):
    """The data order of an epoch: a pure function of (seed, epoch), so a resumed run sees the same."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


# ---- modules and strategies ----

def parse_mods(spec, n_layers, key="mods_rob"):
    """'q,k' (all layers), '0-11:q,k;12-29:v', or a scan JSON (its mods_rob list) -> set of (layer, m)."""
    spec = os.fspath(spec)
    if spec.endswith(".json"):
        try:
            pairs = [(int(l), m, spec) for l, m in read_json(spec)[key]]
        except (KeyError, TypeError, ValueError):
            raise SwatError(f"{spec}: no '{key}' list of [layer, module] pairs") from None
    else:
        pairs = []
        for part in filter(None, spec.replace(" ", "").split(";")):
            rng, _, names = part.rpartition(":")
            lo, _, hi = (rng or f"0-{n_layers - 1}").partition("-")
            try:
                layers = range(int(lo), int(hi or lo) + 1)
            except ValueError:
                raise SwatError(f"module selector {part!r}: bad layer range {rng!r}") from None
            pairs += [(l, m, f"module selector {part!r}") for m in names.split(",") for l in layers]
    for l, m, where in pairs:  # a scan of another model is caught here too
        if m not in MODULES:
            raise SwatError(f"{where}: unknown module {m!r}; choose from {', '.join(MODULES)}")
        if not 0 <= l < n_layers:
            raise SwatError(f"{where}: layer {l} out of range 0-{n_layers - 1}")
    if not pairs:
        raise SwatError(f"module selector {spec!r} selects nothing")
    return {(l, m) for l, m, _ in pairs}


def param_groups(net, strategy, mods, lr, ratio, weight_decay, scope="all"):
    """Groups by (selected, slowed, matrix): selected modules / the rest, matrices decayed, norms and biases
    not. mllr gives the rest lr * ratio: every other parameter (scope "all") or only the other modules of
    Mods_Rob's kinds, e.g. the other q/k/v/o (scope "modules": MLPs, embeddings, norms keep lr). swat starts
    with the rest frozen."""
    if scope not in ("all", "modules"):
        raise SwatError(f"unknown mllr scope {scope!r}; choose all or modules")
    chosen = {f"model.layers.{l}.{MODULES[m]}." for l, m in mods}
    kinds = {f".{MODULES[m]}." for _, m in mods}
    groups = {}
    for name, p in net.named_parameters():
        sel = strategy == "ift" or any(name.startswith(c) for c in chosen)
        slow = strategy == "mllr" and not sel and (scope == "all" or any(k in name for k in kinds))
        g = groups.setdefault((sel, slow, p.ndim >= 2), {"params": [], "names": [], "selected": sel,
                              "lr": lr * ratio if slow else lr, "weight_decay": weight_decay if p.ndim >= 2 else 0.0,
                              "trainable": sel or strategy != "swat"})
        g["params"].append(p)
        g["names"].append(name)
    return list(groups.values())


def schedule(step, total, warmup_frac=0.1):
    """Linear warm-up, then cosine decay to zero."""
    w = max(1, int(warmup_frac * total))
    return (step + 1) / w if step < w else 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, total - w)))


def train(net, tok, chats, out, strategy="ift", mods=(), steps=100, lr=2e-5, batch_size=8, accum=1,
          warmup_steps=0, ratio=0.1, weight_decay=0.0, clip=1.0, max_len=512, seed=0, save_every=0,
          resume=False, grad_ckpt=False, compile=False, skip_long=False, scope="all"):
    """Tune net on chats; write an HF checkpoint (plus optimizer state) to out. Returns the log rows."""
    checks.train_args(strategy, mods, steps, lr, batch_size, accum, warmup_steps, ratio, weight_decay,
                      clip, max_len, save_every)
    out = os.path.abspath(os.fspath(out))
    recover(out)  # a save a fault interrupted is finished (or rolled back) first
    check_folder(out, tok)  # checked now, not after the training
    if net.model.embed_tokens.weight.dtype != torch.float32:  # on CUDA, fp32 weights still compute in bf16 (autocast)
        print("training low-precision weights: small updates are rounded away; load with dtype fp32")
    if strategy == "swat" and warmup_steps == 0:
        print("swat with 0 warm-up steps is plain ift (raise --warmup-frac or --warmup-steps)")
    data = encode_all(tok, chats, max_len, skip_long)
    dev = net.model.embed_tokens.weight.device
    # resume checks that the model it starts from is this one (a hash of its weights, taken before any step)
    source = fingerprint(net)
    net.train().grad_ckpt = grad_ckpt
    if compile:  # per block, so parameter names (and checkpoints) stay those of the checkpoint
        for layer in net.model.layers:
            layer.compile()
    opt = AdamW(param_groups(net, strategy, mods, lr, ratio, weight_decay, scope), lr)
    phase1 = warmup_steps if strategy == "swat" else 0
    total, step, rows = phase1 + steps, 0, []
    # what the updates depend on besides the groups (the schedule on the phases' steps): saved with every
    # checkpoint and checked by resume, so that a run is never continued with other data or settings unsaid
    opt.settings = dict(phases=[phase1, steps], lr=lr, batch_size=batch_size, accum=accum, ratio=ratio,
                        weight_decay=weight_decay, clip=clip, seed=seed, model=source,
                        data=hashlib.sha256(json.dumps(data).encode()).hexdigest()[:16])
    state, log = os.path.join(out, "trainer.safetensors"), os.path.join(out, "log.jsonl")
    if resume and os.path.exists(state):
        step = _load_state(opt, net, out)
        rows = read_log(log, step)  # the log up to the checkpoint: the steps after it are done again
    elif resume:
        print(f"{out}: no checkpoint to resume from; starting afresh")
    claim(out, "log.jsonl")  # the folder is swat-min's from now on; the log is written at every step
    if step == 0:  # a fresh run: a fresh log
        write_text(log, "")
    saved = step  # the step of the checkpoint in out (0: none yet)
    amp = torch.autocast("cuda", torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    bar = tqdm(range(step, total), desc=strategy, initial=step, total=total)
    per_epoch = max(1, len(data) // batch_size)
    for step in bar:
        in_p1 = step < phase1
        for g in opt.param_groups:  # phase 1 of swat: the rest is frozen (no gradient, no update)
            g["trainable"] = g["selected"] or not in_p1
            for p in g["params"]:
                p.requires_grad_(g["trainable"])
        opt.scale = schedule(step, phase1) if in_p1 else schedule(step - phase1, steps)
        t0, loss_sum, ntok, micro = time.time(), 0.0, 0, []
        for k in range(step * accum, (step + 1) * accum):  # micro-batch k of the seeded epoch order
            idx = order(len(data), seed, k // per_epoch)[(k % per_epoch) * batch_size:][:batch_size]
            micro.append([data[i] for i in idx])
        n_resp = sum(sum(x != -100 for x in l[1:]) for mb in micro for _, l in mb)  # the loss is a mean over them
        for mb in micro:
            ids, labels = collate(mb, dev)
            with amp:
                loss = loss_fn(net, ids, labels) / max(1, n_resp)
            loss.backward()
            loss_sum += loss.item()
            ntok += ids.numel()
        gnorm = torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.grad is not None], clip)
        if not (math.isfinite(loss_sum) and gnorm.isfinite()):  # before the update: the weights stay whole
            kept = f"{out} keeps the checkpoint of step {saved}" if saved else "no checkpoint was saved"
            raise SwatError(f"non-finite loss or gradient at step {step + 1} (lr too high?); stopped "
                            f"before updating the weights; {kept}")
        opt.step()
        opt.zero_grad()
        row = {"step": step + 1, "phase": "warmup" if in_p1 else "main", "loss": loss_sum,
               "lr": lr * opt.scale, "grad_norm": gnorm.item(), "tokens_per_s": ntok / (time.time() - t0)}
        rows.append(row)
        bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if save_every and (step + 1) % save_every == 0 and step + 1 < total:
            _save(net, tok, opt, out, step + 1, rows)
            saved = step + 1
    for p in net.parameters():
        p.requires_grad_(True)
    _save(net, tok, opt, out, total, rows)
    net.eval().grad_ckpt = False
    return rows


def _save(net, tok, opt, out, step, rows):
    names = {p: n for g in opt.param_groups for p, n in zip(g["params"], g["names"])}
    tensors = {f"{k}.{names[p]}": t for p, (m, v) in opt.state.items() for k, t in (("m", m), ("v", v))}
    meta = {"step": step, "group_steps": [g["step"] for g in opt.param_groups],
            "groups": [g["names"] for g in opt.param_groups], "settings": opt.settings}  # what resume checks
    log = "".join(json.dumps(r) + "\n" for r in rows)  # save() replaces the folder: the log goes with it
    model.save(net, tok, out, extra={"trainer.safetensors": tensors, "trainer.json": meta, "log.jsonl": log})


def _load_state(opt, net, out):
    """Put the checkpoint in out back into net and opt; -> its step. A checkpoint of another run, or a
    damaged one, is one line that says so."""
    try:
        return _read_state(opt, net, out)
    except SwatError:
        raise
    except Exception as e:  # a truncated safetensors file, a trainer.json without its fields
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SwatError(f"{out}: its checkpoint is damaged ({reason}); it cannot be resumed: train "
                        "without --resume, into a new folder") from None


def _read_state(opt, net, out):
    from safetensors import safe_open
    from safetensors.torch import load_file
    meta = read_json(os.path.join(out, "trainer.json"))
    other = SwatError(f"{out}: its checkpoint was trained with another strategy, module set, number of steps, "
                      "model, data or settings; resume with the same ones, or train into a new folder")
    names = [g["names"] for g in opt.param_groups]
    if (meta.get("groups"), meta.get("settings")) != (names, opt.settings):
        raise other
    if type(meta.get("step")) is not int or len(meta.get("group_steps", ())) != len(names):
        raise ValueError("trainer.json has no step or group_steps")
    dev, params = str(net.model.embed_tokens.weight.device), net.state_dict()
    tensors = load_file(os.path.join(out, "trainer.safetensors"), device=dev)
    with safe_open(os.path.join(out, "model.safetensors"), framework="pt", device=dev) as f:
        for name in f.keys():  # our own save: the same names; one tensor at a time, no second copy
            t = f.get_tensor(name)
            if name not in params or t.shape != params[name].shape:
                raise other
            params[name].copy_(t)
    for g, s in zip(opt.param_groups, meta["group_steps"]):
        g["step"] = s
        for p, n in zip(g["params"], g["names"]):
            opt.state[p][0].copy_(tensors[f"m.{n}"])
            opt.state[p][1].copy_(tensors[f"v.{n}"])
    return meta["step"]
