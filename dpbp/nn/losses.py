"""Losses. Each returns every sample's loss on this rank's rows (float64, shape (B,)) and
the gradient of the GLOBAL batch mean, d(sum of all ranks' losses / N)/d(outputs), where
N is the size of the global batch. Normalising by N rather than by B is what makes the
sum of the ranks' gradients equal the gradient one process computes on the whole batch.

Shapes: B rows here, C outputs (classes). Semantics follow torch.nn.CrossEntropyLoss and
torch.nn.MSELoss with reduction="mean".
"""

import numpy as np


def cross_entropy(logits, labels, N, need_grad=True):
    # logits (B, C), labels (B,) int -> losses (B,), dlogits (B, C) or None
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))   # log softmax, no overflow
    rows = np.arange(len(labels))
    losses = -logp[rows, labels].astype(np.float64)
    if not need_grad:
        return losses, None
    dlogits = np.exp(logp, out=logp)          # softmax
    dlogits[rows, labels] -= 1
    dlogits /= N
    return losses, dlogits


def one_hot(labels, C, dtype):
    # labels (B,) int -> (B, C)
    out = np.zeros((len(labels), C), dtype=dtype)
    out[np.arange(len(labels)), labels] = 1
    return out


def mse(outputs, targets, N, need_grad=True):
    # outputs (B, C), targets (B, C) float or (B,) int labels (one-hot encoded)
    #   -> losses (B,) (each sample's mean over C), doutputs (B, C) or None
    if targets.ndim == 1:
        targets = one_hot(targets, outputs.shape[1], outputs.dtype)
    diff = outputs - targets
    C = outputs.shape[1]
    losses = np.square(diff).sum(axis=1, dtype=np.float64) / C
    if not need_grad:
        return losses, None
    diff *= 2.0 / (N * C)
    return losses, diff


def softmax(z):
    # z (B, C) -> probabilities (B, C) float64, each row summing to 1
    z = z.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)        # no overflow in exp
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def correct(outputs, labels):
    """How many rows' argmax equals the label: (B, C), (B,) -> int."""
    return int(np.count_nonzero(outputs.argmax(axis=1) == labels)) if len(labels) else 0
