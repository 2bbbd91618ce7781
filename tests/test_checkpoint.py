"""Checkpoints: the torch state-dict layout, atomic writes, clear errors on bad files."""

import os

import numpy as np
import pytest

from dpbp import checkpoint, config, files
from dpbp.errors import UserError
from dpbp.model import MLP
from dpbp.optim import SGD


def make(widths=(4, 6, 3), momentum=0.9):
    model = MLP(list(widths), "tanh", np.float64)
    model.init_(np.random.default_rng(0))
    opt = SGD(model.params, model.grads, lr=0.1, momentum=momentum)
    model.grads[...] = 1.0
    opt.step()
    return model, opt


def test_layout_is_torch_sequential_state_dict():
    model, _ = make((784, 128, 64, 10))
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes == {"model.0.weight": (128, 784), "model.0.bias": (128,),
                      "model.2.weight": (64, 128), "model.2.bias": (64,),
                      "model.4.weight": (10, 64), "model.4.bias": (10,)}


def test_round_trip(tmp_path):
    model, opt = make()
    path = checkpoint.path_for(tmp_path, 3)
    os.makedirs(os.path.dirname(path))
    checkpoint.save(path, model, opt, epoch=3, step=42, world_size=4,
                    config_toml=config.to_toml(config.Config()))
    assert os.path.basename(path) == "epoch-0003.npz"
    assert os.listdir(os.path.dirname(path)) == ["epoch-0003.npz"]   # no temporary left
    state = checkpoint.load(path)
    assert (state["epoch"], state["step"], state["world_size"]) == (3, 42, 4)
    assert config.from_toml(state["config"]) == config.Config()
    np.testing.assert_array_equal(state["optimizer.momentum_buffer"], opt.momentum_buffer)
    other, _ = make()
    other.params[...] = 0
    assert other.load_state_dict(state, "ckpt") is None
    np.testing.assert_array_equal(other.params, model.params)
    assert checkpoint.list_epochs(tmp_path) == {3: path}


def test_failed_write_leaves_nothing_behind(tmp_path):
    target = tmp_path / "x.npz"
    target.write_bytes(b"earlier")

    def explode(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        files.write_atomic(str(target), explode)
    assert os.listdir(tmp_path) == ["x.npz"] and target.read_bytes() == b"earlier"


def test_state_that_does_not_fit_is_described():
    model, _ = make((4, 6, 3))
    small, _ = make((4, 5, 3))
    assert "model.0.weight has shape (5, 4), the network needs (6, 4)" in \
        model.load_state_dict(small.state_dict(), "ckpt")
    deeper, _ = make((4, 6, 6, 3))
    assert "model.2.weight has shape (6, 6), the network needs (3, 6)" in \
        model.load_state_dict(deeper.state_dict(), "ckpt")
    extra = dict(model.state_dict(), **{"model.4.weight": np.zeros((3, 3))})
    assert "has model.4.weight, which the 2-layer network (4-6-3) does not have" in \
        model.load_state_dict(extra, "ckpt")
    assert "has no model.2.bias" in model.load_state_dict({"model.0.weight": np.zeros((6, 4)),
                                                            "model.0.bias": np.zeros(6),
                                                            "model.2.weight": np.zeros((3, 6))},
                                                           "ckpt")
    bad = dict(model.state_dict(), **{"model.0.bias": np.full(6, np.nan)})
    assert "holds NaN or Inf" in model.load_state_dict(bad, "ckpt")


def test_unreadable_checkpoint(tmp_path):
    model, opt = make()
    path = str(tmp_path / "epoch-0001.npz")
    checkpoint.save(path, model, opt, 1, 1, 1, config.to_toml(config.Config()))
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) // 2])
    with pytest.raises(UserError, match="is not a readable .npz file"):
        checkpoint.load(path)
    np.savez(path, x=np.zeros(2))
    with pytest.raises(UserError, match="lacks epoch, step, world_size, format_version, "
                                        "config: not a dpbp checkpoint"):
        checkpoint.load(path)


@pytest.mark.parametrize("change,message", [
    ({"epoch": np.array("two")}, "epoch must be a non-negative integer"),
    ({"step": np.array([1, 2])}, "step must be a non-negative integer"),
    ({"world_size": np.float64(2)}, "world_size must be a non-negative integer"),
    ({"config": np.array([1])}, "config must be TOML text"),
    ({"format_version": np.int64(99)}, "has format 99; this dpbp reads up to 1"),
])
def test_malformed_checkpoint_fields(tmp_path, change, message):
    model, opt = make()
    path = str(tmp_path / "epoch-0001.npz")
    checkpoint.save(path, model, opt, 1, 1, 1, config.to_toml(config.Config()))
    with np.load(path) as f:
        arrays = dict({k: f[k] for k in f.files}, **change)
    np.savez(path, **arrays)
    with pytest.raises(UserError, match=message):
        checkpoint.load(path)


def test_restore_checks_the_momentum_buffer(tmp_path):
    model, opt = make()
    state = dict(model.state_dict(), **{"optimizer.momentum_buffer": np.zeros(3)})
    with pytest.raises(UserError, match="momentum_buffer has shape"):
        checkpoint.restore(state, "ckpt", model, opt)
