"""Batched generation with a KV cache: prompts sorted by length, left-padded, prefilled once, then
decoded a token at a time (on a GPU each step replayed from a CUDA graph). model.generate is this
module's generate; the network only needs hidden_states(ids, mask, cache, start) and head(h)."""

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from . import checks


def pad_left(rows, device):
    """Token lists -> ids [B, L] padded on the left, and the mask of real tokens: every row then
    ends at position -1, where generation continues and the probe reads its features."""
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows], device=device)
    mask = [[False] * (width - len(r)) + [True] * len(r) for r in rows]
    return ids, torch.tensor(mask, device=device)


def sample(logits, temperature, top_p, generator):
    """The next token of each row: greedy at temperature 0, else nucleus (top-p) sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    p, index = probs.sort(-1, descending=True)
    p[(p.cumsum(-1) - p) > top_p] = 0  # keep the smallest prefix whose mass reaches top_p
    return index.gather(-1, torch.multinomial(p, 1, generator=generator)).squeeze(-1)


def prefill(net, ids, mask, cache):
    """Run the prompts [B, L] into the cache's first L columns -> logits of their last tokens [B,
    V]."""
    h = net.hidden_states(ids, mask, cache, start=0)[-1]
    return net.head(h[:, -1:])[:, -1]


def decode_one_token(net, token, mask, cache, col):
    """One new token per row [B, 1] at column col (a 1-element tensor) -> next logits [B, V].

    Its column opens in the mask as it is written. Every call has the same shapes (the whole cache,
    masked), so it can be recorded once as a CUDA graph and replayed."""
    mask.index_fill_(1, col, True)
    h = net.hidden_states(token, mask, cache, start=col)[-1]
    return net.head(h)[:, -1]


def record_cuda_graph(fn):
    """fn() recorded once as a CUDA graph, then replayed: one launch instead of hundreds per call.

    Its inputs and output are tensors it updates in place, the same at every call."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # a warm-up off the main stream, as capture requires
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out

    return replay


# not cuDNN's attention: it plans every new shape anew (1.5 ms of CPU a call on an H200)
@sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
@torch.no_grad()
def generate(
    net,
    prompts,
    max_new_tokens=64,
    temperature=0.0,
    top_p=1.0,
    stop_ids=None,
    batch_size=64,
    seed=0,
    progress=False,
    cuda_graph=None,
):
    """Prompts (lists of ids) -> lists of new ids, each cut before its first stop token.

    Greedy unless temperature > 0. Prompts are sorted by length and run in left-padded batches with
    a KV cache. On a GPU each decoding step is replayed from a CUDA graph (cuda_graph=False: not): a
    small model's step is mostly the CPU launching kernels.
    """
    prompts = checks.prompts(prompts, net.cfg.vocab_size)
    checks.sampling_args(temperature, top_p, max_new_tokens, batch_size)
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    device = net.model.embed_tokens.weight.device
    use_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
    stops = set(stop_ids if stop_ids is not None else net.cfg.eos)
    stop = torch.tensor(sorted(stops), device=device, dtype=torch.long)
    generator = torch.Generator(device=device).manual_seed(seed)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outs = [None] * len(prompts)
    for b in tqdm(range(0, len(order), batch_size), disable=not progress, desc="generate"):
        rows = [prompts[i] for i in order[b : b + batch_size]]
        new = generate_batch(
            net, rows, max_new_tokens, temperature, top_p, generator, stop, use_graph
        )
        for r, row in enumerate(new):
            # each answer ends before its first stop token
            cut = next((j for j, t in enumerate(row) if t in stops), len(row))
            outs[order[b + r]] = row[:cut]
    return outs


def generate_batch(net, rows, max_new_tokens, temperature, top_p, generator, stop, use_graph):
    """One left-padded batch: prefill, then decode until every row has stopped -> new ids per
    row."""
    device = net.model.embed_tokens.weight.device
    dtype = net.model.embed_tokens.weight.dtype
    ids, mask = pad_left(rows, device)
    B, L = ids.shape
    # the new tokens' columns, closed until each is written
    mask = torch.cat([mask, mask.new_zeros(B, max_new_tokens)], 1)
    shape = (B, net.cfg.n_kv_heads, L + max_new_tokens, net.cfg.head_dim)
    # K and V of every layer, allocated once; zeros, as masked-out NaN would still poison the sums
    cache = [
        (
            torch.zeros(shape, device=device, dtype=dtype),
            torch.zeros(shape, device=device, dtype=dtype),
        )
        for _ in net.model.layers
    ]
    logits = prefill(net, ids, mask, cache)
    token = ids[:, -1:].clone()  # the decoding step's inputs, changed in place
    col = torch.tensor([L], device=device)

    def step():
        return decode_one_token(net, token, mask, cache, col)

    if use_graph and max_new_tokens > 1:
        step = record_cuda_graph(step)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    new = []
    for t in range(max_new_tokens):
        nxt = sample(logits, temperature, top_p, generator)
        new.append(nxt)
        done |= torch.isin(nxt, stop)
        if t + 1 == max_new_tokens or done.all():
            break
        token.copy_(nxt[:, None])
        logits = step()
        col += 1
    return torch.stack(new, 1).tolist()
