"""Tuning chats -> token ids with loss labels (-100 on the prompt: only the reply is learnt) ->
right-padded batches, in a data order that is a pure function of (seed, epoch)."""

import torch

from .files import SwatError


def encode(tok, chat, max_len, where="example"):
    """-> (ids, labels): labels are -100 on the prompt, so the loss counts only the response
    tokens."""
    full = tok.encode_chat(chat, add_generation_prompt=False)
    # the reply starts where the same chat with an empty reply stops agreeing (not where the
    # generation prompt ends: some templates rearrange a chat that ends with a reply, e.g. Mistral
    # v0.3 drops the system prompt)
    empty_reply = chat[:-1] + [dict(chat[-1], content="")]
    empty = tok.encode_chat(empty_reply, add_generation_prompt=False)
    n = next((i for i, (a, b) in enumerate(zip(empty, full)) if a != b), len(empty))
    if n >= max_len:
        raise SwatError(f"{where}: prompt of {n} tokens does not fit max length {max_len}")
    full = full[:max_len]
    return full, [-100] * n + full[n:]


def encode_all(tok, chats, max_len, skip_long=False, what="example"):
    """Encode every chat; one whose prompt does not fit max_len is an error, or, with skip_long,
    left
    out (and counted, so nothing is dropped silently)."""
    out = []
    for i, chat in enumerate(chats):
        try:
            out.append(encode(tok, chat, max_len, f"{what} {i + 1}"))
        except SwatError:
            if not skip_long:
                raise
    if len(out) < len(chats):
        left_out = len(chats) - len(out)
        print(f"left out {left_out} of {len(chats)} {what}s whose prompt exceeds {max_len} tokens")
    if not out:
        raise SwatError(f"no {what} fits max length {max_len}")
    return out


def collate(rows, device):
    """Right padding: causal attention never looks ahead, so pads need no mask and sdpa stays
    fast."""
    width = max(len(ids) for ids, _ in rows)
    ids = [i + [0] * (width - len(i)) for i, _ in rows]
    labels = [l + [-100] * (width - len(l)) for _, l in rows]
    return torch.tensor(ids, device=device), torch.tensor(labels, device=device)


def order(n, seed, epoch):
    """The data order of an epoch: a pure function of (seed, epoch), so a resumed run sees the
    same."""
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def step_batches(data, seed, step, accum, batch_size):
    """The micro-batches of one optimizer step: the k-th slices of the seeded order of their epoch
    (k = step * accum ... ), so that a resumed run sees the same examples."""
    per_epoch = max(1, len(data) // batch_size)
    micro = []
    for k in range(step * accum, (step + 1) * accum):
        idx = order(len(data), seed, k // per_epoch)[(k % per_epoch) * batch_size :][:batch_size]
        micro.append([data[i] for i in idx])
    return micro
