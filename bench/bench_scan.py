"""Robustness-scan wall time: swat-min's scan (scan_cache.py: hidden states below the perturbed
layer cached, the prompts' shared opening computed once) against the naive way (the model's full
forward, embeddings to logits, for every perturbation), and against re-running every layer on the
cache (layers_s); same model and prompts (a shared opening of 24 tokens, 24 of their own); the
tables must agree (to 1e-6; the naive way's matrix shapes differ).

    python bench/bench_scan.py          # SmolLM2-135M shape, 30 layers x q/k/v/o, 256 prompts
    python bench/bench_scan.py --tiny   # CPU smoke test
"""

import time
import torch
from common import parse_args, emit, ours, reference, SHAPES, sync
import probe
import robustness as rb
from swatkit import scan_cache


class Prompts:
    """A stand-in tokenizer: prompt i is a shared opening of 24 tokens (as a chat template's system
    prompt) and 24 tokens of its own, all random."""

    def __init__(self, n, vocab, generator):
        self.opening = torch.randint(3, vocab, (24,), generator=generator).tolist()
        self.rows = torch.randint(3, vocab, (n, 24), generator=generator).tolist()

    def encode_chat(self, messages):
        return self.opening + self.rows[int(messages[0]["content"])]


def main():
    args = parse_args(lambda ap: ap.add_argument("--prompts", type=int, default=256))
    shape = "tiny" if args.tiny else "smollm2-135m"
    n = 32 if args.tiny else args.prompts
    net = ours(reference(shape, "cpu"), args.device)
    g = torch.Generator().manual_seed(0)
    tok = Prompts(n, SHAPES[shape]["vocab_size"], g)
    dev = torch.device(args.device)
    ids = torch.tensor([tok.encode_chat([{"content": str(i)}]) for i in range(n)], device=dev)
    y = torch.cat([torch.ones(n // 2), torch.zeros(n - n // 2)])
    batches = scan_cache.prefix(net, tok, [str(i) for i in range(n)], batch_size=64)
    X = scan_cache.features_from(net, batches, 0)
    # a separable "harmful" direction, so the probes have something to lose
    X[:, : n // 2] += 0.05 * X.std()
    probes = probe.fit_layers(X, y)

    @torch.no_grad()
    def full_forward(net, batches, start):
        """The naive way: the model's whole forward, from the token ids, for every perturbation."""
        hs = [net(ids[b : b + 64], hidden=True)[1] for b in range(0, n, 64)]
        return torch.cat([torch.stack([h[:, -1] for h in x]).float().cpu() for x in hs], 1)

    times = {}
    tables = {}
    cached = rb.features_from
    for way in ("swat", "layers", "naive"):  # layers: every layer re-run on the cached embeddings
        rb.features_from = full_forward if way == "naive" else cached
        sync(args.device)
        t = time.perf_counter()
        tables[way] = rb.scan(net, probes, batches, y, naive=way != "swat")["later"]
        sync(args.device)
        times[way] = time.perf_counter() - t
    rb.features_from = cached
    emit(
        bench="scan",
        case=f"{shape} {net.cfg.n_layers} layers x q,k,v,o, {n} prompts",
        device=args.device,
        swat_s=round(times["swat"], 2),
        naive_s=round(times["naive"], 2),
        ratio=round(times["naive"] / times["swat"], 3),
        layers_s=round(times["layers"], 2),
        ratio_layers=round(times["layers"] / times["swat"], 3),
        identical=tables["swat"] == tables["layers"],
        max_diff_naive=max_diff(tables["swat"], tables["naive"]),
    )


def max_diff(first, second):
    """The largest difference between two scan tables."""
    return max(abs(a - b) for m in first for a, b in zip(first[m], second[m]))


if __name__ == "__main__":
    main()
