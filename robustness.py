"""Module robustness analysis: perturb each module (Q/K/V/O of every layer) with Gaussian noise
and measure how far the fixed security probe moves; the modules that barely move it are Mods_Rob
(selection.py chooses the set).

The rule: W <- W + scale * std(W) * N(0, 1) (its bias too, with the bias's own std), one seeded draw
per (layer, module, repeat). A module's change is the drop of the readout probe's accuracy (the
paper's metric; the rise of its log-loss breaks ties) or, to compare, the rise of the probes' mean
log-loss over the layers after it. Hidden states below the perturbed layer do not change, so they
are computed once and reused (scan_cache.py keeps them).
"""

import torch
from tqdm import tqdm

from files import SwatError
from model import MODULES
from scan_cache import features_from, last_token_features


def module(net, layer, name):
    """The nn.Module of `name` (a key of MODULES) in block `layer`."""
    if name not in MODULES:
        raise SwatError(f"unknown module {name!r}; choose from {', '.join(MODULES)}")
    if not 0 <= layer < net.cfg.n_layers:
        raise SwatError(f"layer {layer} out of range 0-{net.cfg.n_layers - 1}")
    return net.model.layers[layer].get_submodule(MODULES[name])


def noise_seed(seed, layer, name, repeat):
    """The seed of one noise draw: a module's noise is the same whichever others are scanned."""
    return seed * 1_000_003 + layer * 1009 + list(MODULES).index(name) * 101 + repeat


@torch.no_grad()
def perturb(params, generator, scale):
    """W <- W + scale * std(W) * N(0, 1), in place, for each tensor of a module."""
    for p in params:
        noise = torch.randn(p.shape, generator=generator).to(p)
        p.add_(noise * (scale * p.float().std().item()))


def scan(
    net,
    probes,
    batches,
    y,
    modules=("q", "k", "v", "o"),
    scale=0.5,
    repeats=1,
    seed=0,
    naive=False,
    readout=None,
):
    """Perturb every module of every layer -> the scan: tables {module: [value per layer]} of

      later      the rise of the probes' mean log-loss over the layers after the module (the
                 earlier metric, kept to compare);
      acc_drop   the drop of the fixed readout probe's accuracy (the paper's metric), and
      loss_rise  the rise of its log-loss (the continuous tie-breaker),

    averaged over `repeats` noise draws; "draws" keeps each draw's acc_drop and loss_rise, "halves"
    the same measured on each half of the prompts (for the stability of the ranking). readout: the
    probe's layer (default: the last, the final-normed states). naive=True recomputes every layer
    (to check the prefix reuse).
    """
    n_layers = net.cfg.n_layers
    readout = n_layers if readout is None else readout
    probe = probes[readout]
    halves = prompt_halves(y)
    clean = last_token_features(net, batches)  # the cache already holds the unperturbed states
    base = [p.score(x, y)["loss"] for p, x in zip(probes, clean)]
    # the readout probe's score before any noise: on all prompts, then on each half
    base_readout = [probe.score(clean[readout], y)]
    base_readout += [probe.score(clean[readout][h], y[h]) for h in halves]

    def zeros():
        return {m: [0.0] * n_layers for m in modules}

    readout_metrics = ("acc_drop", "loss_rise")
    result = {"readout": readout, "later": zeros(), "acc_drop": zeros(), "loss_rise": zeros()}
    result["draws"] = {
        k: {m: [[] for _ in range(n_layers)] for m in modules} for k in readout_metrics
    }
    result["halves"] = {k: [zeros() for _ in halves] for k in readout_metrics}
    for layer in tqdm(range(n_layers), desc="scan"):
        for name in modules:
            params = list(module(net, layer, name).parameters())
            saved = [p.detach().clone() for p in params]
            for r in range(repeats):
                generator = torch.Generator().manual_seed(noise_seed(seed, layer, name, r))
                perturb(params, generator, scale)
                X = features_from(net, batches, 0 if naive else layer)
                # only the layers after the perturbed one can change
                later = range(layer + 1, n_layers + 1)
                rise = [probes[j].score(X[j], y)["loss"] - base[j] for j in later]
                result["later"][name][layer] += sum(rise) / len(rise) / repeats
                # the readout probe, on all prompts (this draw's figures), then on each half
                acc_drop, loss_rise = readout_change(probe, X[readout], y, None, base_readout[0])
                result["acc_drop"][name][layer] += acc_drop / repeats
                result["loss_rise"][name][layer] += loss_rise / repeats
                result["draws"]["acc_drop"][name][layer].append(acc_drop)
                result["draws"]["loss_rise"][name][layer].append(loss_rise)
                for h, half in enumerate(halves):
                    acc_drop, loss_rise = readout_change(
                        probe, X[readout], y, half, base_readout[h + 1]
                    )
                    result["halves"]["acc_drop"][h][name][layer] += acc_drop / repeats
                    result["halves"]["loss_rise"][h][name][layer] += loss_rise / repeats
                with torch.no_grad():  # put the weights back exactly
                    for p, s in zip(params, saved):
                        p.copy_(s)
            assert all(torch.equal(p, s) for p, s in zip(params, saved)), "weights not restored"
    return result


def readout_change(probe, X, y, part, before):
    """(accuracy drop, log-loss rise) of the readout probe on features X against its score before
    the noise; part: the prompts to score (None: all)."""
    if part is not None:
        X = X[part]
        y = y[part]
    after = probe.score(X, y)
    return before["acc"] - after["acc"], after["loss"] - before["loss"]


def prompt_halves(y):
    """Two halves of the scan prompts, each with half of every class (index tensors)."""
    first = []
    second = []
    for label in (1, 0):
        index = (y == label).nonzero().flatten()
        first.append(index[: len(index) // 2])
        second.append(index[len(index) // 2 :])
    return [torch.cat(first), torch.cat(second)]


def ranking(scan_result, metric="readout", source=None):
    """Every (layer, module), most robust first.

    metric "readout": by the readout probe's accuracy drop, then its log-loss rise; "later": by the
    mean log-loss rise over the later layers. source: other tables of the same shape to rank instead
    (one noise draw's, or one prompt half's).
    """
    tables = source or scan_result
    if metric == "later":
        later = tables["later"]
        keys = {(layer, m): (v,) for m, row in later.items() for layer, v in enumerate(row)}
    else:
        acc = tables["acc_drop"]
        loss = tables["loss_rise"]
        keys = {
            (layer, m): (acc[m][layer], loss[m][layer]) for m in acc for layer in range(len(acc[m]))
        }
    # ties go to the lower layer, then the module name, so that the order is reproducible
    return sorted(keys, key=lambda lm: (keys[lm], lm))


def choose(scan_result, k, metric="readout"):
    """Mods_Rob: the k most robust modules; also the k least robust (the control)."""
    ranked = ranking(scan_result, metric)
    if not 0 < k <= len(ranked):
        raise SwatError(f"k={k} must be between 1 and {len(ranked)}")
    robust = [[layer, m] for layer, m in ranked[:k]]
    fragile = [[layer, m] for layer, m in ranked[-k:]]
    return robust, fragile
