"""Module robustness analysis: perturb each module (Q/K/V/O of every layer) with Gaussian noise, measure
how far the per-layer security probes move, and call the modules that barely move them Mods_Rob.

The rule: W <- W + scale * std(W) * N(0, 1) (its bias too, with the bias's own std), one seeded draw per
(layer, module, repeat). The change of a module is the rise of the probes' mean log-loss, averaged over
the layers after it (only those can change) and over repeats. Mods_Rob: the k modules with the smallest
change. Hidden states below the perturbed layer do not change, so they are computed once and reused.
"""
import json, os
import torch
from tqdm import tqdm
from files import SwatError, write_text
from model import pad_left

MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def module(net, layer, name):
    if name not in MODULES:
        raise SwatError(f"unknown module {name!r}; choose from {', '.join(MODULES)}")
    if not 0 <= layer < net.cfg.n_layers:
        raise SwatError(f"layer {layer} out of range 0-{net.cfg.n_layers - 1}")
    return net.model.layers[layer].get_submodule(MODULES[name])


@torch.no_grad()
def prefix(net, tok, instructions, batch_size=32):
    """Per batch: the input of every layer at every position, with the rotary table and mask."""
    dev, out = net.model.embed_tokens.weight.device, []
    prompts = [tok.encode_chat([{"role": "user", "content": s}]) for s in instructions]
    for b in range(0, len(prompts), batch_size):
        ids, mask = pad_left(prompts[b:b + batch_size], dev)
        rope, attn = net.context(ids.shape[1], mask, dev)
        _, hs = net(ids, mask, hidden=True, last=True)
        out.append((hs[:-1], rope, attn))  # hs[l] is the input of layer l
    return out


@torch.no_grad()
def features_from(net, batches, start):
    """Last-token features [layers + 1, N, D], running only layers >= start on the cached prefix."""
    out = []
    for hs, rope, attn in batches:
        feats, h = [x[:, -1] for x in hs[:start + 1]], hs[start]
        for i in range(start, net.cfg.n_layers):
            h = net.model.layers[i](h, rope, attn)
            feats.append((net.model.norm(h) if i == net.cfg.n_layers - 1 else h)[:, -1])
        out.append(torch.stack(feats).float().cpu())
    return torch.cat(out, 1)


def scan(net, probes, batches, y, modules=("q", "k", "v", "o"), scale=0.5, repeats=1, seed=0, naive=False):
    """-> {module: [change per layer]}. naive=True recomputes every layer (to check the prefix reuse)."""
    L = net.cfg.n_layers
    base = [p.score(x, y)["loss"] for p, x in zip(probes, features_from(net, batches, 0))]
    table = {m: [0.0] * L for m in modules}
    for layer in tqdm(range(L), desc="scan"):
        for m in modules:
            params = list(module(net, layer, m).parameters())
            saved = [p.detach().clone() for p in params]
            for r in range(repeats):  # a module's noise is the same whichever others are scanned with it
                g = torch.Generator().manual_seed(seed * 1_000_003 + layer * 1009 + list(MODULES).index(m) * 101 + r)
                with torch.no_grad():
                    for p in params:
                        p.add_(torch.randn(p.shape, generator=g).to(p) * (scale * p.float().std().item()))
                X = features_from(net, batches, 0 if naive else layer)
                rise = [probes[j].score(X[j], y)["loss"] - base[j] for j in range(layer + 1, L + 1)]
                table[m][layer] += sum(rise) / len(rise) / repeats
                with torch.no_grad():
                    for p, s in zip(params, saved):
                        p.copy_(s)
            assert all(torch.equal(p, s) for p, s in zip(params, saved)), "weights not restored"
    return table


def choose(table, k):
    """Mods_Rob: the k modules with the smallest change; also the k with the largest (for the control)."""
    ranked = sorted((v, layer, m) for m, row in table.items() for layer, v in enumerate(row))
    if not 0 < k <= len(ranked):
        raise SwatError(f"k={k} must be between 1 and {len(ranked)}")
    return [[l, m] for _, l, m in ranked[:k]], [[l, m] for _, l, m in ranked[-k:]]


def heatmap(table):
    """The paper's figure in the terminal: modules as rows, layers as columns, darker = less robust."""
    shades, vals = " .:-=+*#%@", sorted(v for row in table.values() for v in row)
    rank = lambda v: min(9, int(10 * vals.index(v) / len(vals)))
    head = "      " + "".join(f"{l % 10}" for l in range(len(next(iter(table.values())))))
    return "\n".join([head] + [f"{m:>5} " + "".join(shades[rank(v)] for v in row) for m, row in table.items()]
                     + ["      (layers mod 10; ' ' most robust ... '@' least robust, by rank)"])


def write(path, table, rob, fragile, settings):
    """The scan as JSON (atomically); "written_by" marks it as a file a later scan may replace."""
    scan = {"written_by": "swat-min", "settings": settings,
            "metric": "rise of probe log-loss, mean over later layers",
            "table": table, "mods_rob": rob, "mods_fragile": fragile}
    write_text(os.fspath(path), json.dumps(scan, indent=1))
