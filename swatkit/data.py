"""Data: the project's own instructions (data/), and readers for users' files: harmful or harmless
instruction lists (AdvBench, HarmBench, JailbreakBench, StrongREJECT, JSON/JSONL, plain text) and
instruction-tuning data (Alpaca, GSM8K, Dolly, prompt/completion, chat). Bad records get one clear
line naming the file and the record."""

import csv
import json
import os
import random
from .files import SwatError

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")


def builtin(kind, split=None):
    """The project's own instructions: kind 'harmful' or 'harmless'; split 'train', 'test' or None
    (all). The split is fixed: every fourth line of data/<kind>.tsv is held out for testing."""
    with open(os.path.join(DATA, f"{kind}.tsv"), encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t")[1] for line in f if line.strip()]
    return [r for i, r in enumerate(rows) if split is None or (i % 4 == 3) == (split == "test")]


# the instruction's field, in this order, any case: AdvBench and JailbreakBench (goal;
# JailbreakBench's "Behavior" is a short label), HarmBench (Behavior), StrongREJECT
# (forbidden_prompt), the common names
KEYS = ("goal", "behavior", "forbidden_prompt", "instruction", "prompt", "question", "query")


def _field(names):
    low = {n.lower(): n for n in names if isinstance(n, str)}
    return next((low[k] for k in KEYS if k in low), None)


def _text(r):
    """A record -> its instruction. HarmBench puts a contextual behaviour's context first, so do we;
    Alpaca's
    input and Dolly's context follow their instruction, as in read_examples."""
    key = _field(r)
    v = r.get(key)
    ctx = r.get("ContextString")
    if not isinstance(v, str) or not v.strip():  # a number, a list, blank: no instruction
        return None
    extra = str(key).lower() == "instruction" and (r.get("input") or r.get("context"))
    v = f"{v}\n\n{extra}" if isinstance(extra, str) and extra.strip() else v
    return f"{ctx.strip()}\n\n---\n\n{v}" if isinstance(ctx, str) and ctx.strip() else v


def _instruction(record):
    """A JSON record -> its instruction: a text itself, or an object's field (None: neither)."""
    if isinstance(record, str) and record.strip():
        return record
    if isinstance(record, dict):
        return _text(record)
    return None


def _records(path, f):
    """The records of a JSON list, or of a JSONL file (one per line; a bad line is named)."""
    if path.endswith(".json"):
        recs = json.load(f)
        if not isinstance(recs, list):
            raise SwatError(f"{path}: expected a JSON list of records, found {type(recs).__name__}")
        return recs
    recs = []
    for i, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            recs.append(json.loads(line))
        except ValueError as e:
            raise SwatError(f"{path}: line {i} is not valid JSON ({e})") from None
    return recs


def read_instructions(path):
    """A CSV, JSON or JSONL with one of the KEYS fields (JSON may also be a list of strings), or
    plain text, one per line."""
    path = os.fspath(path)  # a str or a pathlib.Path
    try:
        with open(
            path, newline="", encoding="utf-8-sig"
        ) as f:  # -sig: a spreadsheet's byte-order mark
            if path.endswith(".csv"):
                rows = csv.DictReader(f)
                if _field(rows.fieldnames or []) is None:
                    raise SwatError(f"{path}: no {', '.join(map(repr, KEYS))} column")
                out = [t for t in map(_text, rows) if t]
            elif path.endswith((".json", ".jsonl")):
                recs = _records(path, f)
                out = [_instruction(r) for r in recs]
                if None in out:
                    raise SwatError(
                        f"{path}: record {out.index(None) + 1} has no text in any of the fields "
                        f"{', '.join(KEYS)}"
                    )
            elif os.path.splitext(path)[1].lower() in ("", ".txt"):
                out = [l.strip() for l in f if l.strip()]
            else:  # e.g. a typo'd .cvs: its lines would be read as prompts, header and all
                raise SwatError(
                    f"{path}: unknown format {os.path.splitext(path)[1]!r}; give a .csv, .json, "
                    ".jsonl or .txt (one instruction per line) file"
                )
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, TypeError) as e:
        raise SwatError(
            f"{path}: unreadable ({e.strerror if isinstance(e, OSError) else e})"
        ) from None
    if not out:
        raise SwatError(f"{path}: no instructions found")
    return out


def instructions(path, kind, split):
    """The user's file if one is given, else the built-in split of kind ('harmful' or
    'harmless')."""
    return read_instructions(path) if path else builtin(kind, split)


def lines(name):
    """A built-in text file of data/ (refusal texts, the toy's answers), one entry per line."""
    return read_instructions(os.path.join(DATA, name))


def chats(pairs):
    """(instruction, reply) pairs -> one-turn chats."""
    return [[{"role": "user", "content": q}, {"role": "assistant", "content": r}] for q, r in pairs]


ASK = ("instruction", "question", "prompt")  # the fields of the request, in this order
REPLY = ("output", "answer", "response", "completion")  # and of the reply
ROLES = ("system", "user", "assistant")
SHAREGPT = {
    "human": "user",
    "gpt": "assistant",
    "system": "system",
    "user": "user",
    "assistant": "assistant",
}


def read_examples(path):
    """Alpaca JSON/JSONL (instruction, input, output), GSM8K (question, answer), Dolly (instruction,
    context, response), prompt/completion, or chat JSONL (messages, or ShareGPT's conversations) ->
    chats
    ending with the answer."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8-sig") as f:
            recs = _records(path, f)
    except OSError as e:
        raise SwatError(f"{path}: unreadable ({e.strerror})") from None
    except ValueError as e:
        raise SwatError(f"{path}: not valid JSON ({e})") from None
    out = []
    for i, r in enumerate(recs, 1):
        if not isinstance(r, dict):
            raise SwatError(f"{path}: record {i} is not an object")
        key = "conversations" if isinstance(r.get("conversations"), list) else "messages"
        if key in r:
            ms = r[key] if isinstance(r[key], list) else []
            if key == "conversations":  # ShareGPT: turns of {from: human|gpt|system, value}
                ms = [
                    {"role": SHAREGPT.get(t.get("from")), "content": t.get("value")}
                    if isinstance(t, dict)
                    else t
                    for t in ms
                ]
            if not all(
                isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
                for m in ms
            ):
                raise SwatError(
                    f"{path}: record {i}: '{key}' must be turns with a role "
                    f"({', '.join(ROLES)}, or ShareGPT's human, gpt) and a text content"
                )
            if not ms or ms[-1]["role"] != "assistant":
                raise SwatError(f"{path}: record {i}: '{key}' must end with an assistant turn")
            out.append(ms)
            continue
        q, a = (next((r[k] for k in keys if k in r), None) for keys in (ASK, REPLY))
        if not isinstance(q, str) or not q.strip():
            raise SwatError(f"{path}: record {i} has no {' or '.join(map(repr, ASK))}")
        if not isinstance(a, str):
            raise SwatError(f"{path}: record {i} has no {' or '.join(map(repr, REPLY))}")
        extra = r.get("input") or r.get("context")  # Alpaca's input, Dolly's context
        if extra and not isinstance(extra, str):  # a list would be trained on as its Python repr
            field = "input" if r.get("input") else "context"
            raise SwatError(
                f"{path}: record {i}: {field!r} must be text, not {type(extra).__name__}"
            )
        q = f"{q}\n\n{extra}" if extra else q
        out.append([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
    if not out:
        raise SwatError(f"{path}: no examples")
    return out


def split(chats, n):
    """One fixed split of tuning data: n held-out examples for the task metrics, the rest for
    tuning."""
    chats = list(chats)
    random.Random(0).shuffle(chats)
    return chats[:n], chats[n:]
