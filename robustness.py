"""Module robustness analysis: perturb each module (Q/K/V/O of every layer) with Gaussian noise,
measure how far the per-layer security probes move, and call the modules that barely move them
Mods_Rob.

The rule: W <- W + scale * std(W) * N(0, 1) (its bias too, with the bias's own std), one seeded draw
per (layer, module, repeat). The change of a module is the rise of the probes' mean log-loss,
averaged over the layers after it (only those can change) and over repeats. Mods_Rob: the k modules
with the smallest change. Hidden states below the perturbed layer do not change, so they are
computed once and reused.
"""

import json
import os

import torch
from tqdm import tqdm

from files import SwatError, write_text
from model import MODULES, pad_left


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
def prefix(net, tok, instructions, batch_size=32):
    """Per batch of prompts: the input of every layer at every position, the rotary table and
    mask."""
    device = net.model.embed_tokens.weight.device
    prompts = [tok.encode_chat([{"role": "user", "content": s}]) for s in instructions]
    batches = []
    for b in range(0, len(prompts), batch_size):
        ids, mask = pad_left(prompts[b : b + batch_size], device)
        rope, attn = net.context(ids.shape[1], mask)
        states = net.hidden_states(ids, mask)
        batches.append((states[:-1], rope, attn))  # states[l] is the input of layer l
    return batches


@torch.no_grad()
def features_from(net, batches, start):
    """Last-token features [layers + 1, N, D], running only layers >= start on the cached prefix."""
    last = net.cfg.n_layers - 1
    out = []
    for states, rope, attn in batches:
        # the layers below start are unchanged: their features come from the cache
        feats = [x[:, -1] for x in states[: start + 1]]
        h = states[start]
        for i in range(start, net.cfg.n_layers):
            h = net.model.layers[i](h, rope, attn)
            feats.append((net.model.norm(h) if i == last else h)[:, -1])
        out.append(torch.stack(feats).float().cpu())
    return torch.cat(out, 1)


@torch.no_grad()
def perturb(params, generator, scale):
    """W <- W + scale * std(W) * N(0, 1), in place, for each tensor of a module."""
    for p in params:
        noise = torch.randn(p.shape, generator=generator).to(p)
        p.add_(noise * (scale * p.float().std().item()))


def scan(
    net, probes, batches, y, modules=("q", "k", "v", "o"), scale=0.5, repeats=1, seed=0, naive=False
):
    """-> {module: [change per layer]}. naive=True recomputes every layer (to check the prefix
    reuse)."""
    n_layers = net.cfg.n_layers
    clean = features_from(net, batches, 0)
    base = [p.score(x, y)["loss"] for p, x in zip(probes, clean)]
    table = {m: [0.0] * n_layers for m in modules}
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
                table[name][layer] += sum(rise) / len(rise) / repeats
                with torch.no_grad():  # put the weights back exactly
                    for p, s in zip(params, saved):
                        p.copy_(s)
            assert all(torch.equal(p, s) for p, s in zip(params, saved)), "weights not restored"
    return table


def choose(table, k):
    """Mods_Rob: the k modules with the smallest change; also the k with the largest (the
    control)."""
    ranked = sorted((v, layer, m) for m, row in table.items() for layer, v in enumerate(row))
    if not 0 < k <= len(ranked):
        raise SwatError(f"k={k} must be between 1 and {len(ranked)}")
    robust = [[layer, m] for _, layer, m in ranked[:k]]
    fragile = [[layer, m] for _, layer, m in ranked[-k:]]
    return robust, fragile


def heatmap(table):
    """The paper's figure in the terminal: modules as rows, layers as columns, darker = less robust
    (shades by rank among all modules)."""
    shades = " .:-=+*#%@"
    values = sorted(v for row in table.values() for v in row)
    n_layers = len(next(iter(table.values())))
    lines = ["      " + "".join(f"{layer % 10}" for layer in range(n_layers))]
    for name, row in table.items():
        ranks = [min(9, int(10 * values.index(v) / len(values))) for v in row]
        lines.append(f"{name:>5} " + "".join(shades[r] for r in ranks))
    lines.append("      (layers mod 10; ' ' most robust ... '@' least robust, by rank)")
    return "\n".join(lines)


def write(path, table, rob, fragile, settings):
    """The scan as JSON (atomically); "written_by" marks it as a file a later scan may replace."""
    scan = {
        "written_by": "swat-min",
        "settings": settings,
        "metric": "rise of probe log-loss, mean over later layers",
        "table": table,
        "mods_rob": rob,
        "mods_fragile": fragile,
    }
    write_text(os.fspath(path), json.dumps(scan, indent=1))
