"""A LLaMA-family causal language model written from scratch (llama, mistral, qwen2): the network,
and loading an HF directory into it (batched generation with a KV cache: swatkit/generation.py,
model.generate).

Parameter names are exactly those of Hugging Face checkpoints
(model.layers.3.self_attn.q_proj.weight), so loading and saving are identity mappings, and the
robustness scan and the trainer can address Q, K, V and O of every layer as separate modules
(MODULES, in swatkit/modules.py). What config.json means, which files hold the weights and how a
directory is written are in swatkit/checkpoint.py; the chat formats in swatkit/tokenizer.py.
"""

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from swatkit import checkpoint, hub, tokenizer
from swatkit.files import SwatError
from swatkit.generation import generate, pad_left  # noqa: F401 (model.generate, model.pad_left)
from swatkit.modules import MODULES, ModelConfig  # noqa: F401 (model.MODULES)


def rope_inv_freq(cfg):
    """Rotary frequencies; llama3 scaling stretches the long wavelengths (Llama 3.1/3.2)."""
    exponents = torch.arange(0, cfg.head_dim, 2, dtype=torch.int64, device="cpu").float()
    inv = 1.0 / cfg.rope_theta ** (exponents / cfg.head_dim)
    s = cfg.rope_scaling
    if not s:
        return inv
    factor = s["factor"]
    low = s["low_freq_factor"]
    high = s["high_freq_factor"]
    old_context = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    # long wavelengths are slowed by `factor`, short ones kept, the band between blended smoothly
    scaled = torch.where(wavelen > old_context / low, inv / factor, inv)
    smooth = (old_context / wavelen - low) / (high - low)
    mid = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(mid, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # x / rms(x), in fp32 whatever the weights' dtype, as the checkpoints were trained
        normed = F.rms_norm(x.float(), x.shape[-1:], eps=self.eps)
        return self.weight * normed.to(x.dtype)


def rotate(x, cos, sin):
    """Rotary embedding in HF's "rotate half" layout: pairs are (i, i + d/2), so no weight
    permutation."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.o_bias)

    def forward(self, x, rope, mask, kv=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = rotate(q, *rope)
        k = rotate(k, *rope)
        if kv is not None:
            # generation: write into the preallocated cache, then attend to all of it (masked)
            cache_k, cache_v, cols = kv
            cache_k.index_copy_(2, cols, k)
            cache_v.index_copy_(2, cols, v)
            k = cache_k
            v = cache_v
        if mask is not None and self.n_heads > self.n_kv_heads:
            # sdpa's GQA has no fast masked kernel: the query heads that share K/V become extra rows
            # (attention_mask repeated its rows for them)
            q = q.reshape(B, self.n_kv_heads, -1, self.head_dim)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=q.shape[1] != k.shape[1]
        )
        y = y.reshape(B, self.n_heads, T, self.head_dim).transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(y)


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


def attention_mask(mask, cols, n_rep):
    """The boolean attention mask of the queries at columns cols, for left-padded rows.

    mask: [B, S], True at real tokens. A query sees the real keys up to its own column; a pad query
    sees itself, so that no row is all -inf. The mask has a row per query head that shares K/V.
    """
    keys = torch.arange(mask.shape[1], device=mask.device)
    query = cols[:, None]
    allowed = (keys <= query) & (mask.bool()[:, None] | (keys == query))
    return allowed[:, None].repeat(1, 1, n_rep, 1)


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
        self.grad_ckpt = False  # activation checkpointing while training

    def context(self, n_new, mask=None, cols=None):
        """Rotary (cos, sin) and attention mask for n_new tokens.

        mask: None for plain causal attention (training, one unpadded prompt: sdpa's fast path), or
        [B, S] True at real tokens (left padding; the other columns are in a cache). cols: the
        columns of the new tokens (default: the last n_new). Positions count real tokens only, so
        padding shifts nothing.
        """
        device = self.model.embed_tokens.weight.device
        width = n_new if mask is None else mask.shape[1]
        if self.cfg.window and width > self.cfg.window:
            raise SwatError(
                f"sequence of {width} tokens exceeds the sliding window {self.cfg.window}"
            )
        if mask is None:
            positions = torch.arange(n_new, device=device)[None]
            attn = None
        else:
            if cols is None:
                cols = torch.arange(width - n_new, width, device=device)
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0).index_select(1, cols)
            attn = attention_mask(mask, cols, self.cfg.n_heads // self.cfg.n_kv_heads)
        # moved once, not at every call (nor inside a CUDA graph)
        self.inv_freq = self.inv_freq.to(device)
        freqs = positions[..., None].float() * self.inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B|1, 1, T, head_dim]
        dtype = self.model.embed_tokens.weight.dtype
        return (angles.cos().to(dtype), angles.sin().to(dtype)), attn

    def hidden_states(self, ids, mask=None, cache=None, start=None):
        """ids [B, T] -> [embeddings, block 1, ..., block L-1, final-normed block L], each [B, T,
        dim], as transformers' output_hidden_states. cache: generate's per-layer (K, V) buffers,
        used with a
        mask; the T tokens go to columns start.. of it (an int or a tensor)."""
        n_new = ids.shape[1]
        cols = None
        if cache is not None:
            cols = torch.arange(n_new, device=ids.device) + start
        rope, attn = self.context(n_new, mask, cols)
        h = self.model.embed_tokens(ids)
        states = [h]
        for i, layer in enumerate(self.model.layers):
            if self.grad_ckpt and self.training:
                # recompute this block's activations in the backward pass instead of keeping them
                h = torch.utils.checkpoint.checkpoint(layer, h, rope, attn, use_reentrant=False)
            elif cache is not None:
                h = layer(h, rope, attn, (*cache[i], cols))
            else:
                h = layer(h, rope, attn)
            states.append(h)
        states[-1] = self.model.norm(h)
        return states

    def head(self, h):
        """Final hidden states -> logits (the output head, or the embeddings when tied)."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h, weight)

    def forward(self, ids, mask=None, hidden=False):
        """ids [B, T] -> logits [B, T, vocab]; hidden=True also returns hidden_states()."""
        states = self.hidden_states(ids, mask)
        logits = self.head(states[-1])
        return (logits, states) if hidden else logits


def save(net, tok, out, extra=None):
    """Write net as an HF-format checkpoint folder (model.save is checkpoint.save's public name)."""
    return checkpoint.save(net, tok, out, extra)


def read_config(path):
    """config.json -> ModelConfig (checkpoint.read_config checks it and maps the HF keys)."""
    return ModelConfig(**checkpoint.read_config(path))


def load(path, device="cpu", dtype=torch.float32, chat_format=None):
    """Load an HF-format directory, or a hub id org/name (see hub.py) -> (LLaMA, Tok).

    The network is made on the meta device (no memory), then the weights are copied tensor by tensor
    into it, so there is never a second full copy in memory. What is checked lives in checkpoint.py.
    """
    path = hub.resolve(os.fspath(path))  # a str or a pathlib.Path
    checkpoint.check_model_dir(path, device)
    dtype = checkpoint.parse_dtype(dtype)
    cfg = read_config(os.path.join(path, "config.json"))
    shards = checkpoint.weight_files(path)
    tok = tokenizer.Tok(path, chat_format)
    checkpoint.check_vocabulary(path, tok, cfg.vocab_size)
    with torch.device("meta"):
        net = LLaMA(cfg).to(dtype)
    net.to_empty(device=device)
    checkpoint.load_weights(net, path, shards)
    cfg.eos = checkpoint.generation_eos(path, cfg.eos)
    tok.stop_ids |= set(cfg.eos)
    return net.eval(), tok
