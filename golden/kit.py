"""The porting kit: reference tensors for every stage of swat-min, made from a tiny fixed-seed
LLaMA-family model, and the check that compares a port's tensors with them stage by stage.

A port (JAX, MLX, C++...) reads the kit's inputs (the models' configs and weights, the tokenizer,
the scan's noise, the training batches), runs each stage, writes its results under the same names
into safetensors files, and runs `python -m golden check DIR`: it prints each stage and the first
one that differs. golden/README.md lists every tensor: what it is, its shape, dtype and tolerance.
"""

import json
import os
import tempfile

import torch
from safetensors.torch import load_file, save_file

from swatkit import data
from swatkit import lora
import model
import probe
import robustness as rb
from swatkit import scan_cache
import train

HERE = os.path.dirname(os.path.abspath(__file__))
KIT = os.path.join(HERE, "kit.safetensors")
MANIFEST = os.path.join(HERE, "manifest.json")

# two tiny models: GQA in both; a: untied head and llama3 rope scaling; b: tied head, plain rope
SHAPE = dict(
    vocab_size=320,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    bos_token_id=1,
    eos_token_id=2,
    model_type="llama",
    architectures=["LlamaForCausalLM"],
)
LLAMA3_ROPE = dict(
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,
)
CONFIGS = {
    "a": dict(SHAPE, tie_word_embeddings=False, rope_scaling=LLAMA3_ROPE),
    "b": dict(SHAPE, tie_word_embeddings=True),
}
CHAT = [{"role": "user", "content": "How do I bake bread at home?"}]
HARMFUL = data.builtin("harmful", "train")[:6]
HARMLESS = data.builtin("harmless", "train")[:6]
KINDS = ("q", "k", "v", "o")
TUNING = data.chats([(f"What is {a} plus {b}?", f"{a + b}") for a in range(4) for b in range(3)])
# each tuning variant: (strategy, Mods_Rob, phase-2 steps, phase-1 steps, LoRA settings)
MODS = {(0, "q"), (1, "v")}
LORA = {"r": 2, "alpha": 4, "targets": ["q", "v", "down"]}
VARIANTS = {
    "ift": ("ift", set(), 3, 0, None),
    "swat1": ("swat", MODS, 0, 3, None),  # phase 1 only: Mods_Rob trains, the rest is frozen
    "swat2": ("swat", MODS, 3, 3, None),  # then phase 2: everything, fresh moments for the rest
    "mllr": ("mllr", MODS, 3, 0, None),
    "lora": ("swat", MODS, 3, 3, LORA),
}
TRAIN = dict(lr=1e-2, batch_size=4, seed=0, max_len=64, weight_decay=0.01, ratio=0.1)

# tolerances, absolute + relative to the kit's value: |port - kit| <= atol + rtol |kit|
EXACT = (0.0, 0.0)
STAGES = {
    "tokens": EXACT,
    "forward": (1e-5, 1e-5),
    "features": (1e-5, 1e-5),
    "probe": (1e-4, 1e-3),  # L-BFGS stops near, not at, the optimum
    "scan": (1e-4, 1e-3),
    "select": EXACT,
    "train.ift": (1e-5, 1e-4),
    "train.swat1": (1e-5, 1e-4),
    # phase 2 restarts released groups from zero moments: the first Adam step is about lr * sign(g),
    # so the last bits of a small gradient (another CPU kind) show at 1e-5; a real error is ~lr
    "train.swat2": (1e-4, 1e-4),
    "train.mllr": (1e-5, 1e-4),
    "train.lora": (1e-5, 1e-4),
}


def stage_of(name):
    """The stage a result tensor belongs to: the longest stage name it starts with."""
    found = [s for s in STAGES if name == s or name.startswith(s + ".")]
    return max(found, key=len) if found else None


def write_model(folder, name, weights, kit_dir):
    """An HF folder of kit model `name`: its config, the given weights, the tokenizer in kit_dir."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(CONFIGS[name], f)
    save_file(weights, os.path.join(folder, "model.safetensors"))
    for file_name in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(kit_dir, file_name), encoding="utf-8") as f:
            text = f.read()
        with open(os.path.join(folder, file_name), "w", encoding="utf-8") as f:
            f.write(text)
    return folder


def model_folders(inputs, workdir, kit_dir):
    """Both kit models as HF folders under workdir, from the kit's weights -> {name: folder}."""
    folders = {}
    for name in CONFIGS:
        prefix = f"weights.{name}."
        weights = {k[len(prefix) :]: v for k, v in inputs.items() if k.startswith(prefix)}
        folders[name] = write_model(os.path.join(workdir, name), name, weights, kit_dir)
    return folders


def compute(inputs, workdir, kit_dir=HERE, record=None):
    """Every stage's results, computed by swat-min from the kit's inputs -> {name: tensor}.
    record: a dict that receives the training inputs a port needs (each step's batch and lr)."""
    out = {}
    folders = model_folders(inputs, workdir, kit_dir)
    nets = {name: model.load(folder) for name, folder in folders.items()}
    net, tok = nets["a"]
    out["tokens.chat"] = torch.tensor(tok.encode_chat(CHAT))
    ids = out["tokens.chat"][None]
    with torch.no_grad():
        for name, (each, _) in nets.items():
            logits, hidden = each(ids, hidden=True)
            out[f"forward.{name}.logits"] = logits[0]
            out[f"forward.{name}.hidden"] = torch.stack([h[0] for h in hidden])
    # the security feature space: last-token features of a left-padded batch, a probe per layer
    harmful = probe.features(net, tok, HARMFUL, batch_size=4)
    harmless = probe.features(net, tok, HARMLESS, batch_size=4)
    X, y = probe.labelled(harmful, harmless)
    out["features.a"] = X
    probes = probe.fit_layers(X, y)
    for part in ("mu", "sd", "w", "b"):
        out[f"probe.{part}"] = torch.stack([getattr(p, part) for p in probes])
    out["probe.proba"] = torch.stack([p.predict_proba(x) for p, x in zip(probes, X)])
    # the scan (noise draw 0 of seed 0: the inputs scan.noise.*) and the searched Mods_Rob
    batches = scan_cache.prefix(net, tok, HARMFUL + HARMLESS)
    scan = rb.scan(net, probes, batches, y, KINDS, scale=0.5, seed=0)
    for metric in ("acc_drop", "loss_rise", "later"):
        out[f"scan.{metric}"] = torch.tensor([scan[metric][m] for m in KINDS], dtype=torch.float64)
    picked = rb.select_mods_rob(net, tok, HARMFUL, HARMLESS, probes, KINDS, n=6, k=4, tolerance=0.1)
    pairs = [[layer, KINDS.index(m)] for layer, m in picked["mods_rob"]]
    out["select.mods_rob"] = torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2)
    # training from model a: weights (LoRA: the adapters) and Adam moments after each variant
    real_collate = train.collate
    for variant, (strategy, mods, steps, warmup, adapters) in VARIANTS.items():
        net, tok = model.load(folders["a"])
        folder = os.path.join(workdir, f"train-{variant}")
        batches = []

        def collate(rows, device, batches=batches):  # each step's batch, as a port gets it
            ids, labels = real_collate(rows, device)
            batches.append((ids, labels))
            return ids, labels

        train.collate = collate
        try:
            rows = train.train(
                net, tok, TUNING, folder, strategy, mods, steps=steps, warmup_steps=warmup,
                keep_optimizer=True, lora=adapters, label=f"golden {variant}", **TRAIN,
            )  # fmt: skip
        finally:
            train.collate = real_collate
        if record is not None:
            for i, (ids, labels) in enumerate(batches):
                record[f"train.{variant}.batch.{i}.ids"] = ids
                record[f"train.{variant}.batch.{i}.labels"] = labels
            lrs = [r["lr"] for r in rows]
            record[f"train.{variant}.lr"] = torch.tensor(lrs, dtype=torch.float64)
        moments = load_file(os.path.join(folder, "trainer.safetensors"))
        if adapters:
            trained = load_file(os.path.join(folder, "adapter", "adapter_model.safetensors"))
        else:
            trained = load_file(os.path.join(folder, "model.safetensors"))
        for name, tensor in trained.items():
            out[f"train.{variant}.weights.{name}"] = tensor
        for name, tensor in moments.items():
            out[f"train.{variant}.{name}"] = tensor
    return out


def scan_noise(net):
    """The scan's noise as inputs: for every module, the delta its draw 0 adds to each tensor
    (perturb()'s arithmetic), so that a port needs no torch random numbers."""
    inputs = {}
    for layer in range(net.cfg.n_layers):
        for m in KINDS:
            generator = torch.Generator().manual_seed(rb.noise_seed(0, layer, m, 0))
            for name, p in rb.module(net, layer, m).named_parameters():
                noise = torch.randn(p.shape, generator=generator).to(p)
                inputs[f"scan.noise.{layer}.{m}.{name}"] = noise * (0.5 * p.float().std().item())
    return inputs


def lora_start(folder):
    """LoRA's adapters as they start (A random, B zero), under PEFT's names, as inputs."""
    net, _ = model.load(folder)
    lora.add(net, LORA["r"], LORA["alpha"], LORA["targets"], seed=TRAIN["seed"])
    tensors = lora.peft_files(net, None)["adapter_model.safetensors"]
    return {f"train.lora.start.{k}": v for k, v in tensors.items()}


def random_weights(name, workdir):
    """Kit model `name`'s weights: small random matrices, norms around 1 (every tensor matters)."""
    folder = os.path.join(workdir, f"config-{name}")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(CONFIGS[name], f)
    net = model.LLaMA(model.read_config(os.path.join(folder, "config.json")))
    weights = {}
    for key, p in net.state_dict().items():
        if p.ndim == 1:
            weights[f"weights.{name}.{key}"] = 1 + 0.1 * torch.randn(p.shape)
        else:
            weights[f"weights.{name}.{key}"] = 0.2 * torch.randn(p.shape)
    return weights


def make_tokenizer(folder):
    """The kit's tokenizer: a byte-level BPE trained on the built-in prompts, and ChatML."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = data.builtin("harmful") + data.builtin("harmless")
    texts += [f"What is {a} plus {b}? {a + b}" for a in range(10) for b in range(10)]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=SHAPE["vocab_size"],
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(texts, trainer)
    tk.save(os.path.join(folder, "tokenizer.json"))
    template = (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
        "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": template}
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)


def make(folder=HERE):
    """Write the kit into folder: the tokenizer files, kit.safetensors (inputs and results) and
    manifest.json. The same bytes every time, on the same installs."""
    make_tokenizer(folder)
    torch.manual_seed(0)
    inputs = {}
    with tempfile.TemporaryDirectory() as workdir:
        for name in CONFIGS:
            inputs.update(random_weights(name, workdir))
        folders = model_folders(inputs, workdir, folder)
        inputs.update(scan_noise(model.load(folders["a"])[0]))
        inputs.update(lora_start(folders["a"]))
        record = {}
        results = compute(inputs, workdir, folder, record)
        inputs.update(record)
    save_file({**inputs, **results}, os.path.join(folder, "kit.safetensors"))
    variants = {}
    for name, (strategy, mods, steps, warmup, adapters) in VARIANTS.items():
        variants[name] = dict(strategy=strategy, mods_rob=sorted(map(list, mods)), steps=steps)
        variants[name].update(warmup_steps=warmup, lora=adapters)
    manifest = {
        "configs": CONFIGS,
        "chat": CHAT,
        "harmful": HARMFUL,
        "harmless": HARMLESS,
        "kinds": list(KINDS),
        "scan": {"scale": 0.5, "seed": 0, "search_tolerance": 0.1, "k": 4},
        "train": TRAIN,
        "tuning_data": TUNING,
        "variants": variants,
        "stages": {s: {"atol": t[0], "rtol": t[1]} for s, t in STAGES.items()},
        "inputs": sorted(inputs),
        "results": sorted(results),
        # the same bytes come back on the same torch and CPU kind; elsewhere kernels may round
        # differently in the last bits (within the tolerances)
        "made_with": made_with(),
    }
    with open(os.path.join(folder, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)


def made_with():
    """The torch version and CPU kind the kit was made with."""
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability()}


def read_kit(folder=HERE):
    """-> (kit tensors, manifest)."""
    with open(os.path.join(folder, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    return load_file(os.path.join(folder, "kit.safetensors")), manifest


def dump(out, folder=HERE):
    """swat-min's own results for the kit's inputs -> out/dump.safetensors (what a port writes)."""
    kit, manifest = read_kit(folder)
    inputs = {k: kit[k] for k in manifest["inputs"]}
    with tempfile.TemporaryDirectory() as workdir:
        results = compute(inputs, workdir, folder)
    os.makedirs(out, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in results.items()}, os.path.join(out, "dump.safetensors")
    )


def check(out, folder=HERE, stages=None):
    """Compare every *.safetensors tensor in out with the kit, stage by stage (only `stages`, when
    given); print each stage's verdict -> the first stage that differs (None: all agree)."""
    kit, manifest = read_kit(folder)
    unknown = sorted(set(stages or ()) - set(manifest["stages"]))
    if unknown:
        raise ValueError(
            f"unknown stage {unknown[0]!r}; the stages: {', '.join(manifest['stages'])}"
        )
    theirs = {}
    for file_name in sorted(os.listdir(out)):
        if file_name.endswith(".safetensors"):
            theirs.update(load_file(os.path.join(out, file_name)))
    first = None
    for stage, tolerance in manifest["stages"].items():
        if stages and stage not in stages:
            continue
        names = [n for n in manifest["results"] if stage_of(n) == stage]
        problems = []
        for name in names:
            problem = compare(theirs.get(name), kit[name], tolerance)
            if problem:
                problems.append(f"{name}: {problem}")
        verdict = "ok" if not problems else f"DIFFERS ({len(problems)} of {len(names)} tensors)"
        print(f"{stage:12s} {verdict}")
        for line in problems[:3]:
            print(f"    {line}")
        if problems and first is None:
            first = stage
    print(f"first stage that differs: {first}" if first else "every stage agrees with the kit")
    return first


def compare(port, kit, tolerance):
    """None when port matches kit within tolerance, else what is wrong (one line)."""
    if port is None:
        return "missing"
    if tuple(port.shape) != tuple(kit.shape):
        return f"shape {list(port.shape)}, expected {list(kit.shape)}"
    port = port.double()
    kit = kit.double()
    excess = (port - kit).abs() - (tolerance["atol"] + tolerance["rtol"] * kit.abs())
    if excess.max() > 0 or not port.isfinite().all():
        worst = (port - kit).abs().max().item()
        return f"max |difference| {worst:.3g} (atol {tolerance['atol']}, rtol {tolerance['rtol']})"
    return None
