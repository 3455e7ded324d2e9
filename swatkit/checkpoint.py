"""The Hugging Face checkpoint format: what config.json says (anything swat-min does not implement
is refused), which safetensors files hold the weights, and writing a directory that transformers
loads."""

import hashlib
import json
import os
import shutil
import sys
import secrets
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from .files import MARK, SwatError, check_folder, manifest, read_json, remove_ours, write_text
from . import distributed
from . import lora


def read_config(path):
    """config.json -> the settings the model needs; anything it does not implement is refused."""

    def bad(key, val):
        raise SwatError(
            f"{path}: unsupported {key}={val!r} (swat-min implements llama, mistral, qwen2 "
            "with default or llama3 rope)"
        )

    c = read_json(path)
    mt = c.get("model_type")
    if mt not in ("llama", "mistral", "qwen2"):
        bad("model_type", mt)
    if c.get("hidden_act", "silu") != "silu":
        bad("hidden_act", c["hidden_act"])
    if c.get("mlp_bias"):  # llama's option of biases on gate/up/down: not implemented
        bad("mlp_bias", c["mlp_bias"])
    # rope settings come in three spellings: rope_scaling {type|rope_type}, or v5's rope_parameters;
    # a file with both is read as transformers reads it: rope_scaling's entries win
    for key in ("rope_scaling", "rope_parameters"):
        if c.get(key) is not None and not isinstance(c[key], dict):
            raise SwatError(f"{path}: {key} must be an object of rope settings, not {c[key]!r}")
    scaling = c.get("rope_scaling") or {}
    rope = {**(c.get("rope_parameters") or {}), **scaling}
    rtype = scaling.get("rope_type", scaling.get("type")) or rope.get("rope_type", "default")
    if rtype not in ("default", "llama3"):
        bad("rope_type", rtype)
    window = c.get("sliding_window") if (mt == "mistral" or c.get("use_sliding_window")) else None
    for k in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
    ):
        if c.get(k) is not None and (type(c[k]) is not int or c[k] <= 0):
            raise SwatError(f"{path}: {k} must be a positive integer, not {c[k]!r}")
    num = {
        "rms_norm_eps": c.get("rms_norm_eps", 1e-6),
        "rope_theta": c.get("rope_theta", rope.get("rope_theta", 10000.0)),
    }
    if rtype == "llama3":
        num.update(
            (k, rope.get(k))
            for k in (
                "factor",
                "low_freq_factor",
                "high_freq_factor",
                "original_max_position_embeddings",
            )
        )
    for k, v in num.items():
        if type(v) not in (int, float) or v <= 0:
            raise SwatError(f"{path}: {k} must be a positive number, not {v!r}")
    try:
        heads = c["num_attention_heads"]
        dim = c["hidden_size"]
        return dict(
            vocab_size=c["vocab_size"],
            dim=dim,
            hidden_dim=c["intermediate_size"],
            n_layers=c["num_hidden_layers"],
            n_heads=heads,
            n_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or dim // heads,
            norm_eps=num["rms_norm_eps"],
            rope_theta=num["rope_theta"],
            rope_scaling=rope if rtype == "llama3" else None,
            qkv_bias=mt == "qwen2" or bool(c.get("attention_bias")),
            o_bias=mt == "llama" and bool(c.get("attention_bias")),
            tie=bool(c.get("tie_word_embeddings", False)),
            window=window,
            eos=eos_ids(path, c),
            raw=c,
        )
    except KeyError as e:
        raise SwatError(f"{path}: missing key {e}") from None


DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def parse_dtype(dtype):
    """'fp32', 'bf16' (or their long names) or a torch.dtype -> the torch.dtype."""
    dtype = DTYPES.get(dtype, dtype)
    if not isinstance(dtype, torch.dtype):
        raise SwatError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)} or a torch.dtype")
    return dtype


def check_model_dir(path, device):
    """A model folder that exists, on a device this torch can use (one line here, not a traceback
    deep inside .to_empty())."""
    if not os.path.isdir(path):
        raise SwatError(f"{path}: not a model directory")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise SwatError(f"device {device!r}: {str(e).splitlines()[0]}") from None


def check_vocabulary(path, tok, vocab_size):
    """A tokenizer whose ids all have an embedding."""
    n_tokens = tok.tk.get_vocab_size(with_added_tokens=True)
    if n_tokens > vocab_size:
        raise SwatError(
            f"{path}: tokenizer.json has {n_tokens} tokens, more than the model's "
            f"vocab_size {vocab_size}"
        )


@torch.no_grad()
def load_weights(net, path, shards):
    """Copy the safetensors shards of path into net, one tensor at a time (never a second copy).

    Every tensor must be one of net's, of its shape; a checkpoint without an output head is tied to
    the embeddings. Weights holding NaN or inf are named in one warning line."""
    params = net.state_dict()
    seen = set()
    for file_name in shards:
        file_path = os.path.join(path, file_name)
        try:
            with safe_open(file_path, framework="pt") as f:
                for name in f.keys():
                    if name.endswith("rotary_emb.inv_freq") or (
                        name == "lm_head.weight" and net.cfg.tie
                    ):
                        continue
                    if name not in params:
                        raise SwatError(f"{file_path}: unexpected tensor {name}")
                    tensor = f.get_tensor(name)
                    if tensor.shape != params[name].shape:
                        raise SwatError(
                            f"{file_path}: tensor {name} has shape {list(tensor.shape)}, "
                            f"expected {list(params[name].shape)}"
                        )
                    params[name].copy_(tensor)
                    seen.add(name)
        except SwatError:
            raise
        except Exception as e:  # a truncated or corrupt file, a missing shard
            raise SwatError(
                f"{file_path}: cannot read safetensors ({str(e).splitlines()[0]})"
            ) from None
    missing = set(params) - seen
    if missing == {"lm_head.weight"}:  # no output head in the file: tie it to the embeddings
        net.cfg.tie = True
        net.lm_head = None
    elif missing:
        raise SwatError(
            f"{path}: missing tensors, e.g. {sorted(missing)[0]} ({len(missing)} in all)"
        )
    broken = [name for name, p in net.state_dict().items() if not p.isfinite().all()]
    if broken:  # it would generate empty or random answers without a word
        print(
            f"warning: {path}: {len(broken)} weight tensors hold NaN or inf (e.g. {broken[0]}); "
            "this model's outputs are garbage",
            file=sys.stderr,
        )


def generation_eos(path, eos):
    """The stop tokens: generation_config.json's where it names them (transformers' generate stops
    at those, not at config.json's), else eos."""
    gen_path = os.path.join(path, "generation_config.json")
    gen = read_json(gen_path) if os.path.exists(gen_path) else {}
    if gen.get("eos_token_id") is None:
        return eos
    return eos_ids(gen_path, gen)


@torch.no_grad()
def fingerprint(net):
    """A short hash of the weights (each tensor's name, shape, first values and sum): the same for
    the
    same weights, and, in practice, different for any other model, of the same shapes too."""
    digest = hashlib.sha256()
    for name, p in net.state_dict().items():
        head = p.detach().flatten()[:64].double()
        total = p.detach().sum(dtype=torch.float64)[None]
        digest.update(f"{name}{list(p.shape)}".encode())
        digest.update(torch.cat([head, total]).cpu().numpy().tobytes())
    return digest.hexdigest()[:24]


def eos_ids(path, c):
    """eos_token_id of the JSON object c (an int, a list of ints, or absent) -> a list of ints."""
    eos = c.get("eos_token_id")
    if eos is None:
        eos = []
    elif not isinstance(eos, list):
        eos = [eos]
    if not all(type(e) is int and e >= 0 for e in eos):
        raise SwatError(
            f"{path}: eos_token_id must be a token id or a list of them, not {c['eos_token_id']!r}"
        )
    return eos


def weight_files(d):
    """The safetensors files of the checkpoint in d: its index's shards, or model.safetensors."""
    index = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(index):
        shards = read_json(index).get("weight_map")
        if not shards or not isinstance(shards, dict):
            raise SwatError(f"{index}: no weight_map of tensor names to files")
        files = sorted(set(map(str, shards.values())))
        if not all(
            os.path.basename(f) == f and f.endswith(".safetensors") for f in files
        ):  # e.g. ../x: the hub
            # would write there
            raise SwatError(f"{index}: a shard that is not a .safetensors file of this folder")
        return files
    if os.path.exists(os.path.join(d, "model.safetensors")):
        return ["model.safetensors"]
    raise SwatError(
        f"{d}: no model.safetensors or model.safetensors.index.json (swat-min never reads pickles)"
    )


def save(net, tok, out, extra=None):
    """Write an HF-format directory that transformers loads: config.json, model.safetensors, the
    tokenizer files, and `extra` ({filename: tensors, text or JSON}; a trainer's state and log).

    The directory is written whole into a temporary sibling, its manifest last, then swapped into
    place
    (see swap). A fault at any moment leaves the previous checkpoint or the new one, never half of
    one.
    """
    out = os.path.abspath(os.fspath(out))
    # the plain model's tensors (LoRA adapters merged in): a checkpoint transformers loads; under
    # torchrun each process gathers its shards, and the first one alone writes
    state = distributed.gather({k: v.contiguous() for k, v in lora.merged_state(net).items()})
    extra = {
        k: distributed.gather(v) if k.endswith(".safetensors") else v
        for k, v in (extra or {}).items()
    }
    if distributed.rank() != 0:
        distributed.barrier()  # until the first process has written the checkpoint
        return out
    try:
        return write_whole(net, state, tok, out, extra)
    finally:
        distributed.barrier()  # the others go on once it is written (or has failed)


def write_whole(net, state, tok, out, extra):
    """save()'s writing: checked, into a temporary sibling, then swapped into place. The two
    temporary names are recorded in a journal beside out before either exists, so that recovery
    after a fault touches those and nothing else (never a user's folder of a similar name)."""
    recover(out)
    check_folder(out, tok)
    bad = [k for k, v in state.items() if not v.isfinite().all()]
    if bad:
        raise SwatError(
            f"{out}: not saved: non-finite weights ({bad[0]}, {len(bad)} tensors in all)"
        )
    parent, name = os.path.split(out)
    os.makedirs(parent, exist_ok=True)
    token = secrets.token_hex(6)
    new = os.path.join(parent, f".{name}.swat-new-{token}")
    old = os.path.join(parent, f".{name}.swat-old-{token}")
    journal = journal_path(out)
    if os.path.lexists(journal):  # recover() removed ours: this one is somebody else's
        raise SwatError(f"{journal}: exists and swat-min did not write it; remove or rename it")
    record = {"written_by": "swat-min", "out": out, "new": new, "old": old}
    write_text(journal, json.dumps(record))
    try:
        os.mkdir(new)
        write_files(net, state, tok, new, extra)
    except BaseException as e:
        if os.path.isdir(new):
            shutil.rmtree(new)  # made in this call: nobody else's
        os.remove(journal)
        if not isinstance(e, Exception):  # Ctrl-C
            raise
        # an OSError, or safetensors' own error for a full disk
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        where = getattr(e, "filename", None) or new
        raise SwatError(
            f"{out}: could not save ({reason}, writing {where}); the previous checkpoint stays"
        ) from None
    swap(new, old, out)
    os.remove(journal)
    return out


def journal_path(out):
    """The journal of a save into out: the temporary folders it makes, named before they exist."""
    parent, name = os.path.split(out)
    return os.path.join(parent, f".{name}.swat-save.json")


def write_files(net, state, tok, folder, extra):
    """Every file of the checkpoint into folder; the manifest (MARK) last, as the mark of a whole
    one."""
    save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    dtype = str(next(net.parameters()).dtype).removeprefix("torch.")
    config = dict(net.cfg.raw, tie_word_embeddings=net.cfg.tie, torch_dtype=dtype)
    config.pop("dtype", None)
    write_json(os.path.join(folder, "config.json"), config)
    for file_name in TOKENIZER_FILES:
        source = os.path.join(tok.path, file_name) if tok.path else None
        if source and os.path.exists(source):
            shutil.copy(source, folder)
    for file_name, obj in extra.items():
        path = os.path.join(folder, file_name)
        os.makedirs(os.path.dirname(path), exist_ok=True)  # e.g. adapter/
        if file_name.endswith(".safetensors"):
            save_file(obj, path)
        elif isinstance(obj, str):
            write_plain(path, obj)
        else:
            write_json(path, obj)
    # the manifest: what a later save may replace, and where the weights came from
    source = tok.path and os.path.abspath(tok.path)
    mark = {"written_by": "swat-min", "from": source, "files": sorted(os.listdir(folder))}
    write_json(os.path.join(folder, MARK), mark)
    for root, folders, files in os.walk(folder):  # ordinary modes, not mkdtemp's private ones
        os.chmod(root, 0o755)
        for file_name in files:
            os.chmod(os.path.join(root, file_name), 0o644)


def write_plain(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path, obj):
    write_plain(path, json.dumps(obj, indent=2))


def swap(new, old, out):
    """Put the whole checkpoint in `new` at `out`: move the old one aside to `old`, move the new
    one in, then remove the old one. recover() finishes this after a fault between any two of these
    steps."""
    if os.path.exists(out):
        os.replace(out, old)
    os.replace(new, out)
    if os.path.exists(old):
        shutil.rmtree(old)


def is_whole(folder):
    """True for a checkpoint folder whose manifest was written (save writes it last)."""
    return manifest(folder) is not None


def recover(out):
    """Finish or roll back a save into out that a fault interrupted, from its journal (the two
    temporary folders it named before making them; without a journal there is nothing to do).

    new: the new checkpoint, whole once its manifest is written; old: the checkpoint it replaces.
    A whole new one goes on into place; else, when out is missing, the old one goes back. Then what
    is left of the two is removed (only files a checkpoint holds), and the journal.
    """
    out = os.path.abspath(out)
    path = journal_path(out)
    if not os.path.isfile(path):
        return
    try:
        record = json.load(open(path, encoding="utf-8"))
        ours = record.get("written_by") == "swat-min" and record.get("out") == out
        new = record["new"]
        old = record["old"]
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return  # not a journal of swat-min's: left alone (write_whole refuses to write over it)
    prefix = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.swat-")
    if not (ours and new.startswith(prefix) and old.startswith(prefix)):
        return
    if is_whole(new):  # the new checkpoint was whole: the swap goes on
        swap(new, old, out)
        print(f"{out}: put in place the whole checkpoint of an interrupted save")
    elif is_whole(old) and not os.path.exists(out):  # nothing newer is whole: rolled back
        os.replace(old, out)
        print(f"{out}: put back the checkpoint an interrupted save had moved aside")
    for folder in (new, old):
        listed = manifest(folder) or set()
        remove_ours(folder, listed | {MARK, *CHECKPOINT_FILES, *TOKENIZER_FILES, "adapter"})
    os.remove(path)


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)
# the files a checkpoint of swat-min's holds besides the tokenizer's
CHECKPOINT_FILES = (
    "model.safetensors",
    "config.json",
    "trainer.safetensors",
    "trainer.json",
    "log.jsonl",
)


def read_log(path, step):
    """The rows of a training log up to `step`. A damaged last line (a kill while it was appended)
    is
    a step after the checkpoint, done again: it is left out; damage elsewhere is an error."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line for line in f.read().split("\n") if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if number < len(lines):
                raise SwatError(
                    f"{path}: line {number} is damaged; resume needs the log whole "
                    "(train into a new folder)"
                ) from None
            print(f"{path}: left out its damaged last line (a step after the checkpoint)")
    return [r for r in rows if isinstance(r, dict) and r.get("step", 0) <= step]


# ---- a training checkpoint: the model, plus the optimizer state resume needs ----


def save_trainer(net, tok, opt, out, step, rows, moments=True):
    """The checkpoint: weights, Adam moments (moments=False: left out, as in a finished run's final
    checkpoint, where only a resume would need them) and step counts, what resume checks, and the
    log."""
    names = {p: n for g in opt.param_groups for p, n in zip(g["params"], g["names"])}
    tensors = {}
    for p, (m, v) in opt.state.items():
        tensors[f"m.{names[p]}"] = m
        tensors[f"v.{names[p]}"] = v
    meta = {
        "step": step,
        "group_steps": [g["step"] for g in opt.param_groups],
        "groups": [g["names"] for g in opt.param_groups],
        "settings": opt.settings,
        "moments": moments,
    }
    # save() replaces the folder: the log goes too
    log = "".join(json.dumps(r) + "\n" for r in rows)
    extra = {"trainer.json": meta, "log.jsonl": log}
    if lora.adapters(net):  # LoRA: the adapters alone too, as a folder PEFT loads
        for file_name, obj in lora.peft_files(net, tok.path and os.path.abspath(tok.path)).items():
            extra[f"adapter/{file_name}"] = obj
    if moments:
        extra["trainer.safetensors"] = tensors
    save(net, tok, out, extra=extra)


def checkpoint_size(net, moments=False):
    """The bytes a checkpoint of net takes, roughly: its weights, plus two fp32 Adam moments per
    parameter with moments."""
    weights = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    n_params = sum(t.numel() for t in net.state_dict().values())
    return weights + (8 * n_params if moments else 0)


def load_trainer(opt, net, out):
    """Put the checkpoint in out back into net and opt -> its step. A checkpoint of another run, or
    a damaged one, is one line that says so."""
    try:
        return _read_state(opt, net, out)
    except SwatError:
        raise
    except Exception as e:  # a truncated safetensors file, a trainer.json without its fields
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SwatError(
            f"{out}: its checkpoint is damaged ({reason}); it cannot be resumed: train "
            "without --resume, into a new folder"
        ) from None


def _read_state(opt, net, out):
    meta = read_json(os.path.join(out, "trainer.json"))
    other = SwatError(
        f"{out}: its checkpoint was trained with another strategy, module set, number "
        "of steps, model, data or settings; resume with the same ones, or train into "
        "a new folder"
    )
    names = [g["names"] for g in opt.param_groups]
    if (meta.get("groups"), meta.get("settings")) != (names, opt.settings):
        raise other
    if type(meta.get("step")) is not int or len(meta.get("group_steps", ())) != len(names):
        raise ValueError("trainer.json has no step or group_steps")
    device = str(net.model.embed_tokens.weight.device)
    params = net.state_dict()
    finished = meta["step"] == sum(opt.settings["phases"])
    if not meta.get("moments", True) and not finished:
        raise ValueError("trainer.json says its moments were left out, yet the run is not finished")
    tensors = None
    if meta.get("moments", True):  # a finished run's final checkpoint may leave them out
        tensors = load_file(os.path.join(out, "trainer.safetensors"), device=device)
    if lora.adapters(net):  # the base weights are the model's own; the adapters come back
        path = os.path.join(out, "adapter", "adapter_model.safetensors")
        lora.load_adapters(net, load_file(path, device=device), path)
    else:
        path = os.path.join(out, "model.safetensors")
        with safe_open(path, framework="pt", device=device) as f:
            for name in f.keys():  # our own save: the same names; one tensor at a time
                t = f.get_tensor(name)
                if name not in params or t.shape != params[name].shape:
                    raise other
                distributed.put(params[name], t)  # under torchrun: this process's shard
    for g, group_step in zip(opt.param_groups, meta["group_steps"]):
        g["step"] = group_step
        for p, n in zip(g["params"], g["names"] if tensors else ()):
            distributed.put(opt.state[p][0], tensors[f"m.{n}"])
            distributed.put(opt.state[p][1], tensors[f"v.{n}"])
    return meta["step"]
