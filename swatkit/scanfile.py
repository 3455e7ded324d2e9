"""The scan's file and pictures: scan.json (the tables, Mods_Rob, how it was chosen and how stable
the ranking is), its heat map and search curve (SVG), and its summary in the terminal. The trainer
reads Mods_Rob back with robustness.parse_mods."""

import json
import os

from . import figures
from .files import write_output


METRICS = {
    "readout": "drop of the readout probe's accuracy (then the rise of its log-loss)",
    "later": "rise of the probes' log-loss, mean over the layers after the module",
}


def write_scan(path, scan_result, rob, fragile, settings, selection=None, stability=None):
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
    write_output(os.fspath(path), json.dumps(scan, indent=1))


def write(out, pictures, picked, settings):
    """The scan's JSON at out, its heat map (Mods_Rob outlined) and, for a search, its curve."""
    scan = picked["scan"]
    rob = picked["mods_rob"]
    write_scan(
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


def summary(picked, ranked):
    """The scan in the terminal: the heat map (modules shaded by their rank in `ranked`), Mods_Rob
    and the stability of the ranking."""
    rob = picked["mods_rob"]
    method = picked["selection"]["method"]
    stable = picked["stability"]
    draws = stable["spearman_between_draws"]
    draws = "-" if draws is None else f"{draws:.2f}"
    lines = [
        figures.heatmap(picked["scan"], ranked),
        f"Mods_Rob ({len(rob)} modules, {method}): " + " ".join(f"{l}.{m}" for l, m in sorted(rob)),
        f"rank stability (Spearman): between the {stable['draws']} noise draws {draws}, between "
        f"prompt halves {stable['spearman_between_prompt_halves']:.2f}",
    ]
    distinct = picked["selection"].get("distinct_scores")
    if distinct == 1:  # nothing to rank by: the set is the lowest layers' modules, not robust ones
        lines.append(
            "warning: every module scored the same, so Mods_Rob is the first modules by layer, not "
            "the most robust; raise --scale or --n"
        )
    elif distinct is not None and distinct < len(ranked):
        lines.append(
            f"{len(ranked) - distinct} modules tie with another (ties: the lower layer first)"
        )
    shared = {tuple(m) for m in rob} & {tuple(m) for m in picked["mods_fragile"]}
    if shared:  # the control is meant to be modules the scan did not pick
        lines.append(
            f"note: Mods_Rob ({len(rob)}) is over half of the {len(ranked)} modules, so the "
            f"control set (as many of the least robust) shares {len(shared)} modules with it; "
            "choose a smaller --k or --frac"
        )
    return "\n".join(lines)
