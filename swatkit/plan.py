"""The tuned models of a `run`: each row's recipe, its module set, its safety pairs and how its
module set was chosen.

One scan can choose Mods_Rob in several ways, and the rows compare them: "scan" (as the scan's
--metric and --select chose; by default the readout probe and the joint search), "readout-topk" and
"later-topk" (the k most robust by either metric, each judged alone), or a fixed set (a selector
such as 'q,k', or a scan JSON). Two rows test whether the choice matters at all: the control (the
same recipe on as many of the least robust modules) and a random set of the same size, drawn anew
for every seed.
"""

import random
import re

SCANNED = ("scan", "readout-topk", "later-topk")  # the selections read off the run's own scan


def needs_scan(selections, strategies):
    """Whether a run must scan: some row tunes with a set that the scan chooses."""
    with_modules = set(strategies) - {"ift", "safemix"}
    scanned = any(s in SCANNED for s in selections)
    return bool(with_modules) and (scanned or "control" in strategies)


def tag(selection):
    """A selection as a row-name suffix: 'readout-topk' stays; 'q,k' -> 'fixed-q-k'."""
    if selection in SCANNED:
        return selection
    return "fixed-" + re.sub(r"[^A-Za-z0-9]+", "-", selection).strip("-")


def random_set(size, kinds, n_layers, seed):
    """`size` modules drawn uniformly from every scanned (layer, kind): the same on every machine
    for a seed (Python's own generator, not torch's)."""
    everything = [(layer, kind) for layer in range(n_layers) for kind in kinds]
    return set(random.Random(seed).sample(everything, min(size, len(everything))))


def rows(strategies, selections, chosen, fragile, control, n_safe, random_draw):
    """One seed's tuned models, in order: (row name, recipe, module set, safety pairs, how the set
    was chosen). chosen: {selection: module set}; the first selection's set is the Mods_Rob of
    the swat, mllr and safemix rows and the size of the random set (fragile, the control, is the
    scan's: as many of the least robust as the scan's own Mods_Rob). The other
    selections add rows named like swat-readout-topk, kept when their recipe is asked for."""
    first = selections[0]
    rob = chosen[first]
    plan = [
        ("ift", "ift", set(), 0, "-"),  # plain IFT: the baseline
        ("swat", "swat", rob, 0, first),  # warm-up of Mods_Rob, then all
        ("mllr", "mllr", rob, 0, first),  # Mods_Rob at lr, the rest slower
    ]
    for selection in selections[1:]:  # the same recipes on the other ways of choosing
        for recipe in ("swat", "mllr"):
            name = f"{recipe}-{tag(selection)}"
            plan.append((name, recipe, chosen[selection], 0, selection))
    plan.append(("control", control, fragile, 0, "least robust"))  # on the least robust
    if "random" in strategies:  # drawn only when asked: a seed's draw is the same either way
        plan.append(("random", control, random_draw(len(rob)), 0, "random"))
    plan += [
        ("safemix", "ift", set(), n_safe, "-"),  # plain IFT with safety data: a common defence
        ("swat+safemix", "swat", rob, n_safe, first),  # and combined with SWAT, with ML-LR
        ("mllr+safemix", "mllr", rob, n_safe, first),
    ]
    # swat-readout-topk is a swat row: it runs when swat does
    return [p for p in plan if p[0].split("-")[0] in strategies]
