"""Robustness-scan wall time: swat-min's scan (hidden states below the perturbed layer cached) against the
naive way (a full forward for every perturbation), same model and prompts; the two tables must be equal.

    python bench/bench_scan.py          # SmolLM2-135M shape, 30 layers x q/k/v/o, 256 prompts
    python bench/bench_scan.py --tiny   # CPU smoke test
"""
import time
import torch
from common import args, emit, ours, reference, SHAPES, sync
import probe, robustness as rb


def main():
    a = args(lambda ap: ap.add_argument("--prompts", type=int, default=256))
    shape = "tiny" if a.tiny else "smollm2-135m"
    n = 32 if a.tiny else a.prompts
    net = ours(reference(shape, "cpu"), a.device)
    g = torch.Generator().manual_seed(0)
    V, dev = SHAPES[shape]["vocab_size"], torch.device(a.device)
    ids = torch.randint(3, V, (n, 48), generator=g).to(dev)
    y = torch.cat([torch.ones(n // 2), torch.zeros(n - n // 2)])
    batches = []
    with torch.no_grad():
        for b in range(0, n, 64):  # the same cached inputs as rb.prefix builds, from random prompts
            rope, attn = net.context(48, None, dev)
            _, hs = net(ids[b:b + 64], hidden=True, last=True)
            batches.append((hs[:-1], rope, attn))
        X = rb.features_from(net, batches, 0)
    X[:, : n // 2] += 0.05 * X.std()  # a separable "harmful" direction, so the probes have something to lose
    probes = probe.fit_layers(X, y)
    times, tables = {}, {}
    for naive in (False, True):
        sync(a.device)
        t = time.perf_counter()
        tables[naive] = rb.scan(net, probes, batches, y, naive=naive)
        sync(a.device)
        times[naive] = time.perf_counter() - t
    emit(bench="scan", case=f"{shape} {net.cfg.n_layers} layers x q,k,v,o, {n} prompts", device=a.device,
         swat_s=round(times[False], 2), naive_s=round(times[True], 2), ratio=round(times[True] / times[False], 3),
         identical=tables[False] == tables[True])


if __name__ == "__main__":
    main()
