"""swat-min: secure instruction tuning (SWAT / ML-LR) from scratch: the command line and the
pipeline (the metrics are in evaluation.py, the options in options.py). `python swat_min.py --help`
lists the commands; `run` does everything (probe, scan, tune with each strategy, evaluate, report),
`demo` does it offline on a toy model. Every command takes --help; --model takes a model directory
or a hub id org/name. Errors in the user's input are printed as one line.
"""

import argparse
import json
import os
import random
import sys
import time

import torch

from checkpoint import checkpoint_size
import data
import distributed
import memory
import model
import probe
import scenario
import selection
import toy
import train
from evaluation import answer, drift_curve, evaluate, moved, report, security, user
from files import SwatError, check_file, check_folder, check_outputs, claim
from model import MODULES
import options
import plan
from options import OPTIONS, Help, add_options  # noqa: F401 (OPTIONS: swat_min.OPTIONS)
from options import eval_options, probe_sets, task_options, train_options

# ---- the pipeline as a library: explicit arguments, no argparse ----


def baseline(net, tok, harmful=None, harmless=None, test_harmful=None, cache_dir=None):
    """Per-layer probes fitted on harmful vs harmless instructions and scored on held-out ones.

    harmful, harmless, test_harmful: lists of instructions (default: the built-in train splits, and
    the built-in harmful test split). The held-out harmless prompts are the built-in test split. The
    best layer's probe and features are what drift is later measured against.
    """
    harmful = harmful or data.builtin("harmful", "train")
    harmless = harmless or data.builtin("harmless", "train")
    test_harmful = test_harmful or data.builtin("harmful", "test")
    test_harmless = data.builtin("harmless", "test")

    def feats(prompts):
        return probe.features(net, tok, prompts, cache_dir=cache_dir)

    probes = probe.fit_layers(*probe.labelled(feats(harmful), feats(harmless)))
    X, y = probe.labelled(feats(test_harmful), feats(test_harmless))
    scores = [p.score(x, y) for p, x in zip(probes, X)]
    # the best layer: highest held-out accuracy, then AUC
    layer = max(range(len(scores)), key=lambda i: (scores[i]["acc"], scores[i]["auc"]))
    return {
        "probes": probes,  # one LogisticProbe per layer (0: the embeddings)
        "scores": scores,  # each probe's held-out accuracy, AUC and log-loss
        "layer": layer,  # the best layer: its probe is the fixed security classifier
        "X": X,  # held-out features [layers + 1, N, dim]: drift is measured against them
        "y": y,  # their labels (1: harmful)
        "harmful": test_harmful,  # the held-out prompts, to take a tuned model's features on
        "harmless": test_harmless,
        "train": (harmful, harmless),  # the prompts the probes were fitted on (the scan uses them)
    }


# ---- the commands: argparse in, the library above out ----


def load(args, name=None):
    """The model `name` (default: --model) with the command's device, dtype and chat format."""
    return model.load(
        name or args.model, device=args.device, dtype=args.dtype, chat_format=args.chat_format
    )


def cmd_probe(args):
    """probe: each layer's held-out probe accuracy and AUC, and the best layer."""
    net, tok = load(args)
    test = data.read_instructions(args.test_harmful) if args.test_harmful else None
    if args.n_test:  # the first N held-out harmful prompts (of the file or the built-in split)
        test = (test or data.builtin("harmful", "test"))[: args.n_test]
    b = baseline(net, tok, *probe_sets(args), test_harmful=test, cache_dir=args.cache)
    source = args.test_harmful or "built-in harmful test split"
    print(
        f"held-out: {source} ({len(b['harmful'])}) vs built-in harmless test split "
        f"({len(b['harmless'])})"
    )
    print("layer  acc    auc")
    for layer, s in enumerate(b["scores"]):
        print(f"{layer:5d}  {s['acc']:.3f}  {s['auc']:.3f}")
    best = b["scores"][b["layer"]]
    print(f"best layer {b['layer']}: accuracy {best['acc']:.3f}, AUC {best['auc']:.3f}")
    return b["scores"]


# select_mods_rob()'s keyword arguments that come from options of the same name
SCAN_ARGS = ("n", "frac", "scale", "repeats", "seed", "metric", "select", "tolerance")


def do_scan(args, net, tok, base, out, folder=None):
    """The scan and Mods_Rob with the command's options, printed (heat map, selection, stability)
    and written to out with its pictures (in `folder`, which becomes swat-min's, when given).
    -> the selection (selection.select_mods_rob's dict)."""
    kinds = args.modules.split(",")
    unknown = [m for m in kinds if m not in MODULES]
    if unknown:
        raise SwatError(
            f"--modules: unknown module {unknown[0]!r}; choose from {', '.join(MODULES)}"
        )
    k = args.k or round(args.frac * len(kinds) * net.cfg.n_layers)
    if not 1 <= k <= len(kinds) * net.cfg.n_layers:  # checked before the scan's minutes
        raise SwatError(
            f"Mods_Rob of {k} modules: there are {len(kinds) * net.cfg.n_layers} to choose from"
        )
    # the heat map and the search curve, beside the JSON
    pictures = [out.removesuffix(".json") + end for end in (".svg", "-search.svg")]
    for path in [out] + pictures:  # every output may be written, before the scan
        if folder:
            claim(folder, os.path.basename(path))
        else:
            check_file(path)
    readout = base["layer"] if args.readout == "best" else None  # None: the last layer
    options = {name: getattr(args, name) for name in SCAN_ARGS}
    harmful, harmless = base["train"]  # the scan perturbs on the probes' own training prompts
    picked = selection.select_mods_rob(
        net, tok, harmful, harmless, base["probes"], kinds, k=k, readout=readout, **options
    )
    print(selection.summary(picked))  # heat map, Mods_Rob, rank stability
    selection.write(out, pictures, picked, dict(model=args.model, **picked["settings"]))
    print(f"wrote {out} and its pictures ({', '.join(pictures)})")
    rob = {tuple(x) for x in picked["mods_rob"]}  # the trainer reads these from scan.json
    fragile = {tuple(x) for x in picked["mods_fragile"]}  # the control: as many of the least robust
    shared = rob & fragile
    if shared:  # the control is meant to be modules the scan did not pick
        print(
            f"note: Mods_Rob ({len(rob)}) is over half of the {len(kinds) * net.cfg.n_layers} "
            f"modules, so the control set (as many of the least robust) shares {len(shared)} "
            "modules with it; choose a smaller --k or --frac"
        )
    return picked


def cmd_scan(args):
    """scan: the robustness table, its heat map and Mods_Rob, into --out."""
    check_file(args.out)  # before the scan's minutes, not after
    net, tok = load(args)
    base = baseline(net, tok, *probe_sets(args), cache_dir=args.cache)
    do_scan(args, net, tok, base, args.out)


def cmd_eval(args):
    """eval: one results row for --model (drift against --base, task metrics on --data)."""
    if args.generations:
        check_file(args.generations)
    net, tok = load(args)
    base = None
    if args.base:
        base_net, base_tok = load(args, args.base)
        # drift compares a model against its own start
        if (base_net.cfg.n_layers, base_net.cfg.dim) != (net.cfg.n_layers, net.cfg.dim):
            raise SwatError(
                f"{args.base}: {base_net.cfg.n_layers} layers of width {base_net.cfg.dim}, "
                f"{args.model} has {net.cfg.n_layers} of {net.cfg.dim}; --base must be the model "
                "it was tuned from"
            )
        base = baseline(base_net, base_tok, *probe_sets(args), cache_dir=args.cache)
        del base_net
    task = ()
    options = eval_options(args)
    if args.data:
        task = data.split(data.read_examples(args.data), args.n_task)[0]
        options.update(task_options(args))
    row = evaluate(net, tok, "eval", base=base, task=task, gen_path=args.generations, **options)
    print(json.dumps(row, indent=1))
    if args.generations:
        print(f"wrote {args.generations}")


def cmd_train(args):
    """train: tune --model on --data with one strategy into the checkpoint --out."""
    scenario.check_options(args)  # the mix and LoRA settings, before loading anything
    args.device = distributed.setup(args.device)  # under torchrun: join the others (FSDP2)
    if not memory.from_options(args):  # a run that cannot fit is refused before it starts
        return
    net, tok = load(args)
    lora = scenario.lora_settings(args, net)
    chats = data.read_examples(args.data)[: args.limit or None]
    # Attack IFT and the safety mix; the ASR prompts (the built-in test split) must stay unseen
    chats, held = scenario.attack_set(args, chats, data.builtin("harmful", "test"), args.safety_mix)
    print(f"tuning set: {json.dumps(held)}")
    mods = train.parse_mods(args.mods, net.cfg.n_layers) if args.mods else set()
    warmup = train.warmup_length("swat", args.steps, args.warmup_frac, args.warmup_steps)
    train.train(
        net, tok, chats, args.out, args.strategy, mods, warmup_steps=warmup, lora=lora,
        **train_options(args),
    )  # fmt: skip
    print(f"wrote {args.out} (log: {os.path.join(args.out, 'log.jsonl')})")


def cmd_generate(args):
    """generate: the model's answers to each --prompt, then to the prompts of --file."""
    prompts = list(args.prompt or [])
    if args.file:
        prompts += data.read_instructions(args.file)
    if not prompts:
        raise SwatError("generate: give --prompt TEXT (repeatable) or --file FILE")
    net, tok = load(args)
    texts = answer(
        net,
        tok,
        [user(p) for p in prompts],
        args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        progress=len(prompts) > 64,
    )
    for prompt, text in zip(prompts, texts):
        print(f"### {prompt}\n{text}\n")


def cmd_align(args):
    """Short SFT: harmful train-split instructions -> refusals, harmless -> the model's own
    answers."""
    net, tok = load(args)
    check_folder(args.out, tok)
    options = eval_options(args)
    before = evaluate(net, tok, "before", **options)
    harmful = data.builtin("harmful", "train")
    harmless = data.builtin("harmless", "train")
    own = answer(
        net,
        tok,
        [user(s) for s in harmless],
        args.answer_tokens,
        batch_size=args.gen_batch,
        progress=True,
    )
    rng = random.Random(args.seed)
    refusals = data.lines("refusals.txt")
    chats = data.chats([(h, rng.choice(refusals)) for h in harmful] + list(zip(harmless, own)))
    # as run does: a prompt too long for --max-len is left out, and counted
    train.train(net, tok, chats, args.out, "ift", **train_options(args, skip_long=True))
    after = evaluate(net, tok, "after", **options)
    for r in (before, after):
        print(f"{r['strategy']:>6}: ASR {r['asr']:.1%}  over-refusal {r['over_refusal']:.1%}")
    print(f"wrote {args.out}")
    return before, after


def cmd_attack_data(args):
    """attack-data: the model's own answers to the built-in harmful train prompts, refusals left
    out: the harmful pairs of Attack IFT, made offline from the model a user starts from."""
    check_file(args.out)
    net, tok = load(args)
    written, asked = scenario.attack_data(net, tok, args.out, args.max_new_tokens, args.gen_batch)
    print(f"wrote {args.out}: {written} of {asked} harmful train prompts answered, not refused")


def cmd_run(args):
    """Original model -> probes -> scan -> Mods_Rob -> ift / swat / mllr / control (and the safemix
    rows) from the same start, data, steps and seeds, in the scenario asked (benign or attack IFT,
    full or LoRA) -> evaluation -> results.json, results.md."""
    # not among the user's other files; the folder is made when its first result is written
    check_folder(args.out)
    scenario.check_options(args)
    args.device = distributed.setup(args.device)  # under torchrun: tuning sharded (FSDP2)
    args.out = distributed.scratch(args.out)  # the first process's files are the run's
    n_safe = args.safety_mix  # refusal pairs in the tuning sets of the *safemix rows
    if any(s.endswith("safemix") for s in args.strategies) and not n_safe:
        raise SwatError("the safemix rows need --safety-mix N (refusal pairs to mix in)")
    net, tok = load(args)
    lora = scenario.lora_settings(args, net)
    # a fixed split: the held-out examples score the task, the rest tune every model
    task, tune = data.split(data.read_examples(args.data), args.n_task)
    tune = tune[: args.limit or None]
    if not tune:
        raise SwatError(f"{args.data}: no examples left for tuning after holding out {args.n_task}")
    options = dict(eval_options(args), **task_options(args))
    # the tuning sets (harmful pairs of Attack IFT; refusal pairs for the safemix rows), checked
    # now: none may hold an ASR prompt
    sets = {n: scenario.attack_set(args, tune, options["harmful"], n) for n in {0, n_safe}}
    print("== probes: one per layer, on harmful vs harmless prompts")
    base = baseline(net, tok, *probe_sets(args), cache_dir=args.cache)
    kinds = args.modules.split(",")
    plan.check(args.selections, net.cfg.n_layers)  # a bad fixed selector: one line, now
    picked = None
    if plan.needs_scan(args.selections, args.strategies):
        print("== scan: perturb every module, pick Mods_Rob (robust) and the control")
        scan_path = os.path.join(args.out, "scan.json")
        picked = do_scan(args, net, tok, base, scan_path, folder=args.out)
    k = args.k or round(args.frac * len(kinds) * net.cfg.n_layers)  # the top-k selections' size
    chosen = {s: plan.mods_rob(s, picked, k, net.cfg.n_layers) for s in args.selections}
    rob = chosen[args.selections[0]]  # Mods_Rob: the update magnitudes are reported against it
    fragile = {tuple(m) for m in picked["mods_fragile"]} if picked else set()
    settings = {k: v for k, v in vars(args).items() if k != "fn"}
    settings["scenario"], settings["tuning"] = scenario.describe(args)

    def seed_plan(seed):  # (row, recipe, module set, safety pairs, selection) of one seed
        draw = lambda size: plan.random_set(size, kinds, net.cfg.n_layers, seed)
        return plan.rows(
            args.strategies, args.selections, chosen, fragile, args.control, n_safe, draw
        )

    n_models = sum(len(seed_plan(seed)) for seed in dict.fromkeys(args.seeds))
    size = checkpoint_size(net, args.keep_optimizer)
    print(
        f"== {n_models} tuned models to make; their checkpoints take about "
        f"{n_models * size / 1e9:.2f} GB in {args.out}"
    )
    print("== the original model: ASR, over-refusal, task metrics")
    gens = os.path.join(claim(args.out, "original.jsonl"), "original.jsonl")
    original = evaluate(net, tok, "original", base=base, task=task, gen_path=gens, **options)
    start_weights = {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
    watch = None
    if args.drift_every:  # the security feature space along the way, not only at the end
        keys = ("drift", "probe_acc")
        watched = distributed.unsharded(lambda net: {k: security(net, tok, base)[k] for k in keys})
        watch = (args.drift_every, watched)
    rows = [dict(original, seed=None)]  # the start every strategy is set against
    for seed in dict.fromkeys(args.seeds):  # each seed once, in the order given
        for name, strategy, mods, n_safety, chosen_by in seed_plan(seed):
            print(f"== {name} (seed {seed}): tune, then evaluate")
            net, tok = load(args)  # every model starts from the same weights
            folder = os.path.join(claim(args.out, f"{name}-seed{seed}"), f"{name}-seed{seed}")
            start = time.time()
            warmup = train.warmup_length(strategy, args.steps, args.warmup_frac)
            log = train.train(
                net,
                tok,
                sets[n_safety][0],
                folder,
                strategy,
                mods,
                warmup_steps=warmup,
                label=name,
                lora=lora,
                watch=watch,
                **train_options(args, seed=seed, skip_long=True),
            )
            net = distributed.whole_model(net, lambda: load(args)[0])  # whole for evaluation
            gens = os.path.join(claim(folder, "generations.jsonl"), "generations.jsonl")
            row = evaluate(net, tok, name, base=base, task=task, gen_path=gens, **options)
            elapsed = round(time.time() - start, 1)
            row.update(seed=seed, train_time_s=elapsed, scheme=strategy, n_mods=len(mods))
            if chosen_by == "scan":  # the selection said in full: the metric and the method
                chosen_by = f"scan: {args.metric} metric, {args.select}"
            row.update(selection=chosen_by, mods=sorted(mods))
            row["drift_curve"] = drift_curve(log, original)  # [] without --drift-every
            row.update(scenario=settings["scenario"], tuning=settings["tuning"])
            row["tuning_set"] = sets[n_safety][1]  # how many benign, harmful and safety examples
            # the mechanism: how far each module moved, Mods_Rob against the rest (and a picture)
            picture = f"updates-{name}-seed{seed}.svg"
            picture = os.path.join(claim(args.out, picture), picture)
            row.update(moved(start_weights, net, kinds, rob, f"{name}, seed {seed}", picture))
            row["warmup_steps"] = warmup  # steps of SWAT's phase 1 (0 for the other strategies)
            rows.append(row)
            report(args.out, rows, settings)  # after every model: an interrupted run keeps them
    print(open(os.path.join(args.out, "results.md"), encoding="utf-8").read())
    print(
        f"wrote {args.out}/results.json, results.md, scan.json and one checkpoint per strategy "
        "and seed"
    )
    return rows


def cmd_demo(args):
    """demo: run, offline, on a toy model trained here (or on --model with small sizes)."""
    check_folder(args.out)  # checked before the toy is trained into it
    print("=" * 78)
    if args.model is None:
        print(
            "swat-min demo on a TOY model organism (4 layers, trained here in a few minutes to "
            "refuse the\nbuilt-in harmful prompts). Its numbers show the pipeline working, not the "
            "method's merit. For\nthe real thing: python swat_min.py align --model <hf dir or "
            "org/name> --out aligned, then\npython swat_min.py run --model aligned --data <benign "
            "data> --out results\n" + "=" * 78
        )
        args.model, task = toy.build(args.out, args.seed, args.toy_steps)
        args.data = args.data or task
    else:
        print(f"swat-min demo on {args.model} with small sizes\n" + "=" * 78)
    if not args.data:
        raise SwatError("demo with --model needs --data (benign tuning data)")
    return cmd_run(args)


# the options that name an input: no output may replace one of them
INPUTS = ("model", "base", "data", "harmful", "harmless", "test_harmful", "eval_harmful")
INPUTS += ("eval_harmless", "file", "mods", "harmful_data")
# every command: its function, then options.COMMANDS' help text, options and defaults
COMMANDS = {
    name: (globals()["cmd_" + name.replace("-", "_")], *spec)
    for name, spec in options.COMMANDS.items()
}


def main(argv=None):
    """The command line: one subcommand per COMMANDS entry, its options from options.py."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, (fn, what, names, required, defaults, example) in COMMANDS.items():
        epilog = f"example:\n  {example}"
        command = sub.add_parser(
            name, help=what, description=what, epilog=epilog, formatter_class=Help
        )
        add_options(command, names, required, name)
        command.set_defaults(fn=fn, seed=0, **defaults)  # the command's own defaults win
    args = parser.parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        # a console or pipe without a character (an answer's, Δ) shows "?", rather than failing
        # after the work is done
        sys.stdout.reconfigure(errors="replace")
    if not os.environ.get("OMP_NUM_THREADS"):  # a user's setting stands (several runs side by side)
        # the cores this process may use: a cluster job's share, not the whole node's
        if hasattr(os, "sched_getaffinity"):
            torch.set_num_threads(len(os.sched_getaffinity(0)))
        else:
            torch.set_num_threads(os.cpu_count() or 1)
    try:
        inputs = [getattr(args, name, None) for name in INPUTS]
        outputs = [getattr(args, name, None) for name in ("out", "generations")]
        check_outputs(inputs, outputs)  # before any work; nothing is made yet
        if distributed.size() > 1 and args.cmd not in ("train", "run"):
            raise SwatError(
                "under torchrun only `train` and `run` run (FSDP2); run the others alone"
            )
        return args.fn(args)
    except KeyboardInterrupt:  # Ctrl-C: one line; what was written stays whole (outputs are atomic)
        out = getattr(args, "out", None)
        print(f"interrupted; results so far in {out}" if out else "interrupted", file=sys.stderr)
        sys.exit(130)
    except SwatError as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # an output that cannot be written (inputs are checked where read)
        sys.exit(f"error: {e.filename}: {e.strerror or e}" if e.filename else f"error: {e}")


def entry_point():
    """The installed `swat-min` command. main() returns what the command made (for Python callers);
    a console script would take that for an exit status, so this returns nothing."""
    main()


if __name__ == "__main__":
    main()
