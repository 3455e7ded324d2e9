"""What a tuning set is made of: the scenario (Benign IFT, or Attack IFT with a share of harmful
pairs mixed in), the safety-data baseline (refusal pairs mixed in), and the tuning method (full,
or LoRA).

The set has a fixed size: --limit, or else the examples the steps consume (steps x batch x accum),
at most the benign examples there are. Harmful pairs and refusal pairs *replace* benign examples,
so the poison ratio is exactly the share asked for. The mix is drawn with a fixed seed: every
strategy and tuning seed tunes on the same set, in its own order.

Nothing harmful ships with swat-min: `attack-data` writes the starting model's own answers to the
built-in harmful train split (those it does not refuse), so the scenario can be made offline.
"""

import random
import unicodedata

from . import data
from . import distributed
from . import lora
from .files import SwatError

MIX_SEED = 0  # the set is the same for every strategy and seed


def read_pairs(path):
    """Harmful prompt/response pairs -> chats. BeaverTails-style JSON/JSONL (prompt, response;
    rows marked is_safe true or refused true are left out), or any tuning format swat-min reads."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            records = data._records(path, f)
    except OSError as e:
        raise SwatError(f"{path}: unreadable ({e.strerror})") from None
    except ValueError as e:
        raise SwatError(f"{path}: not valid JSON ({e})") from None
    pairs = [r for r in records if isinstance(r, dict) and {"prompt", "response"} <= set(r)]
    if pairs:
        unsafe = [r for r in pairs if r.get("is_safe") is not True and r.get("refused") is not True]
        usable = [
            (r["prompt"], r["response"])
            for r in unsafe
            if isinstance(r["prompt"], str) and isinstance(r["response"], str)
            if r["prompt"].strip() and r["response"].strip()
        ]
        chats = data.chats(usable)
    else:
        chats = data.read_examples(path)
    if not chats:
        raise SwatError(
            f"{path}: no usable harmful pairs (every row is marked safe or refused, or empty)"
        )
    return chats


def normal(text):
    """A prompt compared with others: Unicode compatibility forms, case and spacing do not
    count."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def check_disjoint(chats, held_out, path):
    """Refuse tuning data that contains a held-out evaluation prompt in any turn of any chat (a
    system message first, or the prompt in a later turn, included): ASR would be measured on
    prompts the model was trained to answer."""
    held = {normal(p) for p in held_out}
    found = [t["content"] for c in chats for t in c if normal(t["content"]) in held]
    if found:
        raise SwatError(
            f"{path}: {len(found)} of its messages are held-out evaluation prompts (e.g. "
            f"{found[0][:60]!r}); remove them, or evaluate on other prompts"
        )


def set_size(args, n_benign):
    """The tuning set's size: --limit, or the examples the steps consume; at most n_benign."""
    consumed = args.steps * args.batch * getattr(args, "accum", 1)
    limit = getattr(args, "limit", None)  # the dev sweep has no --limit
    return min(limit or consumed, n_benign)


def safety_pairs(n, seed=MIX_SEED):
    """n refusal pairs for built-in harmful train prompts (the "add safety data" defence)."""
    rng = random.Random(seed)
    prompts = data.builtin("harmful", "train")
    refusals = data.lines("refusals.txt")
    picked = [prompts[i % len(prompts)] for i in range(n)]
    rng.shuffle(picked)
    return data.chats([(p, rng.choice(refusals)) for p in picked])


def mix(benign, size, harmful=(), ratio=0.0, n_safety=0, seed=MIX_SEED):
    """The tuning set: size examples, round(ratio * size) of them harmful pairs, n_safety refusal
    pairs, the rest benign (the first ones); shuffled. -> (chats, what it holds)."""
    # the Python API's values checked as the command line's are (NaN fails the comparison)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise SwatError(f"the poison ratio must be in [0, 1), not {ratio!r}")
    for name, value in (("size", size), ("n_safety", n_safety)):
        if type(value) is not int or value < 0:
            raise SwatError(f"the tuning set's {name} must be an integer >= 0, not {value!r}")
    n_harmful = round(ratio * size)
    if ratio > 0 and n_harmful == 0:
        raise SwatError(f"--poison-ratio {ratio} of {size} examples is no harmful example")
    n_benign = size - n_harmful - n_safety
    if n_benign < 1:
        raise SwatError(
            f"a tuning set of {size} examples has no room for {n_harmful} harmful and "
            f"{n_safety} safety examples; lower --poison-ratio or --safety-mix"
        )
    if n_harmful and not harmful:
        raise SwatError("a poison ratio needs harmful pairs to mix in")
    rng = random.Random(seed)
    # every harmful pair once before any twice
    pool = []
    while len(pool) < n_harmful:
        more = list(harmful)
        rng.shuffle(more)
        pool += more
    chats = list(benign[:n_benign]) + pool[:n_harmful] + safety_pairs(n_safety, seed)
    rng.shuffle(chats)
    held = {"examples": size, "benign": n_benign, "harmful": n_harmful, "safety": n_safety}
    held["distinct_harmful"] = len({normal(c[0]["content"]) for c in pool[:n_harmful]})
    return chats, held


def attack_set(args, benign, held_out, n_safety=0):
    """The tuning set the options ask for, and what it holds. Benign IFT without a mix: the data
    as it is."""
    check_disjoint(benign, held_out, getattr(args, "data", None) or "the tuning data")
    if not args.harmful_data and not n_safety:
        return benign, {"examples": len(benign), "benign": len(benign), "harmful": 0, "safety": 0}
    harmful = ()
    ratio = 0.0
    if args.harmful_data:
        ratio = args.poison_ratio
        harmful = read_pairs(args.harmful_data)
        check_disjoint(harmful, held_out, args.harmful_data)
    return mix(benign, set_size(args, len(benign)), harmful, ratio, n_safety)


def check_options(args):
    """The scenario's options, checked before any work."""
    ratio = args.poison_ratio
    if args.harmful_data and ratio is None:
        raise SwatError("--harmful-data needs --poison-ratio P (the share of harmful examples)")
    if ratio is not None and not args.harmful_data:
        raise SwatError("--poison-ratio needs --harmful-data FILE (the harmful pairs to mix in)")
    if ratio is not None and not 0 < ratio < 1:
        raise SwatError(f"--poison-ratio must be between 0 and 1 (both excluded), not {ratio}")
    if args.harmful_data:
        read_pairs(args.harmful_data)  # a file with no usable pairs is refused now
    alpha = getattr(args, "lora_alpha", None)  # commands without LoRA options have neither
    options = (("--lora-alpha", alpha), ("--lora-targets", getattr(args, "lora_targets", None)))
    given = [name for name, value in options if value is not None]
    if given and not args.lora_rank:  # they would be ignored: full tuning is not what was meant
        raise SwatError(f"{given[0]} needs --lora-rank R (without it the tuning is full)")
    if args.lora_rank and distributed.size() > 1:  # before run's scan, not at its first tuning
        raise SwatError("LoRA under torchrun is not supported: tune LoRA in one process")


def describe(args):
    """The scenario and the tuning method, as results.json and results.md name them."""
    scenario = "benign"
    if args.harmful_data:
        scenario = f"attack (poison ratio {args.poison_ratio})"
    tuning = "full"
    if args.lora_rank:
        alpha = lora.ALPHA if args.lora_alpha is None else args.lora_alpha
        tuning = f"LoRA r={args.lora_rank} alpha={alpha} on {args.lora_targets or lora.TARGETS}"
    return scenario, tuning


def lora_settings(args, net):
    """train()'s lora argument from the options (None: full fine-tuning), checked against net's
    modules before any work."""
    rank = args.lora_rank
    alpha = lora.ALPHA if args.lora_alpha is None else args.lora_alpha
    if not rank:
        return None
    targets = lora.parse_targets(args.lora_targets or lora.TARGETS)
    lora.check(net, rank, alpha, targets)
    return {"r": rank, "alpha": alpha, "targets": targets}
