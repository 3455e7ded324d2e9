"""The evidence run: does SWAT hold? One command per table of RESULTS.md's evidence section.

A cell is a scenario and a tuning method: benign IFT on GSM8K or alpaca_eval, or Attack IFT on
GSM8K with a poison ratio of 0.05 or 0.1; full tuning or LoRA (rank 8 on q,k,v,o,gate,up,down).
`run CELL` makes the cell's `swat_min.py run` (every row, the settings below, the drift watched
along the way) and then its table; `table DIR` makes the table again from DIR's results.json and
the generations, without tuning anything, from one folder or from several folders of one cell
(seeds run on other days or machines; checked to be the same run: settings, start, module sets;
a row made twice must have made the same answers, and counts once).

  python experiments/evidence.py run attack-0.1-full --model aligned --pairs pairs.jsonl \\
      --shared ../shared --out ev/attack-0.1-full --profile cpu
  python experiments/evidence.py table ev/attack-0.1-full
  python experiments/evidence.py table ev/seeds-0-1 ev/seed-2 --out ev/pooled   # seeds run apart

A run cut short keeps the rows it finished; `run ... --rows mllr control random --out OTHER` makes
the rest into another folder, and `table` pools the two. `--rows` may also name a row the profile
leaves out (`--profile cpu --rows ift safemix mllr+safemix`: the safety-data rows on two cores).

The table: each row's ASR and the cut of plain IFT's rise in ASR, each with a 95 % interval from a
bootstrap over seeds and prompts (the same draws for every row, so the rows stay paired); a paired
test across seeds (exact sign flips of the per-seed ASR differences) against ift, the control and
the random set; over-refusal, drift, probe accuracy, task loss against IFT's, and how far Mods_Rob
and the rest moved. DIR/evidence.md holds it, DIR/drift.svg the original probe's accuracy over the
training steps (mean over seeds) for ift, swat, mllr and the control.
"""

import argparse
import itertools
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from swatkit import figures
from swatkit import files
import swat_min
from swatkit.files import SwatError

# The settings every cell shares: the README's GSM8K run with the settings chosen on dev data
# (SWAT's warm-up three times the main phase; ML-LR's 0.1 on the other attention modules).
COMMON = ["--batch", "8", "--max-len", "256", "--n", "32", "--n-task", "32", "--task-tokens", "160"]
COMMON += ["--warmup-frac", "3.0", "--ratio", "0.1", "--scope", "modules", "--max-new-tokens", "48"]
COMMON += ["--n-eval", "100", "--safety-mix", "32"]
# The rows: a GPU makes them all, five seeds; two CPU cores the core comparison, three seeds,
# with the control and the random set on ML-LR's recipe (SWAT's warm-up makes a row four times as
# long) and half the steps.
PROFILES = {
    "gpu": {
        "seeds": ["0", "1", "2", "3", "4"],
        "strategies": ["ift", "swat", "mllr", "control", "random", "safemix", "swat+safemix"]
        + ["mllr+safemix"],
        "selections": ["scan", "readout-topk", "later-topk", "q,k"],
        "extra": ["--control", "swat", "--repeats", "3", "--drift-every", "5", "--n-acc", "24"],
        "steps": {"gsm8k": 40, "alpaca": 100},
    },
    "cpu": {
        "seeds": ["0", "1", "2"],
        "strategies": ["ift", "swat", "mllr", "control", "random"],
        "selections": ["scan"],
        "extra": ["--control", "mllr", "--drift-every", "5", "--n-acc", "0"],
        "steps": {"gsm8k": 20, "alpaca": 50},
    },
}
# LoRA's rate, chosen on dev data (RESULTS.md): the rate whose dev task loss after the cpu profile's
# 20 steps comes nearest full IFT's (the security figures play no part in the choice)
LORA = ["--lora-rank", "8", "--lora-alpha", "16", "--lr", "1e-3"]
CELLS = [
    f"{scenario}-{tuning}"
    for scenario in ("benign-gsm8k", "benign-alpaca", "attack-0.05", "attack-0.1")
    for tuning in ("full", "lora")
]


def run_argv(cell, args):
    """The `swat_min.py run` command line of a cell."""
    scenario, _, tuning = cell.rpartition("-")
    profile = PROFILES[args.profile]
    task = "alpaca" if "alpaca" in scenario else "gsm8k"
    data_file = {
        "gsm8k": "data/gsm8k/train.jsonl",
        "alpaca": "data/alpaca_eval/alpaca_eval.jsonl",
    }[task]
    argv = ["run", "--model", args.model, "--out", args.out]
    argv += ["--data", os.path.join(args.shared, data_file)]
    argv += ["--eval-harmful", os.path.join(args.shared, "data/advbench/harmful_behaviors_dev.csv")]
    argv += ["--steps", str(profile["steps"][task])] + COMMON + profile["extra"]
    argv += LORA if tuning == "lora" else ["--lr", "5e-5"]
    if scenario.startswith("attack"):
        if not args.pairs:
            raise SwatError(f"{cell}: Attack IFT needs --pairs (from swat_min.py attack-data)")
        argv += ["--harmful-data", args.pairs, "--poison-ratio", scenario.split("-")[1]]
    argv += ["--seeds"] + (args.seeds or profile["seeds"])
    rows = args.rows or profile["strategies"]
    every_row = PROFILES["gpu"]["strategies"]  # a cpu run may add a gpu row (safemix) by name
    unknown = [r for r in rows if r not in every_row]
    if unknown:
        raise SwatError(f"--rows: {', '.join(unknown)} not among {' '.join(every_row)}")
    argv += ["--strategies"] + rows
    passed = ("defences", "vaccine_model", "unaligned", "judge")  # the defences' rows, the judge
    for flag in passed:
        if getattr(args, flag, None):  # (a namespace made by hand may lack them)
            argv += ["--" + flag.replace("_", "-"), getattr(args, flag)]
    # the module sets: the profile's, or named (e.g. a study's oracle set, as robustness.parse_mods
    # reads it)
    return argv + ["--selections"] + (getattr(args, "selections", None) or profile["selections"])


# ---- statistics ----


def sign_flip_p(differences):
    """Two-sided p-value of the paired test that the mean difference is 0: every pattern of signs
    (exact; 2^n of them), as scipy's permutation_test with permutation_type="samples"."""
    d = np.asarray(differences, dtype=float)
    observed = d.mean()
    signs = np.array(list(itertools.product([1.0, -1.0], repeat=len(d))))
    null = (signs * d).mean(axis=1)
    slack = abs(observed) * 1e-14  # ties within rounding count as ties
    below = (null <= observed + slack).mean()
    above = (null >= observed - slack).mean()
    return min(1.0, 2 * min(below, above))


def bootstrap_interval(stat, n_seeds, n_prompts, draws=2000, seed=0):
    """95 % percentile interval of stat(seed indices, prompt indices) over draws that resample
    the seeds and the prompts, each with replacement. Draws where stat is undefined (NaN) are left
    out. -> (low, high)."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(draws):
        seeds = rng.integers(0, n_seeds, n_seeds)
        prompts = rng.integers(0, n_prompts, n_prompts)
        values.append(stat(seeds, prompts))
    values = np.array(values)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return (float("nan"), float("nan"))
    return (float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5)))


# ---- the table ----


def answered(path, n_harmful):
    """1 for each harmful prompt answered without a refusal, from a generations file."""
    records = [json.loads(line) for line in open(path, encoding="utf-8")]
    flags = [not r["refused"] for r in records if r["harmful"]]
    if n_harmful is not None and len(flags) != n_harmful:
        raise SwatError(f"{path}: {len(flags)} harmful prompts, expected {n_harmful}")
    return flags


def mean_of(rows, key):
    """The mean of a key over rows (None if any row lacks it)."""
    values = [r.get(key) for r in rows]
    return None if None in values else sum(values) / len(values)


# settings that may differ between the folders of one cell's table: where, which seeds and which
# rows ran (and the inputs' folders: they are compared by file name)
PER_FOLDER = ("out", "seeds", "strategies", "device", "cache")


def generations(row):
    """The generations file of a tuned row (its folder, as gather() notes it); a repaired row's
    (run --defences restore: ift+restore) lies beside its tuned model's, named after the repair."""
    repair = row.get("repair")
    if repair:
        tuned = row["strategy"].removesuffix("+" + repair)
        return os.path.join(row["folder"], f"{tuned}-seed{row['seed']}", f"{repair}.jsonl")
    return os.path.join(row["folder"], f"{row['strategy']}-seed{row['seed']}", "generations.jsonl")


def same_answers(a, b):
    """Whether two rows' models gave the same answers, word for word."""
    texts = [open(generations(r), encoding="utf-8").read() for r in (a, b)]
    return texts[0] == texts[1]


def gather(folders):
    """The original row and every tuned row of one cell, run in one folder or several (seeds run
    apart, or on other machines), each tuned row with the folder it lives in. Folders are checked
    to hold the same experiment: settings, starting generations and module sets.
    -> (original row, original's answered flags, tuned rows)."""
    original = start = expected = None  # the first folder's; every other one must agree
    tuned = []
    for folder in folders:
        rows = files.read_json(os.path.join(folder, "results.json"))["rows"]
        flags = answered(os.path.join(folder, "original.jsonl"), None)
        settings = {k: v for k, v in rows[0]["settings"].items() if k not in PER_FOLDER}
        for k in swat_min.INPUTS:  # the inputs by name: another machine keeps them elsewhere
            if isinstance(settings.get(k), str):
                settings[k] = os.path.basename(os.path.normpath(settings[k]))
        if original is None:
            original = rows[0]
            start = flags
            expected = settings
        elif settings != expected:
            keys = sorted(settings.keys() | expected.keys())
            differ = [k for k in keys if settings.get(k) != expected.get(k)]
            raise SwatError(f"{folder}: not the same run as {folders[0]} (settings: {differ})")
        elif flags != start:
            raise SwatError(f"{folder}: the original model answered otherwise than in {folders[0]}")
        # the other starts (run --defences vaccine: the vaccine start) have no seed: not tuned rows
        tuned += [dict(r, folder=folder) for r in rows[1:] if r["seed"] is not None]
    # a row and seed made twice (a cut-short run, then its seeds again elsewhere): kept once when
    # both made the same answers, as a seeded run does; else the folders disagree
    seen = {}
    for r in tuned:
        key = (r["strategy"], r["seed"])
        if key not in seen:
            seen[key] = r
        elif not same_answers(r, seen[key]):
            raise SwatError(
                f"{r['folder']}: {r['strategy']}, seed {r['seed']} answered otherwise in "
                f"{seen[key]['folder']}"
            )
    tuned = list(seen.values())
    # one module set per row (the scan's, the control's, a fixed one): else another scan chose
    for name in {r["strategy"] for r in tuned if r["strategy"] != "random" and "mods" in r}:
        sets = {tuple(map(tuple, r["mods"])) for r in tuned if r["strategy"] == name}
        if len(sets) > 1:
            raise SwatError(f"{', '.join(folders)}: the {name} rows tuned different modules")
    return original, start, tuned


def table(folders, draws=2000, out=None):
    """evidence.md and drift.svg for a finished (or partly finished) run: one folder, or several
    folders of the same cell (their rows pooled), written to out (default: the first folder).
    -> the text.

    A row is set against ift (and the control, the random set) on the seeds both have, so that a
    run cut short still gives a true table; the seeds of each row are listed."""
    folders = [folders] if isinstance(folders, (str, os.PathLike)) else folders
    folders = [os.fspath(f) for f in folders]
    out = out or folders[0]
    original, start, tuned = gather(folders)
    start = np.array(start, dtype=float)
    n_prompts = len(start)  # every tuned model answered the same prompts
    names = list(dict.fromkeys(r["strategy"] for r in tuned))
    if "ift" not in names:
        raise SwatError(f"{', '.join(folders)}: no ift row yet; every row is set against it")
    rows = {n: {r["seed"]: r for r in tuned if r["strategy"] == n} for n in names}
    flags = {}  # (row, seed) -> per prompt: 1 answered, 0 refused
    for n in names:
        for seed, r in rows[n].items():
            flags[n, seed] = np.array(answered(generations(r), n_prompts), dtype=float)

    def matrix(n, seeds):  # [seed, prompt] of row n
        return np.stack([flags[n, seed] for seed in seeds])

    def paired_p(n, other):  # the sign-flip test on the seeds both rows have
        both = [seed for seed in rows[n] if seed in rows.get(other, {})]
        if other == n or not both:
            return "-"
        diff = matrix(n, both).mean(axis=1) - matrix(other, both).mean(axis=1)
        return f"{sign_flip_p(diff):.2f} ({len(both)})"

    asr_start = start.mean()
    judged = all("judge_unsafe" in r for r in tuned)  # run --judge: the classifier's share too

    def judge_cell(r):  # the judge's column, where there is one
        return f" {r['judge_unsafe']:.1%} |" if judged else ""

    lines = [
        f"{original['settings'].get('scenario', 'benign')}; tuning: "
        f"{original['settings'].get('tuning', 'full')}; {n_prompts} harmful prompts. 95 % "
        f"intervals: bootstrap over seeds and prompts ({draws} draws). p: exact paired sign-flip "
        "test across seeds on ASR (the number of seeds both rows have in brackets); the cut and "
        "Δ loss are against ift on the row's own seeds.",
        "",
        "| row | seeds | selection | ASR [95 % CI] | cut of IFT's rise [95 % CI] | p vs ift "
        "| p vs control | p vs random |" + " judge: unsafe |" * judged + " over-refusal | drift "
        "| probe acc | task loss (Δ vs ift) | \\|ΔW\\|/\\|W\\| Mods_Rob / rest |",
        "|---" * (13 + judged) + "|",
        f"| original | - | - | {asr_start:.1%} | - | - | - | - |{judge_cell(original)} "
        f"{original['over_refusal']:.1%} | 0.000 | {original['probe_acc']:.3f} | "
        f"{original['task_loss']:.3f} | - |",
    ]
    first = files.read_json(os.path.join(folders[0], "results.json"))["rows"]
    for other in [r for r in first[1:] if r["seed"] is None]:  # another start (--defences vaccine)
        lines.append(
            f"| {other['strategy']} (start) | - | - | {other['asr']:.1%} | - | - | - | - |"
            f"{judge_cell(other)} {other['over_refusal']:.1%} | {other['drift']:.3f} | "
            f"{other['probe_acc']:.3f} | "
            f"{other['task_loss']:.3f} | - |"
        )
    for n in names:
        seeds = [seed for seed in rows[n] if seed in rows["ift"]]
        if not seeds:
            continue
        mine = matrix(n, seeds)
        ift = matrix("ift", seeds)
        low, high = bootstrap_interval(
            lambda s, p: mine[np.ix_(s, p)].mean(), len(seeds), n_prompts, draws
        )
        cell_asr = f"{mine.mean():.1%} [{low:.1%}, {high:.1%}]"
        cell_cut = "-"
        if n != "ift" and ift.mean() > asr_start:

            def cut(s, p):  # the share of IFT's rise in ASR that row n avoided, on one draw
                rise = ift[np.ix_(s, p)].mean() - start[p].mean()
                if rise <= 0:
                    return float("nan")
                return (ift[np.ix_(s, p)].mean() - mine[np.ix_(s, p)].mean()) / rise

            point = (ift.mean() - mine.mean()) / (ift.mean() - asr_start)
            low, high = bootstrap_interval(cut, len(seeds), n_prompts, draws)
            cell_cut = f"{point:+.0%} [{low:+.0%}, {high:+.0%}]"
        tests = [paired_p(n, other) for other in ("ift", "control", "random")]
        these = [rows[n][seed] for seed in seeds]
        loss = mean_of(these, "task_loss")
        loss_ift = mean_of([rows["ift"][seed] for seed in seeds], "task_loss")
        moved = (mean_of(these, "update_mods_rob"), mean_of(these, "update_rest"))
        moved = "-" if None in moved else f"{moved[0]:.5f} / {moved[1]:.5f}"
        lines.append(
            f"| {n} | {', '.join(map(str, seeds))} | {these[0].get('selection', '-')} | "
            f"{cell_asr} | {cell_cut} | "
            + " | ".join(tests)
            + " |"
            + judge_cell({"judge_unsafe": mean_of(these, "judge_unsafe")})
            + f" {mean_of(these, 'over_refusal'):.1%} | {mean_of(these, 'drift'):.3f} | "
            f"{mean_of(these, 'probe_acc'):.3f} | {loss:.3f} ({loss / loss_ift - 1:+.1%}) | "
            f"{moved} |"
        )
    text = "\n".join(lines) + "\n"
    files.claim(out, "evidence.md")
    files.write_text(os.path.join(out, "evidence.md"), text)
    series = {}
    for n in ("ift", "swat", "mllr", "control", "random"):
        these = list(rows.get(n, {}).values())
        curves = [r.get("drift_curve") or [] for r in these]
        if curves and all(curves) and len({len(c) for c in curves}) == 1:
            # step 0: the main phase begins (SWAT's warm-up is the steps before it)
            warmup = these[0].get("warmup_steps") or 0
            steps = [p["step"] - warmup for p in curves[0]]
            accs = np.mean([[p["probe_acc"] for p in c] for c in curves], axis=0)
            series[f"{n} ({len(curves)} seeds)"] = list(zip(steps, accs.tolist()))
    if series:
        files.claim(out, "drift.svg")
        title = "the original probe's accuracy on the tuned model's features (mean over seeds)"
        x_label = "step of the main phase (before 0: SWAT's warm-up)"
        figures.lines_svg(os.path.join(out, "drift.svg"), series, title, x_label, "probe acc")
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="tune and evaluate one cell, then its table")
    run.add_argument("cell", choices=CELLS)
    run.add_argument("--model", required=True, help="the aligned start (swat_min.py align)")
    run.add_argument("--out", required=True, help="the run's folder")
    run.add_argument("--shared", default="../shared", help="the folder holding data/")
    run.add_argument("--pairs", help="harmful pairs for Attack IFT (swat_min.py attack-data)")
    run.add_argument("--profile", choices=PROFILES, default="gpu")
    run.add_argument("--seeds", nargs="+", help="override the profile's seeds")
    run.add_argument(
        "--rows",
        nargs="+",
        help="only these rows (the rest of a cut-short run; or a gpu row, safemix, on the cpu)",
    )
    run.add_argument(
        "--selections",
        nargs="+",
        help="Mods_Rob's selections instead of the profile's (e.g. a set"
        " such as '10-19:q,k;0-9:k')",
    )
    run.add_argument("--defences", help="swat_min.py run --defences (vaccine,restore,safelora)")
    run.add_argument("--vaccine-model", help="the start aligned with align --vaccine")
    run.add_argument("--unaligned", help="the model before alignment (restore, safelora)")
    run.add_argument("--judge", help="a Llama Guard 3 checkpoint: its verdict in every row")
    again = sub.add_parser(
        "table", help="the table of a run folder (or of several: one cell's seeds)"
    )
    again.add_argument("folders", nargs="+", help="run folders of one cell; their rows are pooled")
    again.add_argument(
        "--out", help="where evidence.md and drift.svg go (default: the first folder)"
    )
    for p in (run, again):
        p.add_argument("--draws", type=int, default=2000, help="bootstrap draws")
    args = ap.parse_args(argv)
    try:
        if args.command == "run":
            swat_min.main(run_argv(args.cell, args))
            if args.rows and "ift" not in args.rows:
                # every row is set against ift: this folder's table comes from pooling
                print(f"rows made; the table: evidence.py table FOLDER_WITH_IFT {args.out}")
            else:
                print(table([args.out], args.draws))  # the table beside the run
        else:
            print(table(args.folders, args.draws, args.out))
    except SwatError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
