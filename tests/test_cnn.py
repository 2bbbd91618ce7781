"""Networks given as a list of layers (model.layers) on image data, end to end.

A tiny CNN (conv, relu, max pooling, conv, average pooling, dropout, flatten, linear) on
1 x 8 x 8 images: N ranks under mpirun give the weights of one process in float64 to
1e-10 (uneven shards, ranks without rows); train.deterministic gives the same bits at
1 to 4 ranks and across a resume at another world size, with matrix products whose bits
depend on the BLAS thread count and their row count (tests/sensitive.py); evaluate and
predict give the same bits in one process and under mpirun. The config's model.layers,
the image data of every source, and the refusals at start-up, which name the layer and
the shapes.
The one-process runs go through the commands' own main() in this process (the
`in_process` and `train` fixtures), the multi-rank ones through mpirun."""

import hashlib
import json
import signal

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import dpbp.evaluate
import dpbp.predict
from dpbp.errors import UserError
from dpbp.service import config, data
from tests.conftest import fake_mnist, metrics, model_arrays, run_module, run_train

LAYERS = [{"type": "conv2d", "out_channels": 3, "kernel_size": 3, "padding": 1},
          {"type": "relu"},
          {"type": "maxpool2d", "kernel_size": 2},
          {"type": "conv2d", "out_channels": 4, "kernel_size": 2},
          {"type": "avgpool2d", "kernel_size": 2, "stride": 1, "padding": 1},
          {"type": "dropout", "p": 0.25},
          {"type": "flatten"},
          {"type": "linear", "out_features": 3}]


def toml(layers):
    return config.toml_value(list(layers))


def images(rng, n):
    """n images 1 x 8 x 8 of 3 classes, the class a bright quadrant, and noise."""
    y = rng.integers(0, 3, size=n)
    x = rng.normal(size=(n, 1, 8, 8)) * 0.5
    for i, c in enumerate(y):
        x[i, 0, 4 * (c % 2):4 * (c % 2) + 4, 4 * (c // 2):4 * (c // 2) + 4] += 1
    return x, y


@pytest.fixture
def tiny_images(tmp_path):
    """17 training images (global batches of 8, 8 and 1: uneven shards at 3 ranks, and
    ranks without rows in the last) and 7 to validate."""
    rng = np.random.default_rng(3)
    (x, y), (x_val, y_val) = images(rng, 17), images(rng, 7)
    path = tmp_path / "images.npz"
    np.savez(path, x=x, y=y, x_val=x_val, y_val=y_val)
    return path


def cnn_run(npz, run_dir, *more, layers=LAYERS, epochs=4):
    sets = [f'data.source="npz"', f'data.path="{npz}"', 'model.dtype="float64"',
            f"model.layers={toml(layers)}", f"train.epochs={epochs}", "train.batch_size=8",
            "train.lr=0.1", "train.momentum=0.9", f'run.dir="{run_dir}"',
            "run.keep_checkpoints=0", *more]
    return [a for s in sets for a in ("--set", s)]


def final(run_dir, epoch=4):
    return run_dir / "checkpoints" / f"epoch-{epoch:04d}.npz"


def sha256(path):
    """Of a checkpoint's model and optimizer arrays, in name order."""
    h = hashlib.sha256()
    with np.load(path, allow_pickle=False) as f:
        for key in sorted(k for k in f.files if k.startswith(("model.", "optimizer."))):
            h.update(key.encode() + f[key].tobytes())
    return h.hexdigest()


def logged(run_dir):
    keys = ("train_loss", "val_loss", "val_accuracy")
    return [[m[k] for k in keys] for m in metrics(run_dir)]


# ----------------------------------------------------------------------------- exact

def test_n_ranks_match_one_process(tmp_path, tiny_images, train):
    """float64, momentum, dropout: 2 and 3 ranks end with one process's weights, momentum
    and logged figures to 1e-10."""
    code, out, err = train(cnn_run(tiny_images, tmp_path / "one"))
    assert code == 0, err
    assert "model: 1x8x8 -> conv2d 3 kernel_size=3 padding=1, relu, maxpool2d 2, conv2d 4 " \
           "kernel_size=2, avgpool2d 2 stride=1 padding=1, dropout 0.25, flatten, linear 3" in out
    assert "data: npz, 17 train / 7 val, images 1x8x8, 3 classes" in out
    one = model_arrays(final(tmp_path / "one"))
    with np.load(final(tmp_path / "one")) as f:
        one["momentum"] = f["optimizer.momentum_buffer"]
    for ranks in (2, 3):
        run_dir = tmp_path / f"ranks-{ranks}"
        r = run_train(cnn_run(tiny_images, run_dir), ranks=ranks)
        assert r.returncode == 0, r.stderr
        many = model_arrays(final(run_dir))
        with np.load(final(run_dir)) as f:
            many["momentum"] = f["optimizer.momentum_buffer"]
        assert many.keys() == one.keys() == {"model.0.weight", "model.0.bias", "model.3.weight",
                                             "model.3.bias", "model.7.weight", "model.7.bias",
                                             "momentum"}
        for name in one:
            np.testing.assert_allclose(many[name], one[name], rtol=0, atol=1e-10, err_msg=name)
        for a, b in zip(metrics(tmp_path / "one"), metrics(run_dir)):
            assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-12)
            assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-12)
            assert b["val_accuracy"] == a["val_accuracy"]
    first = model_arrays(final(tmp_path / "one", 1))   # training moved the weights
    assert np.abs(first["model.0.weight"] - one["model.0.weight"]).max() > 1e-3


def test_deterministic_bits_at_1_to_4_ranks_across_a_resume_and_in_evaluation(
        tmp_path, tiny_images, train, in_process, sensitive):
    """train.deterministic with kernel-sensitive matrix products: one process (here,
    2 BLAS threads allowed), 4 ranks, and a run stopped mid-epoch at 2 ranks of 2 threads
    and resumed at 3 end with the same bits and log. Evaluate gives the last epoch's
    logged figures, and predict the same bits, in one process and under mpirun."""
    args = ["train.deterministic=true", "model.dtype=\"float32\""]
    with threadpool_limits(limits=2):
        code, _, err = train(cnn_run(tiny_images, tmp_path / "one", *args))
    assert code == 0, err
    expected = sha256(final(tmp_path / "one"))
    r = run_train(cnn_run(tiny_images, tmp_path / "four", *args), ranks=4,
                  thread_sensitive=True)
    assert r.returncode == 0, r.stderr
    stopped = cnn_run(tiny_images, tmp_path / "resumed", *args)
    r = run_train(stopped, ranks=2, env={"DPBP_FAULT": "sigterm:1:5", "OMP_NUM_THREADS": "2"},
                  thread_sensitive=True)
    assert r.returncode == 128 + signal.SIGTERM, r.stderr
    assert "-batch-0" in r.stdout, r.stdout   # stopped mid-epoch
    r = run_train(stopped + ["--resume"], ranks=3, thread_sensitive=True)
    assert r.returncode == 0, r.stderr
    for run in ("four", "resumed"):
        assert sha256(final(tmp_path / run)) == expected, run
        assert logged(tmp_path / run) == logged(tmp_path / "one"), run

    last = metrics(tmp_path / "one")[-1]
    code, out, err = in_process(dpbp.evaluate.main,
                                ["--checkpoint", final(tmp_path / "four"), "--json"])
    assert code == 0, err
    r = run_module("dpbp.evaluate", ["--checkpoint", str(final(tmp_path / "one")), "--json"],
                   ranks=3, thread_sensitive=True)
    assert r.returncode == 0, r.stderr
    for text in (out, r.stdout):
        result = json.loads(text)
        assert (result["loss"], result["accuracy"]) == (last["val_loss"], last["val_accuracy"])

    x = tmp_path / "x.npy"
    np.save(x, np.random.default_rng(9).normal(size=(300, 1, 8, 8)).astype(np.float32))
    code, out, err = in_process(dpbp.predict.main, ["--checkpoint", final(tmp_path / "one"),
                                                    "--input", x, "--output", tmp_path / "p1.npy"])
    assert code == 0 and "class probabilities (300, 3) float64 for 300 samples" in out, err
    r = run_module("dpbp.predict", ["--checkpoint", str(final(tmp_path / "one")), "--input",
                                    str(x), "--output", str(tmp_path / "p2.npy")],
                   ranks=2, thread_sensitive=True)
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / "p1.npy").tobytes() == np.load(tmp_path / "p2.npy").tobytes()
    np.save(x, np.zeros((5, 64), np.float32))
    code, _, err = in_process(dpbp.predict.main, ["--checkpoint", final(tmp_path / "one"),
                                                  "--input", x, "--output", tmp_path / "p3.npy"])
    assert code == 2 and "shape (5, 64), but the network takes (n, 1, 8, 8): n samples of " \
        "images 1x8x8" in err, err


# ----------------------------------------------------------------------------- config

def test_layers_in_a_file_or_one_set_and_the_printed_config_loads(tmp_path, train):
    path = tmp_path / "cnn.toml"
    path.write_text('[model]\nlayers = [\n  { type = "conv2d", out_channels = 8, kernel_size = '
                    '[3, 2], padding = 1, bias = false },\n  { type = "relu" },\n'
                    '  { type = "flatten" },\n  { type = "linear", out_features = 10 },\n]\n')
    from_file = config.load(path)
    specs = (LAYERS[0] | {"out_channels": 8, "kernel_size": [3, 2], "bias": False},
             {"type": "relu"}, {"type": "flatten"}, {"type": "linear", "out_features": 10})
    assert from_file.model.layers == specs
    assert config.load(None, [f"model.layers={toml(specs)}"]) == from_file
    code, printed, err = train(["--config", path, "--print-config"])
    assert code == 0, err
    assert "hidden = [256, 128]" in printed and \
        '    {type = "conv2d", out_channels = 8, kernel_size = [3, 2], padding = 1, ' \
        'bias = false},' in printed
    (tmp_path / "printed.toml").write_text(printed)
    assert config.load(tmp_path / "printed.toml") == from_file


@pytest.mark.parametrize("name,shape", [("mnist-cnn", (1, 28, 28)), ("mnist-cnn-bn", (1, 28, 28)),
                                        ("synthetic-cnn", (1, 16, 16))])
def test_the_cnn_recipes_build_for_their_images(name, shape):
    from dpbp.nn.model import Model
    from tests.conftest import ROOT
    cfg = config.load(ROOT / "configs" / f"{name}.toml")
    assert Model(cfg.model.layers, shape, np.float32).output_shape == (10,)


@pytest.mark.parametrize("overrides,words", [
    (["model.hidden=[64]"], "model.hidden must be left at its default [256, 128]: it has no "
                            "effect beside model.layers, which gives the whole network, got [64]"),
    (['model.activation="tanh"'], "model.activation must be left at its default"),
    (["model.dropout=0.5"], "model.dropout must be left at its default 0.0"),
    ([f"model.layers={toml([LAYERS[0] | {'dilation': 2}])}"],
     "model.layers: layer 0 (conv2d): unknown key 'dilation'; conv2d takes out_channels, "
     "kernel_size, stride, padding, bias (out_channels, kernel_size required)"),
    ([f"model.layers={toml([{'type': 'relu'}, {'type': 'groupnorm'}])}"],
     "model.layers: layer 1: unknown type 'groupnorm'; the types are avgpool2d, batchnorm1d, "
     "batchnorm2d, conv2d"),
    ([f"model.layers={toml([{'type': 'batchnorm2d', 'track_running_stats': False}])}"],
     "model.layers: layer 0 (batchnorm2d): track_running_stats = false is not supported"),
    (["model.layers=[8]"], "model.layers must be a list of tables"),
])
def test_layers_that_make_no_network_are_refused_by_name(overrides, words):
    if "model.layers" not in overrides[0]:
        overrides = overrides + [f"model.layers={toml(LAYERS)}"]
    with pytest.raises(UserError) as e:
        config.load(None, overrides)
    assert words in str(e.value)


# ----------------------------------------------------------------------------- at start-up

def refused(result, words, run_dir):
    code, out, err = result
    lines = [line for line in err.splitlines() if line.startswith("dpbp")]
    assert code == 2 and len(lines) == 1 and words in lines[0], err
    assert out == "" and not run_dir.exists()


FLAT = {"type": "flatten"}


def test_networks_that_do_not_fit_the_data_are_refused_naming_layer_and_shapes(
        tmp_path, tiny_images, train):
    run_dir = tmp_path / "run"

    def start(layers, npz=tiny_images, *more):
        return train(cnn_run(npz, run_dir, *more, layers=layers))
    flat = tmp_path / "flat.npz"
    rng = np.random.default_rng(0)
    np.savez(flat, x=rng.normal(size=(20, 64)), y=rng.integers(0, 3, size=20))
    refused(start(LAYERS, flat), "model.layers: layer 0 (conv2d) takes images, x of shape "
            "(n, C, H, W), but the npz data's x has rows of 64 features, (n, 64): save x as "
            "(n, C, H, W), e.g. x.reshape(n, 1, 8, 8) for one channel of 8x8", run_dir)
    refused(start(LAYERS[:-1] + [{"type": "linear", "out_features": 5}]),
            "model.layers: the last layer (layer 7, linear) gives 5 outputs per row, but the "
            "data have 3 classes; the last linear needs out_features = 3", run_dir)
    refused(start(LAYERS[:4]), "model.layers: the last layer (layer 3, conv2d) gives rows of "
            "shape (4, 3, 3); a network ends in one row of outputs per sample", run_dir)
    refused(start(LAYERS[:2] + [{"type": "maxpool2d", "kernel_size": 9}] + LAYERS[6:]),
            "model.layers: layer 2 (maxpool2d): its kernel 9x9 is larger than its input 8x8 "
            "(rows of shape (3, 8, 8))", run_dir)
    refused(start([{"type": "linear", "out_features": 3}]),
            "model.layers: layer 0 (linear): linear takes rows of features (D_in,), got rows "
            "of shape (1, 8, 8); put a flatten before it", run_dir)
    refused(start([LAYERS[0] | {"out_channels": 2 ** 62}] + LAYERS[6:]),
            "does not fit in memory; check model.hidden (or model.layers)", run_dir)
    mse = tmp_path / "mse.npz"
    np.savez(mse, x=rng.normal(size=(20, 1, 8, 8)), y=rng.normal(size=(20, 2)))
    refused(start(LAYERS, mse, 'train.loss="mse"'), "the last layer (layer 7, linear) gives "
            "3 outputs per row, but the data have targets of width 2", run_dir)


def test_resume_and_evaluate_keep_the_layers(tmp_path, tiny_images, train, in_process):
    run_dir = tmp_path / "run"
    code, _, err = train(cnn_run(tiny_images, run_dir, epochs=1))
    assert code == 0, err
    other = f"model.layers={toml(LAYERS[:5] + LAYERS[6:])}"
    code, _, err = train(cnn_run(tiny_images, run_dir) + ["--set", other, "--resume"])
    assert code == 2 and "--resume: model.layers was [{type = \"conv2d\"" in err, err
    assert "a resumed run keeps its network" in err
    code, _, err = in_process(dpbp.evaluate.main, ["--checkpoint", run_dir, "--set", other])
    assert code == 2 and "model.layers = [{type = \"conv2d\"" in err, err
    assert "would change the network of checkpoint" in err


# ----------------------------------------------------------------------------- image data

def load(source, path="", images=True, **keys):
    cfg = config.DataConfig(source=source, path=str(path), **keys)
    return data.load(cfg, "cross_entropy", "float32", 0, images=images)


def test_images_of_every_source_keep_their_shape_for_layers_and_flatten_for_the_mlp(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 2, 3, 4))
    np.savez(tmp_path / "d.npz", x=x, y=rng.integers(0, 3, size=30))
    (tmp_path / "npy").mkdir()
    np.save(tmp_path / "npy" / "x.npy", x)
    np.save(tmp_path / "npy" / "y.npy", rng.integers(0, 3, size=30))
    mnist = fake_mnist(tmp_path / "mnist", gz=False)   # 12 images of 4x4, 6 to test
    synthetic = load("synthetic", samples=50)
    assert synthetic.x.shape == (45, 1, 16, 16) and synthetic.describe() == \
        "45 train / 5 val, images 1x16x16, 10 classes"
    assert load("synthetic", samples=50, images=False).x.tobytes() == synthetic.x.tobytes()
    for source, path, shape in (("npz", tmp_path / "d.npz", (2, 3, 4)),
                                ("npy", tmp_path / "npy", (2, 3, 4)),
                                ("mnist", mnist, (1, 4, 4))):
        d, flat = load(source, path), load(source, path, images=False)
        assert d.x.shape[1:] == d.x_val.shape[1:] == shape, source
        assert flat.x.shape[1:] == (int(np.prod(shape)),), source
        assert np.asarray(flat.x).tobytes() == np.asarray(d.x).tobytes(), source
        assert type(d.x) is type(flat.x)   # npy: both stay on disk (data.Rows)
        cfg = config.DataConfig(source=source, path=str(path))
        assert data.peek(cfg, "cross_entropy", images=True)[0] == shape
        assert data.peek(cfg, "cross_entropy")[0] == (int(np.prod(shape)),)
    assert isinstance(load("npy", tmp_path / "npy").x, data.Rows)
    test = data.load_test(config.DataConfig(source="mnist", path=str(mnist)), "cross_entropy",
                          "float32", load("mnist", mnist), images=True)
    assert test[0].shape == (6, 1, 4, 4)


@pytest.mark.parametrize("x,words", [
    (np.zeros((5, 8, 8)), "x must be (n, features) or images (n, C, H, W), sizes >= 1, got "
                          "shape (5, 8, 8); for images of one channel add its axis, x[:, None]"),
    (np.zeros((5, 1, 0, 8)), "got shape (5, 1, 0, 8)"),
    (np.full((5, 1, 2, 2), np.inf), "x holds NaN or Inf values"),
])
def test_image_data_is_checked_as_rows_are(tmp_path, x, words):
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(5) % 2)
    with pytest.raises(UserError) as e:
        load("npz", tmp_path / "d.npz")
    assert words in str(e.value)
