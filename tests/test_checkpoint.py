"""Checkpoints: the torch state-dict layout, atomic writes, clear errors on bad files."""

import os

import numpy as np
import pytest

from dpbp.errors import UserError
from dpbp.nn.model import mlp_layers
from dpbp.nn.optim import SGD, AdamW
from dpbp.service import checkpoint, config, files
from dpbp.service.checkpoint import Position
from tests.conftest import mlp


def make(widths=(4, 6, 3), momentum=0.9):
    model = mlp(list(widths), "tanh", np.float64)
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
    checkpoint.save(path, model, opt, Position(3, 0, 42, 0, 0), world_size=4,
                    config_toml=config.to_toml(config.Config()), data_id="x (2, 3) float32 crc 1")
    assert os.path.basename(path) == "epoch-0003.npz"
    assert os.listdir(os.path.dirname(path)) == ["epoch-0003.npz"]   # no temporary left
    state = checkpoint.load(path)
    assert (state["epoch"], state["batch"], state["step"], state["world_size"]) == (3, 0, 42, 4)
    assert config.from_toml(state["config"]) == config.Config()
    assert state["data"] == "x (2, 3) float32 crc 1"   # what a resume compares its data with
    np.testing.assert_array_equal(state["optimizer.momentum_buffer"], opt.momentum_buffer)
    other, _ = make()
    other.params[...] = 0
    assert other.load_state_dict(state, "ckpt") is None
    np.testing.assert_array_equal(other.params, model.params)
    mid = checkpoint.path_for(tmp_path, 3, 17)
    checkpoint.save(mid, model, opt, Position(3, 17, 59, 1, 2176), 2, config.to_toml(config.Config()),
                    loss_sums=[1.5, 2.5])
    assert os.path.basename(mid) == "epoch-0003-batch-000017.npz"
    state = checkpoint.load(mid)
    assert [state[k] for k in ("batch", "skipped", "counted")] == [17, 1, 2176]
    np.testing.assert_array_equal(state["loss_sums"], [1.5, 2.5])
    assert checkpoint.list_all(tmp_path) == [((3, 0), path), ((3, 17), mid)]


def rewrite(path, **change):
    """Rewrite the checkpoint's .npz with some entries changed: a consistent zip file whose
    content no longer matches the digest written with it."""
    with np.load(path) as f:
        arrays = dict({k: f[k] for k in f.files}, **change)
    np.savez(path, **arrays)


def test_digest_catches_any_change_of_content(tmp_path):
    model, opt = make()
    path = str(tmp_path / "epoch-0001.npz")
    checkpoint.save(path, model, opt, Position(1, 0, 1, 0, 0), 1, config.to_toml(config.Config()))
    weight = np.load(path)["model.0.weight"].copy()
    weight[0, 0] = np.nextafter(weight[0, 0], 1)   # one bit of one weight
    rewrite(path, **{"model.0.weight": weight})
    with pytest.raises(UserError, match=r"epoch-0001.npz is damaged: its content does not "
                                        r"match its SHA-256 digest"):
        checkpoint.load(path)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_bytes_never_load(tmp_path, damage):
    """Truncated or bit-flipped anywhere: an error naming the file, or (for a bit of zip
    metadata that does not touch the content, such as a file time) the very same state."""
    model, opt = make((20, 30, 5))
    path = str(tmp_path / "epoch-0001.npz")
    checkpoint.save(path, model, opt, Position(1, 0, 1, 0, 0), 1, config.to_toml(config.Config()))
    raw, intact = open(path, "rb").read(), checkpoint.load(path)
    refused = 0
    for at in np.linspace(0, len(raw) - 1, 60).astype(int):
        if damage == "truncate":
            bad = raw[:at]
        else:
            bad = bytearray(raw)
            bad[at] ^= 0x10
        open(path, "wb").write(bytes(bad))
        try:
            state = checkpoint.load(path)
        except UserError as e:
            assert "epoch-0001.npz" in str(e)
            refused += 1
            continue
        assert state.keys() == intact.keys() and state["network"] == intact["network"]
        for k in state.keys() - {"network"}:
            np.testing.assert_array_equal(state[k], intact[k])
    assert refused >= (60 if damage == "truncate" else 50)


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
    assert "has model.4.weight, which the network (4 -> linear 6, tanh, linear 3) does not have" in \
        model.load_state_dict(extra, "ckpt")
    assert "has no model.2.bias" in model.load_state_dict({"model.0.weight": np.zeros((6, 4)),
                                                            "model.0.bias": np.zeros(6),
                                                            "model.2.weight": np.zeros((3, 6))},
                                                           "ckpt")
    bad = dict(model.state_dict(), **{"model.0.bias": np.full(6, np.nan)})
    assert "holds NaN or Inf" in model.load_state_dict(bad, "ckpt")
    ints = dict(model.state_dict(), **{"model.0.bias": np.zeros(6, np.int64)})
    assert "model.0.bias has dtype int64, expected floats" in model.load_state_dict(ints, "ckpt")


def test_unreadable_checkpoint(tmp_path):
    model, opt = make()
    path = str(tmp_path / "epoch-0001.npz")
    checkpoint.save(path, model, opt, Position(1, 0, 1, 0, 0), 1, config.to_toml(config.Config()))
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) // 2])
    with pytest.raises(UserError, match="is not a readable .npz file"):
        checkpoint.load(path)
    np.savez(path, x=np.zeros(2))
    with pytest.raises(UserError, match="lacks epoch, batch, step, skipped, counted, "
                                        "world_size, format_version, config, digest: not a "
                                        "dpbp checkpoint"):
        checkpoint.load(path)


@pytest.mark.parametrize("change,message", [
    ({"epoch": np.array("two")}, "epoch must be a non-negative integer"),
    ({"step": np.array([1, 2])}, "step must be a non-negative integer"),
    ({"world_size": np.float64(2)}, "world_size must be a non-negative integer"),
    ({"config": np.array([1])}, "config must be TOML text"),
    ({"config": np.array(["a", "b"])}, "config must be TOML text"),
    ({"data": np.int64(3)}, "data must be text"),
    ({"data": np.array(["a", "b"])}, "data must be text"),
    ({"loss_sums": np.zeros(1, np.float32)}, "loss_sums must be world_size finite float64"),
    ({"loss_sums": np.zeros(2)}, "loss_sums must be world_size finite float64"),
    ({"format_version": np.int64(99)}, "has format 99; this dpbp reads up to 3"),
    ({"loss_sums": np.array([np.nan])}, "loss_sums must be world_size finite float64 values"),
    ({"network": np.str_("[{")}, "network must be JSON text of a list of layers"),
    ({"network": np.str_('[{"type": "conv"}]')}, "its network does not build .layer 0: "
                                                 "unknown type 'conv'"),
    ({"network": np.str_('[{"type": "relu"}]'), "input_shape": np.array([2, 2])},
     r"its network gives rows of shape \(2, 2\), not one row of outputs"),
    ({"input_shape": np.array([4.0])}, "input_shape must be positive integers"),
    ({"input_shape": np.array([4, 1])}, "linear takes rows of features"),
])
def test_malformed_checkpoint_fields(tmp_path, change, message):
    """Fields that are wrong although the digest matches them (as a buggy writer makes)."""
    model, opt = make()
    path = str(tmp_path / "epoch-0001.npz")
    checkpoint.save(path, model, opt, Position(1, 0, 1, 0, 0), 1, config.to_toml(config.Config()))
    with np.load(path) as f:
        arrays = dict({k: f[k] for k in f.files if k != "digest"}, **change)
    np.savez(path, **arrays, digest=np.str_(checkpoint.digest(arrays)))
    with pytest.raises(UserError, match=message):
        checkpoint.load(path)


@pytest.mark.parametrize("version", [1, 2])
def test_reads_checkpoints_of_formats_1_and_2(tmp_path, version):
    """dpbp 0.1 wrote no digest and no mid-epoch position, and neither format recorded
    the network: such files still load, their network the one their config describes
    with the input and output widths of their weights, as format 3 records it."""
    model, opt = make()
    path = str(tmp_path / "epoch-0002.npz")
    toml = config.to_toml(config.load(None, ["model.hidden=[6]", 'model.activation="tanh"']))
    checkpoint.save(path, model, opt, Position(2, 0, 8, 0, 0), 1, toml)
    recorded = checkpoint.load(path)["network"]
    assert recorded == (mlp_layers([6], "tanh", 0.0, 3), (4,)) == (model.specs, (4,))
    older = ("network", "input_shape", "digest") + (
        ("batch", "skipped", "counted", "loss_sums", "data") if version == 1 else ())
    with np.load(path) as f:
        arrays = dict({k: f[k] for k in f.files if k not in older},
                      format_version=np.int64(version))
    np.savez(path, **arrays, **({} if version == 1 else
                                {"digest": np.str_(checkpoint.digest(arrays))}))
    state = checkpoint.load(path)
    assert (state["epoch"], state["batch"], state["step"]) == (2, 0, 8)
    assert state["network"] == recorded
    if version == 1:   # any data, no mid-epoch position
        assert (state["skipped"], state["counted"], state["data"]) == (0, 0, None)
        assert state["loss_sums"].tolist() == [0.0]
    if version == 2:   # weights that do not fit a network: refused by name
        arrays["model.2.weight"] = np.zeros((3, 6, 1))
        np.savez(path, **arrays, digest=np.str_(checkpoint.digest(arrays)))
        with pytest.raises(UserError, match="has no 2-D model.2.weight, which its config "
                                            r"\(model.hidden = \[6\], model.dropout = 0\)"):
            checkpoint.load(path)


def test_never_writes_non_finite_weights(tmp_path):
    model, opt = make()
    model.params[3] = np.inf
    with pytest.raises(UserError, match="the weights are not finite"):
        checkpoint.save(str(tmp_path / "x.npz"), model, opt, Position(1, 0, 1, 0, 0), 1, "")
    assert os.listdir(tmp_path) == []


def test_restore_checks_the_momentum_buffer(tmp_path):
    model, opt = make()
    state = dict(model.state_dict(), **{"optimizer.momentum_buffer": np.zeros(3)})
    with pytest.raises(UserError, match="momentum_buffer has shape"):
        checkpoint.restore(state, "ckpt", model, opt)


def test_a_checkpoint_without_its_momentum_buffer_is_refused(tmp_path):
    """Altered by hand (the buffer removed, the digest recomputed): resuming it would go
    on with zero momentum, silently; it is refused. A run without momentum has none."""
    model, opt = make()
    path = tmp_path / "c.npz"
    checkpoint.save(path, model, opt, Position(1, 0, 1, 0, 0), 1, config.to_toml(config.Config()))
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files if k not in ("optimizer.momentum_buffer", "digest")}
    arrays["digest"] = np.str_(checkpoint.digest(arrays))
    np.savez(path, **arrays)
    state = checkpoint.load(path)   # its digest holds
    with pytest.raises(UserError, match="has no optimizer.momentum_buffer, though it was "
                                        "written with train.momentum = 0.9"):
        checkpoint.restore(state, str(path), model, opt)
    plain = config.to_toml(config.load(None, ["train.momentum=0"]))
    checkpoint.restore(dict(state, config=plain), str(path), model, opt)   # nothing missing
def adamw_config(**train):
    return config.from_dict({"train": dict(optimizer="adamw", **train)})


def test_adamw_state_round_trips_and_lost_moments_are_refused(tmp_path):
    model = mlp([4, 6, 3], "tanh", np.float64)
    model.init_(np.random.default_rng(0))
    opt = AdamW(model.params, model.grads, lr=0.1, amsgrad=True)
    for _ in range(3):
        model.grads[...] = np.random.default_rng(1).normal(size=model.grads.size)
        opt.step()
    path = str(tmp_path / "epoch-0001.npz")
    checkpoint.save(path, model, opt, Position(1, 0, 3, 0, 0), 1,
                    config.to_toml(adamw_config(amsgrad=True)))
    state = checkpoint.load(path)
    assert {k for k in state if k.startswith("optimizer.")} == {
        "optimizer.exp_avg", "optimizer.exp_avg_sq", "optimizer.max_exp_avg_sq",
        "optimizer.step"}
    other = mlp([4, 6, 3], "tanh", np.float64)
    fresh = AdamW(other.params, other.grads, lr=0.1, amsgrad=True)
    checkpoint.restore(state, path, other, fresh)
    for name, a in opt.state().items():
        assert fresh.state()[name].tobytes() == a.tobytes(), name
    assert int(fresh.t) == 3
    for lost in ("optimizer.exp_avg", "optimizer.step"):
        altered = {k: v for k, v in state.items() if k != lost}
        with pytest.raises(UserError, match=f"has no {lost}, though it was written with "
                                            'train.optimizer = "adamw": it was altered'):
            checkpoint.restore(altered, path, other, AdamW(other.params, other.grads, lr=0.1))
    # states no update writes (the digest recomputed, as a careful forger would): refused
    # on load, not blamed later on the learning rate
    for name, change, message in (
            ("optimizer.exp_avg_sq", lambda v: -v, "exp_avg_sq holds negative values"),
            ("optimizer.max_exp_avg_sq", lambda v: v / 2, "max_exp_avg_sq is below optimizer."
                                                         "exp_avg_sq"),
            ("optimizer.step", lambda t: t + 1, "optimizer.step = 4 updates, more than its 3 "
                                                "steps")):
        altered = dict(state, **{name: change(state[name])})
        with pytest.raises(UserError, match=f"{message}.*altered; resume from another"):
            checkpoint.restore(altered, path, other, AdamW(other.params, other.grads, lr=0.1,
                                                           amsgrad=True))


def test_a_checkpoint_without_moments_of_a_run_that_had_none_starts_them_afresh(tmp_path):
    """amsgrad switched on at a resume: max_exp_avg_sq starts at 0, as torch's does."""
    model = mlp([4, 6, 3], "tanh", np.float64)
    opt = AdamW(model.params, model.grads, lr=0.1)
    model.grads[...] = 1.0
    opt.step()
    path = str(tmp_path / "epoch-0001.npz")
    checkpoint.save(path, model, opt, Position(1, 0, 1, 0, 0), 1, config.to_toml(adamw_config()))
    amsgrad = AdamW(model.params, model.grads, lr=0.1, amsgrad=True)
    checkpoint.restore(checkpoint.load(path), path, model, amsgrad)
    assert int(amsgrad.t) == 1 and not amsgrad.max_exp_avg_sq.any()


def test_the_best_checkpoint_is_never_an_epoch_checkpoint(tmp_path):
    model, opt = make()
    for where in (checkpoint.path_for(tmp_path, 2), checkpoint.best_path(tmp_path)):
        os.makedirs(os.path.dirname(where), exist_ok=True)
        checkpoint.save(where, model, opt, Position(2, 0, 4, 0, 0), 1,
                        config.to_toml(config.Config()))
    assert checkpoint.list_all(tmp_path) == [((2, 0), checkpoint.path_for(tmp_path, 2))]
    assert checkpoint.load(checkpoint.best_path(tmp_path))["epoch"] == 2
