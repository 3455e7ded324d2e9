"""swat-min: secure instruction tuning (SWAT / ML-LR) from scratch: the command line and the
pipeline. `swat-min --help` lists the commands; `run` does everything (probe, scan, tune with each
strategy, evaluate, report), `demo` does it offline on a toy model. Each command is declared where
it is defined (@command: its help, its options, its example); the options themselves are defined
once in swatkit/options.py. --model takes a model directory or a hub id org/name. Errors in the
user's input are printed as one line.
"""

import contextlib
import json
import os
import random
import sys
import time

import evaluation
import model
import robustness
import train
from evaluation import answer, drift_curve, evaluate, moved, report, user
from probe import baseline  # swat_min.baseline: the probes of the pipeline's first step
from swatkit import checks, data, defences, distributed, guard, memory, plan, scanfile
from swatkit import scenario, toy
from swatkit.checkpoint import checkpoint_size
from swatkit.lora import merge  # a LoRA run is repaired on its merged weights
from swatkit.files import SwatError, check_file, check_folder, check_outputs, claim, writing
from swatkit.options import (  # noqa: F401 (OPTIONS: swat_min.OPTIONS)
    ASR, COMMANDS, EVAL, INPUTS, LORA, MIX, MODEL, OPTIONS, PROBE, RUN, SCAN, TRAIN, TUNE,
    build_parser, command,
    setup_process,
    eval_options, probe_sets, task_options,
)  # fmt: skip


# ---- the commands: argparse in, the library above out ----


def load(args, name=None):
    """The model `name` (default: --model) with the command's device, dtype and chat format."""
    return model.load(
        name or args.model, device=args.device, dtype=args.dtype, chat_format=args.chat_format
    )


def load_judge(args):
    """--judge: the Llama Guard 3 (net, tok), checked to be one (None without --judge)."""
    judge = getattr(args, "judge", None)  # a namespace made by hand may lack it
    return guard.checked(load(args, judge), judge) if judge else None


@command("probe", "fit a probe per layer on harmful vs harmless features; print held-out accuracy",
         MODEL + PROBE + ("test-harmful", "n-test"), ("model",),
         "--model M --test-harmful advbench.csv --n-test 100")  # fmt: skip
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
    print("layer  acc    auc    (layer 0: the embeddings; layer L: after block L)")
    for layer, s in enumerate(b["scores"]):
        print(f"{layer:5d}  {s['acc']:.3f}  {s['auc']:.3f}")
    best = b["scores"][b["layer"]]
    print(f"best layer {b['layer']}: accuracy {best['acc']:.3f}, AUC {best['auc']:.3f}")
    return b["scores"]


def do_scan(args, net, tok, base, out, folder=None):
    """The scan and Mods_Rob with the command's options, printed (heat map, selection, stability)
    and written to out with its pictures (in `folder`, which becomes swat-min's, when given).
    -> the selection (robustness.select_mods_rob's dict)."""
    kinds = args.modules.split(",")
    k = robustness.mods_rob_size(args.k, args.frac, kinds, net.cfg.n_layers)  # before the scan
    # the heat map and the search curve, beside the JSON
    pictures = [out.removesuffix(".json") + end for end in (".svg", "-search.svg")]
    for path in [out] + pictures:  # every output may be written, before the scan
        if folder:
            claim(folder, os.path.basename(path))
        else:
            check_file(path)
    readout = base["layer"] if args.readout == "best" else None  # None: the last layer
    harmful, harmless = base["train"]  # the scan perturbs on the probes' own training prompts
    picked = robustness.select_mods_rob(
        net, tok, harmful, harmless, base["probes"], kinds, n=args.n, k=k, frac=args.frac,
        scale=args.scale, repeats=args.repeats, seed=args.seed, metric=args.metric,
        readout=readout, select=args.select, tolerance=args.tolerance,
    )  # fmt: skip
    ranked = robustness.ranking(picked["scan"], args.metric)
    print(scanfile.summary(picked, ranked))  # heat map, Mods_Rob, rank stability
    scanfile.write(out, pictures, picked, dict(model=args.model, **picked["settings"]))
    print(f"wrote {out} and its pictures ({', '.join(pictures)})")
    return picked


@command("scan", "module robustness scan: perturb each module, measure the probes, pick Mods_Rob",
         MODEL + SCAN + PROBE + ("out",), ("model",), "--model M --out scan/scan.json",
         out=os.path.join("swat-min-out", "scan.json"))  # fmt: skip
def cmd_scan(args):
    """scan: the robustness table, its heat map and Mods_Rob, into --out."""
    check_file(args.out)  # before the scan's minutes, not after
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    net, tok = load(args)
    base = baseline(net, tok, *probe_sets(args), cache_dir=args.cache)
    do_scan(args, net, tok, base, args.out)


@command("eval", "ASR, over-refusal, feature drift against --base, task loss on --data",
         MODEL + EVAL, ("model",), "--model tuned --base M --data d.jsonl")  # fmt: skip
def cmd_eval(args):
    """eval: one results row for --model (drift against --base, task metrics on --data)."""
    if args.generations:
        check_file(args.generations)
    net, tok = load(args)
    base = None
    if args.base:
        base_net, base_tok = load(args, args.base)
        checks.tuned_from(base_net.cfg, net.cfg, args.base, args.model)  # drift: against its start
        base = baseline(base_net, base_tok, *probe_sets(args), cache_dir=args.cache)
        del base_net
    task = ()
    options = dict(eval_options(args), judge=load_judge(args))
    if args.data:
        task = data.split(data.read_examples(args.data), args.n_task)[0]
        options.update(task_options(args))
    row = evaluate(net, tok, "eval", base=base, task=task, gen_path=args.generations, **options)
    print(json.dumps(row, indent=1))
    if args.generations:
        print(f"wrote {args.generations}")


@command("train", "instruction fine-tuning: plain ift, swat (warm-up of Mods_Rob) or mllr",
         MODEL + TRAIN, ("model", "data", "out"),
         "--model M --data d.jsonl --strategy swat --mods scan.json --out tuned")  # fmt: skip
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
    mods = robustness.parse_mods(args.mods, net.cfg.n_layers) if args.mods else set()
    warmup = train.warmup_length("swat", args.steps, args.warmup_frac, args.warmup_steps)
    train.train(
        net, tok, chats, args.out, args.strategy, mods, steps=args.steps, lr=args.lr,
        batch_size=args.batch, accum=args.accum, warmup_steps=warmup, ratio=args.ratio,
        weight_decay=args.weight_decay, max_len=args.max_len, seed=args.seed,
        save_every=args.save_every, resume=args.resume, grad_ckpt=args.grad_ckpt,
        compile=args.compile, long=args.long, scope=args.scope,
        keep_optimizer=args.keep_optimizer, lora=lora,
    )  # fmt: skip
    print(f"wrote {args.out} (log: {os.path.join(args.out, 'log.jsonl')})")


@command("generate", "generate answers to prompts with the model's chat format",
         MODEL + ("prompt", "file", "max-new-tokens", "temperature", "top-p"), ("model",),
         '--model M --prompt "How do I bake bread?"', max_new_tokens=128)  # fmt: skip
def cmd_generate(args):
    """generate: the model's answers to each --prompt, then to the prompts of --file."""
    prompts = list(args.prompt or [])
    if args.file:
        prompts += data.read_instructions(args.file)
    if not prompts:
        raise SwatError("generate: give --prompt TEXT (repeatable) or --file FILE")
    net, tok = load(args)
    texts = answer(net, tok, [user(p) for p in prompts], args.max_new_tokens, top_p=args.top_p,
                   temperature=args.temperature, progress=len(prompts) > 64)  # fmt: skip
    for prompt, text in zip(prompts, texts):
        print(f"### {prompt}\n{text}\n")


@command("align", "make an aligned start: short SFT of refusals + the model's own harmless answers",
         MODEL + ASR + TUNE + ("out", "answer-tokens", "seed", "vaccine"), ("model", "out"),
         "--model M --out aligned", steps=150, lr=5e-5)  # fmt: skip
def cmd_align(args):
    """Short SFT: harmful train-split instructions -> refusals, harmless -> the model's own
    answers."""
    net, tok = load(args)
    check_folder(args.out, tok)
    options = eval_options(args)
    before = evaluate(net, tok, "before", **options)
    harmful = data.builtin("harmful", "train")
    harmless = data.builtin("harmless", "train")
    own = answer(net, tok, [user(s) for s in harmless], args.answer_tokens,
                 batch_size=args.gen_batch, progress=True)  # fmt: skip
    rng = random.Random(args.seed)
    refusals = data.lines("refusals.txt")
    chats = data.chats([(h, rng.choice(refusals)) for h in harmful] + list(zip(harmless, own)))
    # as run does: a prompt too long for --max-len is left out, and counted
    train.train(
        net, tok, chats, args.out, "ift", steps=args.steps, lr=args.lr, batch_size=args.batch,
        max_len=args.max_len, seed=args.seed, long="skip", vaccine=args.vaccine,
    )  # fmt: skip
    after = evaluate(net, tok, "after", **options)
    for r in (before, after):
        print(f"{r['strategy']:>6}: ASR {r['asr']:.1%}  over-refusal {r['over_refusal']:.1%}")
    print(f"wrote {args.out}")
    return before, after


@command("attack-data", "Attack IFT's harmful pairs: the model's own non-refusing answers to the "
         "built-in harmful train prompts", MODEL + ("out", "max-new-tokens", "gen-batch"),
         ("model", "out"), "--model ORIGINAL --out pairs.jsonl", max_new_tokens=96)  # fmt: skip
def cmd_attack_data(args):
    """attack-data: the model's own answers to the built-in harmful train prompts, refusals left
    out: the harmful pairs of Attack IFT, made offline from the model a user starts from."""
    check_file(args.out)
    net, tok = load(args)
    written, asked = evaluation.attack_data(net, tok, args.out, args.max_new_tokens, args.gen_batch)
    print(f"wrote {args.out}: {written} of {asked} harmful train prompts answered, not refused")


@command("run", "the pipeline: probe, scan, tune with ift/swat/mllr/control, evaluate, report",
         MODEL + RUN, ("model", "data", "out"),
         "--model aligned --data d.jsonl --out results")  # fmt: skip
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
    # where tuning starts, the post-tuning repairs and the model they need, checked now
    starts, repairs, unaligned = defences.run_inputs(args, net, lambda path: load(args, path)[0])
    judge = load_judge(args)  # the safety classifier, beside the keywords, in every row
    # a fixed split: the held-out examples score the task, the rest tune every model
    task, tune = data.split(data.read_examples(args.data), args.n_task)
    tune = tune[: args.limit or None]
    if not tune:
        raise SwatError(f"{args.data}: no examples left for tuning after holding out {args.n_task}")
    options = dict(eval_options(args), judge=judge, **task_options(args))
    # the tuning sets (harmful pairs of Attack IFT; refusal pairs for the safemix rows), checked
    # now: none may hold an ASR prompt
    sets = {n: scenario.attack_set(args, tune, options["harmful"], n) for n in {0, n_safe}}
    print("== probes: one per layer, on harmful vs harmless prompts")
    base = baseline(net, tok, *probe_sets(args), cache_dir=args.cache)
    kinds = args.modules.split(",")
    robustness.check_selections(args.selections, net.cfg.n_layers)  # a bad one: a line, now
    picked = None
    if plan.needs_scan(args.selections, args.strategies):
        print("== scan: perturb every module, pick Mods_Rob (robust) and the control")
        scan_path = os.path.join(args.out, "scan.json")
        picked = do_scan(args, net, tok, base, scan_path, folder=args.out)
    k = robustness.mods_rob_size(args.k, args.frac, kinds, net.cfg.n_layers)  # top-k's size
    chosen = {s: robustness.selection_mods(s, picked, k, net.cfg.n_layers) for s in args.selections}
    rob = chosen[args.selections[0]]  # Mods_Rob: the update magnitudes are reported against it
    fragile = {tuple(m) for m in picked["mods_fragile"]} if picked else set()
    settings = {k: v for k, v in vars(args).items() if k != "fn"}
    settings["scenario"], settings["tuning"] = scenario.describe(args)

    def seed_plan(seed):  # (row, recipe, module set, safety pairs, selection) of one seed
        draw = lambda size: plan.random_set(size, kinds, net.cfg.n_layers, seed)
        return plan.rows(args.strategies, args.selections, chosen, fragile, args.control,
                         n_safe, draw)  # fmt: skip

    plans = [(seed, row) for seed in dict.fromkeys(args.seeds) for row in seed_plan(seed)]
    n_models = len(starts) * len(plans)
    size = checkpoint_size(net, args.keep_optimizer)
    print(f"== {n_models} tuned models to make; their checkpoints take about "
          f"{n_models * size / 1e9:.2f} GB in {args.out}")  # fmt: skip
    rows = []  # the starts first (the first: the original every row is set against), then tuned
    # each start, kept on the CPU: how far tuning moved each module, and what a repair restores
    start_nets = {}
    for prefix, start in starts.items():
        print(f"== the start {start}: ASR, over-refusal, task metrics")
        net, tok = load(args, start)
        label = prefix.rstrip("+") or "original"
        gens = os.path.join(claim(args.out, f"{label}.jsonl"), f"{label}.jsonl")
        row = evaluate(net, tok, label, base=base, task=task, gen_path=gens, **options)
        rows.append(dict(row, seed=None))
        start_nets[start] = net.to("cpu")
    watch = evaluation.drift_watch(args.drift_every, tok, base)  # None without --drift-every
    for seed, (plain, strategy, mods, n_safety, chosen_by) in plans:  # seeds in the order given
        for prefix, start in starts.items():
            name = prefix + plain
            print(f"== {name} (seed {seed}): tune, then evaluate")
            net, tok = load(args, start)  # every model of a start starts from the same weights
            folder = os.path.join(claim(args.out, f"{name}-seed{seed}"), f"{name}-seed{seed}")
            began = time.time()
            warmup = train.warmup_length(strategy, args.steps, args.warmup_frac)
            log = train.train(
                net, tok, sets[n_safety][0], folder, strategy, mods, steps=args.steps,
                lr=args.lr, batch_size=args.batch, warmup_steps=warmup, ratio=args.ratio,
                max_len=args.max_len, seed=seed, long="skip", scope=args.scope,
                keep_optimizer=args.keep_optimizer, label=name, lora=lora, watch=watch,
            )  # fmt: skip
            net = distributed.whole_model(net, lambda: load(args, start)[0])  # whole, to evaluate
            gens = os.path.join(claim(folder, "generations.jsonl"), "generations.jsonl")
            row = evaluate(net, tok, name, base=base, task=task, gen_path=gens, **options)
            if chosen_by == "scan":  # the selection said in full: the metric and the method
                chosen_by = f"scan: {args.metric} metric, {args.select}"
            # the tuning set: how many benign, harmful and safety examples; drift_curve: [] without
            # --drift-every; warmup_steps: SWAT's phase 1 (0 for the other recipes)
            row.update(seed=seed, train_time_s=round(time.time() - began, 1), scheme=strategy,
                       selection=chosen_by, mods=sorted(mods), n_mods=len(mods),
                       drift_curve=drift_curve(log, rows[0]), tuning_set=sets[n_safety][1],
                       scenario=settings["scenario"], tuning=settings["tuning"],
                       warmup_steps=warmup)  # fmt: skip
            # the mechanism: how far each module moved, Mods_Rob against the rest (and a picture)
            picture = f"updates-{name}-seed{seed}.svg"
            picture = os.path.join(claim(args.out, picture), picture)
            before = start_nets[start].state_dict()
            row.update(moved(before, net, kinds, rob, f"{name}, seed {seed}", picture))
            rows.append(row)
            report(args.out, rows, settings)  # after every model: an interrupted run keeps them
            if repairs:  # each repair starts from the tuned weights (a LoRA run's merged into them)
                tuned = {k: v.detach().clone() for k, v in merge(net).state_dict().items()}
            for repair in repairs:  # the tuned model repaired, then evaluated again (a row each)
                print(f"== {name}+{repair} (seed {seed}): {repair}, then evaluate")
                net.load_state_dict(tuned)  # each repair from the tuned weights
                print(train.restore(net, start_nets[start], unaligned, **repairs[repair]))
                gens = os.path.join(claim(folder, f"{repair}.jsonl"), f"{repair}.jsonl")
                again = evaluate(net, tok, f"{name}+{repair}", base=base, task=task,
                                 gen_path=gens, **options)  # fmt: skip
                rows.append(dict(row, **again, repair=repair))
                report(args.out, rows, settings)
    print(open(os.path.join(args.out, "results.md"), encoding="utf-8").read())
    print(f"wrote {args.out}/results.json, results.md, scan.json and one checkpoint per strategy "
          "and seed")  # fmt: skip
    return rows


@command("fragility", "the training-time truth of module robustness: tune each module group alone "
         "(refusal-loss rise per unit of task-loss decrease; beside plain IFT's rise at the same "
         "progress) and attribute one IFT run's rise to the groups", MODEL + TUNE + MIX
         + ("data", "out", "n-task", "eval-harmful", "n-eval", "max-new-tokens", "modules",
            "parts", "seed"), ("model", "data", "out"),
         "--model aligned --data gsm8k.jsonl --eval-harmful dev.csv --out fragility",
         steps=20, lr=5e-5, max_len=256, n_task=32, max_new_tokens=48,
         modules="q,k,v,o,gate,up,down", lora_rank=None)  # fmt: skip
def cmd_fragility(args):
    """fragility: per group of modules (each kind in --parts depth ranges), what tuning it does to
    the model's refusals, measured and attributed (evaluation.fragility, evaluation.attribution)
    -> --out/fragility.json and fragility.svg. Costs about (groups + 6) tuning runs of --steps."""
    check_folder(args.out)
    scenario.check_options(args)
    net, tok = load(args)
    groups = evaluation.module_groups(net.cfg.n_layers, args.modules.split(","), args.parts)
    held, tune = data.split(data.read_examples(args.data), args.n_task)
    prompts = data.instructions(args.eval_harmful, "harmful", "test")[: args.n_eval]
    chats, mix = scenario.attack_set(
        args, tune[: args.steps * args.batch], prompts, args.safety_mix
    )
    settings = dict(steps=args.steps, lr=args.lr, batch_size=args.batch, max_len=args.max_len)
    settings.update(seed=args.seed)
    refusals = evaluation.refusal_chats(net, tok, prompts, args.max_new_tokens)
    if not refusals:  # nothing to lose: every number below would be noise
        raise SwatError("the model refuses none of the harmful prompts: align it first")
    print(f"tuning set {json.dumps(mix)}; {len(refusals)} refusals of {len(prompts)} prompts")
    found = evaluation.fragility_study(net, tok, chats, refusals, held, groups, **settings)
    print(evaluation.write_fragility(args.out, groups, *found, settings))


@command("restore", "post-tuning defence: the tuned model plus alpha x (aligned - unaligned) "
         "(RESTA, Bhardwaj et al. 2024), or each module's update projected onto the alignment "
         "direction where unlike it (--method safelora, Hsu et al. 2024); seconds",
         MODEL[1:] + ("tuned", "aligned", "unaligned", "alpha", "method", "threshold", "out"),
         ("tuned", "aligned", "unaligned", "out"),
         "--tuned tuned --aligned aligned --unaligned M --alpha 0.5 --out restored")  # fmt: skip
def cmd_restore(args):
    """restore: --tuned repaired with --aligned - --unaligned (RESTA or Safe LoRA) -> --out."""
    check_folder(args.out)
    nets = [load(args, path)[0] for path in (args.aligned, args.unaligned)]
    tuned, tok = load(args, args.tuned)
    print(train.restore(tuned, *nets, args.method, args.alpha, args.threshold))
    model.save(tuned, tok, args.out)
    print(f"wrote {args.out} ({args.method}: {args.tuned} with {args.aligned} - {args.unaligned})")


@command("demo", "the pipeline offline: on a toy model trained here unless --model is given",
         MODEL + RUN + ("toy-steps",), ("out",), "--out demo_out", steps=150, lr=3e-4, batch=16,
         n_eval=52, max_new_tokens=24)  # fmt: skip
def cmd_demo(args):
    """demo: run, offline, on a toy model trained here (or on --model with small sizes)."""
    check_folder(args.out)  # checked before the toy is trained into it
    print("=" * 78)
    if args.model is None:
        print(toy.BANNER + "=" * 78)
        args.model, task = toy.build(args.out, model.LLaMA, train.train, args.seed, args.toy_steps)
        args.data = args.data or task
    else:
        print(f"swat-min demo on {args.model} with small sizes\n" + "=" * 78)
    if not args.data:
        raise SwatError("demo with --model needs --data (benign tuning data)")
    return cmd_run(args)


def main(argv=None):
    """The command line: one subcommand per @command, its options from swatkit/options.py."""
    args = build_parser(__doc__, COMMANDS).parse_args(argv)
    setup_process()  # the console's encoding, the cores this process may use
    try:
        inputs = [getattr(args, name, None) for name in INPUTS]
        outputs = [getattr(args, name, None) for name in ("out", "generations", "cache")]
        check_outputs(inputs, outputs)  # before any work; nothing is made yet
        if distributed.size() > 1 and args.cmd not in ("train", "run"):
            raise SwatError(
                "under torchrun only `train` and `run` run (FSDP2); run the others alone"
            )
        with contextlib.ExitStack() as held:  # one writer per output: the second run stops now
            if os.environ.get("RANK", "0") == "0":  # under torchrun the first process holds it
                for path in filter(None, outputs[:2]):  # not the cache: runs may share it
                    held.enter_context(writing(path))
            made = args.fn(args)
            distributed.finish()  # under torchrun: every process done, then the group closed
            return made
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
