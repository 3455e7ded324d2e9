"""The security feature space: each instruction's hidden state at its last prompt token, at every
layer, and a logistic-regression probe per layer that separates harmful (1) from harmless (0)
instructions. The best layer's probe is the fixed classifier the robustness scan and the drift
measurement read.
"""

import hashlib
import json
import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from swatkit import checks, data
from swatkit.checkpoint import fingerprint
from swatkit.files import SwatError, write_atomic
from swatkit.generation import pad_left


@torch.no_grad()
def features(net, tok, instructions, batch_size=32, cache_dir=None):
    """Hidden states at the last prompt token -> fp32 tensor [layers + 1, N, dim].

    Prompts are formatted with the chat format and its generation prompt, then left-padded, so
    position -1 is the last prompt token of every row. With cache_dir, the features are kept in a
    safetensors file keyed by the weights and the prompts.
    """
    if isinstance(instructions, str) or not all(isinstance(s, str) for s in instructions):
        raise SwatError("features: instructions must be a list of prompts (text), e.g. [prompt]")
    if not len(instructions):
        raise SwatError("features: no instructions")
    prompts = [tok.encode_chat([{"role": "user", "content": s}]) for s in instructions]
    path = None
    if cache_dir:
        if os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
            raise SwatError(f"{cache_dir}: not a directory (the feature cache)")
        weights = fingerprint(net).encode()
        key = hashlib.sha256(weights + json.dumps(prompts).encode()).hexdigest()[:24]
        path = os.path.join(cache_dir, f"features-{key}.safetensors")
        if os.path.exists(path):
            return load_file(path)["x"]
    device = net.model.embed_tokens.weight.device
    batches = []
    for b in tqdm(range(0, len(prompts), batch_size), desc="features", leave=False):
        ids, mask = pad_left(prompts[b : b + batch_size], device)
        states = net.hidden_states(ids, mask)
        # one [B, dim] row per layer: the last prompt token's state
        batches.append(torch.stack([h[:, -1].float().cpu() for h in states]))
    x = torch.cat(batches, 1)
    if path:
        write_atomic(path, lambda tmp: save_file({"x": x}, tmp))
    return x


def labelled(harmful, harmless):
    """Two feature tensors [..., N, D] -> X [..., N1 + N2, D], y (1 = harmful)."""
    if harmful.shape[:-2] != harmless.shape[:-2] or harmful.shape[-1] != harmless.shape[-1]:
        raise SwatError(
            f"labelled: features of different shapes ({list(harmful.shape)} and "
            f"{list(harmless.shape)}); they must differ only in the number of prompts"
        )
    y = torch.cat([torch.ones(harmful.shape[-2]), torch.zeros(harmless.shape[-2])])
    return torch.cat([harmful, harmless], -2), y


class LogisticProbe:
    """L2-regularised logistic regression on standardised features, solved with full-batch L-BFGS
    in float64. The objective is scikit-learn's: sum of log-losses + ||w||^2 / (2 C)."""

    def __init__(self, C=1.0, max_iter=200):
        checks.probe_args(C, max_iter)
        self.C = C
        self.max_iter = max_iter

    def fit(self, X, y):
        # the data is small: fit on the CPU in float64, whatever device and dtype it came in
        X = torch.as_tensor(X).double().cpu()
        y = torch.as_tensor(y).double().cpu()
        checks.probe_data(X, y)
        # standardise each feature, so that one C suits every layer's scale
        self.mu = X.mean(0)
        self.sd = X.std(0).clamp(min=1e-6)
        Z = (X - self.mu) / self.sd
        self.w = torch.zeros(Z.shape[1], dtype=torch.float64, requires_grad=True)
        self.b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS(
            [self.w, self.b],
            max_iter=self.max_iter,
            tolerance_grad=1e-9,
            tolerance_change=1e-12,
            history_size=20,
            line_search_fn="strong_wolfe",
        )

        def closure():
            opt.zero_grad()
            logits = Z @ self.w + self.b
            loss = F.binary_cross_entropy_with_logits(logits, y, reduction="sum")
            loss = loss + self.w.square().sum() / (2 * self.C)
            loss.backward()
            return loss

        opt.step(closure)
        self.w = self.w.detach()
        self.b = self.b.detach()
        return self

    def logits(self, X):
        """The log-odds of "harmful" for each row of X."""
        Z = (torch.as_tensor(X).double().cpu() - self.mu) / self.sd
        return Z @ self.w + self.b

    def predict_proba(self, X):
        return torch.sigmoid(self.logits(X)).float()

    def score(self, X, y):
        """Accuracy, AUC and mean log-loss on (X, y)."""
        # NaN features would score as a plain "harmless"
        if not torch.as_tensor(X).isfinite().all():
            raise SwatError("probe: features to score must be finite numbers")
        y = torch.as_tensor(y).double().cpu()
        z = self.logits(X)
        loss = F.binary_cross_entropy_with_logits(z, y).item()
        accuracy = ((z > 0).double() == y).double().mean().item()
        return {"acc": accuracy, "auc": auc(z, y), "loss": loss}


def auc(scores, y):
    """Area under the ROC curve: the chance that a random harmful example outscores a harmless one
    (ties count half)."""
    pos = scores[y == 1][:, None]
    neg = scores[y == 0][None]
    return ((pos > neg).double() + 0.5 * (pos == neg).double()).mean().item()


def fit_layers(X, y):
    """One probe per layer: X [layers + 1, N, D] -> list of probes (index 0: the embeddings)."""
    return [LogisticProbe().fit(X[layer], y) for layer in range(X.shape[0])]


def drift(probes, layer, orig, tuned, y):
    """Security feature-space drift of a tuned model at `layer`.

    The original model's probe is scored on the tuned model's features (acc_after), and each class
    mean's shift is measured relative to the original gap between the two class means.
    """
    before = probes[layer].score(orig[layer], y)
    after = probes[layer].score(tuned[layer], y)
    gap = (orig[layer][y == 1].mean(0) - orig[layer][y == 0].mean(0)).norm()
    shift = []
    for label in (1, 0):
        moved = tuned[layer][y == label].mean(0) - orig[layer][y == label].mean(0)
        shift.append((moved.norm() / gap).item())
    return {
        "layer": layer,
        "acc_before": before["acc"],
        "acc_after": after["acc"],
        "auc_before": before["auc"],
        "auc_after": after["auc"],
        "shift_harmful": shift[0],
        "shift_harmless": shift[1],
    }


# ---- the security feature space of a model: one probe per layer ----


def baseline(net, tok, harmful=None, harmless=None, test_harmful=None, cache_dir=None):
    """Per-layer probes fitted on harmful vs harmless instructions and scored on held-out ones.

    harmful, harmless, test_harmful: lists of instructions (default: the built-in train splits, and
    the built-in harmful test split). The held-out harmless prompts are the built-in test split. The
    best layer's probe and features are what drift is later measured against.
    """
    harmful = harmful or data.builtin("harmful", "train")
    harmless = harmless or data.builtin("harmless", "train")
    test_harmful = test_harmful or data.builtin("harmful", "test")
    test_harmless = data.builtin("harmless", "test")

    def feats(prompts):
        return features(net, tok, prompts, cache_dir=cache_dir)

    probes = fit_layers(*labelled(feats(harmful), feats(harmless)))
    X, y = labelled(feats(test_harmful), feats(test_harmless))
    scores = [p.score(x, y) for p, x in zip(probes, X)]
    # the best layer: highest held-out accuracy, then AUC
    layer = max(range(len(scores)), key=lambda i: (scores[i]["acc"], scores[i]["auc"]))
    return {
        "probes": probes,  # one LogisticProbe per layer (0: the embeddings)
        "scores": scores,  # each probe's held-out accuracy, AUC and log-loss
        "layer": layer,  # the best layer: its probe is the fixed security classifier
        "X": X,  # held-out features [layers + 1, N, dim]: drift is measured against them
        "y": y,  # their labels (1: harmful)
        "harmful": test_harmful,  # the held-out prompts, to take a tuned model's features on
        "harmless": test_harmless,
        "train": (harmful, harmless),  # the prompts the probes were fitted on (the scan uses them)
    }
