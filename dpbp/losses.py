"""Losses. Each returns the SUM of per-sample losses over this rank's rows and the gradient
of the GLOBAL batch mean, d(loss_sum_over_all_ranks / N)/d(outputs), where N is the size
of the global batch. Normalising by N rather than by B is what makes the sum of the
ranks' gradients equal the gradient one process computes on the whole batch.

Shapes: B rows here, C outputs (classes). Semantics follow torch.nn.CrossEntropyLoss and
torch.nn.MSELoss with reduction="mean".
"""

import numpy as np


def cross_entropy(logits, labels, N, need_grad=True):
    # logits (B, C), labels (B,) int -> loss_sum (float), dlogits (B, C) or None
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))   # log softmax, no overflow
    rows = np.arange(len(labels))
    loss_sum = -float(logp[rows, labels].sum(dtype=np.float64))
    if not need_grad:
        return loss_sum, None
    dlogits = np.exp(logp, out=logp)          # softmax
    dlogits[rows, labels] -= 1
    dlogits /= N
    return loss_sum, dlogits


def one_hot(labels, C, dtype):
    # labels (B,) int -> (B, C)
    out = np.zeros((len(labels), C), dtype=dtype)
    out[np.arange(len(labels)), labels] = 1
    return out


def mse(outputs, targets, N, need_grad=True):
    # outputs (B, C), targets (B, C) float or (B,) int labels (one-hot encoded)
    #   -> loss_sum (float; each sample's loss is its mean over C), doutputs (B, C) or None
    if targets.ndim == 1:
        targets = one_hot(targets, outputs.shape[1], outputs.dtype)
    diff = outputs - targets
    C = outputs.shape[1]
    loss_sum = float(np.square(diff).sum(dtype=np.float64)) / C
    if not need_grad:
        return loss_sum, None
    diff *= 2.0 / (N * C)
    return loss_sum, diff


LOSSES = {"cross_entropy": cross_entropy, "mse": mse}


def correct(outputs, labels):
    """How many rows' argmax equals the label: (B, C), (B,) -> int."""
    return int(np.count_nonzero(outputs.argmax(axis=1) == labels)) if len(labels) else 0
