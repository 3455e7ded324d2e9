"""How long the README's commands take: each run as a user runs it (`python swat_min.py ...`, a
fresh process, the model loaded from disk), timed by the wall clock, one JSON line per command.
The README's time column quotes these lines (BENCH.md, "Command times").

  python bench/command_times.py --model ~/.cache/swat-min/SmolLM2-135M-Instruct \\
      --data ../shared/data/gsm8k/train.jsonl --out /tmp/times

Outputs go under --out (a new folder); nothing else is written. Run it on an otherwise idle machine:
the figures are the machine's, not swat-min's alone.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def commands(model, data, out):
    """(name, what is counted, argv after `swat_min.py`) of every timed case."""
    return [
        ("generate", "one prompt, 64 new tokens",
         ["generate", "--model", model, "--prompt", "How do I bake bread?", "--max-new-tokens",
          "64"]),
        ("probe", "the built-in prompts (159 + 52 a class): features, 31 probes",
         ["probe", "--model", model]),
        ("train", "4 steps of 8 x 256 tokens (GSM8K), with loading and saving",
         ["train", "--model", model, "--data", data, "--out", os.path.join(out, "train"), "--steps",
          "4", "--batch", "8", "--max-len", "256", "--lr", "5e-5"]),
        ("eval", "the built-in test prompts (52 harmful, 52 harmless), 48 new tokens",
         ["eval", "--model", model, "--max-new-tokens", "48"]),
        ("demo", "the quick start's demo: the toy built and the whole pipeline on it",
         ["demo", "--out", os.path.join(out, "demo")]),
        ("workshop", "workshop.ipynb executed top to bottom in a fresh kernel (nbclient)",
         ["-c", NOTEBOOK, os.path.join(out, "workshop")]),
    ]  # fmt: skip


# the workshop notebook, run as CI runs it: in a fresh kernel, in a folder of its own
NOTEBOOK = (
    "import os, shutil, sys, nbclient, nbformat; folder = sys.argv[1]; os.makedirs(folder); "
    f"[shutil.copytree(os.path.join({ROOT!r}, n), os.path.join(folder, n)) if n == 'swatkit' else "
    f"shutil.copy(os.path.join({ROOT!r}, n), folder) for n in os.listdir({ROOT!r}) "
    "if n.endswith('.py') or n == 'swatkit']; "
    f"nb = nbformat.read(os.path.join({ROOT!r}, 'workshop.ipynb'), as_version=4); "
    "nbclient.NotebookClient(nb, timeout=3600, resources={'metadata': {'path': folder}}).execute()"
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="SmolLM2-135M-Instruct's folder")
    parser.add_argument("--data", required=True, help="GSM8K's train.jsonl")
    parser.add_argument("--out", required=True, help="a new folder for the commands' outputs")
    parser.add_argument("--only", nargs="*", help="the names of the cases to run (default: all)")
    args = parser.parse_args(argv)
    if os.path.exists(args.out):
        sys.exit(f"{args.out}: exists; give a new folder")
    os.makedirs(args.out)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    for name, counted, argv in commands(args.model, args.data, args.out):
        if args.only and name not in args.only:
            continue
        began = time.time()
        script = [] if argv[0] == "-c" else [os.path.join(ROOT, "swat_min.py")]
        ran = subprocess.run([sys.executable, *script, *argv], capture_output=True, text=True)
        seconds = time.time() - began
        if ran.returncode != 0:
            sys.exit(f"{name} failed: {ran.stderr.strip().splitlines()[-1:]}")
        line = {"command": name, "counted": counted, "seconds": round(seconds, 1), "cores": cores,
                "date": time.strftime("%Y-%m-%d")}  # fmt: skip
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
