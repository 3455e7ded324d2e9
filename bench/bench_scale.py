"""The paper's scale on one GPU: a training step of an 8B model (the Llama-3.1-8B shape, random
weights), batch 8 x 1024, activation checkpointing on both sides, in two modes:

- lora: bf16 frozen base, rank-8 adapters on q,k,v,o,gate,up,down (fp32), against transformers +
  peft (the same adapters) + torch.optim.AdamW(fused=True);
- full: bf16 weights, fp32 Adam moments and stochastic rounding of each update (train.AdamW),
  against transformers with bf16 weights + torch.optim.AdamW(fused=True), whose moments are bf16
  and whose updates are rounded to nearest (the usual way, and the one whose small updates vanish).

Both sides run in this process on the same device, weights and batch (bf16 autocast on CUDA). Each
line: tokens/s, MFU against the 989 TFLOP/s bf16 dense peak (LoRA counts 4 FLOPs per weight and
token: no weight gradients), peak memory, memory.plan's estimate for swat-min (what `train
--dry-run` prints), and the first step's loss on each side (the same weights: they must agree).

    python bench/bench_scale.py             # the 8B cases (one H200, about 3 minutes)
    python bench/bench_scale.py --tiny      # a CPU smoke test
"""

import gc

import torch
from bench_train import PEAK, flops_per_token, measure
from common import SHAPES, emit, ours, parse_args, reference

from swatkit import lora
from swatkit import memory
import train

CASES = [("llama-3.1-8b", "lora", 8, 1024), ("llama-3.1-8b", "full", 8, 1024)]
TINY = [("tiny", "lora", 4, 64), ("tiny", "full", 4, 64)]
TARGETS = ["q", "k", "v", "o", "gate", "up", "down"]
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_flops_per_token(shape, T):
    """LoRA's step: the forward (2 per weight) and the input gradients (2), no weight gradients;
    attention's own work as in full training. The adapters' few FLOPs are left out."""
    full = flops_per_token(shape, T)
    s = SHAPES[shape]
    attention = 6 * s["num_hidden_layers"] * s["hidden_size"] * T
    return (full - attention) * 4 // 6 + attention


def main():
    args = parse_args(lambda ap: ap.add_argument("--steps", type=int, default=5))
    cuda = args.device.startswith("cuda")
    amp = lambda: (
        torch.autocast("cuda", torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    )
    for shape, mode, B, T in TINY if args.tiny else CASES:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, SHAPES[shape]["vocab_size"], (B, T), generator=g).to(args.device)
        ref = reference(shape, args.device, torch.bfloat16).train()
        net = ours(ref, "cpu", torch.bfloat16)  # the same weights, kept aside while ref runs
        ref.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if mode == "lora":
            import peft

            config = peft.LoraConfig(
                r=8, lora_alpha=16, lora_dropout=0.0, target_modules=HF_TARGETS
            )
            ref = peft.get_peft_model(ref, config)
        trained = [p for p in ref.parameters() if p.requires_grad]
        ropt = torch.optim.AdamW(trained, lr=1e-5, fused=cuda)
        losses = {}

        def ref_step():
            with amp():
                loss = ref(input_ids=ids, labels=ids).loss
            losses.setdefault("ref", loss.item())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            ropt.step()
            ropt.zero_grad(set_to_none=True)

        ref_s, ref_mem = measure(ref_step, args.device, args.steps)
        ref = ropt = trained = None  # frees the reference before swat-min's model comes in
        gc.collect()
        net = net.to(args.device).train()
        net.grad_ckpt = True
        if mode == "lora":
            lora.add(net, 8, 16, TARGETS)
        params = [p for p in net.parameters() if p.requires_grad]
        opt = train.AdamW(params, lr=1e-5)

        def our_step():
            with amp():
                loss = train.loss_fn(net, ids, ids) / (B * (T - 1))
            losses.setdefault("swat", loss.item())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad()

        our_s, our_mem = measure(our_step, args.device, args.steps)
        adapters = {"r": 8, "targets": TARGETS} if mode == "lora" else None
        plan = memory.plan(net.cfg, B, T, 2, adapters, grad_ckpt=True, on_gpu=cuda)["total"]
        tok = B * T
        fpt = lora_flops_per_token(shape, T) if mode == "lora" else flops_per_token(shape, T)
        emit(
            bench="scale",
            case=f"{shape} {mode} {B}x{T}",
            device=args.device,
            swat_tok_s=round(tok / our_s),
            ref_tok_s=round(tok / ref_s),
            ratio=round(ref_s / our_s, 3),
            swat_mfu=round(tok / our_s * fpt / PEAK, 3) if cuda else None,
            ref_mfu=round(tok / ref_s * fpt / PEAK, 3) if cuda else None,
            swat_peak_gb=our_mem,
            ref_peak_gb=ref_mem,
            swat_plan_gb=round(plan / 2**30, 2),
            first_loss=[round(losses["swat"], 4), round(losses["ref"], 4)],
        )
        net = opt = params = None  # frees this case's model before the next one
        gc.collect()


if __name__ == "__main__":
    main()
