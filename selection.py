"""Choosing Mods_Rob from a robustness scan: the proxy-guided search over module sets, and how
stable a ranking is across noise draws and prompt halves.

Modules that are robust one at a time can be fragile together, so the search grows a set in order of
single-module robustness and perturbs the whole candidate set *jointly* at each step: a module is
kept only while the joint change of the readout probe stays within a tolerance. The curve (set size
-> joint change) is recorded, so a reader sees where the set stops being robust.
"""

import json
import os

import torch
from tqdm import tqdm

import figures
import robustness as rb
import scan_cache
from files import write_text


def search(order, joint_change, tolerance, max_size):
    """Grow a set along `order` (most robust first); keep a module only if joint_change(set with it)
    <= tolerance; stop at max_size modules. -> (the set, the curve: one record per module tried)."""
    chosen = []
    curve = []
    for module in tqdm(order, desc="search", leave=False):
        change = joint_change(chosen + [module])
        kept = change <= tolerance
        curve.append(
            {"module": list(module), "size": len(chosen) + 1, "change": change, "kept": kept}
        )
        if kept:
            chosen.append(module)
        if len(chosen) == max_size:
            break
    return chosen, curve


class JointChange:
    """joint_change(modules) for search(): the readout probe's accuracy drop when every module of
    the set is perturbed at once, each with its own first noise draw (the scan's), weights restored.

    The search grows its set one module at a time, so the states of the last set tried are kept:
    when the next set contains it, only the layers from its new module on are rerun (the numbers
    are the same as a rerun from the lowest module; incremental=False does that, to check)."""

    def __init__(self, net, probes, batches, y, readout, scale, seed, incremental=True):
        self.net = net
        self.probe = probes[readout]
        self.readout = readout
        self.y = y
        self.scale = scale
        self.seed = seed
        self.incremental = incremental
        self.clean = (frozenset(), batches)
        self.base = self.score(batches)
        self.kept = self.clean  # the largest set tried whose states start the next rerun
        self.last = self.clean  # the set tried last, and its states

    def score(self, batches):
        """The readout probe's accuracy on the cached batches' features."""
        X = scan_cache.last_token_features(self.net, batches)
        return self.probe.score(X[self.readout], self.y)["acc"]

    def __call__(self, modules):
        modules = frozenset(map(tuple, modules))
        if self.incremental and self.last[0] <= modules:  # the last set was kept
            self.kept = self.last
        if not (self.incremental and self.kept[0] <= modules):
            self.kept = self.clean
        new = modules - self.kept[0]
        # the kept states already hold the modules below the lowest new one
        start = min((layer for layer, _ in new), default=self.net.cfg.n_layers)
        params = {}
        for layer, name in modules:
            if layer >= start:
                params[(layer, name)] = list(rb.module(self.net, layer, name).parameters())
        saved = {key: [p.detach().clone() for p in ps] for key, ps in params.items()}
        for (layer, name), ps in params.items():
            generator = torch.Generator().manual_seed(rb.noise_seed(self.seed, layer, name, 0))
            rb.perturb(ps, generator, self.scale)
        batches = scan_cache.advanced(self.net, self.kept[1], start)
        with torch.no_grad():
            for key, ps in params.items():
                for p, s in zip(ps, saved[key]):
                    p.copy_(s)
        self.last = (modules, batches)
        return self.base - self.score(batches)


def spearman(first, second):
    """Spearman's rank correlation of two orderings of the same items (lists, best first)."""
    n = len(first)
    if n < 2:
        return 1.0
    where = {item: i for i, item in enumerate(second)}
    # no ties in an ordering: 1 - 6 sum d^2 / (n (n^2 - 1))
    d2 = sum((i - where[item]) ** 2 for i, item in enumerate(first))
    return 1 - 6 * d2 / (n * (n * n - 1))


def stability(scan_result):
    """How stable the readout ranking of a scan is: each module's mean and spread over the noise
    draws, the rank correlation between draws (mean over pairs) and between the two halves of the
    prompts. (The halves and draws are measured with the readout probe, whichever metric chose.)"""
    draws = scan_result["draws"]
    modules = list(draws["acc_drop"])
    n_layers = len(draws["acc_drop"][modules[0]])
    n_draws = len(draws["acc_drop"][modules[0]][0])
    spread = {}
    for m in modules:
        values = [torch.tensor(draws["acc_drop"][m][layer]) for layer in range(n_layers)]
        spread[m] = [v.std().item() if len(v) > 1 else 0.0 for v in values]
    rankings = []
    for r in range(n_draws):
        one = {k: {m: [v[r] for v in draws[k][m]] for m in modules} for k in draws}
        rankings.append(rb.ranking(scan_result, "readout", source=one))
    pairs = [(a, b) for a in range(n_draws) for b in range(a + 1, n_draws)]
    between_draws = None
    if pairs:
        between_draws = sum(spearman(rankings[a], rankings[b]) for a, b in pairs) / len(pairs)
    halves = [{k: scan_result["halves"][k][h] for k in scan_result["halves"]} for h in (0, 1)]
    half_rankings = [rb.ranking(scan_result, "readout", source=h) for h in halves]
    return {
        "draws": n_draws,
        "mean": scan_result["acc_drop"],  # each module's mean accuracy drop over the draws
        "spread": spread,  # and its standard deviation over the draws
        "spearman_between_draws": between_draws,  # None with one draw
        "spearman_between_prompt_halves": spearman(*half_rankings),
    }


def select_mods_rob(
    net,
    tok,
    harmful,
    harmless,
    probes,
    kinds=("q", "k", "v", "o"),
    n=64,
    k=None,
    frac=0.5,
    scale=0.5,
    repeats=1,
    seed=0,
    metric="readout",
    readout=None,
    select="search",
    tolerance=0.02,
):
    """The robustness scan on n prompts per class, then Mods_Rob and the control set.

    metric: "readout" (the fixed probe at layer `readout`, default the last) or "later" (the earlier
    mean over later layers). select: "search" (grow a set jointly perturbed, keeping modules while
    the readout accuracy drop stays <= tolerance, up to k) or "topk" (the k most robust alone). The
    control: as many of the least robust modules. -> a dict: scan, mods_rob, mods_fragile,
    settings, selection (method, tolerance, curve), stability.
    """
    n = min(n, len(harmful), len(harmless))
    k = k or round(frac * len(kinds) * net.cfg.n_layers)
    batches = scan_cache.prefix(net, tok, harmful[:n] + harmless[:n])
    labels = torch.cat([torch.ones(n), torch.zeros(n)])
    scan = rb.scan(net, probes, batches, labels, kinds, scale, repeats, seed, readout=readout)
    order = rb.ranking(scan, metric)
    curve = None
    if select == "search":
        joint = JointChange(net, probes, batches, labels, scan["readout"], scale, seed)
        robust, curve = search(order, joint, tolerance, k)
    else:
        robust = order[:k]
    # the control: as many of the least robust modules, outside Mods_Rob where there are enough
    outside = [m for m in order if m not in set(robust)]
    fragile = outside[-len(robust) :] if len(outside) >= len(robust) else order[-len(robust) :]
    settings = {"n_per_class": n, "scale": scale, "repeats": repeats, "seed": seed, "k": k}
    settings.update(metric=metric, readout=scan["readout"], select=select, tolerance=tolerance)
    return {
        "scan": scan,
        "mods_rob": [list(m) for m in robust],
        "mods_fragile": [list(m) for m in fragile],
        "settings": settings,
        "selection": {"method": select, "tolerance": tolerance, "curve": curve},
        "stability": stability(scan),
    }


METRICS = {
    "readout": "drop of the readout probe's accuracy (then the rise of its log-loss)",
    "later": "rise of the probes' log-loss, mean over the layers after the module",
}


def write_json(path, scan_result, rob, fragile, settings, selection=None, stability=None):
    """The scan as JSON (atomically); "written_by" marks it as a file a later scan may replace.
    mods_rob is what the trainer reads; selection and stability say how it was chosen and how
    stable the ranking is."""
    metric = settings.get("metric", "readout")
    scan = {
        "written_by": "swat-min",
        "settings": settings,
        "metric": METRICS[metric],
        "readout_layer": scan_result["readout"],
        "table": scan_result["acc_drop"] if metric == "readout" else scan_result["later"],
        "tables": {k: scan_result[k] for k in ("acc_drop", "loss_rise", "later")},
        "mods_rob": rob,
        "mods_fragile": fragile,
        "selection": selection,
        "stability": stability,
    }
    write_text(os.fspath(path), json.dumps(scan, indent=1))


def write(out, pictures, picked, settings):
    """The scan's JSON at out, its heat map (Mods_Rob outlined) and, for a search, its curve."""
    scan = picked["scan"]
    rob = picked["mods_rob"]
    write_json(
        out, scan, rob, picked["mods_fragile"], settings, picked["selection"], picked["stability"]
    )
    metric = settings["metric"]
    table = scan["acc_drop" if metric == "readout" else "later"]
    title = f"module robustness: {METRICS[metric]} (readout layer {scan['readout']})"
    figures.heatmap_svg(pictures[0], table, title, "change", {tuple(m) for m in rob})
    curve = picked["selection"]["curve"]
    if curve:
        title = "searched Mods_Rob: joint accuracy drop as modules are added"
        figures.curve_svg(pictures[1], curve, picked["selection"]["tolerance"], title)


def summary(picked):
    """The scan in the terminal: the heat map, Mods_Rob and the stability of the ranking."""
    rob = picked["mods_rob"]
    metric = picked["settings"]["metric"]
    method = picked["selection"]["method"]
    stable = picked["stability"]
    draws = stable["spearman_between_draws"]
    draws = "-" if draws is None else f"{draws:.2f}"
    lines = [
        figures.heatmap(picked["scan"], metric),
        f"Mods_Rob ({len(rob)} modules, {method}): " + " ".join(f"{l}.{m}" for l, m in sorted(rob)),
        f"rank stability (Spearman): between the {stable['draws']} noise draws {draws}, between "
        f"prompt halves {stable['spearman_between_prompt_halves']:.2f}",
    ]
    return "\n".join(lines)
