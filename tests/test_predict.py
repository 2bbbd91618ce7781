"""`python -m dpbp.predict` end to end, on a real tiny run: outputs, bits, bad input."""

import os
import re

import numpy as np
import pytest

from dpbp import predict
from dpbp.errors import UserError
from dpbp.service import config
from dpbp.service import data as datasets
from tests.conftest import assert_refused, ckpt, run_module, run_train


def reference_outputs(checkpoint_path, x):
    """The network by hand, in float64: Linear, ReLU, ..., Linear."""
    with np.load(checkpoint_path, allow_pickle=False) as f:
        weights = {k: f[k].astype(np.float64) for k in f.files if k.startswith("model.")}
    layers = sorted({int(k.split(".")[1]) for k in weights})
    h = x.astype(np.float64)
    for i in layers:
        h = h @ weights[f"model.{i}.weight"].T + weights[f"model.{i}.bias"]
        if i != layers[-1]:
            h = np.maximum(h, 0)
    return h


def validation_inputs(run_dir):
    cfg = config.load(str(run_dir / "config.toml"))
    d = datasets.load(cfg.data, cfg.train.loss, cfg.model.dtype, cfg.run.seed)
    return d.x_val, d.y_val


@pytest.mark.parametrize("ranks", [None, 2])
def test_predict_gives_probabilities_that_match_the_run(run, tmp_path, ranks):
    run_dir, metrics = run
    x_val, y_val = validation_inputs(run_dir)
    np.save(tmp_path / "x.npy", x_val)
    out = tmp_path / "p.npy"
    r = run_module("dpbp.predict", ["--checkpoint", ckpt(run_dir, 2), "--input",
                                    str(tmp_path / "x.npy"), "--output", str(out)], ranks)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("wrote") == 1   # rank 0 alone writes and speaks
    p = np.load(out, allow_pickle=False)
    assert p.shape == (60, 10) and p.dtype == np.float64
    assert np.allclose(p.sum(axis=1), 1, rtol=0, atol=1e-12) and (p >= 0).all()
    z = reference_outputs(ckpt(run_dir, 2), x_val)
    expected = np.exp(z - z.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    assert np.allclose(p, expected, atol=1e-5)   # the network runs in float32
    assert np.mean(p.argmax(axis=1) == y_val) == metrics[1]["val_accuracy"]
    assert sorted(os.listdir(tmp_path)) == ["p.npy", "x.npy"]   # no temporaries left


def test_predict_gives_the_same_bits_at_any_world_size(run, tmp_path):
    """600 rows, three blocks: computed by one process or shared among 3 ranks (one with
    no block at 4), each row comes out of the same block, with the same bits."""
    run_dir, _ = run
    np.save(tmp_path / "x.npy", np.concatenate([validation_inputs(run_dir)[0]] * 10))
    outputs = []
    for ranks in (None, 3, 4):
        out = tmp_path / f"p{ranks}.npy"
        r = run_module("dpbp.predict", ["--checkpoint", ckpt(run_dir, 2), "--input",
                                        str(tmp_path / "x.npy"), "--output", str(out)], ranks)
        assert r.returncode == 0, r.stderr
        outputs.append(np.load(out, allow_pickle=False))
    assert outputs[0].shape == (600, 10)
    assert outputs[0].tobytes() == outputs[1].tobytes() == outputs[2].tobytes()


def test_predict_regression_outputs_and_integer_inputs(tmp_path):
    rng = np.random.default_rng(4)
    x = rng.integers(-3, 4, size=(30, 3))          # integer inputs are cast, like training
    np.savez(tmp_path / "reg.npz", x=x, y=x @ rng.normal(size=(3, 2)))
    r = run_train(["--set", 'data.source="npz"', "--set", f'data.path="{tmp_path / "reg.npz"}"',
                   "--set", 'train.loss="mse"', "--set", "model.hidden=[4]",
                   "--set", 'model.dtype="float64"', "--set", "train.epochs=1",
                   "--set", f'run.dir="{tmp_path / "run"}"'])
    assert r.returncode == 0, r.stderr
    np.save(tmp_path / "x.npy", x[:7])
    r = run_module("dpbp.predict", ["--checkpoint", ckpt(tmp_path / "run", 1), "--input",
                                    str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy")])
    assert r.returncode == 0 and "outputs (7, 2)" in r.stdout, r.stderr
    y = np.load(tmp_path / "y.npy")
    assert np.allclose(y, reference_outputs(ckpt(tmp_path / "run", 1), x[:7]), rtol=1e-12)


@pytest.mark.parametrize("name,array,message", [
    ("narrow.npy", np.zeros((4, 10)), "shape (4, 10), but the network takes (n, 256)"),
    ("one.npy", np.zeros(256), "is one sample; the network takes (n, 256)"),
    ("text.npy", np.array([["a"] * 256]), "must hold numbers, got dtype <U1"),
    ("notnpy.npy", b"1,2,3\n", "not a readable .npy file"),
    ("missing.npy", None, "--input: no such file"),
])
def test_predict_checks_the_input(tmp_path, name, array, message):
    path = tmp_path / name
    if isinstance(array, bytes):
        path.write_bytes(array)
    elif array is not None:
        np.save(path, array)
    with pytest.raises(UserError, match=re.escape(message)):
        predict.open_input(str(path), (256,))


@pytest.mark.parametrize("output,message", [
    ("x.npy", "is the input file; choose another name"),
    ("out.txt", "must name a .npy file"),
    ("nowhere/out.npy", "is not a writable folder"),
    ("folder.npy", "is a folder"),
])
def test_predict_checks_the_output(tmp_path, output, message):
    np.save(tmp_path / "x.npy", np.zeros((1, 2)))
    (tmp_path / "folder.npy").mkdir()
    with pytest.raises(UserError, match=re.escape(message)):
        predict.check_output(str(tmp_path / output), str(tmp_path / "x.npy"))


def test_predict_refuses_bad_input_and_writes_nothing(run, tmp_path):
    run_dir, _ = run
    good = np.zeros((4, 256), dtype=np.float32)
    np.save(tmp_path / "good.npy", good)
    nan = good.copy()
    nan[3, 5] = np.nan                       # on rank 1 of 2
    np.save(tmp_path / "nan.npy", nan)
    np.save(tmp_path / "big.npy", np.full((3, 256), 1e300))
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    cases = [
        (2, "nan.npy", "out.npy", "nan.npy: row 3 holds NaN or Inf"),
        (None, "big.npy", "out.npy", "row 0 holds NaN or Inf (or values beyond float32)"),
        (2, "good.npy", "good.npy", "is the input file; choose another name"),
    ]
    for ranks, source, target, message in cases:
        r = run_module("dpbp.predict", ["--checkpoint", ckpt(run_dir, 1), "--input",
                                        str(tmp_path / source), "--output",
                                        str(tmp_path / target)], ranks)
        assert_refused(r, message)
    assert_refused(run_module("dpbp.predict", ["--input", "x.npy"]),
                   "--checkpoint, --output required")
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before   # nothing written
