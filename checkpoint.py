"""The Hugging Face checkpoint format: what config.json says (anything swat-min does not implement is
refused), which safetensors files hold the weights, and writing a directory that transformers loads."""
import json, os, shutil
from types import SimpleNamespace
from safetensors.torch import save_file
from files import SwatError, read_json, writable


def read_config(path):
    """config.json -> the settings the model needs; anything it does not implement is refused."""
    def bad(key, val):
        raise SwatError(f"{path}: unsupported {key}={val!r} (swat-min implements llama, mistral, qwen2 "
                        "with default or llama3 rope)")
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
    scaling = c.get("rope_scaling") or {}
    rope = {**(c.get("rope_parameters") or {}), **scaling}
    rtype = scaling.get("rope_type", scaling.get("type")) or rope.get("rope_type", "default")
    if rtype not in ("default", "llama3"):
        bad("rope_type", rtype)
    window = c.get("sliding_window") if (mt == "mistral" or c.get("use_sliding_window")) else None
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim"):
        if c.get(k) is not None and (type(c[k]) is not int or c[k] <= 0):
            raise SwatError(f"{path}: {k} must be a positive integer, not {c[k]!r}")
    num = {"rms_norm_eps": c.get("rms_norm_eps", 1e-6),
           "rope_theta": c.get("rope_theta", rope.get("rope_theta", 10000.0))}
    if rtype == "llama3":
        num.update((k, rope.get(k)) for k in ("factor", "low_freq_factor", "high_freq_factor",
                                              "original_max_position_embeddings"))
    for k, v in num.items():
        if type(v) not in (int, float) or v <= 0:
            raise SwatError(f"{path}: {k} must be a positive number, not {v!r}")
    try:
        heads, dim = c["num_attention_heads"], c["hidden_size"]
        return SimpleNamespace(
            vocab_size=c["vocab_size"], dim=dim, hidden_dim=c["intermediate_size"], n_layers=c["num_hidden_layers"],
            n_heads=heads, n_kv_heads=c.get("num_key_value_heads") or heads, head_dim=c.get("head_dim") or dim // heads,
            norm_eps=num["rms_norm_eps"], rope_theta=num["rope_theta"],
            rope_scaling=rope if rtype == "llama3" else None,  # llama3 parameters, or None
            qkv_bias=mt == "qwen2" or bool(c.get("attention_bias")), o_bias=mt == "llama" and bool(c.get("attention_bias")),
            tie=bool(c.get("tie_word_embeddings", False)),
            window=window,  # sliding window (mistral/qwen2): refused at run time once a sequence exceeds it
            eos=eos_ids(path, c),
            raw=c)  # the config.json as read: save() writes it back
    except KeyError as e:
        raise SwatError(f"{path}: missing key {e}") from None


def eos_ids(path, c):
    """eos_token_id of the JSON object c (an int, a list of ints, or absent) -> a list of ints."""
    eos = c.get("eos_token_id")
    eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
    if not all(type(e) is int and e >= 0 for e in eos):
        raise SwatError(f"{path}: eos_token_id must be a token id or a list of them, not {c['eos_token_id']!r}")
    return eos


def weight_files(d):
    """The safetensors files of the checkpoint in d: its index's shards, or model.safetensors."""
    index = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(index):
        shards = read_json(index).get("weight_map")
        if not shards or not isinstance(shards, dict):
            raise SwatError(f"{index}: no weight_map of tensor names to files")
        files = sorted(set(map(str, shards.values())))
        if not all(os.path.basename(f) == f and f.endswith(".safetensors") for f in files):  # e.g. ../x: the hub
            raise SwatError(f"{index}: a shard that is not a .safetensors file of this folder")  # would write there
        return files
    if os.path.exists(os.path.join(d, "model.safetensors")):
        return ["model.safetensors"]
    raise SwatError(f"{d}: no model.safetensors or model.safetensors.index.json (swat-min never reads pickles)")


def save(net, tok, out, extra=None):
    """Write an HF-format directory (config.json, model.safetensors, tokenizer files, and `extra`
    {filename: tensors, text or JSON}) atomically: into a temporary sibling, renamed into place when complete."""
    out = writable(out, tok)
    tmp, old = out + ".tmp", out + ".old"
    for d in (tmp, old):  # leftovers of an interrupted save
        shutil.rmtree(d, ignore_errors=True)
    os.makedirs(tmp)
    try:
        sd = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
        save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        dt = str(next(net.parameters()).dtype).removeprefix("torch.")
        cfg = dict(net.cfg.raw, tie_word_embeddings=net.cfg.tie, torch_dtype=dt)
        cfg.pop("dtype", None)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)
        with open(os.path.join(tmp, "swat-min.json"), "w", encoding="utf-8") as f:  # the mark that lets a later save replace it
            json.dump({"written_by": "swat-min", "from": tok.path and os.path.abspath(tok.path)}, f)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                     "generation_config.json", "chat_template.jinja"):
            if tok.path and os.path.exists(os.path.join(tok.path, name)):
                shutil.copy(os.path.join(tok.path, name), tmp)
        for name, obj in (extra or {}).items():
            if name.endswith(".safetensors"):
                save_file(obj, os.path.join(tmp, name))
            else:  # text as it is, anything else as JSON
                with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                    f.write(obj if isinstance(obj, str) else json.dumps(obj))
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SwatError(f"{out}: could not save ({e.strerror or e})") from None
    if os.path.exists(out):
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out
