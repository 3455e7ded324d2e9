"""Module robustness analysis, from the scan to Mods_Rob: perturb each module (Q/K/V/O of every
layer) with Gaussian noise and measure how far the fixed security probe moves (scan); rank the
modules (ranking); grow a set that, perturbed jointly, still barely moves it (search); say how
stable the ranking is (stability). The set is Mods_Rob, one type all the way to the trainer: a set
of (layer, module) pairs, written to scan.json as [[layer, module], ...] and read back by
parse_mods, which also reads selectors such as 'q,k' or '0-11:q;12-29:v'.

The rule: W <- W + scale * std(W) * N(0, 1) (its bias too, with the bias's own std), one seeded draw
per (layer, module, repeat). A module's change is the drop of the readout probe's accuracy (the
paper's metric; the rise of its log-loss breaks ties) or, to compare, the rise of the probes' mean
log-loss over the layers after it. Hidden states below the perturbed layer do not change, so they
are computed once and reused (swatkit/scan_cache.py keeps them).
"""

import contextlib
import os

import torch
from tqdm import tqdm

from model import MODULES
from swatkit import checks, scan_cache
from swatkit.files import SwatError, read_json
from swatkit.plan import SCANNED
from swatkit.scan_cache import features_from, last_token_features


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


@contextlib.contextmanager
def perturbed(draws, scale):
    """Each (params, generator) of draws with its noise added; on leaving, an error included,
    every weight is put back exactly as it was."""
    saved = [[p.detach().clone() for p in params] for params, _ in draws]
    try:
        for params, generator in draws:
            perturb(params, generator, scale)
        yield
    finally:
        with torch.no_grad():
            for (params, _), kept in zip(draws, saved):
                for p, s in zip(params, kept):
                    p.copy_(s)


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
            for r in range(repeats):
                generator = torch.Generator().manual_seed(noise_seed(seed, layer, name, r))
                with perturbed([(params, generator)], scale):
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


def scores(tables, metric="readout"):
    """{(layer, module): its sort key}: "readout": (accuracy drop, log-loss rise) of the readout
    probe; "later": (mean log-loss rise over the later layers,)."""
    if metric == "later":
        later = tables["later"]
        return {(layer, m): (v,) for m, row in later.items() for layer, v in enumerate(row)}
    acc = tables["acc_drop"]
    loss = tables["loss_rise"]
    return {
        (layer, m): (acc[m][layer], loss[m][layer]) for m in acc for layer in range(len(acc[m]))
    }


def ranking(scan_result, metric="readout", source=None):
    """Every (layer, module), most robust first.

    metric "readout": by the readout probe's accuracy drop, then its log-loss rise; "later": by the
    mean log-loss rise over the later layers. source: other tables of the same shape to rank instead
    (one noise draw's, or one prompt half's).
    """
    keys = scores(source or scan_result, metric)
    # ties go to the lower layer, then the module name, so that the order is reproducible
    return sorted(keys, key=lambda lm: (keys[lm], lm))


# ---- Mods_Rob: the search over module sets, and the ranking's stability ----


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
                params[(layer, name)] = list(module(self.net, layer, name).parameters())
        seeds = {key: noise_seed(self.seed, *key, 0) for key in params}
        draws = [(ps, torch.Generator().manual_seed(seeds[key])) for key, ps in params.items()]
        with perturbed(draws, self.scale):
            batches = scan_cache.advanced(self.net, self.kept[1], start)
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
        rankings.append(ranking(scan_result, "readout", source=one))
    pairs = [(a, b) for a in range(n_draws) for b in range(a + 1, n_draws)]
    between_draws = None
    if pairs:
        between_draws = sum(spearman(rankings[a], rankings[b]) for a, b in pairs) / len(pairs)
    halves = [{k: scan_result["halves"][k][h] for k in scan_result["halves"]} for h in (0, 1)]
    half_rankings = [ranking(scan_result, "readout", source=h) for h in halves]
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
    checks.scan_args(n, scale, repeats, metric, select, tolerance)
    n = min(n, len(harmful), len(harmless))
    k = mods_rob_size(k, frac, kinds, net.cfg.n_layers)
    batches = scan_cache.prefix(net, tok, harmful[:n] + harmless[:n])
    labels = torch.cat([torch.ones(n), torch.zeros(n)])
    table = scan(net, probes, batches, labels, kinds, scale, repeats, seed, readout=readout)
    order = ranking(table, metric)
    curve = None
    if select == "search":
        joint = JointChange(net, probes, batches, labels, table["readout"], scale, seed)
        robust, curve = search(order, joint, tolerance, k)
    else:
        robust = order[:k]
    # the control: as many of the least robust modules, outside Mods_Rob where there are enough
    outside = [m for m in order if m not in set(robust)]
    fragile = outside[-len(robust) :] if len(outside) >= len(robust) else order[-len(robust) :]
    settings = {"n_per_class": n, "scale": scale, "repeats": repeats, "seed": seed, "k": k}
    settings.update(metric=metric, readout=table["readout"], select=select, tolerance=tolerance)
    return {
        "scan": table,
        "mods_rob": [list(m) for m in robust],
        "mods_fragile": [list(m) for m in fragile],
        "settings": settings,
        # how many different scores the ranking had: one means every module tied (order by index)
        "selection": {
            "method": select,
            "tolerance": tolerance,
            "curve": curve,
            "distinct_scores": len(set(scores(table, metric).values())),
        },
        "stability": stability(table),
    }


# ---- Mods_Rob as the trainer takes it ----


def mods_rob_size(k, frac, kinds, n_layers):
    """The size of Mods_Rob (the one place it is computed): k, else frac of the scanned modules;
    the kinds checked, so that a bad name or size is one line before the scan's minutes."""
    unknown = [m for m in kinds if m not in MODULES]
    if unknown:
        raise SwatError(
            f"--modules: unknown module {unknown[0]!r}; choose from {', '.join(MODULES)}"
        )
    k = k or round(frac * len(kinds) * n_layers)
    if not 1 <= k <= len(kinds) * n_layers:
        n_all = len(kinds) * n_layers
        raise SwatError(f"Mods_Rob of {k} modules: there are {n_all} to choose from")
    return k


def parse_mods(spec, n_layers, key="mods_rob"):
    """'q,k' (all layers), '0-11:q,k;12-29:v', or a scan JSON (its mods_rob list) -> {(layer,
    m)}."""
    spec = os.fspath(spec)
    if spec.endswith(".json"):
        try:
            pairs = [(int(layer), m, spec) for layer, m in read_json(spec)[key]]
        except (KeyError, TypeError, ValueError):
            raise SwatError(f"{spec}: no '{key}' list of [layer, module] pairs") from None
    else:
        pairs = []  # (layer, module, the part of the selector that named it)
        for part in filter(None, spec.replace(" ", "").split(";")):
            layers_text, _, names = part.rpartition(":")
            lo, _, hi = (layers_text or f"0-{n_layers - 1}").partition("-")
            try:
                layers = range(int(lo), int(hi or lo) + 1)
            except ValueError:
                raise SwatError(
                    f"module selector {part!r}: bad layer range {layers_text!r}"
                ) from None
            where = f"module selector {part!r}"
            pairs += [(layer, m, where) for m in names.split(",") for layer in layers]
    for layer, m, where in pairs:  # a scan of another model is caught here too
        if m not in MODULES:
            raise SwatError(f"{where}: unknown module {m!r}; choose from {', '.join(MODULES)}")
        if not 0 <= layer < n_layers:
            raise SwatError(f"{where}: layer {layer} out of range 0-{n_layers - 1}")
    if not pairs:
        raise SwatError(f"module selector {spec!r} selects nothing")
    return {(layer, m) for layer, m, _ in pairs}


def check_selections(selections, n_layers):
    """Every fixed selection parsed now, before any work: a bad one is one line (SwatError)."""
    for selection in selections:
        if selection not in SCANNED:
            parse_mods(selection, n_layers)


def selection_mods(selection, picked, k, n_layers):
    """The module set {(layer, kind)} of one selection; picked: the scan's (None: no row needed
    one, so a scanned selection is empty)."""
    if selection in SCANNED and picked is None:
        return set()
    if selection == "scan":
        return {tuple(m) for m in picked["mods_rob"]}
    if selection in ("readout-topk", "later-topk"):
        metric = selection.split("-")[0]
        return set(ranking(picked["scan"], metric)[:k])
    return parse_mods(selection, n_layers)
