"""SGD against a hand-written reference step that spells out torch.optim.SGD's rule."""

import numpy as np
import pytest

from dpbp.nn import optim
from dpbp.nn.optim import SGD, AdamW


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


def reference_adamw(p, grads, lrs, betas, eps, weight_decay, amsgrad):
    """Written out per step, as torch.optim.AdamW documents it."""
    beta1, beta2 = betas
    m, v, v_max = np.zeros_like(p), np.zeros_like(p), np.zeros_like(p)
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        p = p - lr * weight_decay * p
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        v_max = np.maximum(v_max, v)
        v_hat = (v_max if amsgrad else v) / (1 - beta2 ** t)
        p = p - lr * (m / (1 - beta1 ** t)) / (np.sqrt(v_hat) + eps)
    return p, m, v, v_max


@pytest.mark.parametrize("betas,eps,weight_decay,amsgrad", [
    ((0.9, 0.999), 1e-8, 0.0, False), ((0.9, 0.999), 1e-8, 0.01, False),
    ((0.8, 0.99), 1e-3, 0.1, True), ((0.0, 0.5), 1e-8, 0.0, True)])
@pytest.mark.parametrize("chunk", [optim.CHUNK, 7])
def test_adamw_matches_reference(betas, eps, weight_decay, amsgrad, chunk, monkeypatch):
    monkeypatch.setattr(optim, "CHUNK", chunk)
    rng = np.random.default_rng(1)
    p0 = rng.normal(size=60)
    grads = [rng.normal(size=60) * 10.0 ** rng.integers(-3, 2) for _ in range(8)]
    lrs = [0.01 * (k + 1) for k in range(8)]   # the loop sets lr before every step
    params, g = p0.copy(), np.zeros(60)
    opt = AdamW(params, g, lr=None, betas=betas, eps=eps, weight_decay=weight_decay,
                amsgrad=amsgrad)
    for step_grad, lr in zip(grads, lrs):
        g[...] = step_grad
        opt.lr = lr
        opt.step()
    want_p, want_m, want_v, want_max = reference_adamw(p0, grads, lrs, betas, eps,
                                                       weight_decay, amsgrad)
    np.testing.assert_allclose(params, want_p, rtol=1e-12, atol=1e-14)
    state = opt.state()
    np.testing.assert_allclose(state["exp_avg"], want_m, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(state["exp_avg_sq"], want_v, rtol=1e-12, atol=1e-15)
    assert int(state["step"]) == 8 and state["step"].dtype == np.int64
    assert list(state) == list(AdamW.state_names(amsgrad))
    if amsgrad:
        np.testing.assert_allclose(state["max_exp_avg_sq"], want_max, rtol=1e-12, atol=1e-15)


def test_adamw_is_in_place_and_float32_stays_float32():
    params, grads = np.ones(5, np.float32), np.full(5, 2.0, np.float32)
    view = params[1:3]
    opt = AdamW(params, grads, lr=0.5)
    opt.step()
    np.testing.assert_allclose(view, [0.5, 0.5], rtol=1e-6)   # the first update: lr sign(g)
    assert all(a.dtype == np.float32 for name, a in opt.state().items() if name != "step")


@pytest.mark.parametrize("make", [
    lambda p, g: SGD(p, g, lr=0.1, momentum=0.9),
    lambda p, g: AdamW(p, g, lr=0.1, amsgrad=True)])
def test_state_round_trips_and_bad_state_is_described(make):
    rng = np.random.default_rng(2)
    p, g = rng.normal(size=10), np.zeros(10)
    opt = make(p, g)
    for _ in range(3):
        g[...] = rng.normal(size=10)
        opt.step()
    saved = {name: a.copy() for name, a in opt.state().items()}
    fresh = make(np.zeros(10), np.zeros(10))
    assert fresh.load_state(saved, "ckpt") is None
    for name, a in fresh.state().items():
        assert a.tobytes() == saved[name].tobytes(), name
    name = next(iter(saved))
    assert "has shape (3,)" in fresh.load_state({name: np.zeros(3)}, "ckpt")
    assert "NaN, Inf" in fresh.load_state({name: np.full(10, np.nan)}, "ckpt")
    if "step" in saved:
        assert "NaN, Inf or negative" in fresh.load_state({"step": np.int64(-1)}, "ckpt")
        assert "needs an integer" in fresh.load_state({"step": np.float64(3)}, "ckpt")
