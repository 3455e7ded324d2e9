"""Generation throughput for the ASR evaluation: batched greedy decoding of prompts of different
lengths, swat-min's model.generate against transformers' generate (left padding, KV cache), same
weights. Every row must generate exactly the same number of tokens (no early stop), so tokens/s
compare. On a GPU, swat-min is measured with and without its CUDA-graph decoding step.

    python bench/bench_generate.py          # SmolLM2-135M shape, 256 prompts x 64 new tokens
    python bench/bench_generate.py --tiny   # CPU smoke test
"""

import torch
from common import parse_args, emit, ours, reference, timed, SHAPES
import model


def main():
    args = parse_args(
        lambda ap: (
            ap.add_argument("--prompts", type=int, default=256),
            ap.add_argument("--new", type=int, default=64),
            ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16"),
        )
    )
    shape = "tiny" if args.tiny else "smollm2-135m"
    n, new = (32, 16) if args.tiny else (args.prompts, args.new)
    dtype = (
        torch.bfloat16 if args.dtype == "bf16" and args.device.startswith("cuda") else torch.float32
    )
    g = torch.Generator().manual_seed(0)
    V = SHAPES[shape]["vocab_size"]
    prompts = [
        torch.randint(3, V, (int(L),), generator=g).tolist()
        for L in torch.randint(20, 80, (n,), generator=g)
    ]
    ref = reference(shape, args.device, dtype)
    net = ours(ref, args.device, dtype)
    L = max(map(len, prompts))
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts], device=args.device)
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts], device=args.device)
    out = {}

    def run_ref():
        out["ref"] = ref.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )[:, L:].tolist()

    with torch.no_grad():
        run_ref()  # warm-up
        ref_s = timed(run_ref, args.device, 2)
    for graph in (False, True) if args.device.startswith("cuda") else (False,):

        def run_ours():  # one batch, as transformers gets (swat-min would also sort by length)
            out["ours"] = model.generate(
                net, prompts, new, stop_ids=[], batch_size=n, cuda_graph=graph
            )

        run_ours()
        our_s = timed(run_ours, args.device, 2)
        same = sum(x == y for x, y in zip(out["ours"], out["ref"])) / n
        emit(
            bench="generate",
            case=f"{shape} {n} prompts x {new} new, {str(dtype)[6:]}",
            device=args.device,
            cuda_graph=graph,
            swat_tok_s=round(n * new / our_s),
            ref_tok_s=round(n * new / ref_s),
            ratio=round(ref_s / our_s, 3),
            rows_identical=same,
        )


if __name__ == "__main__":
    main()
