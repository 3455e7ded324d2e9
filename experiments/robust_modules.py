"""What makes a module robust: the training-time ground truth per module group, and every proxy
set against it (RESULTS.md, "What makes a module robust").

  truth    for one scenario and seed: tune each group alone (evaluation.fragility: refusal-loss rise
           per unit of task-loss decrease) and attribute one plain IFT run's refusal-loss rise to
           the groups (evaluation.attribution; also the gradient proxies at the start).
  whole    plain IFT of every parameter at the same settings (and at lower rates, --lr): the
           refusal-loss rise (all reply tokens, and the first 5) against the task-loss decrease,
           the trade-off curve a group tuned alone must beat.
  subset   a set of modules tuned together (--include, --exclude) at the same settings.
  matched  each group (and subset) measured so far against plain IFT at the rate making the same
           task progress (read off the `whole` curve), as a markdown table.
  proxies  the static proxies of the aligned start: the scan's tables (readout accuracy drop and
           log-loss rise, the later-layer mean) at each noise scale and prompt count asked, and
           SPPFT's safety layers (where harmful and harmless states part, by cosine similarity);
           then how far the scans rank the modules alike (scan_agreement).
  gradients the gradient proxies alone (conflict, importance) at the aligned start, for many
           seeds' first batches: how much a one-batch proxy's ranking depends on the batch.
  asr      one real-ASR row of one seed: a set tuned alone, plain IFT at a rate, a random set,
           SPPFT, or SWAT / ML-LR with a set as Mods_Rob; asr-table tabulates them over seeds.
           --steps N (a name ending -stepsN) is the regime rows' longer main phase, set against
           plain IFT of N steps ("ift-stepsN"); --scenario alpaca tunes on alpaca_eval instead.
           asr-table also reads each row against plain IFT's curve at its task loss.
  updates  the asr rows' update sizes split by a module set (--include, e.g. Mods_Rob): inside
           and outside it, at the end of SWAT's warm-up and at the end.
  table    Spearman between the ground truth and every proxy (95 % bootstrap over the groups),
           printed as markdown and written to results/robust_modules.json.

Every output is one JSON file per group, (scenario, seed) or proxy setting under --out; what exists
is skipped, so a cut-short run resumes where it stopped. The groups measured so far are kept in the
repository under results/robust_modules (--out results/robust_modules goes on from them; the
aligned model's refusals, made again there, are AdvBench text and stay out of git).

  python experiments/robust_modules.py truth --model aligned --pairs pairs.jsonl \\
      --shared ../shared --out rm --scenario attack --seed 0
  python experiments/robust_modules.py proxies --model aligned --shared ../shared --out rm
  python experiments/robust_modules.py table rm
"""

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluation
import evidence  # its bootstrap and sign-flip test, and its reader of generations
import model
import probe
import robustness
import train
from swatkit import data, plan, scenario
from swatkit.files import SwatError, write_text

# The evidence cells' settings: 20 steps of 8, lr 5e-5, 256 tokens, 32 held-out GSM8K examples.
STEPS = 20
BATCH = 8
LR = 5e-5
MAX_LEN = 256
N_TASK = 32
# Each scenario's task data under --shared ("alpaca": the general-domain regime, to convergence)
TASK_DATA = {"attack": "data/gsm8k/train.jsonl", "benign": "data/gsm8k/train.jsonl",
             "alpaca": "data/alpaca_eval/alpaca_eval.jsonl"}  # fmt: skip
# The dev harmful prompts whose refusals the refusal loss is taken on: AdvBench dev rows 201-300
# (rows 1-100 score ASR and are never used to choose anything).
DEV_ROWS = slice(200, 300)
# SWAT's and ML-LR's settings in the evidence cells: a warm-up three times the main phase, the rest
# of Mods_Rob's kinds at 0.1 x the rate.
WARMUP_FRAC = 3.0
RATIO = 0.1
# The default selection of `scan`/`run` (the paper's): a row named "search" tuned with its set.
DEFAULT_SELECTION = "scan (readout metric, joint search)"
# Seeds 0-2 chose the sets and rates; 3-4 only confirm them, so their rows are read on their own.
DEV_SEEDS = (0, 1, 2)
FRESH_SEEDS = (3, 4)


def tuning_set(shared, scenario_name, pairs, steps=None):
    """(the tuning chats, the held-out task chats) of a scenario, as the evidence cells have
    them: benign IFT draws its steps x BATCH examples from all of GSM8K's train split but the
    held-out ones (by the seed's order), Attack IFT from a fixed mix of that size (steps: STEPS
    unless given); "alpaca", the general-domain regime, from alpaca_eval's 805 instructions."""
    source = os.path.join(shared, TASK_DATA[scenario_name])
    held, rest = data.split(data.read_examples(source), N_TASK)
    size = (steps or STEPS) * BATCH
    if scenario_name in ("benign", "alpaca"):
        return rest, held
    harmful = scenario.read_pairs(pairs)
    chats, _ = scenario.mix(rest, size, harmful, 0.1)
    return chats, held


def refusals(net, tok, shared, out):
    """The aligned model's own refusals of the dev harmful prompts (made once, kept in out)."""
    path = os.path.join(out, "refusals.json")
    if os.path.exists(path):
        return json.load(open(path))
    adv = data.read_instructions(os.path.join(shared, "data/advbench/harmful_behaviors_dev.csv"))
    chats = evaluation.refusal_chats(net, tok, adv[DEV_ROWS])
    write_text(path, json.dumps(chats))
    return chats


def truth(args):
    """One scenario and seed: each group tuned alone (one JSON per group, written as it finishes,
    so a cut-short run resumes at the next group), then the attributed run; then truth.json."""
    folder = os.path.join(args.out, args.scenario, f"seed{args.seed}")
    path = os.path.join(folder, "truth.json")
    if os.path.exists(path):
        print(f"{path} exists; skipped")
        return
    os.makedirs(os.path.join(folder, "groups"), exist_ok=True)
    torch.manual_seed(args.seed)
    net, tok = model.load(args.model)
    refusal = refusals(net, tok, args.shared, args.out)
    chats, held = tuning_set(args.shared, args.scenario, args.pairs)
    groups = evaluation.module_groups(net.cfg.n_layers)
    settings = dict(steps=STEPS, batch_size=BATCH, lr=LR, max_len=MAX_LEN, seed=args.seed)
    measured = {}
    for name, group in groups.items():
        one = os.path.join(folder, "groups", name.replace(":", "_") + ".json")
        if not os.path.exists(one):
            began = time.time()
            cell = evaluation.fragility(net, tok, chats, refusal, held, {name: group}, **settings)
            write_text(one, json.dumps(dict(cell[name], seconds=time.time() - began)))
        measured[name] = json.load(open(one))
        print(f"{name}: {json.dumps(measured[name])}", flush=True)
    one = os.path.join(folder, "attribution.json")
    if not os.path.exists(one):
        began = time.time()
        attributed = evaluation.attribution(net, tok, chats, refusal, groups, **settings)
        write_text(one, json.dumps(dict(attributed, seconds=time.time() - began)))
    attributed = json.load(open(one))
    result = {"scenario": args.scenario, "settings": settings, "n_refusals": len(refusal),
              "measured": measured, "attribution": attributed}  # fmt: skip
    write_text(path, json.dumps(result, indent=1))
    print(f"wrote {path}")


def opening(rows, k=5):
    """The same (ids, labels) rows with only the first k reply tokens scored: where a refusal is
    decided ("I can't ..."), before the reply runs on in a set phrase."""
    out = []
    for ids, labels in rows:
        scored = [i for i, label in enumerate(labels) if label != -100][:k]
        out.append((ids, [label if i in scored else -100 for i, label in enumerate(labels)]))
    return out


def whole(args):
    """Plain IFT of every parameter (the same tuning set, steps and rate as the groups): how far
    the refusal loss rises when everything trains together, on all reply tokens and on the first
    5."""
    path = os.path.join(args.out, args.scenario, f"seed{args.seed}", f"whole-lr{args.lr:g}.json")
    tune_and_measure(args, path, lambda net: list(net.parameters()))


def subset(args):
    """A set of modules tuned together at the groups' settings (every module of the seven kinds,
    or --include's, less --exclude's; specs as train.parse_mods reads them): whether a split makes
    more of IFT's progress for less damage than plain IFT's own curve."""
    path = os.path.join(args.out, args.scenario, f"seed{args.seed}", f"subset-{args.name}.json")

    def chosen(net):
        n = net.cfg.n_layers
        every = {(layer, kind) for layer in range(n) for kind in model.MODULES}
        modules = train.parse_mods(args.include, n) if args.include else every
        if args.exclude:
            modules = modules - train.parse_mods(args.exclude, n)
        return evaluation.group_params(net, modules)

    tune_and_measure(args, path, chosen)


def tune_and_measure(args, path, parameters):
    """Tune parameters(net) on the scenario's set; the refusal loss (all reply tokens and the
    first 5) and the task loss before and after, written to path (skipped if it exists)."""
    if os.path.exists(path):
        print(open(path).read())
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.manual_seed(args.seed)
    net, tok = model.load(args.model)
    refusal = train.encode_all(tok, refusals(net, tok, args.shared, args.out), MAX_LEN, "skip")
    chats, held = tuning_set(args.shared, args.scenario, args.pairs)
    held = train.encode_all(tok, held, MAX_LEN, "skip")
    sets = {"refusal_loss": refusal, "refusal_opening_loss": opening(refusal), "task_loss": held}

    def losses():
        with torch.no_grad():
            return {name: evaluation.mean_loss(net, rows).item() for name, rows in sets.items()}

    before = losses()
    began = time.time()
    data = train.encode_all(tok, chats, MAX_LEN, "skip")
    evaluation.tune_only(net, data, parameters(net), STEPS, args.lr, BATCH, args.seed)
    result = {"lr": args.lr, "before": before, "after": losses(), "seconds": time.time() - began}
    write_text(path, json.dumps(result, indent=1))
    print(json.dumps(result))


def ift_curve(folder, show=False):
    """Plain IFT's trade-off curve of one scenario and seed, from its `whole` runs: [(task-loss
    decrease, refusal-loss rise)] from no tuning (0, 0) on, by decrease."""
    curve = [(0.0, 0.0)]  # no tuning: no progress, no damage
    for name in sorted(os.listdir(folder)):
        if name.startswith("whole-lr"):
            run = json.load(open(os.path.join(folder, name)))
            drop = run["before"]["task_loss"] - run["after"]["task_loss"]
            curve.append((drop, run["after"]["refusal_loss"] - run["before"]["refusal_loss"]))
            if show:
                print(f"plain IFT at lr {run['lr']:g}: task-loss decrease {drop:.4f}, refusal-loss "
                      f"rise {curve[-1][1]:+.4f}")  # fmt: skip
    return sorted(curve)


def matched(args):
    """Each group measured so far against plain IFT at the rate that makes the same task progress:
    plain IFT's refusal-loss rise at the group's task-loss decrease, read off the curve of the
    `whole` runs (straight lines between its points, from no tuning at all), as a markdown table."""
    folder = os.path.join(args.out, args.scenario, f"seed{args.seed}")
    curve = ift_curve(folder, show=True)
    drops = [d for d, _ in curve]
    rises = [r for _, r in curve]
    print(
        "\n| group | task-loss decrease | refusal-loss rise | plain IFT's rise at that decrease |"
    )
    print("|---|---|---|---|")
    for name in sorted(os.listdir(folder)):  # sets of modules tuned together
        if name.startswith("subset-"):
            run = json.load(open(os.path.join(folder, name)))
            drop = run["before"]["task_loss"] - run["after"]["task_loss"]
            rise = run["after"]["refusal_loss"] - run["before"]["refusal_loss"]
            at = float(np.interp(drop, drops, rises))
            print(f"| {name[7:-5]} (together) | {drop:.4f} | {rise:+.4f} | {at:+.4f} |")
    for name in module_order(os.listdir(os.path.join(folder, "groups"))):
        cell = json.load(open(os.path.join(folder, "groups", name + ".json")))
        at = float(np.interp(cell["task_drop"], drops, rises))  # beyond the curve: its last rise
        print(f"| {name.replace('_', ':')} | {cell['task_drop']:.4f} | "
              f"{cell['refusal_rise']:+.4f} | {at:+.4f} |")  # fmt: skip


def asr_recipe(args, net, tok):
    """The parameters a real-ASR row tunes, by its name: "ift" (every parameter; at --lr, so that
    "ift --lr 5e-6" is plain IFT at the rate matching a set's task progress), "only" (the modules of
    --include less --exclude; nothing else moves), "random" (as many modules as --size, drawn
    from the seven kinds with the seed: the set's control) or "sppft" (every parameter but the
    safety layers', which SPPFT freezes; the layers of the proxies' safety-layers.json, made here
    if it is missing)."""
    n = net.cfg.n_layers
    every = {(layer, kind) for layer in range(n) for kind in model.MODULES}
    if args.recipe == "ift":
        return list(net.parameters())
    if args.recipe == "only":
        return evaluation.group_params(net, named_modules(args, n, every))
    if args.recipe == "random":
        return evaluation.group_params(net, plan.random_set(args.size, model.MODULES, n, args.seed))
    first, last = sppft_layers(net, tok, args.out)
    frozen = {f"model.layers.{layer}." for layer in range(first, last + 1)}
    return [p for name, p in net.named_parameters() if not name.startswith(tuple(frozen))]


def named_modules(args, n_layers, every):
    """The modules of --include (every module when it is not given) less those of --exclude."""
    modules = train.parse_mods(args.include, n_layers) if args.include else every
    if args.exclude:
        modules = modules - train.parse_mods(args.exclude, n_layers)
    return modules


def module_weights(net):
    """A copy of every (layer, kind) module weight: the start that moved_table measures from."""
    names = [f"model.layers.{layer}.{model.MODULES[kind]}.weight"
             for layer in range(net.cfg.n_layers) for kind in model.MODULES]  # fmt: skip
    weights = net.state_dict()
    return {name: weights[name].detach().float().cpu().clone() for name in names}


def moved_table(before, net):
    """How far tuning has moved each module from `before`: {kind: [|dW| / |W| per layer]}, rounded
    (the rows keep it, so that any set's update size can be read off later)."""
    table = evaluation.update_magnitudes(before, net, list(model.MODULES), set())[0]
    return {kind: [round(v, 7) for v in row] for kind, row in table.items()}


def method_row(args, net, tok, chats, folder, before):
    """SWAT or ML-LR with --include as Mods_Rob, through train.train with the evidence cells'
    settings (SWAT: a warm-up of WARMUP_FRAC x the steps on Mods_Rob alone, then every parameter;
    ML-LR: the other modules of Mods_Rob's kinds at lr x RATIO). train.train writes a checkpoint,
    here into a scratch folder of this run's own, removed once the weights are back in net.
    -> {"moved_warmup": the modules' update sizes at the end of SWAT's warm-up} (ML-LR: {})."""
    if not args.include:
        raise SwatError(f"asr --recipe {args.recipe}: name Mods_Rob with --include")
    mods = named_modules(args, net.cfg.n_layers, set())
    warmup = train.warmup_length(args.recipe, args.steps, WARMUP_FRAC)
    phases = {}

    def at_warmup_end(net):
        # train.train calls this every `warmup` steps; the first call ends the warm-up
        phases.setdefault("moved_warmup", moved_table(before, net))
        return {}

    scratch = tempfile.mkdtemp(prefix=".swat-row-", dir=folder)
    try:
        train.train(net, tok, chats, os.path.join(scratch, "model"), args.recipe, mods,
                    steps=args.steps, lr=args.lr, batch_size=BATCH, warmup_steps=warmup,
                    ratio=RATIO, max_len=MAX_LEN, seed=args.seed, long="skip", scope=args.scope,
                    watch=(warmup, at_warmup_end) if warmup else None)  # fmt: skip
    finally:
        shutil.rmtree(scratch)  # train.train has left net trained and in evaluation mode
    return phases


def asr(args):
    """One real-ASR row (--name) of one seed: tune as asr_recipe says, at the groups' settings, then
    the evidence cells' evaluation (AdvBench dev rows 1-100 for ASR, 100 built-in harmless prompts
    for over-refusal, the 32 held-out GSM8K examples' task loss) -> asr/NAME-seedS.json and its
    generations; the aligned start's own row once, asr/original.json. --steps sets the main
    phase's length (and the tuning set's size) for the regime rows; it is kept in the row, as is
    each module's update size at the end ("moved") and, for SWAT, at the end of the warm-up."""
    if args.steps < 1:
        raise SwatError(f"asr: --steps must be at least 1, got {args.steps}")
    # a row of another length is named for it, so the tables set it against IFT of that length
    suffix = regime_of(args.name)[1]
    if suffix != ("" if args.steps == STEPS else f"-steps{args.steps}"):
        raise SwatError(f"asr: --steps {args.steps} wants a name ending -steps{args.steps} "
                        f"(none at {STEPS}); got {args.name!r}")  # fmt: skip
    folder = os.path.join(args.out, args.scenario, "asr")
    os.makedirs(folder, exist_ok=True)
    net, tok = model.load(args.model)
    adv = data.read_instructions(
        os.path.join(args.shared, "data/advbench/harmful_behaviors_dev.csv")
    )
    chats, held = tuning_set(args.shared, args.scenario, args.pairs, args.steps)
    options = dict(harmful=adv[:100], harmless=data.builtin("harmless", "test")[:100],
                   max_new_tokens=48, task=held, max_len=MAX_LEN, batch_size=BATCH, n_acc=0,
                   task_tokens=160)  # fmt: skip
    for name in ("original", f"{args.name}-seed{args.seed}"):
        path = os.path.join(folder, name + ".json")
        if os.path.exists(path):
            print(f"{path} exists; skipped")
            continue
        began = time.time()
        sizes = {}  # each module's update size: at the end, and at the end of SWAT's warm-up
        if name != "original":  # the start's own row is tuned by nothing
            before = module_weights(net)
            if args.recipe in ("swat", "mllr"):  # the methods: train.train
                sizes = method_row(args, net, tok, chats, folder, before)
            else:  # a set of parameters tuned, the rest frozen
                torch.manual_seed(args.seed)
                encoded = train.encode_all(tok, chats, MAX_LEN, "skip")
                tuned = asr_recipe(args, net, tok)
                evaluation.tune_only(net, encoded, tuned, args.steps, args.lr, BATCH, args.seed)
            sizes["moved"] = moved_table(before, net)
            if args.recipe == "mllr":  # which weights ML-LR slowed: Mods_Rob's kinds, or all
                sizes["scope"] = args.scope
        generations = os.path.join(folder, name + ".jsonl")
        row = evaluation.evaluate(net, tok, name, gen_path=generations, **options)
        row.update(seed=args.seed, lr=args.lr, recipe=args.recipe, steps=args.steps,
                   seconds=time.time() - began, **sizes)  # fmt: skip
        # the table's per-prompt data, text-free (AdvBench's prompts stay out of git)
        row["answered"] = [int(a) for a in evidence.answered(generations, None)]
        if name == "original":  # the start, tuned by nothing
            row.update(seed=None, lr=None, recipe=None)
        write_text(path, json.dumps(row, indent=1))
        print(json.dumps(row))


def row_flags(folder, name):
    """A row's answered flags: from its generations where they are, else from its JSON."""
    generations = os.path.join(folder, name + ".jsonl")
    if os.path.exists(generations):
        return evidence.answered(generations, None)
    return json.load(open(os.path.join(folder, name + ".json")))["answered"]


def regime_of(name):
    """(a row's name less its regime suffix, the suffix): "swat-search-steps40" is in the 40-step
    regime ("-steps40") and is set against "ift-steps40"; a name without one, against "ift"."""
    match = re.search(r"-steps\d+$", name)
    if match is None:
        return name, ""
    return name[: match.start()], match.group(0)


def selection_of(name, recipe):
    """A row's selection in results/robust_modules.json's words: plain IFT at another rate is
    "lr-matched", a random set "random", SPPFT "sppft"; a set tuned alone keeps its name, less
    its rate ("oracle": the least fragile groups by the ground truth; "only-qk": every q and k)."""
    name = regime_of(name)[0]  # "ift-steps40" is plain IFT in the 40-step regime
    if recipe == "ift":
        return "ift" if name == "ift" else "lr-matched"
    if recipe in ("random", "sppft"):
        return recipe
    if recipe in ("swat", "mllr"):  # "swat-oracle": SWAT with the oracle set as Mods_Rob
        name = name.removeprefix(recipe + "-")
    if name.startswith("random-"):  # "swat-random-60": a random draw of 60 as Mods_Rob
        return "random"
    if name == "search":  # "swat-search-steps40": the scan's searched set, the default
        return DEFAULT_SELECTION
    return name.split("-lr")[0]


def asr_rows(out, scenario_name, versus, draws=2000, seeds=None):
    """The real-ASR rows of a scenario (of `seeds` only, when given: dev and fresh seeds are read
    apart), each over the seeds it shares with plain IFT of its own length ("ift", or
    "ift-stepsN" for a -stepsN row; named in the row dict's "versus"): its ASR and the cut of that
    IFT's rise, with 95 % intervals from a bootstrap over seeds and prompts (evidence.py's draws),
    task loss against that IFT's, and p, the paired sign-flip test across seeds, against the
    argument `versus` (plain IFT at the matched rate) -> (the start's row and flags, [rows])."""
    folder = os.path.join(out, scenario_name, "asr")
    start = np.array(row_flags(folder, "original"), float)
    rows = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json") and "-seed" in name:  # a row of one seed (not the manifest)
            row = json.load(open(os.path.join(folder, name)))
            if seeds is not None and row["seed"] not in seeds:
                continue
            flags = row_flags(folder, name[:-5])
            if len(flags) != len(start):
                raise SwatError(f"{name}: {len(flags)} harmful prompts, the start {len(start)}")
            rows.setdefault(name[:-5].rsplit("-seed", 1)[0], {})[row["seed"]] = (row, flags)
    original = json.load(open(os.path.join(folder, "original.json")))
    found = []
    for name, seeds in rows.items():
        baseline = "ift" + regime_of(name)[1]  # plain IFT of the same steps
        both = sorted(seed for seed in seeds if seed in rows.get(baseline, {}))
        if not both:
            continue
        mine = np.array([seeds[seed][1] for seed in both], float)
        ift = np.array([rows[baseline][seed][1] for seed in both], float)
        ci = evidence.bootstrap_interval(lambda s, p: mine[np.ix_(s, p)].mean(), len(both),
                                         len(start), draws)  # fmt: skip
        cut = cut_ci = None
        if name != baseline and ift.mean() > start.mean():

            def share(s, p):  # the share of IFT's rise this row avoided, on one draw
                rise = ift[np.ix_(s, p)].mean() - start[p].mean()
                if rise <= 0:
                    return float("nan")
                return (ift[np.ix_(s, p)].mean() - mine[np.ix_(s, p)].mean()) / rise

            cut = (ift.mean() - mine.mean()) / (ift.mean() - start.mean())
            cut_ci = evidence.bootstrap_interval(share, len(both), len(start), draws)
        other = rows.get(versus, {})
        paired = [seed for seed in both if seed in other]
        p = None
        if name != versus and paired:
            diff = [np.mean(seeds[s][1]) - np.mean(other[s][1]) for s in paired]
            p = (evidence.sign_flip_p(np.array(diff)), len(paired))
        loss = np.mean([seeds[s][0]["task_loss"] for s in both])
        loss_ift = np.mean([rows[baseline][s][0]["task_loss"] for s in both])
        found.append({
            "scenario": scenario_name, "tuning": "full", "row": name,
            "selection": selection_of(name, seeds[both[0]][0]["recipe"]),
            "strategy": seeds[both[0]][0]["recipe"], "seeds": both, "asr": mine.mean(),
            "steps": seeds[both[0]][0].get("steps", STEPS), "versus": baseline,
            "asr_ci": list(ci), "cut": cut, "cut_ci": cut_ci and list(cut_ci),
            "task_loss": loss, "task_loss_delta": loss / loss_ift - 1, "p_vs": p,
            "over_refusal": np.mean([seeds[s][0]["over_refusal"] for s in both]),
            "seconds": np.mean([seeds[s][0]["seconds"] for s in both]),
        })  # fmt: skip
    return (original, start), found


def updates(args):
    """Each row's update sizes split by a module set (--include): the mean |dW| / |W| of the
    modules inside it and outside it, at the end of SWAT's warm-up ("-" for a one-phase recipe)
    and at the end, over the row's seeds that kept them (asr rows keep "moved")."""
    folder = os.path.join(args.out, args.scenario, "asr")
    if not os.path.isdir(folder):
        raise SwatError(f"{folder}: no asr rows here (is --out the folder asr wrote into?)")
    print("| row | seeds | set, warm-up end | rest, warm-up end | set, end | rest, end |")
    print("|---|---|---|---|---|---|")
    for name in args.rows:
        pattern = re.escape(name) + r"-seed(\d+)\.json"
        found = sorted(f for f in os.listdir(folder) if re.fullmatch(pattern, f))
        rows = [json.load(open(os.path.join(folder, f))) for f in found]
        kept = [row for row in rows if "moved" in row]  # rows from before sizes were kept: none
        if not kept:
            print(f"| {name} | none kept update sizes | - | - | - | - |")
            continue
        n_layers = len(kept[0]["moved"]["q"])
        inside = train.parse_mods(args.include, n_layers)
        cells = []
        for phase in ("moved_warmup", "moved"):
            for wanted in (True, False):  # the set, then the rest
                sizes = [size for row in kept if phase in row
                         for kind, per_layer in row[phase].items()
                         for layer, size in enumerate(per_layer)
                         if ((layer, kind) in inside) == wanted]  # fmt: skip
                cells.append(f"{np.mean(sizes):.5f}" if sizes else "-")
        seeds = ", ".join(str(row["seed"]) for row in kept)
        print(f"| {name} | {seeds} | " + " | ".join(cells) + " |")


def asr_table(args):
    """asr_rows as markdown (printed)."""
    (original, start), found = asr_rows(args.out, args.scenario, args.versus, args.draws,
                                        args.seeds)  # fmt: skip
    lines = [f"| row | seeds | ASR [95 % CI] | cut of IFT's rise [95 % CI] | p vs {args.versus} | "
             "over-refusal | task loss (Δ vs ift) | time (s) |", "|---" * 8 + "|",
             f"| original | - | {start.mean():.1%} | - | - | {original['over_refusal']:.1%} | "
             f"{original['task_loss']:.3f} | - |"]  # fmt: skip
    for r in found:
        if args.rows and r["row"] not in args.rows:  # only the rows asked for (and the start)
            continue
        cut = "-"
        if r["cut"] is not None:
            cut = f"{r['cut']:+.0%} [{r['cut_ci'][0]:+.0%}, {r['cut_ci'][1]:+.0%}]"
        p = "-" if r["p_vs"] is None else f"{r['p_vs'][0]:.2f} ({r['p_vs'][1]})"
        lines.append(f"| {r['row']} | {', '.join(map(str, r['seeds']))} | {r['asr']:.1%} "
                     f"[{r['asr_ci'][0]:.1%}, {r['asr_ci'][1]:.1%}] | {cut} | {p} | "
                     f"{r['over_refusal']:.1%} | {r['task_loss']:.3f} "
                     f"({r['task_loss_delta']:+.1%}) | {r['seconds']:.0f} |")  # fmt: skip
    print("\n".join(lines))
    curve_lines = on_ifts_curve([r for r in found if not args.rows or r["row"] in args.rows])
    if curve_lines:
        print("\n" + "\n".join(curve_lines))


def on_ifts_curve(found):
    """Each method row against plain IFT's own trade-off at its task loss: the ASR read off the
    straight line between the two plain-IFT rates (same steps) whose task losses bracket the row's
    -> markdown lines (none when fewer than two rates ran, or no row falls between them)."""
    lines = []
    for r in found:
        if r["strategy"] == "ift":
            continue
        curve = sorted((c["task_loss"], c["asr"], c["row"]) for c in found
                       if c["strategy"] == "ift" and c["steps"] == r["steps"])  # fmt: skip
        for (loss_a, asr_a, name_a), (loss_b, asr_b, name_b) in zip(curve, curve[1:]):
            if loss_a <= r["task_loss"] <= loss_b:  # lower loss first: the faster rate
                weight = (r["task_loss"] - loss_a) / max(loss_b - loss_a, 1e-12)
                asr_then = asr_a + weight * (asr_b - asr_a)
                lines.append(f"| {r['row']} | {r['task_loss']:.3f} | {r['asr']:.1%} | "
                             f"{asr_then:.1%} (between {name_a} and {name_b}) |")  # fmt: skip
                break
    if not lines:
        return []
    head = ["| row | task loss | ASR | plain IFT's ASR at that task loss (its curve) |",
            "|---|---|---|---|"]  # fmt: skip
    return head + lines


def module_order(files):
    """Group file names in the order the study runs them (kinds as in MODULES, then depth)."""
    names = [f.removesuffix(".json") for f in files if f.endswith(".json")]
    kinds = list(model.MODULES)
    return sorted(
        names, key=lambda n: (kinds.index(n.split("_")[0]), int(n.split("_")[1].split("-")[0]))
    )


def safety_layers(net, tok, harmful, harmless):
    """SPPFT's localisation (Li et al., ICLR 2025): per layer, the cosine similarity of the mean
    last-token states of harmful and harmless prompts; the safety layers are the contiguous layers
    from where the two start to part (the gap first exceeds a third of its final value) to where the
    gap stops growing (its first local maximum after that). -> (gap per layer, [first, last])."""
    features = [probe.features(net, tok, p) for p in (harmful, harmless)]
    means = [f.mean(1) for f in features]  # [layers + 1, dim] each
    gap = (1 - torch.nn.functional.cosine_similarity(means[0], means[1], dim=-1)).tolist()[1:]
    final = max(gap)
    first = next(i for i, g in enumerate(gap) if g > final / 3)
    last = next((i for i in range(first + 1, len(gap) - 1) if gap[i] >= gap[i + 1]), len(gap) - 1)
    return gap, [first, last]


def sppft_layers(net, tok, out):
    """SPPFT's safety layers of net on the built-in train prompts, [first, last]: found once and
    kept, with the gap per layer, in out/safety-layers.json (read back after)."""
    path = os.path.join(out, "safety-layers.json")
    if not os.path.exists(path):
        harmful = data.builtin("harmful", "train")
        gap, layers = safety_layers(net, tok, harmful, data.builtin("harmless", "train"))
        write_text(path, json.dumps({"gap": gap, "layers": layers}))
    return json.load(open(path))["layers"]


def proxies(args):
    os.makedirs(args.out, exist_ok=True)
    net, tok = model.load(args.model)
    base = None
    for scale in args.scales:
        for n in args.ns:
            path = os.path.join(args.out, f"scan-scale{scale}-n{n}.json")
            if os.path.exists(path):
                continue
            base = base or probe.baseline(net, tok)
            harmful, harmless = base["train"]
            began = time.time()
            picked = robustness.select_mods_rob(
                net, tok, harmful, harmless, base["probes"], tuple(model.MODULES), n=n,
                scale=scale, select="topk", k=1, readout=None,
            )  # fmt: skip
            best = robustness.select_mods_rob(
                net, tok, harmful, harmless, base["probes"], tuple(model.MODULES), n=n,
                scale=scale, select="topk", k=1, readout=base["layer"],
            )  # fmt: skip
            tables = {k: picked["scan"][k] for k in ("acc_drop", "loss_rise", "later")}
            tables.update({f"best_{k}": best["scan"][k] for k in ("acc_drop", "loss_rise")})
            record = {"scale": scale, "n": n, "tables": tables, "best_layer": base["layer"],
                      "seconds": time.time() - began}  # fmt: skip
            write_text(path, json.dumps(record))
            print(f"wrote {path} ({record['seconds']:.0f} s)")
    first, last = sppft_layers(net, tok, args.out)
    print(f"safety layers {first}-{last}")
    scan_agreement(args.out)


def scan_agreement(out):
    """How far the scan agrees with itself: Spearman over every module between each two of
    `proxies`' scans in out, per table (same noise seed: the settings and prompts differ). A proxy
    that ranks the modules alike at every setting measures something steady, whatever its tie to
    the ground truth; one that does not is noise. -> {"A vs B": {table: rho}}, printed."""
    names = sorted(n for n in os.listdir(out) if n.startswith("scan-scale") and n.endswith(".json"))
    scans = {n[len("scan-") : -len(".json")]: json.load(open(os.path.join(out, n))) for n in names}
    found = {}
    keys = ("acc_drop", "loss_rise", "later")
    labels = list(scans)
    for i, a in enumerate(labels):
        for b in labels[i + 1 :]:
            pair = {}
            for key in keys:  # every (kind, layer) value, in one fixed order
                kinds = sorted(set(scans[a]["tables"][key]) & set(scans[b]["tables"][key]))
                x = [v for kind in kinds for v in scans[a]["tables"][key][kind]]
                y = [v for kind in kinds for v in scans[b]["tables"][key][kind]]
                pair[key] = spearman(x, y)
            found[f"{a} vs {b}"] = pair
    if found:
        print("| scans | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
        for pair, values in found.items():
            print(f"| {pair} | " + " | ".join(f"{values[k]:+.2f}" for k in keys) + " |")
    return found


def gradients(args):
    """The gradient proxies (evaluation.gradient_proxies) at the aligned start, one file per seed:
    each seed's first --batches batches of its data order against the dev refusals' gradient
    -> out/SCENARIO/gradients-bB-seedS.json. Seconds a seed, so many batches can be drawn."""
    if args.batches < 1:  # no task rows: no task gradient to set against the refusals'
        raise SwatError(f"gradients --batches {args.batches}: must be 1 or more")
    folder = os.path.join(args.out, args.scenario)
    os.makedirs(folder, exist_ok=True)
    net, tok = model.load(args.model)
    refusal = refusals(net, tok, args.shared, args.out)
    chats, _ = tuning_set(args.shared, args.scenario, args.pairs)
    groups = evaluation.module_groups(net.cfg.n_layers)
    for seed in args.seeds:
        path = os.path.join(folder, f"gradients-b{args.batches}-seed{seed}.json")
        if os.path.exists(path):
            print(f"{path} exists; skipped")
            continue
        began = time.time()
        cells = evaluation.gradient_proxies(net, tok, chats, refusal, groups, BATCH, MAX_LEN,
                                            seed, args.batches)  # fmt: skip
        record = {"seed": seed, "batches": args.batches, "groups": cells,
                  "seconds": time.time() - began}  # fmt: skip
        write_text(path, json.dumps(record, indent=1))
        print(f"wrote {path} ({record['seconds']:.0f} s)")


def spearman(a, b):
    """Spearman's rank correlation of two equal-length value lists (average ranks for ties)."""
    ranks = [np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(float) for x in (a, b)]
    for x, r in zip((a, b), ranks):  # ties share their mean rank
        x = np.asarray(x)
        for v in np.unique(x):
            r[x == v] = r[x == v].mean()
    if ranks[0].std() == 0 or ranks[1].std() == 0:
        return 0.0
    return float(np.corrcoef(*ranks)[0, 1])


def bootstrap(a, b, draws=2000, seed=0):
    """Spearman and its 95 % interval from resampling the groups."""
    rng = np.random.default_rng(seed)
    a = np.asarray(a, float)
    b = np.asarray(b, float)
    values = []
    for _ in range(draws):
        pick = rng.integers(0, len(a), len(a))
        values.append(spearman(a[pick], b[pick]))
    return spearman(a, b), [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def group_value(table, group):
    """A per-module table {kind: [per layer]} summed over a group's modules."""
    return sum(table[kind][layer] for layer, kind in group)


def measured_runs(folder):
    """Every seed measured so far of one scenario: [{"measured": {group: its numbers, beside plain
    IFT at the same progress where that seed has the `whole` curve}, "attribution": the attributed
    run or None}], from the per-group files (a run cut short counts with the groups it has)."""
    runs = []
    for seed_folder in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        groups_folder = os.path.join(folder, seed_folder, "groups")
        if not os.path.isdir(groups_folder):
            continue
        names = module_order(os.listdir(groups_folder))
        measured = {n.replace("_", ":"): json.load(open(os.path.join(groups_folder, n + ".json")))
                    for n in names}  # fmt: skip
        curve = ift_curve(os.path.join(folder, seed_folder))
        if len(curve) > 1:
            evaluation.beside_ift(measured, curve)
        path = os.path.join(folder, seed_folder, "attribution.json")
        attribution = json.load(open(path)) if os.path.exists(path) else None
        runs.append({"seed": seed_folder, "measured": measured, "attribution": attribution})
    return runs


def table(args):
    """Spearman between the ground truth and every proxy, 95 % bootstrap over the groups. The
    ground truth of a group: its refusal-loss rise beyond plain IFT's at the same task progress
    (the excess; its fragility ratio where a seed lacks the IFT curve), averaged over the seeds,
    on the groups every seed has."""
    out = args.folders[0]
    truths = {}
    for scenario_name in ("attack", "benign"):
        runs = measured_runs(os.path.join(out, scenario_name))
        if runs:
            truths[scenario_name] = runs
    if not truths:
        raise SwatError(f"{out}: no measured group yet (run `truth` first)")
    first = next(iter(truths.values()))
    names = [n for n in first[0]["measured"] if all(n in r["measured"] for r in first)]
    groups = {}
    for name in names:
        kind, _, span = name.partition(":")
        lo, _, hi = span.partition("-")
        groups[name] = {(layer, kind) for layer in range(int(lo), int(hi) + 1)}
    rows = []
    # the numbers in results/robust_modules.json's form: the default selection of the day, the
    # groups, the ground truth per scenario, each proxy's Spearman with it, and the real-ASR rows
    result = {"default": DEFAULT_SELECTION, "groups": names,
              "ground_truth": {}, "attributed": {}, "proxies": {}, "rows": []}  # fmt: skip
    for scenario_name, runs in truths.items():
        runs = [r for r in runs if all(g in r["measured"] for g in names)]
        if not runs:  # a run cut short: its groups wait until every one is measured
            print(f"{scenario_name}: no seed has all {len(names)} groups yet; left out")
            continue
        measured = {g: np.mean([r["measured"][g]["refusal_rise"] for r in runs]) for g in names}
        drop = {g: np.mean([r["measured"][g]["task_drop"] for r in runs]) for g in names}
        # damage per unit of task progress; a group that makes no progress is most fragile
        ratio = {g: measured[g] / drop[g] if drop[g] > 0 else 1e9 for g in names}
        each = {r["seed"]: {g: r["measured"][g].get("excess_rise", ratio[g]) for g in names}
                for r in runs}  # fmt: skip
        excess = {g: np.mean([values[g] for values in each.values()]) for g in names}
        result["ground_truth"][scenario_name] = excess
        result.setdefault("ground_truth_seeds", {})[scenario_name] = each
        if len(runs) > 1:  # is the ground truth itself reproducible? another data order's ranking
            first_seed, second_seed = list(each)[:2]
            rho, ci = bootstrap([each[first_seed][g] for g in names],
                                [each[second_seed][g] for g in names])  # fmt: skip
            label = f"another seed's ground truth ({first_seed} vs {second_seed})"
            result["proxies"][f"{label} [{scenario_name}]"] = {
                "spearman": rho,
                "ci": ci,
                "groups": len(names),
            }
            rows.append((scenario_name, label, rho, ci, len(names)))
        candidates = {
            "fragility ratio (rise per unit of task-loss decrease)": ratio,
            "measured refusal-loss rise alone": measured,
        }
        attributed = [r["attribution"] for r in runs if r["attribution"]]
        if attributed:  # one IFT run's first-order shares, and the gradient proxies at its start
            for key, label in (("attributed", "attributed (first-order share of one IFT run)"),
                               ("conflict", "conflict (cos of task and refusal gradients)"),
                               ("importance", "importance (sum |W * grad R|)")):  # fmt: skip
                candidates[label] = {
                    g: np.mean([a["groups"][g][key] for a in attributed]) for g in names
                }
            result["attributed"][scenario_name] = candidates[
                "attributed (first-order share of one IFT run)"
            ]
        drawn = {}  # the gradient proxies of many seeds' first batches: each, and their mean
        for path in sorted(os.listdir(os.path.join(out, scenario_name))):
            if path.startswith("gradients-"):
                record = json.load(open(os.path.join(out, scenario_name, path)))
                b = record["batches"]
                seed = record["seed"]
                # (importance reads the refusal gradient alone: the same for every batch)
                values = {g: record["groups"][g]["conflict"] for g in names}
                candidates[f"conflict, {b} batch(es) of seed {seed}"] = values
                drawn.setdefault(b, []).append(values)
        for b, draws in drawn.items():
            label = f"conflict, {b} batch(es), mean of {len(draws)} seeds"
            candidates[label] = {g: np.mean([d[g] for d in draws]) for g in names}
        for path in sorted(os.listdir(out)):
            if path.startswith("scan-"):  # `proxies`' scans, or a run's scan.json copied here
                scan = json.load(open(os.path.join(out, path)))
                settings = scan.get("settings", scan)  # a run's scan keeps its settings apart
                tag = (
                    f"scale {settings['scale']}, n {settings.get('n', settings.get('n_per_class'))}"
                )
                if "settings" in scan:
                    tag += f", noise seed {settings['seed']}"
                # a run scans q, k, v, o only: its proxies cover the attention groups
                kinds = set(scan["tables"]["acc_drop"])
                covered = [g for g in names if all(kind in kinds for _, kind in groups[g])]
                for key, label in (("acc_drop", "readout acc drop (last layer)"),
                                   ("loss_rise", "readout log-loss rise (last layer)"),
                                   ("best_acc_drop", "readout acc drop (best layer)"),
                                   ("best_loss_rise", "readout log-loss rise (best layer)"),
                                   ("later", "later-layer mean log-loss rise")):  # fmt: skip
                    if key in scan["tables"]:
                        candidates[f"{label}, {tag}"] = {
                            g: group_value(scan["tables"][key], groups[g]) for g in covered
                        }
                if "mods_rob" in scan:  # the selection itself: a group outside Mods_Rob is fragile
                    robust = {tuple(m) for m in scan["mods_rob"]}
                    candidates[f"searched Mods_Rob: share of the group outside it, {tag}"] = {
                        g: 1 - np.mean([m in robust for m in groups[g]]) for g in covered
                    }
        layers_path = os.path.join(out, "safety-layers.json")
        if os.path.exists(layers_path):
            lo, hi = json.load(open(layers_path))["layers"]
            candidates[f"SPPFT safety layers ({lo}-{hi}): share of the group inside"] = {
                g: np.mean([lo <= layer <= hi for layer, _ in groups[g]]) for g in names
            }
        for label, values in candidates.items():
            common = [g for g in names if g in values]  # the groups this proxy covers
            rho, ci = bootstrap([excess[g] for g in common], [values[g] for g in common])
            result["proxies"][f"{label} [{scenario_name}]"] = {
                "spearman": rho,
                "ci": ci,
                "groups": len(common),
            }
            rows.append((scenario_name, label, rho, ci, len(common)))
    both = result["ground_truth"]
    if len(both) == 2:  # is fragility the module's, or the data's? the two scenarios' rankings
        rho, ci = bootstrap([both["attack"][g] for g in names],
                            [both["benign"][g] for g in names])  # fmt: skip
        result["proxies"]["the other scenario's ground truth [attack vs benign]"] = {
            "spearman": rho,
            "ci": ci,
            "groups": len(names),
        }
        rows.append(("both", "the other scenario's ground truth", rho, ci, len(names)))
    print(f"ground truth: the excess refusal-loss rise over plain IFT at the same progress, on "
          f"{len(names)} groups")  # fmt: skip
    print("| scenario | proxy | groups | Spearman vs the ground truth | 95 % CI |")
    print("|---|---|---|---|---|")
    for scenario_name, label, rho, ci, n in rows:
        print(f"| {scenario_name} | {label} | {n} | {rho:+.2f} | [{ci[0]:+.2f}, {ci[1]:+.2f}] |")
    for scenario_name, truth_of in result["ground_truth"].items():
        ordered = sorted(names, key=lambda g: truth_of[g])
        print(f"\n{scenario_name}: least fragile first: " + ", ".join(
            f"{g} {truth_of[g]:+.4f}" for g in ordered))  # fmt: skip
        each = result["ground_truth_seeds"][scenario_name]
        if len(each) > 1:  # each seed's excess beside the mean, least fragile first
            print(f"| group | {' | '.join(each)} | mean |\n|---|" + "---|" * (len(each) + 1))
            for g in ordered:
                seeds = " | ".join(f"{values[g]:+.4f}" for values in each.values())
                print(f"| {g} | {seeds} | {truth_of[g]:+.4f} |")
    for scenario_name in TASK_DATA:  # the real-ASR rows measured so far
        if os.path.exists(os.path.join(out, scenario_name, "asr", "original.json")):
            for seeds in (DEV_SEEDS, FRESH_SEEDS):  # read apart: settings were chosen on dev seeds
                result["rows"] += asr_rows(out, scenario_name, "ift-lr5e-06", args.draws, seeds)[1]
    if args.json:
        write_text(args.json, json.dumps(result, indent=1, default=float))
        print(f"wrote {args.json}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("truth")
    one.add_argument("--model", required=True)
    one.add_argument("--pairs", required=True)
    one.add_argument("--shared", required=True)
    one.add_argument("--out", required=True)
    one.add_argument("--scenario", choices=("attack", "benign"), required=True)
    one.add_argument("--seed", type=int, default=0)
    whole_run = commands.add_parser("whole")
    for name in ("--model", "--pairs", "--shared", "--out"):
        whole_run.add_argument(name, required=True)
    whole_run.add_argument("--scenario", choices=("attack", "benign"), required=True)
    whole_run.add_argument("--seed", type=int, default=0)
    # below the groups' rate: plain IFT's own trade-off curve, to set a group's cost against
    whole_run.add_argument("--lr", type=float, default=LR)
    some = commands.add_parser("subset")
    for name in ("--model", "--pairs", "--shared", "--out"):
        some.add_argument(name, required=True)
    some.add_argument("--name", required=True, help="the set's name in its file, subset-NAME.json")
    some.add_argument("--scenario", choices=("attack", "benign"), required=True)
    some.add_argument("--seed", type=int, default=0)
    some.add_argument("--lr", type=float, default=LR)
    some.add_argument("--include", help="the modules tuned, e.g. q,k (default: all seven kinds)")
    some.add_argument("--exclude", help="modules left out, e.g. 0-9:v")
    curve = commands.add_parser("matched")
    curve.add_argument("--out", required=True)
    curve.add_argument("--scenario", choices=("attack", "benign"), required=True)
    curve.add_argument("--seed", type=int, default=0)
    two = commands.add_parser("proxies")
    two.add_argument("--model", required=True)
    two.add_argument("--shared", required=True)
    two.add_argument("--out", required=True)
    two.add_argument("--scales", type=float, nargs="+", default=[0.5])
    two.add_argument("--ns", type=int, nargs="+", default=[64])
    grads = commands.add_parser("gradients")
    for name in ("--model", "--pairs", "--shared", "--out"):
        grads.add_argument(name, required=True)
    grads.add_argument("--scenario", choices=("attack", "benign"), required=True)
    grads.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    grads.add_argument("--batches", type=int, default=1, help="task batches a gradient averages")
    row = commands.add_parser("asr")
    for name in ("--model", "--pairs", "--shared", "--out", "--name"):
        row.add_argument(name, required=True)
    recipes = ("ift", "only", "random", "sppft", "swat", "mllr")
    row.add_argument("--recipe", choices=recipes, required=True)
    row.add_argument("--scenario", choices=tuple(TASK_DATA), required=True)
    row.add_argument("--seed", type=int, default=0)
    row.add_argument("--lr", type=float, default=LR)
    row.add_argument("--steps", type=int, default=STEPS, help="main-phase steps (SWAT: 3x warm-up)")
    row.add_argument("--include", help="only: the modules tuned, e.g. q,k; swat, mllr: Mods_Rob")
    row.add_argument("--exclude", help="only: modules left out, e.g. 0-9:v")
    row.add_argument("--size", type=int, help="random: how many modules")
    row.add_argument(
        "--scope",
        choices=("modules", "all"),
        default="modules",
        help="mllr: slow the other modules of Mods_Rob's kinds, or every other weight",
    )
    rows = commands.add_parser("asr-table")
    rows.add_argument("--out", required=True)
    rows.add_argument("--scenario", choices=tuple(TASK_DATA), required=True)
    rows.add_argument("--versus", default="ift-lr5e-06", help="the row p is taken against")
    rows.add_argument("--draws", type=int, default=2000)
    rows.add_argument("--seeds", type=int, nargs="+", help="only these seeds (e.g. the fresh 3 4)")
    rows.add_argument("--rows", nargs="+", help="only these rows (e.g. ift swat-oracle)")
    sizes = commands.add_parser("updates")
    sizes.add_argument("--out", required=True)
    sizes.add_argument("--scenario", choices=tuple(TASK_DATA), required=True)
    sizes.add_argument("--include", required=True, help="the set to split by, e.g. Mods_Rob")
    sizes.add_argument("--rows", nargs="+", required=True, help="e.g. ift-steps80 swat-oracle")
    three = commands.add_parser("table")
    three.add_argument("folders", nargs="+")
    three.add_argument("--json", help="where to write the numbers (results/robust_modules.json)")
    three.add_argument("--draws", type=int, default=2000, help="bootstrap draws of the ASR rows")
    args = parser.parse_args(argv)
    try:
        commands = {"truth": truth, "whole": whole, "subset": subset, "matched": matched}
        commands["proxies"] = proxies
        commands["gradients"] = gradients
        commands["table"] = table
        commands["asr"] = asr
        commands["asr-table"] = asr_table
        commands["updates"] = updates
        commands[args.command](args)
    except SwatError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
