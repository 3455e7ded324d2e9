"""swat-min: secure instruction tuning (SWAT / ML-LR) from scratch: the command line and the pipeline
(the metrics are in evaluation.py). `python swat_min.py --help` lists the commands; `run` does everything
(probe, scan, tune with each strategy, evaluate, report), `demo` does it offline on a toy model. Every
command takes --help; --model takes a model directory or a hub id org/name. Errors in the user's input are
printed as one line.
"""
import argparse, json, os, random, sys, time
import torch
import checks, data, model, probe, robustness as rb, tokenizer, toy, train
from evaluation import answer, evaluate, report, user
from files import SwatError, check_can_create, check_file, check_folder, claim


def load(a, name=None):  # the model `name` (default: --model) with the command's device, dtype and chat format
    return model.load(name or a.model, device=a.device, dtype=a.dtype, chat_format=a.chat_format)


def baseline(a, net, tok, test_harmful=None):
    """Per-layer probes fitted on the train splits (or the user's files) and scored on held-out prompts;
    the best layer's probe and features are what drift is later measured against."""
    f = lambda xs: probe.features(net, tok, xs, cache_dir=a.cache)
    H = data.instructions(a.harmful, "harmful", "train")
    S = data.instructions(a.harmless, "harmless", "train")
    probes = probe.fit_layers(*probe.labelled(f(H), f(S)))
    Ht = data.instructions(test_harmful, "harmful", "test")
    St = data.builtin("harmless", "test")
    X, y = probe.labelled(f(Ht), f(St))
    scores = [p.score(x, y) for p, x in zip(probes, X)]
    layer = max(range(len(scores)), key=lambda l: (scores[l]["acc"], scores[l]["auc"]))
    return {"probes": probes, "scores": scores, "layer": layer, "X": X, "y": y, "harmful": Ht, "harmless": St,
            "train": (H, S)}


def cmd_probe(a):
    net, tok = load(a)
    b = baseline(a, net, tok, a.test_harmful)
    print(f"held-out: {a.test_harmful or 'built-in harmful test split'} ({len(b['harmful'])}) vs built-in "
          f"harmless test split ({len(b['harmless'])})\nlayer  acc    auc")
    for l, s in enumerate(b["scores"]):
        print(f"{l:5d}  {s['acc']:.3f}  {s['auc']:.3f}")
    s = b["scores"][b["layer"]]
    print(f"best layer {b['layer']}: accuracy {s['acc']:.3f}, AUC {s['auc']:.3f}")
    return b["scores"]


def do_scan(a, net, tok, H, S, probes, out, folder=None):
    """The scan, its heat map and Mods_Rob, written to out (when folder is given: out in that folder,
    which becomes swat-min's). -> (Mods_Rob, the control set) as sets of (layer, module)."""
    n, kinds = min(a.n, len(H), len(S)), a.modules.split(",")
    k = a.k or round(a.frac * len(kinds) * net.cfg.n_layers)
    if not 1 <= k <= len(kinds) * net.cfg.n_layers:  # checked before the scan's minutes, not after
        raise SwatError(f"Mods_Rob of {k} modules: there are {len(kinds) * net.cfg.n_layers} to choose from")
    batches = rb.prefix(net, tok, H[:n] + S[:n])
    table = rb.scan(net, probes, batches, torch.cat([torch.ones(n), torch.zeros(n)]), kinds,
                    a.scale, a.repeats, a.seed)
    rob, fragile = rb.choose(table, k)
    print(rb.heatmap(table))
    print(f"Mods_Rob ({k} most robust): " + " ".join(f"{l}.{m}" for l, m in sorted(rob)))
    settings = {"model": a.model, "n_per_class": n, "scale": a.scale, "repeats": a.repeats, "seed": a.seed, "k": k}
    if folder:
        claim(folder, os.path.basename(out))
    rb.write(out, table, rob, fragile, settings)
    print(f"wrote {out}")
    rob, fragile = {tuple(x) for x in rob}, {tuple(x) for x in fragile}
    if rob & fragile:  # the control is meant to be modules the scan did not pick
        print(f"note: k={k} is over half of the {len(table) * net.cfg.n_layers} modules, so the control set (the {k} "
              f"least robust) shares {len(rob & fragile)} modules with Mods_Rob; choose a smaller --k or --frac")
    return rob, fragile


def cmd_scan(a):
    check_file(a.out)  # before the scan's minutes, not after
    net, tok = load(a)
    b = baseline(a, net, tok)
    do_scan(a, net, tok, *b["train"], b["probes"], a.out)


def cmd_eval(a):
    if a.generations:
        check_file(a.generations)
    net, tok = load(a)
    base = None
    if a.base:
        bnet, btok = load(a, a.base)
        if (bnet.cfg.n_layers, bnet.cfg.dim) != (net.cfg.n_layers, net.cfg.dim):  # drift: a model against its own start
            raise SwatError(f"{a.base}: {bnet.cfg.n_layers} layers of width {bnet.cfg.dim}, {a.model} has "
                            f"{net.cfg.n_layers} of {net.cfg.dim}; --base must be the model it was tuned from")
        base = baseline(a, bnet, btok)
        del bnet
    task = data.split(data.read_examples(a.data), a.n_task)[0] if a.data else ()
    print(json.dumps(evaluate(net, tok, a, "eval", base, task, a.generations), indent=1))
    if a.generations:
        print(f"wrote {a.generations}")


def cmd_train(a):
    net, tok = load(a)
    chats = data.read_examples(a.data)[:a.limit or None]
    mods = train.parse_mods(a.mods, net.cfg.n_layers) if a.mods else set()
    warm = a.warmup_steps if a.warmup_steps is not None else round(a.warmup_frac * a.steps)
    train.train(net, tok, chats, a.out, a.strategy, mods, steps=a.steps, lr=a.lr, batch_size=a.batch,
                accum=a.accum, warmup_steps=warm, ratio=a.ratio, weight_decay=a.weight_decay,
                max_len=a.max_len, seed=a.seed, save_every=a.save_every, resume=a.resume, grad_ckpt=a.grad_ckpt,
                compile=a.compile, skip_long=a.skip_long, scope=a.scope)
    print(f"wrote {a.out} (log: {os.path.join(a.out, 'log.jsonl')})")


def cmd_generate(a):
    if not (a.prompt or a.file):
        raise SwatError("generate: give --prompt TEXT (repeatable) or --file FILE")
    net, tok = load(a)
    prompts = a.prompt or data.read_instructions(a.file)
    for p, t in zip(prompts, answer(net, tok, [user(p) for p in prompts], a.max_new_tokens,
                                    temperature=a.temperature, top_p=a.top_p, progress=len(prompts) > 64)):
        print(f"### {p}\n{t}\n")


def cmd_align(a):
    """Short SFT: harmful train-split instructions -> refusals, harmless -> the model's own answers."""
    net, tok = load(a)
    check_folder(a.out, tok)
    before = evaluate(net, tok, a, "before")
    H, S = data.builtin("harmful", "train"), data.builtin("harmless", "train")
    own = answer(net, tok, [user(s) for s in S], a.answer_tokens, batch_size=a.gen_batch, progress=True)
    rng, refusals = random.Random(a.seed), data.lines("refusals.txt")
    chats = data.chats([(h, rng.choice(refusals)) for h in H] + list(zip(S, own)))
    train.train(net, tok, chats, a.out, "ift", steps=a.steps, lr=a.lr, batch_size=a.batch, max_len=a.max_len,
                seed=a.seed, skip_long=True)  # as run does: a prompt too long for --max-len is left out, and counted
    after = evaluate(net, tok, a, "after")
    for r in (before, after):
        print(f"{r['strategy']:>6}: ASR {r['asr']:.1%}  over-refusal {r['over_refusal']:.1%}")
    print(f"wrote {a.out}")
    return before, after


def cmd_run(a):
    """Original model -> probes -> scan -> Mods_Rob -> ift / swat / mllr / control from the same start,
    data, steps and seeds -> evaluation -> results.json, results.md."""
    check_folder(a.out)  # not among the user's other files; made when its first result is written
    net, tok = load(a)
    task, tune = data.split(data.read_examples(a.data), a.n_task)
    tune = tune[:a.limit or None]
    if not tune:
        raise SwatError(f"{a.data}: no examples left for tuning after holding out {a.n_task}")
    base = baseline(a, net, tok)
    rob, fragile = do_scan(a, net, tok, *base["train"], base["probes"], os.path.join(a.out, "scan.json"),
                           folder=a.out)
    settings = {k: v for k, v in vars(a).items() if k != "fn"}
    gens = os.path.join(claim(a.out, "original.jsonl"), "original.jsonl")
    rows = [dict(evaluate(net, tok, a, "original", base, task, gens), seed=None)]
    plan = [("ift", "ift", set()), ("swat", "swat", rob), ("mllr", "mllr", rob), ("control", a.control, fragile)]
    plan = [p for p in plan if p[0] in a.strategies]
    for seed in dict.fromkeys(a.seeds):  # each seed once, in the order given
        for name, strategy, mods in plan:
            net, tok = load(a)
            d, t0 = os.path.join(claim(a.out, f"{name}-seed{seed}"), f"{name}-seed{seed}"), time.time()
            warm = round(a.warmup_frac * a.steps)
            train.train(net, tok, tune, d, strategy, mods, steps=a.steps, lr=a.lr, batch_size=a.batch,
                        warmup_steps=warm, ratio=a.ratio, max_len=a.max_len, seed=seed, skip_long=True, scope=a.scope)
            gens = os.path.join(claim(d, "generations.jsonl"), "generations.jsonl")
            row = evaluate(net, tok, a, name, base, task, gens)
            rows.append(dict(row, seed=seed, train_time_s=round(time.time() - t0, 1), scheme=strategy,
                             n_mods=len(mods), warmup_steps=warm if strategy == "swat" else 0))
            report(a.out, rows, settings)  # after every model: an interrupted run keeps what it measured
    print(open(os.path.join(a.out, "results.md"), encoding="utf-8").read())
    print(f"wrote {a.out}/results.json, results.md, scan.json and one checkpoint per strategy and seed")
    return rows


def cmd_demo(a):
    check_folder(a.out)  # checked before the toy is trained into it
    print("=" * 78)
    if a.model is None:
        print("swat-min demo on a TOY model organism (4 layers, trained here in a few minutes to refuse the\n"
              "built-in harmful prompts). Its numbers show the pipeline working, not the method's merit. For\n"
              "the real thing: python swat_min.py align --model <hf dir or org/name> --out aligned, then\n"
              "python swat_min.py run --model aligned --data <benign data> --out results\n" + "=" * 78)
        a.model, task = toy.build(a.out, a.seed, a.toy_steps)
        a.data = a.data or task
    else:
        print(f"swat-min demo on {a.model} with small sizes\n" + "=" * 78)
    if not a.data:
        raise SwatError("demo with --model needs --data (benign tuning data)")
    return cmd_run(a)


class Help(argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):  # every option's help ends with its default, where it has one
        d = action.default
        return action.help if d is None or d is False or d == argparse.SUPPRESS else action.help + " (default: %(default)s)"


# Every option once; each command below names the ones it takes ("!": required there).
OPTIONS = {
    "model": dict(help="HF-format model directory, or a hub id org/name"),
    "device": dict(default="cuda" if torch.cuda.is_available() else "cpu", help="torch device"),
    "dtype": dict(choices=["fp32", "bf16"], default="fp32", help="dtype of the weights"),
    "chat-format": dict(choices=tokenizer.Tok.FORMATS, help="override the chat format read off the checkpoint"),
    "cache": dict(help="directory to cache probe features in (safetensors)"),
    "harmful": dict(help="harmful instructions to fit the probe on (default: built-in train split)"),
    "harmless": dict(help="harmless instructions to fit the probe on (default: built-in train split)"),
    "test-harmful": dict(help="held-out harmful file, e.g. AdvBench CSV (default: built-in test split)"),
    "n": dict(type=checks.number(int, 1), default=64, help="prompts per class in the scan"),
    "modules": dict(default="q,k,v,o", help="modules to scan (also gate,up,down)"),
    "scale": dict(type=checks.number(float, 0), default=0.5, help="scan noise std, as a multiple of the weight's std"),
    "repeats": dict(type=checks.number(int, 1), default=1, help="noise draws per module"),
    "k": dict(type=checks.number(int, 1), help="size of Mods_Rob (default: --frac of the scanned modules)"),
    "frac": dict(type=checks.number(float, 0, 1), default=0.5, help="size of Mods_Rob as a fraction of the scanned modules"),
    "data": dict(help="benign tuning data: Alpaca, GSM8K, Dolly, prompt/completion or chat (messages, "
                      "ShareGPT) JSON/JSONL; --n-task examples of it are held out for the task metrics"),
    "strategy": dict(choices=["ift", "swat", "mllr"], default="ift", help="ift: all parameters; swat: warm-up "
                     "of --mods, then all; mllr: --mods at --lr, the rest at --lr x --ratio"),
    "mods": dict(help="Mods_Rob: scan JSON, or a selector like 'q,k' or '0-11:q,k;12-29:v'"),
    "steps": dict(type=checks.number(int, 0), default=100, help="optimizer steps of normal training"),
    "warmup-frac": dict(type=checks.number(float, 0), default=0.2, help="swat phase 1 length, as a fraction of --steps"),
    "warmup-steps": dict(type=checks.number(int, 0), help="swat phase 1 steps (overrides --warmup-frac)"),
    "ratio": dict(type=checks.number(float, 0), default=0.1, help="mllr: lr multiplier of the modules outside Mods_Rob"),
    "scope": dict(choices=["all", "modules"], default="all", help="mllr: what runs at --lr x --ratio: every "
                  "parameter outside Mods_Rob, or only the other modules of its kinds (MLPs, embeddings, norms keep --lr)"),
    "lr": dict(type=checks.number(float, 0), default=2e-5, help="peak learning rate"),
    "batch": dict(type=checks.number(int, 1), default=8, help="examples per step (and per task-loss batch)"),
    "accum": dict(type=checks.number(int, 1), default=1, help="gradient accumulation steps"),
    "max-len": dict(type=checks.number(int, 1), default=512, help="tokens per example"),
    "limit": dict(type=checks.number(int, 1), help="use only the first N examples"),
    "weight-decay": dict(type=checks.number(float, 0), default=0.0, help="AdamW weight decay of the matrices"),
    "save-every": dict(type=checks.number(int, 0), default=0, help="checkpoint every N steps (0: only at the end)"),
    "resume": dict(action="store_true", help="continue from the checkpoint in --out (same model, data and settings)"),
    "grad-ckpt": dict(action="store_true", help="activation checkpointing (less memory, slower)"),
    "compile": dict(action="store_true", help="torch.compile each block (faster on GPU after warm-up)"),
    "skip-long": dict(action="store_true", help="leave out examples whose prompt exceeds --max-len"),
    "seed": dict(type=checks.number(int, 0, 2**32 - 1), default=0, help="random seed"),
    "seeds": dict(type=checks.number(int, 0, 2**32 - 1), nargs="+", default=[0], help="tuning seeds: one model per strategy and seed"),
    "strategies": dict(nargs="+", choices=["ift", "swat", "mllr", "control"], default=["ift", "swat", "mllr", "control"],
                       help="the tuned models to make, per seed"),
    "control": dict(choices=["swat", "mllr"], default="swat", help="scheme of the control row"),
    "toy-steps": dict(type=checks.number(int, 1), default=400, help="training steps of the toy model"),
    "eval-harmful": dict(help="harmful prompts for ASR, e.g. AdvBench CSV (default: built-in test split)"),
    "eval-harmless": dict(help="harmless prompts for over-refusal, e.g. XSTest's safe ones (default: built-in test split)"),
    "n-eval": dict(type=checks.number(int, 1), default=100, help="prompts per class for ASR and over-refusal"),
    "max-new-tokens": dict(type=checks.number(int, 1), default=64, help="new tokens per answer"),
    "gen-batch": dict(type=checks.number(int, 1), default=64, help="prompts per generation batch"),
    "n-task": dict(type=checks.number(int, 0), default=64, help="tuning examples held out for the task metrics"),
    "n-acc": dict(type=checks.number(int, 0), default=32, help="of which scored by exact match (short answers only)"),
    "task-tokens": dict(type=checks.number(int, 1), default=256, help="new tokens for exact-match answers"),
    "base": dict(help="the original model, for feature-space drift"),
    "generations": dict(help="write the generations here (JSONL)"),
    "prompt": dict(action="append", help="a prompt (repeatable)"),
    "file": dict(help="prompts from a file (CSV, JSON/JSONL, text)"),
    "temperature": dict(type=checks.number(float, 0), default=0.0, help="sampling temperature (0: greedy)"),
    "top-p": dict(type=checks.number(float, 0, 1), default=1.0, help="nucleus sampling: keep this much probability mass"),
    "answer-tokens": dict(type=checks.number(int, 1), default=128, help="length of the model's own harmless answers"),
    "out": dict(help="where to write: a scan JSON, a checkpoint or a results folder (new, or one swat-min wrote)"),
}
PROBE, SCAN, TRAIN = "harmful harmless", "n modules scale repeats k frac", "steps warmup-frac ratio scope lr batch max-len limit"
EVAL = "eval-harmful eval-harmless n-eval max-new-tokens gen-batch n-task n-acc task-tokens"
COMMANDS = {  # name: (function, what it does, its options besides the model's, its own defaults)
    "probe": (cmd_probe, "fit a probe per layer on harmful vs harmless features; print held-out accuracy",
              f"{PROBE} test-harmful", {}),
    "scan": (cmd_scan, "module robustness scan: perturb each module, measure the probes, pick Mods_Rob",
             f"{PROBE} {SCAN} out seed", {"out": "scan.json"}),
    "train": (cmd_train, "instruction fine-tuning: plain ift, swat (warm-up of Mods_Rob) or mllr",
              f"{TRAIN} data! strategy mods out! warmup-steps accum weight-decay seed save-every resume "
              "grad-ckpt compile skip-long", {}),
    "eval": (cmd_eval, "ASR, over-refusal, feature drift against --base, task loss on --data",
             f"{EVAL} {PROBE} base data batch max-len generations", {}),
    "generate": (cmd_generate, "generate answers to prompts with the model's chat format",
                 "prompt file max-new-tokens temperature top-p", {"max_new_tokens": 128}),
    "align": (cmd_align, "make an aligned start: short SFT of refusals + the model's own harmless answers",
              f"{EVAL} {TRAIN} out! answer-tokens seed", {"steps": 150, "lr": 5e-5}),
    "run": (cmd_run, "the pipeline: probe, scan, tune with ift/swat/mllr/control, evaluate, report",
            f"{PROBE} {SCAN} {TRAIN} {EVAL} data! out! seeds strategies control", {}),
    "demo": (cmd_demo, "the pipeline offline: on a toy model trained here unless --model is given",
             f"{PROBE} {SCAN} {TRAIN} {EVAL} data out! seeds strategies control toy-steps",
             {"steps": 150, "lr": 3e-4, "batch": 16, "n_eval": 52, "max_new_tokens": 24}),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, (fn, what, opts, defaults) in COMMANDS.items():
        p = sub.add_parser(name, help=what, description=what, formatter_class=Help)
        for o in ("model" if name == "demo" else "model!", "device", "dtype", "chat-format", "cache", *opts.split()):
            p.add_argument("--" + o.rstrip("!"), required=o.endswith("!"), **OPTIONS[o.rstrip("!")])
        p.set_defaults(fn=fn, seed=0, **defaults)
    a = ap.parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):  # a console or pipe without a character (an answer's, Δ) shows "?",
        sys.stdout.reconfigure(errors="replace")  # rather than failing after the work is done
    if not os.environ.get("OMP_NUM_THREADS"):  # a user's setting stands (e.g. several runs side by side)
        cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
        torch.set_num_threads(len(cores))  # the cores this process may use (a cluster job's share, not the node's)
    try:
        ins = [getattr(a, k, None) for k in ("model", "base", "data", "harmful", "harmless", "test_harmful",
                                             "eval_harmful", "eval_harmless", "file", "mods")]
        for path in filter(None, (getattr(a, "out", None), getattr(a, "generations", None))):
            real = os.path.realpath(path)
            for i in filter(None, ins):  # an output is never an input, nor a file of the input model's
                ri = os.path.realpath(i)
                if real == ri or (real.startswith(ri + os.sep) and os.path.exists(real)):
                    raise SwatError(f"{path}: would overwrite the input {i}; choose another path")
            check_can_create(real)  # refused before any work; nothing is made yet
        return a.fn(a)
    except KeyboardInterrupt:  # Ctrl-C: one line, what was written stays whole (outputs are atomic)
        out = getattr(a, "out", None)
        print(f"interrupted; results so far in {out}" if out else "interrupted", file=sys.stderr)
        sys.exit(130)
    except SwatError as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # an output path that cannot be written (inputs are checked where they are read)
        sys.exit(f"error: {e.filename}: {e.strerror or e}" if e.filename else f"error: {e}")


if __name__ == "__main__":
    main()
