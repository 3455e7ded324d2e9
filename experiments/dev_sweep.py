"""The dev-set sweep behind the chosen settings (SWAT's warm-up length, ML-LR's ratio, LoRA's rate;
RESULTS.md has its runs).

Every setting tunes the same start on the same data, steps and seed, and is scored only on data that
the reported results never use: the harmful prompts of --dev-harmful from row --dev-start on (the
README's tables report the first 100 of the same file), and --n-dev tuning examples held out from
tuning as well as from `run`'s task metrics. One JSON line per setting goes to stdout and to
OUT/sweep.jsonl, and OUT/results.md holds the table (with the cut of the ASR rise and the task loss
against ift). With --harmful-data and --poison-ratio every setting tunes on Attack IFT's mix, the
same one `run` makes (its dev scoring prompts may not be among the harmful pairs).

  python experiments/dev_sweep.py --model aligned --data ../shared/data/gsm8k/train.jsonl \\
      --mods gsm8k/scan.json --dev-harmful ../shared/data/advbench/harmful_behaviors_dev.csv --out
      sweep \\
      ift mllr:ratio=0.5 mllr:ratio=0.1,scope=modules swat:warmup_steps=40
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from swatkit import data
import evaluation
from swatkit import files
from swatkit import options
from swatkit import scenario
import swat_min
import train
from swatkit.files import SwatError


def parse(setting):
    """'mllr:ratio=0.5,scope=modules' -> ('mllr', {'ratio': 0.5, 'scope': 'modules'})"""
    strategy, _, opts = setting.partition(":")

    def num(v):  # "40" -> 40, "0.1" / "1e-5" / "-1" -> numbers, "modules" stays a string
        for cast in (int, float):
            try:
                return cast(v)
            except ValueError:
                pass
        return v

    try:
        kw = {k: num(v) for k, v in (o.split("=") for o in opts.split(",") if o)}
    except ValueError:
        kw = None
    if (
        strategy not in ("ift", "swat", "mllr")
        or kw is None
        or not set(kw) <= {"ratio", "warmup_steps", "weight_decay", "accum", "scope", "lr"}
    ):
        raise SwatError(
            f"setting {setting!r}: expected ift, swat or mllr[:key=value,...] with keys ratio, "
            "warmup_steps, weight_decay, accum, scope, lr"
        )
    return strategy, kw


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=options.Help)
    ap.add_argument(
        "settings",
        nargs="+",
        help="strategy[:key=value,...] of train.train, e.g. ift, ift:lr=1e-3, "
        "mllr:ratio=0.5, swat:warmup_steps=40 (swat's warm-up defaults to 20%% of --steps)",
    )
    names = (
        "model",
        "data",
        "mods",
        "out",
        "device",
        "dtype",
        "chat-format",
        "cache",
        "steps",
        "lr",
        "batch",
        "max-len",
        "seed",
        "n-eval",
        "max-new-tokens",
        "gen-batch",
        "n-task",
        "lora-rank",
        "lora-alpha",
        "lora-targets",
        "harmful-data",
        "poison-ratio",
    )
    options.add_options(ap, names, required=("model", "data", "mods", "out"))
    ap.add_argument("--dev-harmful", required=True, help="harmful prompts (CSV, JSON/JSONL, text)")
    ap.add_argument("--dev-start", type=int, default=200, help="first row of --dev-harmful to use")
    ap.add_argument(
        "--n-dev", type=int, default=64, help="tuning examples held out for the dev task loss"
    )
    args = ap.parse_args(argv)
    settings = [parse(s) for s in args.settings]
    scenario.check_options(args)  # Attack IFT's mix and LoRA, before any work
    harmful = data.read_instructions(args.dev_harmful)[args.dev_start :]
    if not harmful:
        raise SwatError(f"{args.dev_harmful}: no prompts from row {args.dev_start} on")
    for entry in (
        "dev_harmful.jsonl",
        "sweep.jsonl",
    ):  # OUT is swat-min's: nothing of the user's is replaced
        files.claim(args.out, entry)
    # a record of the prompts scored (evaluate takes them as a list)
    files.write_text(
        os.path.join(args.out, "dev_harmful.jsonl"), "".join(json.dumps(h) + "\n" for h in harmful)
    )
    # the first part is `run`'s held-out set
    _, tune = data.split(data.read_examples(args.data), args.n_task)
    dev = tune[-args.n_dev :]  # held out from tuning too: the dev task loss
    tune = tune[: -args.n_dev]
    # Attack IFT: run's own mix (the same benign examples first); no dev ASR prompt may be in it
    tune, held = scenario.attack_set(args, tune, harmful)
    print(f"tuning set: {json.dumps(held)}", flush=True)
    net, tok = swat_min.load(args)
    base = swat_min.baseline(net, tok, cache_dir=args.cache)
    mods = train.parse_mods(args.mods, net.cfg.n_layers)
    # task loss only
    scoring = dict(
        harmful=harmful[: args.n_eval],
        harmless=data.builtin("harmless", "test")[: args.n_eval],
        max_new_tokens=args.max_new_tokens,
        gen_batch=args.gen_batch,
        max_len=args.max_len,
        batch_size=args.batch,
        n_acc=0,
    )
    rows = []
    with open(os.path.join(args.out, "sweep.jsonl"), "a", encoding="utf-8") as log:
        for s, (strategy, kw) in zip(["original"] + args.settings, [(None, {})] + settings):
            name = s.replace(":", "-").replace(",", "-")
            start = time.time()
            for entry in (name, name + ".jsonl"):
                files.claim(args.out, entry)
            # every setting starts again from the original weights ("original": them as loaded)
            if strategy:
                net, tok = swat_min.load(args)
                kw.setdefault("warmup_steps", train.warmup_length(strategy, args.steps))
                kw.setdefault("lr", args.lr)  # a setting may choose its own rate (LoRA's)
                train.train(
                    net,
                    tok,
                    tune,
                    os.path.join(args.out, name),
                    strategy,
                    set() if strategy == "ift" else mods,
                    steps=args.steps,
                    lora=scenario.lora_settings(args, net),  # None: full tuning
                    batch_size=args.batch,
                    max_len=args.max_len,
                    seed=args.seed,
                    long="skip",
                    **kw,
                )
            gen_path = os.path.join(args.out, name + ".jsonl")
            row = evaluation.evaluate(
                net, tok, s, base=base, task=dev, gen_path=gen_path, **scoring
            )
            rows.append(
                dict(
                    row,
                    seed=args.seed if strategy else None,
                    train_time_s=round(time.time() - start, 1),
                )
            )
            evaluation.report(args.out, rows, vars(args))  # OUT/results.md: the table, against ift
            line = json.dumps({k: v for k, v in rows[-1].items() if k != "drift_detail"})
            print(line, flush=True)
            print(line, file=log, flush=True)


if __name__ == "__main__":
    try:
        main()
    except SwatError as e:
        sys.exit(f"error: {e}")
