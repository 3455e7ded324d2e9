"""The security feature space: each instruction's hidden state at its last prompt token, at every layer,
and a logistic-regression probe per layer that separates harmful (1) from harmless (0) instructions."""
import hashlib, json, os
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm
import checks
from files import SwatError, write_atomic
from checkpoint import fingerprint
from model import pad_left

@torch.no_grad()
def features(net, tok, instructions, batch_size=32, cache_dir=None):
    """Hidden states at the last prompt token -> fp32 tensor [layers + 1, N, dim]. Prompts are formatted
    with the chat format and generation prompt, then left-padded, so position -1 is the last prompt token."""
    prompts = [tok.encode_chat([{"role": "user", "content": s}]) for s in instructions]
    key = None
    if cache_dir:  # keyed by the weights (each tensor's first numbers and its sum) and the prompts
        if os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
            raise SwatError(f"{cache_dir}: not a directory (the feature cache)")
        weights = fingerprint(net).encode()
        key = hashlib.sha256(weights + json.dumps(prompts).encode()).hexdigest()[:24]
        path = os.path.join(cache_dir, f"features-{key}.safetensors")
        if os.path.exists(path):
            return load_file(path)["x"]
    dev, out = net.model.embed_tokens.weight.device, []
    for b in tqdm(range(0, len(prompts), batch_size), desc="features", leave=False):
        _, hs = net(*pad_left(prompts[b:b + batch_size], dev), hidden=True, last=True)
        out.append(torch.stack([h[:, -1].float().cpu() for h in hs]))
    x = torch.cat(out, 1)
    if key:
        os.makedirs(cache_dir, exist_ok=True)
        write_atomic(path, lambda tmp: save_file({"x": x}, tmp))
    return x


def labelled(harmful, harmless):
    """Two feature tensors [..., N, D] -> X [..., N1 + N2, D], y (1 = harmful)."""
    y = torch.cat([torch.ones(harmful.shape[-2]), torch.zeros(harmless.shape[-2])])
    return torch.cat([harmful, harmless], -2), y


class LogisticProbe:
    """L2-regularised logistic regression on standardised features, solved with full-batch L-BFGS in
    float64. Objective as scikit-learn's: sum of log-losses + ||w||^2 / (2 C)."""
    def __init__(self, C=1.0, max_iter=200):
        checks.probe_args(C, max_iter)
        self.C = C
        self.max_iter = max_iter

    def fit(self, X, y):
        X, y = torch.as_tensor(X).double().cpu(), torch.as_tensor(y).double().cpu()  # small: CPU, float64
        if X.ndim != 2 or len(X) != len(y) or len(X) == 0:
            raise SwatError(f"probe: features must be [N, D] with N labels, not {list(X.shape)} and {len(y)} labels")
        if not (((y == 0) | (y == 1)).all() and X.isfinite().all()):
            raise SwatError("probe: labels must be 0 (harmless) or 1 (harmful), and the features finite numbers")
        if not (0 < y.sum() < len(y)):
            raise SwatError("probe: training data holds only one class; it needs harmful and harmless examples")
        self.mu, self.sd = X.mean(0), X.std(0).clamp(min=1e-6)
        Z = (X - self.mu) / self.sd
        self.w = torch.zeros(Z.shape[1], dtype=torch.float64, requires_grad=True)
        self.b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([self.w, self.b], max_iter=self.max_iter, tolerance_grad=1e-9,
                                tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(Z @ self.w + self.b, y, reduction="sum")
            loss = loss + self.w.square().sum() / (2 * self.C)
            loss.backward()
            return loss
        opt.step(closure)
        self.w, self.b = self.w.detach(), self.b.detach()
        return self

    def logits(self, X):
        return ((torch.as_tensor(X).double().cpu() - self.mu) / self.sd) @ self.w + self.b

    def predict_proba(self, X):
        return torch.sigmoid(self.logits(X)).float()

    def score(self, X, y):
        """Accuracy, AUC and mean log-loss on (X, y)."""
        if not torch.as_tensor(X).isfinite().all():  # NaN features would score as a plain "harmless"
            raise SwatError("probe: features to score must be finite numbers")
        y, z = torch.as_tensor(y).double().cpu(), self.logits(X)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z, y).item()
        return {"acc": ((z > 0).double() == y).double().mean().item(), "auc": auc(z, y), "loss": loss}


def auc(scores, y):
    """Area under the ROC curve: the chance that a random harmful example outscores a harmless one."""
    pos, neg = scores[y == 1], scores[y == 0]
    return ((pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()).mean().item()


def fit_layers(X, y):
    """One probe per layer: X [layers + 1, N, D] -> list of probes (index 0: the embeddings)."""
    return [LogisticProbe().fit(X[l], y) for l in range(X.shape[0])]


def drift(probes, layer, orig, tuned, y):
    """Security feature-space drift of a tuned model: the original model's probe at `layer` scored on the
    tuned model's features, and how far each class mean moved, relative to the original gap between them."""
    before, after = probes[layer].score(orig[layer], y), probes[layer].score(tuned[layer], y)
    gap = (orig[layer][y == 1].mean(0) - orig[layer][y == 0].mean(0)).norm()
    shift = [((tuned[layer][y == c].mean(0) - orig[layer][y == c].mean(0)).norm() / gap).item() for c in (1, 0)]
    return {"layer": layer, "acc_before": before["acc"], "acc_after": after["acc"], "auc_before": before["auc"],
            "auc_after": after["auc"], "shift_harmful": shift[0], "shift_harmless": shift[1]}
