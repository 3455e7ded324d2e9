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

import data
import model
import probe
import robustness as rb
import toy
import train
from evaluation import answer, evaluate, report, user
from files import SwatError, check_can_create, check_file, check_folder, claim
from model import MODULES
from options import OPTIONS, Help, add_options  # noqa: F401 (OPTIONS: swat_min.OPTIONS)

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
        "probes": probes,
        "scores": scores,
        "layer": layer,
        "X": X,
        "y": y,
        "harmful": test_harmful,
        "harmless": test_harmless,
        "train": (harmful, harmless),
    }


def scan_modules(
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
):
    """The robustness scan on n prompts per class -> (table, Mods_Rob, control set, settings).

    Mods_Rob: the k most robust modules (default: frac of the scanned ones); the control: the k
    least.
    """
    n = min(n, len(harmful), len(harmless))
    k = k or round(frac * len(kinds) * net.cfg.n_layers)
    batches = rb.prefix(net, tok, harmful[:n] + harmless[:n])
    labels = torch.cat([torch.ones(n), torch.zeros(n)])
    table = rb.scan(net, probes, batches, labels, kinds, scale, repeats, seed)
    rob, fragile = rb.choose(table, k)
    settings = {"n_per_class": n, "scale": scale, "repeats": repeats, "seed": seed, "k": k}
    return table, rob, fragile, settings


# ---- the commands: argparse in, the library above out ----


def load(args, name=None):
    """The model `name` (default: --model) with the command's device, dtype and chat format."""
    return model.load(
        name or args.model, device=args.device, dtype=args.dtype, chat_format=args.chat_format
    )


def probe_sets(args):
    """The instruction lists --harmful and --harmless name (None: the built-in splits)."""
    harmful = data.read_instructions(args.harmful) if args.harmful else None
    harmless = data.read_instructions(args.harmless) if args.harmless else None
    return harmful, harmless


def eval_options(args):
    """evaluate()'s arguments from the command's options: the prompt sets and sizes."""
    harmful = data.instructions(args.eval_harmful, "harmful", "test")[: args.n_eval]
    harmless = data.instructions(args.eval_harmless, "harmless", "test")[: args.n_eval]
    return dict(
        harmful=harmful,
        harmless=harmless,
        max_new_tokens=args.max_new_tokens,
        gen_batch=args.gen_batch,
        max_len=getattr(args, "max_len", 512),
        batch_size=getattr(args, "batch", 8),
        n_acc=args.n_acc,
        task_tokens=args.task_tokens,
    )


def cmd_probe(args):
    net, tok = load(args)
    test = data.read_instructions(args.test_harmful) if args.test_harmful else None
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


def do_scan(args, net, tok, base, out, folder=None):
    """The scan with the command's options, its heat map and Mods_Rob, written to out (in `folder`,
    which becomes swat-min's, when given) -> (Mods_Rob, control) as sets of (layer, module)."""
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
    harmful, harmless = base["train"]
    table, rob, fragile, settings = scan_modules(
        net,
        tok,
        harmful,
        harmless,
        base["probes"],
        kinds,
        args.n,
        k,
        args.frac,
        args.scale,
        args.repeats,
        args.seed,
    )
    print(rb.heatmap(table))
    print(f"Mods_Rob ({k} most robust): " + " ".join(f"{l}.{m}" for l, m in sorted(rob)))
    if folder:
        claim(folder, os.path.basename(out))
    rb.write(out, table, rob, fragile, dict(model=args.model, **settings))
    print(f"wrote {out}")
    rob = {tuple(x) for x in rob}
    fragile = {tuple(x) for x in fragile}
    shared = rob & fragile
    if shared:  # the control is meant to be modules the scan did not pick
        n_modules = len(table) * net.cfg.n_layers
        print(
            f"note: k={k} is over half of the {n_modules} modules, so the control set (the {k} "
            f"least robust) shares {len(shared)} modules with Mods_Rob; choose a smaller --k or "
            "--frac"
        )
    return rob, fragile


def cmd_scan(args):
    check_file(args.out)  # before the scan's minutes, not after
    net, tok = load(args)
    base = baseline(net, tok, *probe_sets(args), cache_dir=args.cache)
    do_scan(args, net, tok, base, args.out)


def cmd_eval(args):
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
    if args.data:
        task = data.split(data.read_examples(args.data), args.n_task)[0]
    row = evaluate(
        net, tok, "eval", base=base, task=task, gen_path=args.generations, **eval_options(args)
    )
    print(json.dumps(row, indent=1))
    if args.generations:
        print(f"wrote {args.generations}")


def cmd_train(args):
    net, tok = load(args)
    chats = data.read_examples(args.data)[: args.limit or None]
    mods = train.parse_mods(args.mods, net.cfg.n_layers) if args.mods else set()
    warmup = train.warmup_length("swat", args.steps, args.warmup_frac, args.warmup_steps)
    train.train(
        net,
        tok,
        chats,
        args.out,
        args.strategy,
        mods,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch,
        accum=args.accum,
        warmup_steps=warmup,
        ratio=args.ratio,
        weight_decay=args.weight_decay,
        max_len=args.max_len,
        seed=args.seed,
        save_every=args.save_every,
        resume=args.resume,
        grad_ckpt=args.grad_ckpt,
        compile=args.compile,
        skip_long=args.skip_long,
        scope=args.scope,
    )
    print(f"wrote {args.out} (log: {os.path.join(args.out, 'log.jsonl')})")


def cmd_generate(args):
    if not (args.prompt or args.file):
        raise SwatError("generate: give --prompt TEXT (repeatable) or --file FILE")
    net, tok = load(args)
    prompts = args.prompt or data.read_instructions(args.file)
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
    train.train(
        net,
        tok,
        chats,
        args.out,
        "ift",
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch,
        max_len=args.max_len,
        seed=args.seed,
        skip_long=True,
    )
    after = evaluate(net, tok, "after", **options)
    for r in (before, after):
        print(f"{r['strategy']:>6}: ASR {r['asr']:.1%}  over-refusal {r['over_refusal']:.1%}")
    print(f"wrote {args.out}")
    return before, after


def cmd_run(args):
    """Original model -> probes -> scan -> Mods_Rob -> ift / swat / mllr / control from the same
    start, data, steps and seeds -> evaluation -> results.json, results.md."""
    check_folder(
        args.out
    )  # not among the user's other files; made when its first result is written
    net, tok = load(args)
    task, tune = data.split(data.read_examples(args.data), args.n_task)
    tune = tune[: args.limit or None]
    if not tune:
        raise SwatError(f"{args.data}: no examples left for tuning after holding out {args.n_task}")
    base = baseline(net, tok, *probe_sets(args), cache_dir=args.cache)
    scan_path = os.path.join(args.out, "scan.json")
    rob, fragile = do_scan(args, net, tok, base, scan_path, folder=args.out)
    settings = {k: v for k, v in vars(args).items() if k != "fn"}
    options = eval_options(args)
    gens = os.path.join(claim(args.out, "original.jsonl"), "original.jsonl")
    rows = [
        dict(
            evaluate(net, tok, "original", base=base, task=task, gen_path=gens, **options),
            seed=None,
        )
    ]
    plan = [
        ("ift", "ift", set()),
        ("swat", "swat", rob),
        ("mllr", "mllr", rob),
        ("control", args.control, fragile),
    ]
    plan = [p for p in plan if p[0] in args.strategies]
    for seed in dict.fromkeys(args.seeds):  # each seed once, in the order given
        for name, strategy, mods in plan:
            net, tok = load(args)  # every model starts from the same weights
            folder = os.path.join(claim(args.out, f"{name}-seed{seed}"), f"{name}-seed{seed}")
            start = time.time()
            warmup = train.warmup_length(strategy, args.steps, args.warmup_frac)
            train.train(
                net,
                tok,
                tune,
                folder,
                strategy,
                mods,
                steps=args.steps,
                lr=args.lr,
                batch_size=args.batch,
                warmup_steps=warmup,
                ratio=args.ratio,
                max_len=args.max_len,
                seed=seed,
                skip_long=True,
                scope=args.scope,
            )
            gens = os.path.join(claim(folder, "generations.jsonl"), "generations.jsonl")
            row = evaluate(net, tok, name, base=base, task=task, gen_path=gens, **options)
            row.update(
                seed=seed,
                train_time_s=round(time.time() - start, 1),
                scheme=strategy,
                n_mods=len(mods),
                warmup_steps=warmup,
            )
            rows.append(row)
            report(args.out, rows, settings)  # after every model: an interrupted run keeps them
    print(open(os.path.join(args.out, "results.md"), encoding="utf-8").read())
    print(
        f"wrote {args.out}/results.json, results.md, scan.json and one checkpoint per strategy "
        "and seed"
    )
    return rows


def cmd_demo(args):
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


# ---- which command takes which option ----

COMMON = ("model", "device", "dtype", "chat-format", "cache")
PROBE = ("harmful", "harmless")
SCAN = ("n", "modules", "scale", "repeats", "k", "frac")
TRAIN = ("steps", "warmup-frac", "ratio", "scope", "lr", "batch", "max-len", "limit")
EVAL = (
    "eval-harmful",
    "eval-harmless",
    "n-eval",
    "max-new-tokens",
    "gen-batch",
    "n-task",
    "n-acc",
    "task-tokens",
)
TRAIN_ONLY = (
    "data",
    "strategy",
    "mods",
    "out",
    "warmup-steps",
    "accum",
    "weight-decay",
    "seed",
    "save-every",
    "resume",
    "grad-ckpt",
    "compile",
    "skip-long",
)
RUN = PROBE + SCAN + TRAIN + EVAL + ("data", "out", "seeds", "strategies", "control")
# name: (function, what it does, its options, the required ones, its own defaults)
COMMANDS = {
    "probe": (
        cmd_probe,
        "fit a probe per layer on harmful vs harmless features; print held-out accuracy",
        COMMON + PROBE + ("test-harmful",),
        ("model",),
        {},
    ),
    "scan": (
        cmd_scan,
        "module robustness scan: perturb each module, measure the probes, pick Mods_Rob",
        COMMON + PROBE + SCAN + ("out", "seed"),
        ("model",),
        {"out": "scan.json"},
    ),
    "train": (
        cmd_train,
        "instruction fine-tuning: plain ift, swat (warm-up of Mods_Rob) or mllr",
        COMMON + TRAIN + TRAIN_ONLY,
        ("model", "data", "out"),
        {},
    ),
    "eval": (
        cmd_eval,
        "ASR, over-refusal, feature drift against --base, task loss on --data",
        COMMON + EVAL + PROBE + ("base", "data", "batch", "max-len", "generations"),
        ("model",),
        {},
    ),
    "generate": (
        cmd_generate,
        "generate answers to prompts with the model's chat format",
        COMMON + ("prompt", "file", "max-new-tokens", "temperature", "top-p"),
        ("model",),
        {"max_new_tokens": 128},
    ),
    "align": (
        cmd_align,
        "make an aligned start: short SFT of refusals + the model's own harmless answers",
        COMMON + EVAL + TRAIN + ("out", "answer-tokens", "seed"),
        ("model", "out"),
        {"steps": 150, "lr": 5e-5},
    ),
    "run": (
        cmd_run,
        "the pipeline: probe, scan, tune with ift/swat/mllr/control, evaluate, report",
        COMMON + RUN,
        ("model", "data", "out"),
        {},
    ),
    "demo": (
        cmd_demo,
        "the pipeline offline: on a toy model trained here unless --model is given",
        COMMON + RUN + ("toy-steps",),
        ("out",),
        {"steps": 150, "lr": 3e-4, "batch": 16, "n_eval": 52, "max_new_tokens": 24},
    ),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, (fn, what, names, required, defaults) in COMMANDS.items():
        command = sub.add_parser(name, help=what, description=what, formatter_class=Help)
        add_options(command, names, required)
        command.set_defaults(fn=fn, seed=0, **defaults)
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
        check_paths(args)
        return args.fn(args)
    except KeyboardInterrupt:  # Ctrl-C: one line; what was written stays whole (outputs are atomic)
        out = getattr(args, "out", None)
        print(f"interrupted; results so far in {out}" if out else "interrupted", file=sys.stderr)
        sys.exit(130)
    except SwatError as e:
        sys.exit(f"error: {e}")
    except (
        OSError
    ) as e:  # an output that cannot be written (inputs are checked where they are read)
        sys.exit(f"error: {e.filename}: {e.strerror or e}" if e.filename else f"error: {e}")


INPUTS = (
    "model",
    "base",
    "data",
    "harmful",
    "harmless",
    "test_harmful",
    "eval_harmful",
    "eval_harmless",
    "file",
    "mods",
)


def check_paths(args):
    """An output is never an input, nor a file of the input model's; and it can be written. Both are
    checked before any work, and nothing is made yet."""
    inputs = [getattr(args, k, None) for k in INPUTS]
    outputs = [getattr(args, "out", None), getattr(args, "generations", None)]
    for path in filter(None, outputs):
        real = os.path.realpath(path)
        for given in filter(None, inputs):
            real_input = os.path.realpath(given)
            inside = real.startswith(real_input + os.sep) and os.path.exists(real)
            if real == real_input or inside:
                raise SwatError(f"{path}: would overwrite the input {given}; choose another path")
        check_can_create(real)


if __name__ == "__main__":
    main()
