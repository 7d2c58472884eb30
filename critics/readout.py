"""Reading a critic's logits on labelled rows: validation figures and the logit offset.

Shared by `critics.train` (one critic) and its ensembles (several heads on one trunk, whose
logits are averaged before the offset is fitted and the validation figures are read).
"""

from __future__ import annotations

import numpy as np
import torch

from critics.labels import Labels
from critics.metrics import auroc, ece
from critics.models import StepEncoder, pad_right, step_logits


class Rows:
    """Encoded rows of one critic: ids, labelled positions, targets and loss weights per position."""

    def __init__(self, labels: Labels, enc: StepEncoder, kind: str, targets: list[list[float]], weights=None):
        self.ids, ends = enc.encode(labels.prompts, labels.steps)
        self.pos = [e if kind == "prm" else [len(r) - 1] for r, e in zip(self.ids, ends, strict=True)]
        self.targets = targets
        self.weights = weights or [[1.0] * len(t) for t in targets]
        for p, t in zip(self.pos, targets, strict=True):
            assert len(p) == len(t), f"{len(p)} labelled positions but {len(t)} targets"

    def batch(self, idx, pad_id: int, device):
        x, mask = pad_right([self.ids[i] for i in idx], pad_id)
        k = max(len(self.pos[i]) for i in idx)
        pos = torch.zeros(len(idx), k, dtype=torch.long)
        tgt, w = torch.zeros(len(idx), k), torch.zeros(len(idx), k)  # weight 0 = padding position
        for j, i in enumerate(idx):
            n = len(self.pos[i])
            pos[j, :n] = torch.tensor(self.pos[i])
            tgt[j, :n] = torch.tensor(self.targets[i], dtype=torch.float32)
            w[j, :n] = torch.tensor(self.weights[i], dtype=torch.float32)
        return x.to(device), mask.to(device), pos.to(device), tgt.to(device), w.to(device)


@torch.inference_mode()
def read_logits(model, tok, kind: str, labels: Labels, sep: str, device, batch_size: int = 256):
    """(logits, soft targets, hard labels) at every labelled position of `labels`, in order.
    `model`: one model, or a list of models on one tokenizer whose logits are averaged (an
    ensemble, as `critics.models.ModelCritic` scores one with members)."""
    models = model if isinstance(model, list) else [model]
    rows = Rows(labels, StepEncoder(tok, sep), kind, labels.soft)
    logits, soft = [], []
    for lo in range(0, len(labels), batch_size):
        idx = list(range(lo, min(lo + batch_size, len(labels))))
        x, mask, pos, tgt, w = rows.batch(idx, tok.pad_token_id, device)
        keep = (w > 0).cpu().numpy()
        mean = sum(step_logits(m, kind, x, mask, pos) for m in models) / len(models)
        logits.append(mean.float().cpu().numpy()[keep])
        soft.append(tgt.cpu().numpy()[keep])
    hard = np.array([h for row in labels.hard for h in row], bool)
    return np.concatenate(logits).astype(np.float64), np.concatenate(soft), hard


def evaluate(
    model, tok, kind: str, labels: Labels, sep: str, device, batch_size: int = 256, logit_offset: float = 0.0
) -> dict:
    """Validation AUROC (vs the binary label) and ECE (vs the soft target) over every labelled
    position, probabilities read as at scoring time (`logit_offset` added); NaN when there are no
    rows or one class only. `model` as `read_logits` takes it."""
    if not len(labels):
        return {"val_rows": 0, "val_auroc": float("nan"), "val_ece": float("nan")}
    logits, soft, hard = read_logits(model, tok, kind, labels, sep, device, batch_size)
    probs = (torch.from_numpy(logits).float() + logit_offset).sigmoid().numpy()  # as scoring reads them
    return {"val_rows": len(labels), "val_auroc": auroc(probs, hard), "val_ece": ece(probs, soft)}


def fit_offset(logits: np.ndarray, targets: np.ndarray) -> float:
    """The logit offset o with mean(sigmoid(logits + o)) = mean(targets): the one constant shift
    that gives the rows' own mean back (a shift keeps every rank, so AUROC is unchanged)."""
    goal, lo, hi = float(np.mean(targets)), -30.0, 30.0
    for _ in range(60):  # the mean is increasing in o: bisection to ~1e-16
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.mean(1.0 / (1.0 + np.exp(-(logits + mid)))) < goal else (lo, mid)
    return (lo + hi) / 2
