"""Training-step throughput: swat-min's loop pieces (train.loss_fn + train.AdamW) against
transformers LlamaForCausalLM (sdpa) + torch.optim.AdamW(fused=True), same weights, shapes, dtype
and device. bf16 autocast with fp32 weights on CUDA, fp32 on CPU. One JSON line per case.

    python bench/bench_train.py            # the GPU cases
    python bench/bench_train.py --tiny     # a CPU smoke test in seconds
    --compile also measures swat-min with every block compiled (train --compile), against the same
    reference
"""

import gc
import torch
from common import parse_args, emit, ours, peak_gb, peak_reset, reference, timed, SHAPES
import train

CASES = [("smollm2-135m", 16, 512), ("smollm2-135m", 32, 1024), ("llama-3.2-1b", 8, 1024)]
TINY = [("tiny", 4, 64), ("tiny", 8, 128)]
# dense bf16 FLOP/s of an H100 SXM or H200 (NVIDIA's spec; twice that is with sparsity)
PEAK = 989.4e12


def flops_per_token(shape, T):
    s = SHAPES[shape]
    d = s["hidden_size"]
    L = s["num_hidden_layers"]
    f = s["intermediate_size"]
    V = s["vocab_size"]
    kv = d * s["num_key_value_heads"] // s["num_attention_heads"]
    n = L * (2 * d * d + 2 * d * kv + 3 * d * f) + d * V  # matmul weights, with the output head
    return 6 * n + 6 * L * d * T  # forward + backward, plus causal attention scores


def measure(step, device, steps):
    step()  # warm-up (and compilation)
    step()
    peak_reset(device)
    return timed(step, device, steps), peak_gb(device)


def main():
    args = parse_args(
        lambda ap: (
            ap.add_argument("--steps", type=int, default=10),
            ap.add_argument("--compile", action="store_true"),
        )
    )
    cuda = args.device.startswith("cuda")
    amp = lambda: (
        torch.autocast("cuda", torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    )
    for shape, B, T in TINY if args.tiny else CASES:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, SHAPES[shape]["vocab_size"], (B, T), generator=g).to(args.device)
        labels = ids.clone()
        ref = reference(shape, args.device).train()
        ropt = torch.optim.AdamW(ref.parameters(), lr=1e-5, fused=True)

        def ref_step():
            with amp():
                loss = ref(input_ids=ids, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
            ropt.step()
            ropt.zero_grad(set_to_none=True)

        ref_s, ref_mem = measure(ref_step, args.device, args.steps)
        net = ours(ref, args.device).train()
        ref = ropt = None  # frees the reference's memory (its step closure sees None now)
        gc.collect()
        opt = train.AdamW(net.parameters(), lr=1e-5)

        def our_step():
            with amp():
                loss = train.loss_fn(net, ids, labels) / (B * (T - 1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            opt.zero_grad()

        tok = B * T
        fpt = flops_per_token(shape, T)
        for compiled in (False, True) if args.compile else (False,):  # the same reference for both
            if compiled:
                for layer in net.model.layers:
                    layer.compile()
            our_s, our_mem = measure(our_step, args.device, args.steps)
            emit(
                bench="train",
                case=f"{shape} {B}x{T}",
                device=args.device,
                compile=compiled,
                swat_tok_s=round(tok / our_s),
                ref_tok_s=round(tok / ref_s),
                ratio=round(ref_s / our_s, 3),
                swat_mfu=round(tok / our_s * fpt / PEAK, 3) if cuda else None,
                ref_mfu=round(tok / ref_s * fpt / PEAK, 3) if cuda else None,
                swat_peak_gb=our_mem,
                ref_peak_gb=ref_mem,
            )
        net = opt = None  # frees this case's model before the next one
        gc.collect()


if __name__ == "__main__":
    main()
