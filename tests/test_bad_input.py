"""Every kind of bad input, end to end through `python -m dpbp.train`, in one table.

Each case must stop the run with exit code 2 and exactly one line `dpbp: error: ...`
holding the case's words (the problem, and the file or key), print no traceback, and
write nothing: everything under the test's folder, the run directory included, is byte
for byte what it was before.

How each case is launched (the `launch` column):
  ONE   one process, no launcher: most cases, since a launch costs ~0.5 s; in a fork of
        a process that imported dpbp already (tests/forked.py), which saves most of it.
  TWO   mpirun -n 2 alone.
  BOTH  one process and mpirun -n 2.
Under mpirun -n 2 the table holds at least one case of each place where input is
checked: the command line, config keys and ranges, a config file, an .npz, an IDX folder
(raw and gzip) and initial weights, which every rank reads (so the ranks must agree and
report it once, not once per rank), and the run directory and the checkpoint to resume
from, which rank 0 alone reads (so rank 1 must stop with it, not wait for it).
"""

import gzip
import os
import sys
import zipfile
from typing import Callable, NamedTuple

import numpy as np
import pytest

from dpbp.nn.optim import SGD
from dpbp.service import checkpoint, config
from dpbp.service.checkpoint import Position
from tests.conftest import fake_mnist, mlp, run_forked, run_train, run_with_timeout, write_idx

ONE, TWO, BOTH = (None,), (2,), (None, 2)   # ranks to launch with; None: no mpirun


class Case(NamedTuple):
    id: str
    setup: Callable      # setup(tmp_path) -> the command line's arguments
    words: tuple         # each must appear in the one error line
    launch: tuple = ONE
    skip: str = ""       # why it cannot run here, if it cannot


# ----------------------------------------------------------------------------- set-ups

def sets(*overrides):
    return [arg for o in overrides for arg in ("--set", o)]


def base(tmp, args=()):
    """Every case trains a tiny network for one epoch into tmp/run unless it says else,
    so a case that were wrongly accepted ends in a second, with files written; of 40
    synthetic samples, where the case's `args` choose no other source (data.samples
    has no effect with the others, and is refused)."""
    other = any(a.startswith("data.source=") or a == "--config" for a in args)
    return sets("model.hidden=[4]", "train.epochs=1", "train.batch_size=4",
                *([] if other else ["data.samples=40"]), f'run.dir="{tmp / "run"}"')


def given(*overrides):
    """Set-up: just these --set overrides."""
    return lambda tmp: sets(*overrides)


def config_file(content):
    """Set-up: --config a file holding this text (or these bytes)."""
    def setup(tmp):
        path = tmp / "bad.toml"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return ["--config", str(path)]
    return setup


def npz_source(path, loss="cross_entropy"):
    return sets('data.source="npz"', f'data.path="{path}"', f'train.loss="{loss}"',
                "data.val_fraction=0")


def tiny_npz(tmp):
    """8 samples, 5 features, 3 classes: a network of 5-4-3 under base()."""
    rng = np.random.default_rng(0)
    np.savez(tmp / "d.npz", x=rng.normal(size=(8, 5)), y=np.arange(8) % 3)
    return npz_source(tmp / "d.npz")


def npz(loss="cross_entropy", **arrays):
    """Set-up: train on an .npz holding these arrays."""
    def setup(tmp):
        np.savez(tmp / "d.npz", **arrays)
        return npz_source(tmp / "d.npz", loss)
    return setup


def damaged_npz(damage):
    """Set-up: train on tiny_npz after damage(its bytes) -> bytes."""
    def setup(tmp):
        args = tiny_npz(tmp)
        (tmp / "d.npz").write_bytes(damage((tmp / "d.npz").read_bytes()))
        return args
    return setup


def flip(offset):
    """Damage: invert the byte at `offset` (negative: from the end)."""
    def damage(raw):
        raw = bytearray(raw)
        raw[offset] ^= 0xFF
        return bytes(raw)
    return damage


def mark_encrypted(raw):
    """Damage: set the 'encrypted' flag of the first entry in the zip's directory."""
    raw = bytearray(raw)
    raw[raw.find(b"PK\x01\x02") + 8] |= 0x01
    return bytes(raw)


def zip_of_bytes(tmp):
    """Set-up: an .npz whose x is a plain file in the zip, not a .npy array."""
    with zipfile.ZipFile(tmp / "d.npz", "w") as z:
        z.writestr("x", b"1,2\n3,4\n")
        z.writestr("y.npy", b"")
    return npz_source(tmp / "d.npz")


def mnist(damage=None, gz=False):
    """Set-up: train on a small MNIST-format folder, after damage(folder)."""
    def setup(tmp):
        folder = fake_mnist(tmp / "mnist", gz)
        if damage:
            damage(folder)
        return sets('data.source="mnist"', f'data.path="{folder}"')
    return setup


def rewrite(name, change):
    """Damage for mnist(): the file `name` gets change(its bytes) -> bytes."""
    def damage(folder):
        (folder / name).write_bytes(change((folder / name).read_bytes()))
    return damage


def gunzipped(change):
    """Damage for a .gz file: change(the bytes inside) -> bytes, compressed again."""
    return lambda raw: gzip.compress(change(gzip.decompress(raw)))


def init_weights(**shapes):
    """Set-up: tiny_npz, starting from an .npz of model.* weights of these shapes (the
    5-4-3 network needs model.0.weight (4, 5), model.0.bias (4,), model.2.weight (3, 4),
    model.2.bias (3,))."""
    def setup(tmp):
        np.savez(tmp / "w.npz", **{name: np.zeros(shape) for name, shape in shapes.items()})
        return tiny_npz(tmp) + sets(f'model.init="{tmp / "w.npz"}"')
    return setup


def run_dir(where):
    """Set-up: tiny_npz into run.dir = where(tmp_path)."""
    return lambda tmp: tiny_npz(tmp) + sets(f'run.dir="{where(tmp)}"')


def under_a_file(tmp):
    (tmp / "file").write_text("")
    return tmp / "file" / "run"


def in_a_read_only_folder(tmp):
    (tmp / "locked").mkdir(mode=0o500)
    return tmp / "locked" / "run"


def resume_from(damage, widths=(5, 4, 3)):
    """Set-up: --resume a run whose one checkpoint, of a network of `widths`, went
    through damage(its bytes) -> bytes."""
    def setup(tmp):
        args = tiny_npz(tmp)
        cfg = config.load(None, (base(tmp, args) + args)[1::2])   # the --set values
        model = mlp(list(widths), "relu", np.float32)
        model.init_(np.random.default_rng(0))
        path = checkpoint.path_for(cfg.run.dir, 1)
        os.makedirs(os.path.dirname(path))
        checkpoint.save(path, model, SGD(model.params, model.grads, 0.1, 0.9), Position(1, 0, 2, 0, 0),
                        world_size=1, config_toml=config.to_toml(cfg))
        with open(path, "rb") as f:
            raw = f.read()
        with open(path, "wb") as f:
            f.write(damage(raw))
        return args + ["--resume"]
    return setup


IMAGES, LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

# ----------------------------------------------------------------------------- the table

CASES = [
    # the command line and config keys: every rank reads them (test_config.py has more
    # variants, test_properties.py random ones)
    Case("unknown-option", lambda tmp: ["--bogus"], ("unrecognized arguments: --bogus",), TWO),
    Case("unknown-key", given("train.lrr=0.1"),
         ("unknown key train.lrr", "did you mean train.lr?"), BOTH),
    Case("set-not-toml", given("train.epochs=ten"),
         ("--set train.epochs=ten", 'train.epochs must be an integer, got "ten"')),
    Case("type-int", given("train.epochs=2.5"), ("train.epochs must be an integer", "2.5")),
    Case("type-number", given('train.lr="fast"'), ("train.lr must be a number", '"fast"')),
    Case("lr-negative", given("train.lr=-0.1"), ("train.lr must be a number > 0", "-0.1")),
    Case("lr-inf", given("train.lr=inf"), ("train.lr must be a number > 0", "inf")),
    Case("batch-size-0", given("train.batch_size=0"), ("train.batch_size must be >= 1",), TWO),
    Case("momentum-1", given("train.momentum=1.0"), ("train.momentum must be in [0, 1)",)),
    Case("momentum-negative", given("train.momentum=-0.5"), ("train.momentum", "[0, 1)")),
    Case("weight-decay-negative", given("train.weight_decay=-1e-4"),
         ("train.weight_decay must be >= 0",)),
    Case("val-fraction-1", given("data.val_fraction=1"), ("data.val_fraction", "[0, 1)")),
    Case("val-fraction-negative", given("data.val_fraction=-0.1"),
         ("data.val_fraction must be in [0, 1)", "-0.1")),
    Case("epochs-0", given("train.epochs=0"), ("train.epochs must be >= 1, got 0",)),
    Case("epochs-negative", given("train.epochs=-3"), ("train.epochs must be >= 1, got -3",)),
    Case("hidden-width-0", given("model.hidden=[8, 0]"), ("model.hidden", "widths >= 1")),
    # (model.hidden = [] is not bad input: it is a linear model)
    Case("layers-linear-on-images",   # checked against the data's shape: every rank
         given("model.hidden=[256, 128]", 'model.layers=[{type = "linear", out_features = 10}]'),
         ("model.layers: layer 0 (linear)", "got rows of shape (1, 16, 16); put a flatten "
          "before it"), TWO),
    Case("unknown-activation", given('model.activation="gelu"'),
         ("model.activation must be one of", '"relu"')),
    Case("unknown-loss", given('train.loss="l1"'), ("train.loss must be one of", '"mse"')),
    Case("unknown-dtype", given('model.dtype="float16"'), ("model.dtype must be one of",)),
    Case("grains-0", given("train.grains=0"), ("train.grains must be in [1, 1024], got 0",)),
    Case("grains-beyond-batch", given("train.deterministic=true", "train.batch_size=3"),
         ("train.grains must be <= train.batch_size = 3 when train.deterministic", "got 4")),
    Case("deterministic-accumulation", given("train.deterministic=true",
                                             "train.accumulation_steps=2"),
         ("train.accumulation_steps must be 1 when train.deterministic = true", "got 2"), TWO),
    Case("deterministic-float16", given("train.deterministic=true", 'train.comm_dtype="float16"'),
         ("train.comm_dtype must be \"float32\" when train.deterministic",)),
    Case("unknown-optimizer", given('train.optimizer="adam"'),
         ("train.optimizer must be one of", '"sgd", "adamw"', '"adam"')),
    Case("dropout-1", given("model.dropout=1.0"), ("model.dropout must be in [0, 1), got 1.0",),
         TWO),
    Case("dropout-negative", given("model.dropout=-0.1"), ("model.dropout must be in [0, 1)",)),
    Case("betas-negative", given('train.optimizer="adamw"', "train.betas=[-0.1, 0.999]"),
         ("train.betas must be two numbers in [0, 1)", "got [-0.1, 0.999]")),
    Case("betas-1", given('train.optimizer="adamw"', "train.betas=[0.9, 1.0]"),
         ("train.betas must be two numbers in [0, 1)", "got [0.9, 1.0]")),
    Case("betas-one-number", given('train.optimizer="adamw"', "train.betas=[0.9]"),
         ("train.betas must be two numbers",)),
    Case("betas-not-numbers", given('train.betas=["a", "b"]'),
         ("train.betas must be a list of numbers",)),
    Case("eps-0", given('train.optimizer="adamw"', "train.eps=0"),
         ("train.eps must be a number > 0, got 0",)),
    Case("eps-negative", given('train.optimizer="adamw"', "train.eps=-1e-8"),
         ("train.eps must be a number > 0",)),
    Case("momentum-with-adamw", given('train.optimizer="adamw"', "train.momentum=0.5"),
         ("train.momentum must be left at its default 0.9", 'train.optimizer = "adamw"'), TWO),
    Case("nesterov-with-adamw", given('train.optimizer="adamw"', "train.nesterov=true"),
         ("train.nesterov must be left at its default false",)),
    Case("betas-with-sgd", given("train.betas=[0.8, 0.9]"),
         ("train.betas must be left at its default [0.9, 0.999]", 'train.optimizer = "sgd"')),
    Case("amsgrad-with-sgd", given("train.amsgrad=true"),
         ("train.amsgrad must be left at its default false",)),
    Case("patience-negative", given("train.early_stopping_patience=-1"),
         ("train.early_stopping_patience must be >= 0",)),
    Case("min-delta-negative", given("train.early_stopping_min_delta=-0.01"),
         ("train.early_stopping_min_delta must be >= 0",)),
    Case("keep-best-without-validation", given("run.keep_best=true", "data.val_fraction=0"),
         ("run.keep_best needs validation data", "data.val_fraction"), BOTH),
    Case("early-stopping-without-validation",
         lambda tmp: tiny_npz(tmp) + sets("train.early_stopping_patience=2"),
         ("train.early_stopping_patience needs validation data", "npz")),

    # config files
    Case("config-missing", lambda tmp: ["--config", str(tmp / "absent.toml")],
         ("config file", "absent.toml", "No such file")),
    Case("toml-malformed", config_file("[train\nlr = \n"), ("bad.toml", "invalid TOML"), BOTH),
    Case("toml-nested-too-deeply", config_file("[train]\nlr = " + "[" * 100_000),
         ("bad.toml", "invalid TOML", "nested too deeply")),
    Case("toml-not-utf8", config_file(b"\xff\xfe[train]"), ("bad.toml", "not UTF-8")),
    Case("toml-unknown-key", config_file("[train]\nlr = 0.1\nmomentun = 0.5\n"),
         ("bad.toml", "unknown key train.momentun", "did you mean train.momentum?")),
    Case("toml-wrong-type", config_file('[train]\nepochs = "ten"\n'),
         ("bad.toml", "train.epochs must be an integer")),

    # .npz data: every rank reads it
    Case("npz-missing", lambda tmp: npz_source(tmp / "absent.npz"),
         ("data.path", "no such file", "absent.npz"), BOTH),
    Case("npz-is-a-folder", lambda tmp: npz_source(tmp), ("data.path", "no such file")),
    Case("npz-is-an-npy", damaged_npz(lambda raw: b"\x93NUMPY" + raw[6:]),
         ("d.npz", "one unnamed array (.npy)")),
    Case("npz-not-a-zip", damaged_npz(lambda raw: b"this is not a zip file"),
         ("d.npz", "not a readable .npz", "not a zip archive")),
    Case("npz-truncated", damaged_npz(lambda raw: raw[:300]), ("d.npz", "not a readable"), TWO),
    Case("npz-corrupt-byte", damaged_npz(flip(200)), ("d.npz", "not a readable .npz")),
    Case("npz-marked-encrypted", damaged_npz(mark_encrypted), ("d.npz", "encrypted")),
    Case("npz-member-not-an-array", zip_of_bytes, ("d.npz", "'x' is not a .npy array")),
    Case("npz-without-x", npz(y=np.zeros(3, int)), ("d.npz", "missing array 'x'")),
    Case("npz-without-y", npz(x=np.zeros((3, 2))), ("d.npz", "missing array 'y'")),
    Case("x-1d", npz(x=np.zeros(3), y=np.zeros(3, int)), ("d.npz", "x must be (n, features) or images (n, C, H, W)", "(3,)")),
    Case("x-no-features", npz(x=np.zeros((3, 0)), y=np.zeros(3, int)),
         ("d.npz", "x must be (n, features) or images", "sizes >= 1", "(3, 0)")),
    Case("y-scalar", npz(x=np.zeros((3, 2)), y=np.int64(1)), ("d.npz", "y has none (a scalar)")),
    Case("y-2d-labels", npz(x=np.zeros((2, 2)), y=np.array([[0], [1]])),
         ("d.npz", "y must be integer class labels of shape (n,)")),
    Case("x-objects", npz(x=np.array([object(), object()]), y=np.array([0, 1])),
         ("d.npz", "not a readable .npz", "Object arrays")),
    Case("x-strings", npz(x=np.array([["a", "b"], ["c", "d"]]), y=np.array([0, 1])),
         ("d.npz", "x must hold numbers", "<U1")),
    Case("y-strings", npz(x=np.zeros((2, 2)), y=np.array(["cat", "dog"])),
         ("d.npz", "y must be integer class labels", "<U3")),
    Case("y-fractions", npz(x=np.zeros((2, 2)), y=np.array([0.5, 1.0])),
         ("d.npz", "y must be integer class labels", "float64",
          'for regression targets set train.loss = "mse"')),
    Case("mse-y-integers-2d", npz(x=np.zeros((2, 2)), y=np.zeros((2, 2), int), loss="mse"),
         ("d.npz", "y must be float targets", "int64")),
    Case("label-negative", npz(x=np.zeros((2, 2)), y=np.array([0, -1])),
         ("d.npz", "negative class label -1")),
    Case("label-too-large", npz(x=np.zeros((2, 2)), y=np.array([0, 10**9])),
         ("d.npz", "class label 1000000000", "at most 65536")),
    Case("label-beyond-int64", npz(x=np.zeros((2, 2)), y=np.array([0, 2**63 + 5], np.uint64)),
         ("d.npz", "class label 9223372036854775813")),
    Case("labels-one-class", npz(x=np.zeros((2, 2)), y=np.array([0, 0])),
         ("d.npz", "a single class")),
    Case("x-nan", npz(x=np.array([[1.0, np.nan], [0, 0]]), y=np.array([0, 1])),
         ("d.npz", "x holds NaN or Inf")),
    Case("x-inf", npz(x=np.array([[1.0, -np.inf], [0, 0]]), y=np.array([0, 1])),
         ("d.npz", "x holds NaN or Inf")),
    Case("x-beyond-float32", npz(x=np.array([[1e39], [0.0]]), y=np.array([0, 1])),
         ("d.npz", "values too large for float32")),
    Case("mse-targets-nan", npz(x=np.zeros((2, 2)), y=np.array([[0.0], [np.nan]]), loss="mse"),
         ("d.npz", "y holds NaN or Inf")),
    Case("x-y-lengths-differ", npz(x=np.zeros((3, 2)), y=np.zeros(4, int)),
         ("d.npz", "x has 3 samples but y has 4"), TWO),
    Case("dataset-empty", npz(x=np.zeros((0, 2)), y=np.zeros(0, int)), ("d.npz", "x is empty")),
    Case("val-half-missing", npz(x=np.zeros((2, 2)), y=np.arange(2), x_val=np.zeros((1, 2))),
         ("d.npz", "x_val and y_val must come together")),
    Case("val-features-differ", npz(x=np.zeros((2, 2)), y=np.arange(2), x_val=np.zeros((1, 3)),
                                    y_val=np.array([1])),
         ("d.npz", "x has shape (2, 2) but x_val has (1, 3)")),
    Case("val-split-leaves-nothing",
         lambda tmp: npz(x=np.zeros((1, 2)), y=np.array([0]))(tmp) + sets("data.val_fraction=0.5"),
         ("d.npz", "data.val_fraction = 0.5 leaves no training samples")),

    # MNIST-format folders of IDX files, raw or gzip: every rank reads them
    Case("idx-folder-missing",
         lambda tmp: sets('data.source="mnist"', f'data.path="{tmp / "nowhere"}"'),
         ("data.path", "no such folder", "nowhere")),
    Case("idx-file-missing", mnist(lambda folder: (folder / IMAGES).unlink()),
         ("mnist: missing train-images-idx3-ubyte",)),
    Case("idx-truncated", mnist(rewrite(IMAGES, lambda raw: raw[:-5])),
         (IMAGES, "the header promises 192 bytes", "holds 187")),
    Case("idx-header-truncated", mnist(rewrite(IMAGES, lambda raw: raw[:9])),
         (IMAGES, "truncated IDX header")),
    Case("idx-wrong-magic", mnist(rewrite(IMAGES, lambda raw: b"\x00\x00\x0d" + raw[3:])),
         (IMAGES, "bad magic number"), TWO),
    Case("idx-dims-overflow",   # 65536**4 = 2**64: a product in int64 would wrap to 0
         mnist(rewrite(IMAGES, lambda raw: bytes([0, 0, 8, 4]) + b"\x00\x01\x00\x00" * 4)),
         (IMAGES, "the header promises 18446744073709551616 bytes")),
    Case("idx-counts-differ",
         mnist(lambda folder: write_idx(folder / LABELS, np.arange(11) % 10)),
         ("train-images-idx3-ubyte has 12 images but train-labels-idx1-ubyte has 11 labels",)),
    Case("idx-images-not-3d",
         mnist(lambda folder: write_idx(folder / IMAGES, np.zeros((12, 16)))),
         (IMAGES, "expected images (n, rows, cols)", "(12, 16)")),
    Case("gzip-truncated", mnist(rewrite(IMAGES + ".gz", lambda raw: raw[:-6]), gz=True),
         (IMAGES + ".gz", "cannot read", "corrupt or truncated")),
    Case("gzip-corrupt", mnist(rewrite(IMAGES + ".gz", flip(-20)), gz=True),
         (IMAGES + ".gz", "cannot read", "corrupt or truncated"), TWO),
    Case("gzip-not-gzip", mnist(rewrite(LABELS + ".gz", gzip.decompress), gz=True),
         (LABELS + ".gz", "cannot read")),
    Case("gzip-of-truncated-idx",
         mnist(rewrite(LABELS + ".gz", gunzipped(lambda raw: raw[:-1])), gz=True),
         (LABELS + ".gz", "the header promises 12 bytes")),

    # initial weights (model.init): every rank reads them
    Case("init-missing",
         lambda tmp: tiny_npz(tmp) + sets(f'model.init="{tmp / "absent.npz"}"'),
         ("model.init", "no such file", "absent.npz")),
    Case("init-shapes-do-not-fit",
         init_weights(**{"model.0.weight": (4, 5), "model.0.bias": (4,),
                         "model.2.weight": (2, 4), "model.2.bias": (3,)}),
         ("model.init", "w.npz", "model.2.weight has shape (2, 4), the network needs (3, 4)"),
         BOTH),
    Case("init-missing-layer", init_weights(**{"model.0.weight": (4, 5), "model.0.bias": (4,)}),
         ("model.init", "w.npz", "has no model.2.weight")),
    Case("init-extra-layer",
         init_weights(**{"model.0.weight": (4, 5), "model.0.bias": (4,),
                         "model.2.weight": (3, 4), "model.2.bias": (3,),
                         "model.4.weight": (3, 3)}),
         ("model.init", "w.npz", "has model.4.weight, which the network (5 -> linear 4, "
          "relu, linear 3) does not have")),

    # the run directory: rank 0 checks it
    Case("run-dir-under-a-file", run_dir(under_a_file),
         ("run.dir", "file/run", "cannot create it", "not a writable folder"), BOTH),
    Case("run-dir-is-a-file", run_dir(lambda tmp: under_a_file(tmp).parent),
         ("run.dir", "cannot create it", "not a writable folder")),
    Case("run-dir-not-utf8", given('run.dir="run\udcff"'),   # the byte 0xFF on the command line
         ("--set run.dir=", "run.dir must be UTF-8 text")),
    Case("run-dir-read-only", run_dir(in_a_read_only_folder),
         ("run.dir", "locked/run", "cannot create it"),
         skip="root writes into read-only folders" if AS_ROOT else ""),

    # the checkpoint to resume from: rank 0 reads it
    Case("resume-without-checkpoint", lambda tmp: ["--resume"],
         ("--resume: no run in", "run to resume", "--resume auto"), TWO),
    Case("checkpoint-truncated", resume_from(lambda raw: raw[: len(raw) // 2]),
         ("checkpoint", "epoch-0001.npz", "not a readable .npz"), BOTH),
    Case("checkpoint-corrupt-byte", resume_from(flip(100)),
         ("checkpoint", "epoch-0001.npz", "not a readable .npz")),
    Case("checkpoint-garbage", resume_from(lambda raw: b"garbage"),
         ("checkpoint", "epoch-0001.npz", "not a zip archive")),
    Case("checkpoint-of-another-network", resume_from(lambda raw: raw, widths=(6, 4, 3)),
         ("the data's rows have shape (5,), but the network of checkpoint", "epoch-0001.npz",
          "(6 -> linear 4, relu, linear 3) takes (6,)")),
    Case("resume-switching-optimizer",
         lambda tmp: resume_from(lambda raw: raw)(tmp) + sets('train.optimizer="adamw"'),
         ('--resume: train.optimizer was "sgd"', 'now "adamw"', "keeps its network, global "
          "batch and optimizer"), TWO),
    Case("resume-switching-dropout",
         lambda tmp: resume_from(lambda raw: raw)(tmp) + sets("model.dropout=0.5"),
         ("--resume: model.dropout was 0.0", "now 0.5")),
]


def launches(cases):
    """One pytest.param per case and launch, with ids like unknown-key-mpi2."""
    for case in cases:
        marks = [pytest.mark.skip(reason=case.skip)] if case.skip else []
        for ranks in case.launch:
            name = f"{case.id}-{'serial' if ranks is None else f'mpi{ranks}'}"
            yield pytest.param(case, ranks, id=name, marks=marks)


def snapshot(folder):
    """{relative path: bytes, or None for a folder} of everything under folder."""
    out = {}
    for root, folders, files in os.walk(folder):
        for name in folders:
            out[os.path.relpath(os.path.join(root, name), folder)] = None
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(f.name, folder)] = f.read()
    return out


@pytest.mark.parametrize("case,ranks", list(launches(CASES)))
def test_bad_input_is_refused(tmp_path, forks, case, ranks):
    args = case.setup(tmp_path)
    args = base(tmp_path, args) + args
    before = snapshot(tmp_path)
    if ranks is None:
        r = run_forked(forks, "dpbp.train", args, cwd=tmp_path)
    else:
        r = run_train(args, ranks=ranks, cwd=tmp_path, timeout=60)
    # (Open MPI's launcher adds its own banner about the exit code; MPICH's adds nothing)
    lines = [line for line in r.stderr.splitlines() if line.startswith("dpbp")]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("dpbp: error: "), lines[0]
    for word in case.words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    assert "Traceback" not in r.stderr and r.stdout == "", r.stderr + r.stdout
    assert snapshot(tmp_path) == before


def test_a_forked_run_says_what_a_fresh_process_says(tmp_path, forks):
    """The table's one-process cases run in forks (tests/forked.py): the same exit code
    and the same output as `python -m dpbp.train` started afresh."""
    args = base(tmp_path) + sets("train.lr=-1", "model.hiden=[3]")
    fresh = run_with_timeout([sys.executable, "-m", "dpbp.train", *args], 60, cwd=tmp_path)
    forked = run_forked(forks, "dpbp.train", args, cwd=tmp_path)
    assert fresh.returncode == 2 and "did you mean" in fresh.stderr, fresh.stderr
    assert (forked.returncode, forked.stdout, forked.stderr) == (
        fresh.returncode, fresh.stdout, fresh.stderr)
