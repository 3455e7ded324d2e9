"""Tuning chats -> token ids with loss labels (-100 on the prompt: only the reply is learnt) ->
right-padded batches, in a data order that is a pure function of (seed, epoch)."""

import torch

from .files import SwatError


# what to do with a record whose prompt does not fit max_len (train's `long`, `--long`)
LONG = ("stop", "skip", "truncate")


class TooLong(SwatError):
    """A record whose prompt does not fit max_len (encode_all decides what becomes of it)."""


def encode(tok, chat, max_len, where="example", truncate=False):
    """-> (ids, labels): labels are -100 on the prompt, so the loss counts only the response
    tokens. A prompt of max_len tokens or more is an error, or with truncate, cut from its start
    to half of max_len (its end, next to the reply, is what the reply follows)."""
    if not chat or chat[-1].get("role") != "assistant":
        raise SwatError(f"{where}: a tuning chat must end with the assistant's reply")
    full = tok.encode_chat(chat, add_generation_prompt=False)
    # the reply starts where the same chat with an empty reply stops agreeing (not where the
    # generation prompt ends: some templates rearrange a chat that ends with a reply, e.g. Mistral
    # v0.3 drops the system prompt)
    empty_reply = chat[:-1] + [dict(chat[-1], content="")]
    empty = tok.encode_chat(empty_reply, add_generation_prompt=False)
    n = next((i for i, (a, b) in enumerate(zip(empty, full)) if a != b), len(empty))
    if n >= max_len:
        if not truncate:
            raise TooLong(f"{where}: prompt of {n} tokens does not fit max length {max_len}")
        keep = max_len // 2
        full = full[n - keep :]
        n = keep
    full = full[:max_len]
    return full, [-100] * n + full[n:]


def encode_all(tok, chats, max_len, long="stop", what="example"):
    """Encode every chat. One whose prompt does not fit max_len stops it (long="stop", naming how
    many and the first), is left out and counted ("skip"), or has its prompt cut ("truncate")."""
    if long is True or long is False:  # the older spelling: skip_long=True / False
        long = "skip" if long else "stop"
    if long not in LONG:
        raise SwatError(f"long must be one of {', '.join(LONG)}, not {long!r}")
    out = []
    too_long = []  # the positions (from 1) of the records whose prompt does not fit
    for i, chat in enumerate(chats):
        try:
            out.append(encode(tok, chat, max_len, f"{what} {i + 1}", long == "truncate"))
        except TooLong:
            too_long.append(i + 1)
    if too_long and long == "stop":
        raise SwatError(
            f"{len(too_long)} of {len(chats)} {what}s have a prompt of {max_len} tokens or more "
            f"(the first: {what} {too_long[0]}); raise --max-len, or --long skip to leave them "
            "out, --long truncate to cut their prompts"
        )
    if too_long:
        left_out = f"{len(too_long)} of {len(chats)} {what}s"
        print(f"left out {left_out} whose prompt exceeds {max_len} tokens")
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
