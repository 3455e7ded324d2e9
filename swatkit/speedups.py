"""AdamW's two speed-ups, computing what train.adamw_update computes (tested against it and against
torch.optim.AdamW): "foreach" (each line of the update over all tensors at once) and "fused"
(torch's one-kernel AdamW, one pass over the state: the default on a GPU); and the stochastic
rounding that lets bf16 weights take updates smaller than their last bit."""

import math

import torch


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
