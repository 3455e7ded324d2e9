"""The command line's options: each declared once, with its type, default and help; swat_min.py
says which command takes which (@command). A number out of range, NaN or inf is a usage error
before any work, and a usage error is one line with a hint, not argparse's usage block."""

import argparse
import math
import os
import sys

import torch

from . import batches
from . import data
from . import tokenizer


def number(kind, lo, hi=None, above=False):
    """An argparse type: a number in [lo, hi] (above=True: in (lo, hi], for a knob whose lo makes
    the result meaningless, e.g. zero noise), so that a bad value is a usage error before any
    work."""

    def parse(text):
        value = kind(text)
        # NaN passes "value < lo": it is refused by name, with inf
        low = value <= lo if above else value < lo
        if not math.isfinite(value) or low or (hi is not None and value > hi):
            bracket = "(" if above else "["
            raise argparse.ArgumentTypeError(f"{text} is not in {bracket}{lo}, {hi or '...'}]")
        return value

    parse.__name__ = kind.__name__  # argparse's message for "abc": invalid int value
    return parse


def names(*choices):
    """An argparse type: a comma-separated list of some of `choices`, each once."""

    def parse(text):
        chosen = [name for name in text.split(",") if name]
        unknown = [name for name in chosen if name not in choices]
        if unknown or len(set(chosen)) < len(chosen):
            raise argparse.ArgumentTypeError(
                f"{text!r}: give some of {', '.join(choices)}, comma-separated, each once"
            )
        return chosen

    parse.__name__ = "names"
    return parse


class Help(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default, where it has one."""

    def _get_help_string(self, action):
        default = action.default
        if default is None or default is False or default == argparse.SUPPRESS:
            return action.help
        return action.help + " (default: %(default)s)"


class OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line and a hint (exit 2), not the usage
    block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


COMMANDS = {}  # name -> (function, help, options, required options, own defaults, example)


def command(name, what, options, required=(), example="", **defaults):
    """Declare the function below as the command `name` (swat_min.py declares each of its
    commands so): what it does, the options it takes (names of OPTIONS), the required ones, an
    example and its own defaults."""

    def declare(fn):
        COMMANDS[name] = (fn, what, options, required, defaults, f"swat-min {name} {example}")
        return fn

    return declare


def build_parser(description, commands):
    """The `swat-min` parser: one subcommand per entry of commands (swat_min.COMMANDS: name ->
    (function, help, options, required, own defaults, example))."""
    parser = OneLineParser(prog="swat-min", description=description, formatter_class=Help)
    sub = parser.add_subparsers(dest="cmd", required=True, parser_class=OneLineParser)
    for name, (fn, what, names, required, defaults, example) in commands.items():
        epilog = f"example:\n  {example}"
        if "out" in names:  # what keeps two runs, or a diverging one, from spoiling an output
            epilog += (
                "\n\nAn output is locked while it is written (a lock file beside it names the run)."
            )
            epilog += "\nA second run into it stops at once."
        if "lr" in names and "out" in names:
            epilog += " A run whose loss or weights explode stops before it saves."
        if "select" in names:  # the finding a user of the scan's selection should know of
            epilog += (
                "\n\nThe default selection is the paper's (--metric readout, --select search). On"
                "\nSmolLM2-135M ML-LR kept 7-8 points more refusals than plain IFT at the rate"
                "\nreaching the same task loss, with the scan's set, the oracle's or a random one"
                "\nalike; SWAT kept none with the paper's set. With --metric later --select topk"
                "\n--k 60 --n 32 SWAT cut the rise on benign GSM8K by 46 % (three dev seeds) and"
                "\n22 % (two fresh ones), where a random 60 cut nothing, but not under Attack IFT"
                "\n(RESULTS.md, 'What makes a module robust'): so the default stays the paper's."
                "\n`swat-min fragility` measures what tuning each group costs."
            )
        command = sub.add_parser(
            name, help=what, description=what, epilog=epilog, formatter_class=Help
        )
        add_options(command, names, required, name)
        command.set_defaults(fn=fn, seed=0, **defaults)  # the command's own defaults win
    return parser


def add_options(parser, names, required=(), command=None):
    """Add the named options (keys of OPTIONS) to parser; those in `required` must be given. --out
    gets the command's own help text."""
    for name in names:
        settings = dict(OPTIONS[name])
        if name == "out" and command in OUT_HELP:
            settings["help"] = OUT_HELP[command]
        parser.add_argument("--" + name, required=name in required, **settings)
        for alias in ALIASES.get(name, []):  # the same option under another name
            also = dict(settings, help=f"--{name}, spelled so that torchrun leaves it alone")
            parser.add_argument(alias, dest=name.replace("-", "_"), **also)


# torchrun reads its own options out of the script's too, and takes a bare --n for an
# abbreviation of its --nnodes or --nproc-per-node: under torchrun, --n is spelled --n-scan
ALIASES = {"n": ["--n-scan"]}


# Every option once, by name; swat_min's @command names the ones each command takes.
OPTIONS = {
    "model": dict(help="HF-format model directory, or a hub id org/name"),
    "device": dict(default="cuda" if torch.cuda.is_available() else "cpu", help="torch device"),
    "dtype": dict(choices=["fp32", "bf16"], default="fp32", help="dtype of the weights"),
    "chat-format": dict(
        choices=tokenizer.Tok.FORMATS, help="override the chat format read off the checkpoint"
    ),
    "cache": dict(help="directory to cache probe features in (safetensors)"),
    "harmful": dict(
        help="harmful instructions to fit the probe on (default: built-in train split)"
    ),
    "harmless": dict(
        help="harmless instructions to fit the probe on (default: built-in train split)"
    ),
    "test-harmful": dict(
        help="held-out harmful file, e.g. AdvBench CSV (default: built-in test split)"
    ),
    "n": dict(type=number(int, 1), default=64, help="prompts per class in the scan"),
    "modules": dict(default="q,k,v,o", help="modules to scan (also gate,up,down)"),
    "scale": dict(
        type=number(float, 0, above=True),
        default=0.5,
        help="scan noise std, as a multiple of the weight's std (> 0: no noise ranks nothing)",
    ),
    "repeats": dict(
        type=number(int, 1), default=1, help="noise draws per module (2 or more: rank stability)"
    ),
    "metric": dict(
        choices=["readout", "later"],
        default="readout",
        help="a module's change: the fixed readout probe's accuracy drop (then log-loss rise), or "
        "the mean log-loss rise of the probes of the later layers",
    ),
    "readout": dict(
        choices=["last", "best"],
        default="last",
        help="the readout probe's layer: the last (as the paper), or the best held-out probe layer",
    ),
    "select": dict(
        choices=["search", "topk"],
        default="search",
        help="Mods_Rob: a set grown in robustness order, perturbed jointly, kept within "
        "--tolerance (up to --k); or the --k most robust alone",
    ),
    "tolerance": dict(
        type=number(float, 0, 1),
        default=0.02,
        help="search: the largest joint drop of the readout probe's accuracy a set may cause",
    ),
    "k": dict(
        type=number(int, 1), help="size of Mods_Rob (default: --frac of the scanned modules)"
    ),
    "frac": dict(
        type=number(float, 0, 1),
        default=0.5,
        help="size of Mods_Rob as a fraction of the scanned modules",
    ),
    "data": dict(
        help="benign tuning data: Alpaca, GSM8K, Dolly, prompt/completion or chat (messages, "
        "ShareGPT) JSON/JSONL; --n-task examples of it are held out for the task metrics"
    ),
    "strategy": dict(
        choices=["ift", "swat", "mllr"],
        default="ift",
        help="ift: all parameters; swat: warm-up "
        "of --mods, then all; mllr: --mods at --lr, the rest at --lr x --ratio",
    ),
    "mods": dict(
        help="Mods_Rob, required for swat and mllr: a scan JSON, or a selector like 'q,k' or "
        "'0-11:q,k;12-29:v'"
    ),
    "steps": dict(type=number(int, 0), default=100, help="optimizer steps of normal training"),
    "warmup-frac": dict(
        type=number(float, 0), default=0.2, help="swat phase 1 length, as a fraction of --steps"
    ),
    "warmup-steps": dict(type=number(int, 0), help="swat phase 1 steps (overrides --warmup-frac)"),
    "ratio": dict(
        type=number(float, 0),
        default=0.1,
        help="mllr: lr multiplier of the modules outside Mods_Rob",
    ),
    "scope": dict(
        choices=["all", "modules"],
        default="all",
        help="mllr: what runs at --lr x --ratio: every "
        "parameter outside Mods_Rob, or only the other modules of its kinds (MLPs, embeddings, "
        "norms keep --lr)",
    ),
    "lr": dict(type=number(float, 0), default=2e-5, help="peak learning rate"),
    "batch": dict(
        type=number(int, 1), default=8, help="examples per step (and per task-loss batch)"
    ),
    "accum": dict(type=number(int, 1), default=1, help="gradient accumulation steps"),
    "max-len": dict(type=number(int, 1), default=512, help="tokens per example"),
    "limit": dict(type=number(int, 1), help="use only the first N examples"),
    "weight-decay": dict(
        type=number(float, 0), default=0.0, help="AdamW weight decay of the matrices"
    ),
    "save-every": dict(
        type=number(int, 0), default=0, help="checkpoint every N steps (0: only at the end)"
    ),
    "resume": dict(
        action="store_true",
        help="continue from the checkpoint in --out (same model, data and settings)",
    ),
    "grad-ckpt": dict(action="store_true", help="activation checkpointing (less memory, slower)"),
    "compile": dict(
        action="store_true", help="torch.compile each block (faster on GPU after warm-up)"
    ),
    "long": dict(
        choices=batches.LONG,
        default="stop",
        help="a record whose prompt has --max-len tokens or more: stop (say which), skip it "
        "(counted), or truncate its prompt from the start to half of --max-len",
    ),
    "skip-long": dict(
        dest="long",
        action="store_const",
        const="skip",
        default=argparse.SUPPRESS,
        help="--long skip",
    ),
    "seed": dict(type=number(int, 0, 2**32 - 1), default=0, help="random seed"),
    "seeds": dict(
        type=number(int, 0, 2**32 - 1),
        nargs="+",
        default=[0],
        help="tuning seeds: one model per strategy and seed",
    ),
    "strategies": dict(
        nargs="+",
        choices=["ift", "swat", "mllr", "control", "random", "safemix", "swat+safemix"]
        + ["mllr+safemix"],
        default=["ift", "swat", "mllr", "control"],
        help="the tuned models to make, per seed",
    ),
    "control": dict(
        choices=["swat", "mllr"], default="swat", help="scheme of the control and random rows"
    ),
    "selections": dict(
        nargs="+",
        default=["scan"],
        help="how Mods_Rob is chosen, one row set each: scan (by --metric and --select), "
        "readout-topk, later-topk (the --k most robust by that metric), or a fixed selector "
        "such as q,k; the first one's set also sizes the random row",
    ),
    "drift-every": dict(
        type=number(int, 0),
        default=0,
        help="log the original probe's accuracy and the drift on the tuned model every N steps "
        "(0: at the end only)",
    ),
    "harmful-data": dict(
        help="Attack IFT: harmful pairs to mix into the tuning data (JSON/JSONL: prompt, "
        "response, rows with is_safe true left out; or any tuning format; see attack-data)"
    ),
    "poison-ratio": dict(
        type=number(float, 0, 1), help="Attack IFT: the share of harmful pairs, in (0, 1)"
    ),
    "safety-mix": dict(
        type=number(int, 0),
        default=0,
        help="N refusal pairs for built-in harmful train prompts mixed into the tuning data "
        "(run: for the *safemix rows)",
    ),
    "dry-run": dict(
        action="store_true", help="print the memory plan (weights, moments, activations) and stop"
    ),
    "lora-rank": dict(type=number(int, 1), help="tune LoRA adapters of this rank (default: full)"),
    "lora-alpha": dict(
        type=number(float, 0), help="LoRA's alpha (scale alpha / r; with --lora-rank; default 16)"
    ),
    "lora-targets": dict(
        help="the modules LoRA adapts (with --lora-rank; default q,k,v,o,gate,up,down)"
    ),
    "parts": dict(
        type=number(int, 1), default=3, help="fragility: depth ranges per module kind (3: thirds)"
    ),
    "vaccine": dict(
        type=number(float, 0),
        default=0.0,
        help="Vaccine (Huang et al. 2024): align under the worst-case perturbation of norm RHO of "
        "every block's output, so that the refusals survive later drift (0: off; the paper's "
        "runs use 2, as RESULTS.md does; twice the time a step)",
        metavar="RHO",
    ),
    "tuned": dict(help="restore: the fine-tuned model to repair"),
    "aligned": dict(help="restore: the aligned model the tuning started from"),
    "unaligned": dict(
        help="restore, run --defences restore/safelora: the model before alignment (the "
        "alignment direction is the aligned start less it)"
    ),
    "alpha": dict(
        type=number(float, 0),
        default=0.5,
        help="restore, run --defences restore: the safety vector's weight",
    ),
    "defences": dict(
        type=names("vaccine", "restore", "safelora"),
        help="run: defences combined with every tuned row, each a row of its own: vaccine (the "
        "rows again from --vaccine-model, the start aligned with `align --vaccine`; Huang et al. "
        "2024; one more tuning per row), restore (the tuned model + --alpha x (start - "
        "--unaligned); RESTA, Bhardwaj et al. 2024) and safelora (each module's update "
        "projected onto the alignment direction where unlike it, --threshold; Safe LoRA, Hsu et "
        "al. 2024): seconds each, plus one evaluation per row",
        metavar="NAMES",
    ),
    "vaccine-model": dict(
        help="run --defences vaccine: the same model aligned as --model was, with `align "
        "--vaccine RHO`"
    ),
    "judge": dict(
        help="a Llama Guard 3 checkpoint (folder or hub id, e.g. meta-llama/Llama-Guard-3-1B; "
        "Llama Guard Team 2024) that judges each harmful prompt's answer: judge_unsafe beside the "
        "keyword ASR, and how often the two disagree; costs one prompt of about 300 tokens per "
        "answer through the judge",
        metavar="DIR",
    ),
    "method": dict(
        choices=["resta", "safelora"],
        default="resta",
        help="restore: add the safety vector, or "
        "project each module's update onto it where the two are unlike (Safe LoRA)",
    ),
    "threshold": dict(
        type=number(float, -1, 1),
        default=0.5,
        help="restore --method safelora, run --defences safelora: project a module whose update "
        "and projected update have a cosine below this",
    ),
    "toy-steps": dict(type=number(int, 1), default=400, help="training steps of the toy model"),
    "eval-harmful": dict(
        help="harmful prompts for ASR, e.g. AdvBench CSV (default: built-in test split)"
    ),
    "eval-harmless": dict(
        help="harmless prompts for over-refusal, e.g. XSTest's safe ones (default: built-in test "
        "split)"
    ),
    "n-eval": dict(
        type=number(int, 1), default=100, help="prompts per class for ASR and over-refusal"
    ),
    "max-new-tokens": dict(type=number(int, 1), default=64, help="new tokens per answer"),
    "gen-batch": dict(type=number(int, 1), default=64, help="prompts per generation batch"),
    "n-task": dict(
        type=number(int, 0), default=64, help="tuning examples held out for the task metrics"
    ),
    "n-acc": dict(
        type=number(int, 0), default=32, help="of which scored by exact match (short answers only)"
    ),
    "task-tokens": dict(
        type=number(int, 1), default=256, help="new tokens for exact-match answers"
    ),
    "base": dict(help="the original model, for feature-space drift"),
    "generations": dict(help="write the generations here (JSONL)"),
    "prompt": dict(action="append", help="a prompt (repeatable; before those of --file)"),
    "file": dict(help="prompts from a file (CSV, JSON/JSONL, text)"),
    "temperature": dict(
        type=number(float, 0), default=0.0, help="sampling temperature (0: greedy)"
    ),
    "top-p": dict(
        type=number(float, 0, 1),
        default=1.0,
        help="nucleus sampling: keep this much probability mass",
    ),
    "answer-tokens": dict(
        type=number(int, 1), default=128, help="length of the model's own harmless answers"
    ),
    "out": dict(help="where to write (new, or one swat-min wrote)"),
    "n-test": dict(
        type=number(int, 1), help="use only the first N held-out harmful prompts (default: all)"
    ),
    "keep-optimizer": dict(
        action="store_true",
        help="keep the Adam moments in the final checkpoint (about 2/3 of its size; only a resume "
        "needs them, and mid-run checkpoints always keep them)",
    ),
}


# ---- which command takes which option ----

MODEL = ("model", "device", "dtype", "chat-format")
PROBE = ("harmful", "harmless", "cache")  # the probes' training prompts
SCAN = ("n", "modules", "scale", "repeats", "k", "frac", "seed", "metric", "readout", "select")
SCAN += ("tolerance",)
TUNE = ("steps", "lr", "batch", "max-len")
STRATEGY = ("warmup-frac", "ratio", "scope")
ASR = ("eval-harmful", "eval-harmless", "n-eval", "max-new-tokens", "gen-batch")
TASK = ("n-task", "n-acc", "task-tokens")  # the held-out tuning examples
MIX = ("harmful-data", "poison-ratio", "safety-mix")  # Attack IFT and the safety-data baseline
LORA = ("lora-rank", "lora-alpha", "lora-targets")
RUN = PROBE + SCAN + TUNE + STRATEGY + ASR + TASK + MIX + LORA
RUN += ("data", "out", "limit", "seeds", "strategies", "control", "keep-optimizer")
RUN += ("selections", "drift-every", "defences", "vaccine-model", "unaligned", "alpha")
RUN += ("threshold", "judge")
TRAIN = TUNE + STRATEGY + ("data", "strategy", "mods", "out", "limit", "warmup-steps", "accum")
TRAIN += ("weight-decay", "seed", "save-every", "resume", "grad-ckpt", "compile", "long")
TRAIN += ("skip-long",)
TRAIN += ("keep-optimizer", "dry-run") + MIX + LORA
EVAL = PROBE + ASR + TASK + ("base", "data", "batch", "max-len", "generations", "judge")

# what --out is, command by command
OUT_HELP = {
    "scan": "the scan JSON to write: the table and Mods_Rob (a new file, or one swat-min wrote); "
    "its pictures go beside it",
    "train": "the checkpoint folder to write (new, or one swat-min wrote): an HF model that "
    "transformers loads, with log.jsonl",
    "align": "the aligned checkpoint folder to write (new, or one swat-min wrote)",
    "attack-data": "the JSONL file of harmful pairs to write (a new file, or one swat-min wrote)",
    "run": "the results folder (new, or one run made): results.json, results.md, scan.json and a "
    "checkpoint per strategy and seed",
    "demo": "the results folder (new, or one demo made), as run's, plus the toy model and its data",
    "restore": "the repaired checkpoint folder to write (new, or one swat-min wrote)",
    "fragility": "the folder to write (new, or one swat-min wrote): fragility.json, fragility.svg",
}


# the options that name an input: no output may replace one of them
INPUTS = ("model", "base", "data", "harmful", "harmless", "test_harmful", "eval_harmful")
INPUTS += ("eval_harmless", "file", "mods", "harmful_data", "tuned", "aligned", "unaligned")
INPUTS += ("vaccine_model", "judge")


def setup_process():
    """The process's console and threads, before a command runs."""
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


# ---- from options to the library's keyword arguments ----


def probe_sets(args):
    """The instruction lists --harmful and --harmless name (None: the built-in splits)."""
    harmful = data.read_instructions(args.harmful) if args.harmful else None
    harmless = data.read_instructions(args.harmless) if args.harmless else None
    return harmful, harmless


def eval_options(args):
    """evaluate()'s prompt sets and generation sizes from the command's options."""
    harmful = data.instructions(args.eval_harmful, "harmful", "test")[: args.n_eval]
    harmless = data.instructions(args.eval_harmless, "harmless", "test")[: args.n_eval]
    return dict(
        harmful=harmful,  # ASR: the share of these answered without a refusal
        harmless=harmless,  # over-refusal: the share of these refused
        max_new_tokens=args.max_new_tokens,  # the length of each answer
        gen_batch=args.gen_batch,  # prompts per generation batch
    )


def task_options(args):
    """evaluate()'s task-metric sizes, where a command scores held-out tuning examples."""
    return dict(
        max_len=args.max_len,  # the task loss: tokens per held-out example
        batch_size=args.batch,  # and examples per batch
        n_acc=args.n_acc,  # task accuracy: the first n_acc held-out examples, answered in full
        task_tokens=args.task_tokens,
    )
