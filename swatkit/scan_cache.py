"""The robustness scan's cache: every layer's input for the scan prompts, so that a perturbed
module's layer and those after it are all that is rerun.

Every prompt opens with the same tokens (the chat template's system prompt and user header). That
opening is computed once, as a sequence of one, and its keys and values are shared by the rows,
which hold only the rest of each prompt: the scan's work is about halved on a chat model.
"""

import torch

from .generation import pad_left


def shared_start(prompts):
    """How many leading tokens all prompts share (the chat template's system prompt and user
    header), leaving every prompt at least one token of its own."""
    n = 0
    limit = min(len(p) for p in prompts) - 1
    while n < limit and all(p[n] == prompts[0][n] for p in prompts):
        n += 1
    return n


def kv_buffers(net, n_rows, width):
    """Zeroed key and value buffers [n_rows, kv heads, width, head_dim] for cached attention."""
    weight = net.model.embed_tokens.weight
    shape = (n_rows, net.cfg.n_kv_heads, width, net.cfg.head_dim)
    return [torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in range(2)]


@torch.no_grad()
def prefix(net, tok, instructions, batch_size=32):
    """The cache, per batch of prompts: every layer's input (the shared opening's and the rows'),
    rotary tables, masks and key/value buffers, from which any layer can be rerun."""
    device = net.model.embed_tokens.weight.device
    prompts = [tok.encode_chat([{"role": "user", "content": s}]) for s in instructions]
    n_shared = shared_start(prompts)
    shared_ids = torch.tensor([prompts[0][:n_shared]], dtype=torch.long, device=device)
    batches = []
    for b in range(0, len(prompts), batch_size):
        ids, mask = pad_left([p[n_shared:] for p in prompts[b : b + batch_size]], device)
        # each row's columns: the shared opening, then its own tokens (left padded)
        opening = torch.ones(len(ids), n_shared, dtype=torch.bool, device=device)
        mask = torch.cat([opening, mask], 1)
        cols = torch.arange(n_shared, mask.shape[1], device=device)
        rope, attn = net.context(ids.shape[1], mask, cols)
        batch = {
            "n_shared": n_shared,
            "shared": [net.model.embed_tokens(shared_ids)],  # the opening's input of each layer
            "shared_rope": net.context(n_shared)[0],
            "shared_cols": torch.arange(n_shared, device=device),
            "shared_kv": kv_buffers(net, 1, n_shared),
            "rows": [net.model.embed_tokens(ids)],  # the rows' input of each layer
            "rope": rope,
            "attn": attn,
            "cols": cols,
            "kv": kv_buffers(net, len(ids), mask.shape[1]),  # the opening's columns, then the rows'
        }
        batches.append(advanced(net, [batch], 0)[0])
    return batches


@torch.no_grad()
def advanced(net, batches, start):
    """The batches with every layer input from layer start + 1 on recomputed with the weights as
    they are now (the cache is not changed; the last entry is the last block's output)."""
    out = []
    for batch in batches:
        n_shared = batch["n_shared"]
        shared = batch["shared"][start]
        rows = batch["rows"][start]
        new_shared = []
        new_rows = []
        for i in range(start, net.cfg.n_layers):
            layer = net.model.layers[i]
            if n_shared:
                shared_kv = (*batch["shared_kv"], batch["shared_cols"])
                shared = layer(shared, batch["shared_rope"], None, shared_kv)
                # every row attends to the same opening: its keys and values are copied in
                batch["kv"][0][:, :, :n_shared] = batch["shared_kv"][0]
                batch["kv"][1][:, :, :n_shared] = batch["shared_kv"][1]
            rows = layer(rows, batch["rope"], batch["attn"], (*batch["kv"], batch["cols"]))
            new_shared.append(shared)
            new_rows.append(rows)
        shared_states = batch["shared"][: start + 1] + new_shared
        row_states = batch["rows"][: start + 1] + new_rows
        out.append({**batch, "shared": shared_states, "rows": row_states})
    return out


def last_token_features(net, batches):
    """Last-token features [layers + 1, N, D] of the cached batches (the last layer normed)."""
    out = []
    for batch in batches:
        feats = [x[:, -1] for x in batch["rows"]]
        feats[-1] = net.model.norm(feats[-1])
        out.append(torch.stack(feats).float().cpu())
    return torch.cat(out, 1)


@torch.no_grad()
def features_from(net, batches, start):
    """Last-token features [layers + 1, N, D], running only layers >= start on the cache."""
    return last_token_features(net, advanced(net, batches, start))
