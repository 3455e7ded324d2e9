"""A LLaMA-family causal language model written from scratch (llama, mistral, qwen2): the network,
loading an HF directory into it, and batched generation with a preallocated KV cache.

Parameter names are exactly those of Hugging Face checkpoints (model.layers.3.self_attn.q_proj.weight, ...),
so loading and saving are identity mappings, and the robustness scan and the trainer can address Q, K, V
and O of every layer as separate modules. What config.json means and how a directory is written are in
checkpoint.py (model.save is its save); the tokenizer and chat formats are in tokenizer.py.
"""
import math, os, sys
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.nn.attention import sdpa_kernel, SDPBackend
from safetensors import safe_open
from tqdm import tqdm
from checkpoint import eos_ids, read_config, save, weight_files  # noqa: F401 (save: part of this file's API)
from files import SwatError, read_json
import checks, hub, tokenizer


def rope_inv_freq(cfg):
    """Rotary frequencies; llama3 scaling stretches the long wavelengths (Llama 3.1/3.2)."""
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64, device="cpu").float() / cfg.head_dim)
    s = cfg.rope_scaling
    if s:
        f, lo, hi, old = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / f, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        mid = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = torch.where(mid, (1 - smooth) * scaled / f + smooth * scaled, scaled)
    return inv


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):  # in fp32 whatever the weights' dtype, as the checkpoints were trained
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)  # x / rms(x)


def rotate(x, cos, sin):  # HF "rotate half" layout: pairs are (i, i + d/2), so no weight permutation
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, self.nh * self.hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, self.nkv * self.hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, self.nkv * self.hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.dim, bias=cfg.o_bias)

    def forward(self, x, rope, mask, kv=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        q, k = rotate(q, *rope), rotate(k, *rope)
        if kv is not None:  # generation: write into the preallocated cache, attend to all of it (masked)
            K, V, cols = kv
            K.index_copy_(2, cols, k), V.index_copy_(2, cols, v)
            k, v = K, V
        if mask is not None and self.nh > self.nkv:  # sdpa's GQA has no fast masked kernel: the query heads
            q = q.reshape(B, self.nkv, -1, self.hd)    # that share K/V become extra rows (context's mask has them)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=q.shape[1] != k.shape[1])
        return self.o_proj(y.reshape(B, self.nh, T, self.hd).transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):  # SwiGLU
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, mask, kv=None):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class LLaMA(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.model = nn.Module()  # the "model." prefix of HF parameter names
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.model.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.model.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = None if cfg.tie else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.inv_freq = rope_inv_freq(cfg)  # a plain attribute: stays fp32 whatever .to() does

    def context(self, T, mask=None, device=None, cols=None):
        """Rotary (cos, sin) and attention mask for T tokens at columns cols (default: the last T) of S.
        mask: [B, S], True at real tokens (left padding; the other columns are in the cache). Positions count
        real tokens only, so padding shifts nothing. The mask has a row per query head that shares K/V."""
        S = T if mask is None else mask.shape[1]
        if self.cfg.window and S > self.cfg.window:
            raise SwatError(f"sequence of {S} tokens exceeds the sliding window {self.cfg.window}")
        if mask is None:  # plain causal attention (training, one unpadded prompt): sdpa's fast path
            pos, attn = torch.arange(T, device=device)[None], None
        else:
            cols = torch.arange(S - T, S, device=device) if cols is None else cols
            pos = (mask.long().cumsum(-1) - 1).clamp(min=0).index_select(1, cols)
            keys, c = torch.arange(S, device=device), cols[:, None]
            attn = (keys <= c) & (mask.bool()[:, None] | (keys == c))  # causal; a pad position sees itself, so
            attn = attn[:, None].repeat(1, 1, self.cfg.n_heads // self.cfg.n_kv_heads, 1)  # no row is all -inf
        self.inv_freq = self.inv_freq.to(pos.device)  # moved once, not at every call (nor in a CUDA graph)
        freqs = pos[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B|1, 1, T, head_dim]
        dt = self.model.embed_tokens.weight.dtype
        return (emb.cos().to(dt), emb.sin().to(dt)), attn

    def forward(self, idx, mask=None, cache=None, hidden=False, last=False, start=None):
        """idx [B, T] -> logits [B, T, vocab] (last=True: only the last position's). cache: generate's
        per-layer (K, V) buffers, used with a mask; the T tokens go to columns start.. of it (an int or a
        tensor; default the last T of the mask). hidden=True also returns the hidden states as
        transformers' output_hidden_states does: [embeddings, block 1, ..., block L-1, final-normed block L]."""
        T = idx.shape[1]
        if cache and start is None:
            start = mask.shape[1] - T
        cols = None if start is None else torch.arange(T, device=idx.device) + start
        rope, attn = self.context(T, mask, idx.device, cols)
        h = self.model.embed_tokens(idx)
        hs = [h]
        for i, layer in enumerate(self.model.layers):
            if getattr(self, "grad_ckpt", False) and self.training:  # recompute activations in backward
                h = torch.utils.checkpoint.checkpoint(layer, h, rope, attn, use_reentrant=False)
            else:
                h = layer(h, rope, attn, cache and (*cache[i], cols))
            hs.append(h)
        h = hs[-1] = self.model.norm(h)
        if last:
            h = h[:, -1:]
        logits = F.linear(h, self.lm_head.weight if self.lm_head else self.model.embed_tokens.weight)
        return (logits, hs) if hidden else logits


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def load(path, device="cpu", dtype=torch.float32, chat_format=None):
    """Load an HF-format directory, or a hub id org/name (see hub.py) -> (LLaMA, Tok). Weights are copied
    tensor by tensor into the preallocated model, so there is never a second full copy in memory."""
    path = hub.resolve(os.fspath(path))  # a str or a pathlib.Path
    if not os.path.isdir(path):
        raise SwatError(f"{path}: not a model directory")
    try:  # a device this torch cannot use fails here, in one line, not deep inside .to_empty()
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise SwatError(f"device {device!r}: {str(e).splitlines()[0]}") from None
    dtype = DTYPES.get(dtype, dtype)
    if not isinstance(dtype, torch.dtype):
        raise SwatError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)} or a torch.dtype")
    cfg = read_config(os.path.join(path, "config.json"))
    shards = weight_files(path)
    tok = tokenizer.Tok(path, chat_format)
    n_tokens = tok.tk.get_vocab_size(with_added_tokens=True)
    if n_tokens > cfg.vocab_size:  # its ids past vocab_size have no embedding
        raise SwatError(f"{path}: tokenizer.json has {n_tokens} tokens, more than the model's "
                        f"vocab_size {cfg.vocab_size}")
    with torch.device("meta"):
        net = LLaMA(cfg).to(dtype)
    net.to_empty(device=device)
    params, seen = net.state_dict(), set()
    for fname in shards:
        fpath = os.path.join(path, fname)
        try:
            with safe_open(fpath, framework="pt") as f:
                for name in f.keys():
                    if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and cfg.tie):
                        continue
                    if name not in params:
                        raise SwatError(f"{fpath}: unexpected tensor {name}")
                    t = f.get_tensor(name)
                    if t.shape != params[name].shape:
                        raise SwatError(f"{fpath}: tensor {name} has shape {list(t.shape)}, "
                                        f"expected {list(params[name].shape)}")
                    with torch.no_grad():
                        params[name].copy_(t)
                    seen.add(name)
        except SwatError:
            raise
        except Exception as e:  # truncated or corrupt file, missing shard
            raise SwatError(f"{fpath}: cannot read safetensors ({str(e).splitlines()[0]})") from None
    gc = os.path.join(path, "generation_config.json")
    gen = read_json(gc) if os.path.exists(gc) else {}
    if gen.get("eos_token_id") is not None:  # transformers' generate stops at these, not at config.json's
        cfg.eos = eos_ids(gc, gen)
    tok.stop_ids |= set(cfg.eos)
    missing = set(params) - seen
    if missing == {"lm_head.weight"}:  # no output head in the file: tie it to the embeddings
        cfg.tie, net.lm_head = True, None
    elif missing:
        raise SwatError(f"{path}: missing tensors, e.g. {sorted(missing)[0]} ({len(missing)} in all)")
    broken = [name for name, p in net.state_dict().items() if not p.isfinite().all()]
    if broken:  # it would generate empty or random answers without a word
        print(f"warning: {path}: {len(broken)} weight tensors hold NaN or inf (e.g. {broken[0]}); "
              "this model's outputs are garbage", file=sys.stderr)
    return net.eval(), tok


def pad_left(rows, device):
    """Token lists -> ids [B, L] padded on the left, and the mask of real tokens: every row then ends at
    position -1, where generation continues and the probe reads its features."""
    L = max(map(len, rows))
    ids = torch.tensor([[0] * (L - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[False] * (L - len(r)) + [True] * len(r) for r in rows], device=device)
    return ids, mask


def _pick(logits, temperature, top_p, gen):
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    p, i = probs.sort(-1, descending=True)
    p[(p.cumsum(-1) - p) > top_p] = 0  # keep the smallest prefix whose mass reaches top_p
    return i.gather(-1, torch.multinomial(p, 1, generator=gen)).squeeze(-1)


def _graphed(fn):
    """fn() recorded once as a CUDA graph, then replayed: one launch instead of hundreds per call. Its
    inputs and output are tensors it updates in place, the same at every call."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # a warm-up off the main stream, as capture requires
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return lambda: (graph.replay(), out)[1]


# not cuDNN's attention: it plans every new shape anew (1.5 ms of CPU a call on an H200)
@sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
@torch.no_grad()
def generate(net, prompts, max_new_tokens=64, temperature=0.0, top_p=1.0, stop_ids=None,
             batch_size=64, seed=0, progress=False, cuda_graph=None):
    """Prompts (lists of ids) -> lists of new ids, each cut before its first stop token. Greedy unless
    temperature > 0. Prompts are sorted by length and run in left-padded batches with a KV cache. Every
    decoding step has the same shapes (the whole cache, masked), so on a GPU it is replayed from a CUDA
    graph (cuda_graph=False: not): a small model's step is mostly the CPU launching kernels."""
    prompts = [p.tolist() if torch.is_tensor(p) else p for p in prompts]
    if any(isinstance(p, int) for p in prompts):  # generate(net, ids) instead of generate(net, [ids])
        raise SwatError("generate: prompts must be a list of prompts (lists of token ids), e.g. [ids]")
    prompts = [list(p) for p in prompts]
    checks.sampling_args(temperature, top_p, max_new_tokens, batch_size)
    for i, p in enumerate(prompts):
        if not p or not all(0 <= t < net.cfg.vocab_size for t in p):
            raise SwatError(f"generate: prompt {i + 1} " + ("has no tokens" if not p else
                            f"has a token id outside the vocabulary (0..{net.cfg.vocab_size - 1})"))
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    dev = net.model.embed_tokens.weight.device
    graph = dev.type == "cuda" if cuda_graph is None else cuda_graph
    stops = set(stop_ids if stop_ids is not None else net.cfg.eos)
    stop = torch.tensor(sorted(stops), device=dev, dtype=torch.long)
    gen = torch.Generator(device=dev).manual_seed(seed)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outs = [None] * len(prompts)
    for b in tqdm(range(0, len(order), batch_size), disable=not progress, desc="generate"):
        rows = [prompts[i] for i in order[b:b + batch_size]]
        idx, mask = pad_left(rows, dev)
        (B, L), dt, N = idx.shape, net.model.embed_tokens.weight.dtype, max_new_tokens
        mask = torch.cat([mask, mask.new_zeros(B, N)], 1)  # new tokens' columns open as they are written
        zeros = lambda: torch.zeros(B, net.cfg.n_kv_heads, L + N, net.cfg.head_dim, device=dev, dtype=dt)
        cache = [(zeros(), zeros()) for _ in net.model.layers]  # K and V of every layer, allocated once; zeros,
        logits = net(idx, mask, cache, last=True, start=0)[:, -1]  # as masked-out NaN would still poison sums
        tok, col = idx[:, -1:].clone(), torch.tensor([L], device=dev)  # the step's inputs, changed in place

        def step():  # the token in tok, at column col of every row
            mask.index_fill_(1, col, True)
            return net(tok, mask, cache, last=True, start=col)[:, -1]
        if graph and N > 1:
            step = _graphed(step)
        done, new = torch.zeros(B, dtype=torch.bool, device=dev), []
        for t in range(N):
            nxt = _pick(logits, temperature, top_p, gen)
            new.append(nxt)
            done |= torch.isin(nxt, stop)
            if t + 1 == N or done.all():
                break
            tok.copy_(nxt[:, None])
            logits = step()
            col += 1
        for r, row in enumerate(torch.stack(new, 1).tolist()):
            cut = next((j for j, x in enumerate(row) if x in stops), len(row))
            outs[order[b + r]] = row[:cut]
    return outs
