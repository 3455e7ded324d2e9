"""The user's files, handled safely.

Three rules hold for everything swat-min writes:
- a problem with a file is one line (SwatError) naming it;
- an output is written whole or not at all: into a temporary sibling with a unique name, then
renamed;
- nothing swat-min did not write is ever replaced or deleted.

A folder swat-min writes (a checkpoint, a run's results, a training log) holds a manifest, MARK,
that lists every entry swat-min put there. Such a folder may be written into again, or replaced,
only while every entry in it is one the manifest lists. A single output file (a scan, generations,
pairs) is listed in its folder's manifest with the digest of what was written, and may be replaced
only while it still has exactly those bytes: what a file looks like is never proof.
"""

import contextlib
import hashlib
import json
import os
import shutil
import socket
import tempfile

MARK = "swat-min.json"  # the manifest of a folder swat-min wrote
TEMP = ".swat-tmp-"  # the prefix of a temporary file, unique per call (tempfile)


class SwatError(Exception):
    """A problem with the user's input; the CLI prints it as one line."""


def read_json(path):
    """The JSON object in path (every JSON file swat-min reads holds one)."""
    try:
        # JSON is UTF-8, whatever the locale
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise SwatError(f"{path}: not found") from None
    except (OSError, ValueError) as e:
        raise SwatError(f"{path}: unreadable ({e})") from None
    if not isinstance(obj, dict):
        raise SwatError(f"{path}: not a JSON object")
    return obj


def write_atomic(path, write):
    """Call write(tmp) on a fresh temporary file beside path, then rename it onto path.

    A reader (or a later run) never sees half a file, and a fault (a kill, a full disk) leaves the
    previous file as it was. The temporary name is unique, so nobody else's file is ever touched.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=folder, prefix=TEMP)
    os.close(handle)
    try:
        write(tmp)
        # mkstemp makes the file private (0600); an output is an ordinary file
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as e:
        os.remove(tmp)
        if isinstance(e, OSError):  # e.g. a full disk: the output's name, not the temporary's
            raise SwatError(f"{path}: could not write ({e.strerror or e})") from None
        raise


def write_text(path, text):
    """Write text to path atomically (see write_atomic), as UTF-8."""

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    write_atomic(os.fspath(path), write)


# ---- which files and folders are swat-min's ----


def manifest(folder):
    """The entries folder's manifest lists, or None when the folder has no manifest."""
    path = os.path.join(folder, MARK)
    if not os.path.isfile(path):
        return None
    try:
        mark = read_json(path)
    except SwatError:
        return None
    listed = mark.get("files")
    if mark.get("written_by") != "swat-min" or not isinstance(listed, list):
        return None
    return set(listed)


def is_temporary(entry, listed):
    """True for a temporary sibling swat-min makes while writing one of the listed entries."""
    if entry.startswith(TEMP):
        return True
    return any(entry.startswith(f".{name}.swat-") for name in listed)


def foreign_entry(folder):
    """The first entry in folder that its manifest does not list (None: every entry is
    swat-min's)."""
    entries = sorted(os.listdir(folder))
    listed = manifest(folder)
    if listed is None:
        return entries[0] if entries else None
    for entry in entries:
        if entry != MARK and entry not in listed and not is_temporary(entry, listed):
            return entry
    return None


def check_folder(folder, tok=None):
    """Refuse, in one line, to write into folder unless it is new, empty, or wholly swat-min's.

    tok: the input model's tokenizer; its folder is never an output.
    """
    refuse_link(folder)
    folder = os.path.abspath(folder)
    if tok is not None and tok.path and os.path.abspath(tok.path) == folder:
        raise SwatError(f"{folder}: refusing to overwrite the input model")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise SwatError(f"{folder}: exists and is not a folder; choose a new folder")
    check_can_create(folder)
    if not os.path.isdir(folder):
        return folder
    foreign = foreign_entry(folder)
    if foreign is not None:
        raise SwatError(
            f"{folder}: exists and holds {foreign}, which swat-min did not write; refusing to "
            "write there "
            "(choose a new folder)"
        )
    return folder


def refuse_link(path):
    """An output given as a symbolic link is refused: replacing it whole would replace the link,
    and writing through it would write where the user did not name."""
    if os.path.islink(path):
        raise SwatError(
            f"{path}: is a symbolic link (to {os.path.realpath(path)}); give that path itself, or "
            "a new name"
        )


def claim(folder, entry=None):
    """Make folder swat-min's (created if new) and list entry in its manifest before it is
    written."""
    check_folder(folder)
    os.makedirs(folder, exist_ok=True)
    had = manifest(folder)
    listed = set(had or ())
    if entry is not None:
        listed.add(entry)
    # a checkpoint's manifest also says where its weights came from: kept
    mark = read_json(os.path.join(folder, MARK)) if had is not None else {}
    mark.update(written_by="swat-min", files=sorted(listed))
    write_text(os.path.join(folder, MARK), json.dumps(mark, indent=1))
    return folder


def prepare(path):
    """Make path ready to be written: listed in its folder's manifest where the folder is
    swat-min's,
    else checked to be new or a file swat-min wrote."""
    folder, name = os.path.split(os.path.abspath(path))
    if os.path.isdir(folder) and manifest(folder) is not None and foreign_entry(folder) is None:
        claim(folder, name)
    else:
        check_file(path)
    return path


def digest(path):
    """The SHA-256 of a file's bytes (None when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def written_here(path):
    """True when path is a file swat-min wrote and nobody changed since: its folder's manifest
    lists it with the digest of exactly these bytes (or, in a folder that is wholly swat-min's,
    lists it at all). What a file looks like is never proof."""
    folder, name = os.path.split(os.path.abspath(path))
    if name not in (manifest(folder) or set()):
        return False
    recorded = read_json(os.path.join(folder, MARK)).get("sha256", {})
    if name in recorded:
        return recorded[name] == digest(path)
    return foreign_entry(folder) is None


def check_file(path):
    """Refuse, in one line, to write path unless it is new or a file swat-min wrote (and nobody
    changed since)."""
    refuse_link(path)
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise SwatError(f"{path}: is a folder; give a file name")
    check_can_create(path)
    folder = os.path.dirname(path)
    mark = os.path.join(folder, MARK)
    if os.path.lexists(mark) and manifest(folder) is None:  # the user's own file of that name
        raise SwatError(f"{mark}: exists and swat-min did not write it; write elsewhere")
    if not os.path.lexists(path) or written_here(path):
        return path
    raise SwatError(f"{path}: exists and swat-min did not write it; refusing to replace it")


def write_output(path, text):
    """Write one output file atomically, then list it in its folder's manifest with its digest,
    so that a later run may replace it only while it is exactly what swat-min wrote."""
    write_text(path, text)
    folder, name = os.path.split(os.path.abspath(path))
    mark_path = os.path.join(folder, MARK)
    mark = read_json(mark_path) if manifest(folder) is not None else {}
    mark["written_by"] = "swat-min"
    mark["files"] = sorted(set(mark.get("files", [])) | {name})
    mark.setdefault("sha256", {})[name] = digest(path)
    write_text(mark_path, json.dumps(mark, indent=1))


def check_outputs(inputs, outputs):
    """An output is never an input, nor a file inside an input (the model's folder); and it can be
    written. Paths that are None are skipped."""
    for path in filter(None, outputs):
        real = os.path.realpath(path)
        for given in filter(None, inputs):
            real_input = os.path.realpath(given)
            # inside an input folder (the model's): files would be added to it, or replaced
            inside = real.startswith(real_input + os.sep) and (
                os.path.isdir(real_input) or os.path.exists(real)
            )
            if real == real_input or inside:
                raise SwatError(f"{path}: would overwrite the input {given}; choose another path")
        check_can_create(real)


def check_can_create(path):
    """Fail now, in one line, if path could not be written, rather than after the work.

    Nothing is created: a temporary file is made and removed in the nearest folder that exists.
    """
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise SwatError(f"{path}: cannot be made ({folder} is a file)")
    try:
        handle, tmp = tempfile.mkstemp(dir=folder, prefix=TEMP)
    except OSError as e:
        raise SwatError(f"{path}: cannot write in {folder} ({e.strerror or e})") from None
    os.close(handle)
    os.remove(tmp)


def remove_ours(folder, names):
    """Remove a temporary folder swat-min made, if it holds nothing but the given file names."""
    if os.path.isdir(folder) and set(os.listdir(folder)) <= set(names):
        shutil.rmtree(folder)


# ---- one writer per output ----


def lock_path(path):
    """The lock of an output: a hidden file beside it (the output itself may not exist yet)."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.swat-lock")


@contextlib.contextmanager
def writing(path):
    """Hold the output's lock while a command writes it: a second swat-min run into the same
    output fails at once, in one line, instead of losing one of the two results. The lock names
    its owner (pid, host); a lock whose process is gone (on this host) is stale and taken over."""
    lock = lock_path(path)
    made = []  # the folders made to hold the lock: removed again if the run leaves them empty
    folder = os.path.dirname(lock)
    while not os.path.exists(folder):
        made.append(folder)
        folder = os.path.dirname(folder)
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    owner = {"written_by": "swat-min", "pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):  # a stale lock is removed once, then taken
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            holder = lock_holder(lock)
            if holder is not None and not alive(holder):
                os.remove(lock)
                continue
            who = f"pid {holder['pid']} on {holder['host']}" if holder else "unknown"
            raise SwatError(
                f"{path}: another swat-min run ({who}) is writing there; wait for it, choose "
                f"another output, or remove {lock} if no run is"
            ) from None
    else:
        raise SwatError(f"{path}: could not take the lock {lock}")
    with os.fdopen(handle, "w") as f:
        json.dump(owner, f)
    try:
        yield path
    finally:
        if lock_holder(lock) == owner:  # still ours (nobody took it over as stale)
            os.remove(lock)
        for folder in made:  # innermost first
            if os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)


def lock_holder(lock):
    """The owner a lock names, or None when it is unreadable (being written, or not ours)."""
    try:
        with open(lock, encoding="utf-8") as f:
            holder = json.load(f)
    except (OSError, ValueError):
        return None
    keys = {"written_by", "pid", "host"}
    return holder if isinstance(holder, dict) and set(holder) == keys else None


def alive(holder):
    """Whether a lock's process may still be running (one on another host always may)."""
    if holder["host"] != socket.gethostname():
        return True
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
