"""The user's files, handled safely: every problem with one is a single line (SwatError) naming it, an
output is written whole or not at all, and nothing swat-min did not write is ever overwritten."""
import json, os


class SwatError(Exception):
    """A problem with the user's input; the CLI prints it as one line."""


def read_json(path):
    """The JSON object in path (every JSON file swat-min reads holds one)."""
    try:
        with open(path, encoding="utf-8") as f:  # JSON is UTF-8, whatever the locale
            obj = json.load(f)
    except FileNotFoundError:
        raise SwatError(f"{path}: not found") from None
    except (OSError, ValueError) as e:
        raise SwatError(f"{path}: unreadable ({e})") from None
    if not isinstance(obj, dict):
        raise SwatError(f"{path}: not a JSON object")
    return obj


def write_text(path, text):
    """Write path atomically: a reader (or a later run) never sees half a file."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def writable(out, tok=None, ours=("swat-min.json", "log.jsonl")):
    """out, if swat-min may write there: not the input model (tok's), and new, empty, or a folder it wrote
    before (holding one of `ours`: by default its checkpoint mark or a training log), never the user's other
    files nor another model of theirs."""
    out, have = os.path.abspath(out), os.listdir(out) if os.path.isdir(out) else []
    if tok and tok.path and os.path.abspath(tok.path) == out:
        raise SwatError(f"{out}: refusing to overwrite the input model")
    if (os.path.exists(out) and not os.path.isdir(out)) or (have and not set(ours) & set(have)):
        raise SwatError(f"{out}: exists and holds nothing swat-min wrote; refusing to write there (choose a new folder)")
    return out
