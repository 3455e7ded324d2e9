"""Robustness-scan wall time: swat-min's scan (hidden states below the perturbed layer cached)
against the naive way (the model's full forward, embeddings to logits, for every perturbation), and
against re-running every layer on cached embeddings without logits (layers_s); same model and
prompts; the tables must be equal.

    python bench/bench_scan.py          # SmolLM2-135M shape, 30 layers x q/k/v/o, 256 prompts
    python bench/bench_scan.py --tiny   # CPU smoke test
"""

import time
import torch
from common import parse_args, emit, ours, reference, SHAPES, sync
import probe
import robustness as rb


def main():
    args = parse_args(lambda ap: ap.add_argument("--prompts", type=int, default=256))
    shape = "tiny" if args.tiny else "smollm2-135m"
    n = 32 if args.tiny else args.prompts
    net = ours(reference(shape, "cpu"), args.device)
    g = torch.Generator().manual_seed(0)
    V = SHAPES[shape]["vocab_size"]
    dev = torch.device(args.device)
    ids = torch.randint(3, V, (n, 48), generator=g).to(dev)
    y = torch.cat([torch.ones(n // 2), torch.zeros(n - n // 2)])
    batches = []
    with torch.no_grad():
        for b in range(0, n, 64):  # the same cached inputs as rb.prefix builds, from random prompts
            rope, attn = net.context(48)
            hs = net.hidden_states(ids[b : b + 64])
            batches.append((hs[:-1], rope, attn))
        X = rb.features_from(net, batches, 0)
    # a separable "harmful" direction, so the probes have something to lose
    X[:, : n // 2] += 0.05 * X.std()
    probes = probe.fit_layers(X, y)

    def full_forward(
        net, batches, start
    ):  # the naive way: the model's whole forward, from the token ids
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
        identical=tables["swat"] == tables["layers"] == tables["naive"],
    )


if __name__ == "__main__":
    main()
