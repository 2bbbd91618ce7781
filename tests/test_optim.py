"""SGD against a hand-written reference step that spells out torch.optim.SGD's rule."""

import numpy as np
import pytest

from dpbp.nn import optim
from dpbp.nn.optim import SGD


def reference_sgd(p, grads, lr, momentum, nesterov, weight_decay):
    """Written out per step, as torch.optim.SGD documents it (dampening 0)."""
    buf = None
    for g in grads:
        d_p = g + weight_decay * p
        if momentum != 0:
            buf = d_p.copy() if buf is None else momentum * buf + d_p
            d_p = d_p + momentum * buf if nesterov else buf
        p = p - lr * d_p
    return p, buf


@pytest.mark.parametrize("momentum,nesterov,weight_decay", [
    (0.0, False, 0.0), (0.0, False, 0.01), (0.9, False, 0.0), (0.9, True, 0.0),
    (0.5, True, 0.1), (0.99, False, 0.001)])
@pytest.mark.parametrize("chunk", [optim.CHUNK, 7])   # one chunk, or 8 and a partial one
def test_sgd_matches_reference(momentum, nesterov, weight_decay, chunk, monkeypatch):
    monkeypatch.setattr(optim, "CHUNK", chunk)
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=60)
    grads = [rng.normal(size=60) for _ in range(6)]
    params, g = p0.copy(), np.zeros(60)
    opt = SGD(params, g, lr=0.1, momentum=momentum, nesterov=nesterov,
              weight_decay=weight_decay)
    for step_grad in grads:
        g[...] = step_grad
        opt.step()
    want_p, want_buf = reference_sgd(p0, grads, 0.1, momentum, nesterov, weight_decay)
    np.testing.assert_allclose(params, want_p, rtol=1e-13, atol=1e-15)
    if momentum:
        np.testing.assert_allclose(opt.momentum_buffer, want_buf, rtol=1e-13, atol=1e-15)
    else:
        assert opt.momentum_buffer is None


def test_update_is_in_place():
    """The optimizer must never rebind params: the model's layer views would detach."""
    params, grads = np.ones(4), np.full(4, 2.0)
    view = params[1:3]
    SGD(params, grads, lr=0.5, momentum=0.9).step()
    np.testing.assert_array_equal(view, [0.0, 0.0])
