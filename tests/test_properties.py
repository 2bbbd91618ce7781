"""Properties of the config parser and the data loaders, over inputs that hypothesis draws.

Config: any valid config survives to_toml -> from_toml and a file -> load unchanged;
`--set section.key=VALUE` gives what setting the field directly gives; an unknown key, a
value of the wrong type or out of range is a UserError that names the key; and any
text at all, as a --set or as a config file, gives a Config or a UserError, never
another exception.

Data: random valid .npz arrays load with the right shapes, dtypes and classes; an .npz,
an IDX file or a gzip file with random bytes changed, cut or added either loads as a
well-formed Dataset or is a UserError, never another exception and never a hang.

The examples are derandomized (the same on every run, no example database), few, and
each has a deadline, so the file runs in seconds and CI is stable.
"""

import contextlib
import dataclasses
import gzip
import io
import math
import re
import signal
import tempfile
import typing
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dpbp.errors import UserError
from dpbp.service import config, data
from tests.conftest import fake_mnist

# No deadline: how long an example takes depends on the machine, not on the code under test.
BOUNDED = settings(max_examples=60, deadline=None, derandomize=True,
                   database=None)


@contextlib.contextmanager
def scratch():
    """A fresh folder for one example (pytest's tmp_path is shared by all of a test's)."""
    with tempfile.TemporaryDirectory() as folder:
        yield Path(folder)

# ----------------------------------------------------------------------------- config

SECTIONS = typing.get_type_hints(config.Config)
TYPES = {f"{s}.{k}": t for s, cls in SECTIONS.items()
         for k, t in typing.get_type_hints(cls).items()}   # "train.lr": float, ...

# Any text UTF-8 can encode (no lone surrogates, which config refuses), often with what
# TOML strings must escape
UNICODE = st.characters().filter(lambda c: not 0xD800 <= ord(c) <= 0xDFFF)
TEXT = st.text(UNICODE | st.sampled_from('"\\\'\x00\n\t\x1f\x7f\u2028é😀'), max_size=10)
INT64 = 2**63 - 1   # TOML integers are 64-bit


def choice(key):
    return st.sampled_from(config.CHOICES[key])


# Layers as model.layers takes them (their shapes are checked against the data later)
LAYER = st.sampled_from([
    {"type": "conv2d", "out_channels": 4, "kernel_size": [2, 3], "stride": [1, 2],
     "padding": 1, "bias": False},
    {"type": "relu"}, {"type": "tanh"}, {"type": "sigmoid"}, {"type": "flatten"},
    {"type": "maxpool2d", "kernel_size": 2}, {"type": "avgpool2d", "kernel_size": 3,
                                                "stride": 1, "padding": 1}]) | st.builds(
    lambda n: {"type": "conv2d", "out_channels": n, "kernel_size": 3}, st.integers(1, INT64)) \
    | st.builds(lambda n: {"type": "linear", "out_features": n}, st.integers(1, INT64)) \
    | st.builds(lambda p: {"type": "dropout", "p": p}, st.floats(0, 1, exclude_max=True))
NOT_A_LAYER = st.sampled_from([{"type": "conv"}, {"type": "relu", "inplace": True},
                               {"type": "linear", "out_features": 0}, {"type": "conv2d"},
                               {"type": "maxpool2d", "kernel_size": 2, "padding": 2},
                               {"out_features": 3}, {"type": 2}])

# A valid value for every key, within the ranges that config.validate enforces.
VALID = {
    "run.dir": TEXT.filter(str.strip),
    "run.seed": st.integers(0, INT64),
    "data.source": choice("data.source"),
    "data.path": TEXT.filter(bool),   # not "": the npz and mnist sources need a path
    "data.val_fraction": st.floats(0, 1, exclude_max=True),
    "data.shuffle": st.booleans(),
    "data.samples": st.integers(2, INT64),
    "data.mnist_t10k": choice("data.mnist_t10k"),
    "model.hidden": st.lists(st.integers(1, INT64), max_size=4),
    "model.activation": choice("model.activation"),
    "model.dtype": choice("model.dtype"),
    "model.init": TEXT,
    "model.classes": st.just(0) | st.integers(2, config.MAX_CLASSES),
    "train.loss": choice("train.loss"),
    "train.epochs": st.integers(1, INT64),
    "train.batch_size": st.integers(1, INT64),
    "train.lr": st.floats(0, exclude_min=True, allow_infinity=False),
    "train.momentum": st.floats(0, 1, exclude_max=True),
    "train.nesterov": st.booleans(),
    "train.weight_decay": st.floats(0, allow_infinity=False),
    "run.keep_checkpoints": st.integers(0, INT64),
    "run.sync_check_steps": st.integers(0, INT64),
    "run.watchdog_seconds": st.floats(0, allow_infinity=False),
    "run.log_every_steps": st.integers(0, INT64),
    "train.schedule": choice("train.schedule"),
    "train.milestones": st.lists(st.integers(1, INT64), unique=True, max_size=4).map(sorted),
    "train.gamma": st.floats(0, exclude_min=True, allow_infinity=False),
    "train.warmup_epochs": st.floats(0, 1e6),     # at most train.epochs: valid_settings
    "train.lr_scaling": choice("train.lr_scaling"),
    "train.base_batch_size": st.integers(1, INT64),
    "train.accumulation_steps": st.integers(1, INT64),   # at most train.batch_size
    "train.clip_grad_norm": st.floats(0, allow_infinity=False),
    "train.comm_dtype": choice("train.comm_dtype"),
    "train.on_nonfinite": choice("train.on_nonfinite"),
    "train.checkpoint_every_steps": st.integers(0, INT64),
    "train.deterministic": st.booleans(),
    "train.grains": st.integers(1, config.MAX_GRAINS),   # at most train.batch_size: below
    "run.keep_best": st.booleans(),
    "model.dropout": st.floats(0, 1, exclude_max=True),
    "model.layers": st.lists(LAYER, max_size=4),        # the MLP's keys then: valid_settings
    "train.optimizer": choice("train.optimizer"),        # the other's keys: valid_settings
    "train.betas": st.lists(st.floats(0, 1, exclude_max=True), min_size=2, max_size=2),
    "train.eps": st.floats(0, exclude_min=True, allow_infinity=False),
    "train.amsgrad": st.booleans(),
    "train.early_stopping_patience": st.integers(0, INT64),
    "train.early_stopping_min_delta": st.floats(0, allow_infinity=False),
    "run.best_metric": choice("run.best_metric"),        # val_accuracy not with mse: below
    "train.plateau_factor": st.floats(0, 1, exclude_min=True, exclude_max=True),
    "train.plateau_patience": st.integers(0, INT64),     # plateau's keys: valid_settings
    "train.plateau_threshold": st.floats(0, allow_infinity=False),
    "train.plateau_cooldown": st.integers(0, INT64),
    "train.min_lr": st.floats(0, allow_infinity=False),
}

NAN = st.just(math.nan)
NEGATIVE = st.floats(max_value=-math.ulp(0.0))   # < 0, and never -0.0
# A value out of range for each key whose range no type can express.
OUT_OF_RANGE = {
    "run.dir": st.text(" \t\n", max_size=3),
    "run.seed": st.integers(max_value=-1),
    "data.source": TEXT.filter(lambda v: v not in config.CHOICES["data.source"]),
    "data.val_fraction": NEGATIVE | st.floats(1) | NAN,
    "data.samples": st.integers(max_value=1),
    "model.hidden": st.tuples(st.lists(st.integers(1, 9), max_size=2), st.integers(max_value=0),
                              st.lists(st.integers(1, 9), max_size=2)).map(
                                  lambda t: [*t[0], t[1], *t[2]]),
    "model.activation": TEXT.filter(lambda v: v not in config.CHOICES["model.activation"]),
    "model.dtype": TEXT.filter(lambda v: v not in config.CHOICES["model.dtype"]),
    "train.loss": TEXT.filter(lambda v: v not in config.CHOICES["train.loss"]),
    "train.epochs": st.integers(max_value=0),
    "train.batch_size": st.integers(max_value=0),
    "train.lr": st.floats(max_value=0) | st.just(math.inf) | NAN,
    "train.momentum": NEGATIVE | st.floats(1) | NAN,
    "train.weight_decay": NEGATIVE | st.just(math.inf) | NAN,
    "run.keep_checkpoints": st.integers(max_value=-1),
    "run.sync_check_steps": st.integers(max_value=-1),
    "run.watchdog_seconds": NEGATIVE | st.just(math.inf) | NAN,
    "run.log_every_steps": st.integers(max_value=-1),
    "model.classes": st.integers(max_value=-1) | st.just(1) | st.integers(config.MAX_CLASSES + 1),
    "train.schedule": TEXT.filter(lambda v: v not in config.CHOICES["train.schedule"]),
    "train.milestones": st.lists(st.integers(1, 99), min_size=1, max_size=3).map(
        lambda m: m + [m[-1]]) | st.lists(st.integers(max_value=0), min_size=1, max_size=2),
    "train.gamma": st.floats(max_value=0) | st.just(math.inf) | NAN,
    "train.warmup_epochs": NEGATIVE | st.just(math.inf) | NAN,
    "train.lr_scaling": TEXT.filter(lambda v: v not in config.CHOICES["train.lr_scaling"]),
    "train.base_batch_size": st.integers(max_value=0),
    "train.accumulation_steps": st.integers(max_value=0),
    "train.clip_grad_norm": NEGATIVE | st.just(math.inf) | NAN,
    "train.comm_dtype": TEXT.filter(lambda v: v not in config.CHOICES["train.comm_dtype"]),
    "train.on_nonfinite": TEXT.filter(lambda v: v not in config.CHOICES["train.on_nonfinite"]),
    "train.checkpoint_every_steps": st.integers(max_value=-1),
    "train.grains": st.integers(max_value=0) | st.integers(config.MAX_GRAINS + 1),
    "model.dropout": NEGATIVE | st.floats(1) | NAN,
    "model.layers": st.tuples(st.lists(LAYER, max_size=2), NOT_A_LAYER).map(
        lambda t: [*t[0], t[1]]),
    "train.optimizer": TEXT.filter(lambda v: v not in config.CHOICES["train.optimizer"]),
    "train.betas": st.lists(st.floats(0, 0.99), max_size=1) | st.lists(
        st.floats(0, 0.99), min_size=3, max_size=4) | st.tuples(
        st.floats(0, 0.99), NEGATIVE | st.floats(1) | NAN).map(list) | st.tuples(
        NEGATIVE | st.floats(1) | NAN, st.floats(0, 0.99)).map(list),
    "train.eps": st.floats(max_value=0) | st.just(math.inf) | NAN,
    "train.early_stopping_patience": st.integers(max_value=-1),
    "train.early_stopping_min_delta": NEGATIVE | st.just(math.inf) | NAN,
    "run.best_metric": TEXT.filter(lambda v: v not in config.CHOICES["run.best_metric"]),
    "train.plateau_factor": st.floats(max_value=0) | st.floats(1) | NAN,
    "train.plateau_patience": st.integers(max_value=-1),
    "train.plateau_threshold": NEGATIVE | st.just(math.inf) | NAN,
    "train.plateau_cooldown": st.integers(max_value=-1),
    "train.min_lr": NEGATIVE | st.just(math.inf) | NAN,
}

# A value of another type than each type of key takes (an int is a fine float).
SMALL = st.integers(-5, 5)
WRONG_TYPE = {
    int: st.booleans() | st.floats(allow_nan=False) | TEXT | st.lists(SMALL, max_size=2),
    float: st.booleans() | TEXT | st.lists(SMALL, max_size=2)
    | st.dictionaries(TEXT, SMALL, max_size=2),
    bool: SMALL | st.floats() | TEXT,
    str: SMALL | st.floats(allow_nan=False) | st.booleans() | st.lists(TEXT, max_size=2),
    tuple[int, ...]: SMALL | TEXT | st.lists(st.floats(allow_nan=False) | TEXT | st.booleans(),
                                             min_size=1, max_size=3),
    tuple[float, ...]: SMALL | st.floats(allow_nan=False) | TEXT
    | st.lists(TEXT | st.booleans(), min_size=1, max_size=3),
    tuple[dict, ...]: SMALL | TEXT | st.dictionaries(TEXT, SMALL, max_size=2)
    | st.lists(SMALL | TEXT, min_size=1, max_size=2),
}


def nest(flat):
    """{"train.lr": 0.1} -> {"train": {"lr": 0.1}}"""
    tree = {}
    for key, value in flat.items():
        section, name = key.split(".")
        tree.setdefault(section, {})[name] = value
    return tree


@st.composite
def valid_settings(draw):
    """{"section.key": value} for a random subset of keys, all valid together."""
    keys = draw(st.lists(st.sampled_from(sorted(VALID)), unique=True))
    flat = {key: draw(VALID[key]) for key in keys}
    if flat.get("data.source", "synthetic") != "synthetic" and "data.path" not in flat:
        flat["data.path"] = draw(VALID["data.path"])   # npz and mnist need a path
    source = flat.get("data.source", "synthetic")      # the other sources' keys: defaults
    for key, used in (("data.path", source != "synthetic"), ("data.samples", source == "synthetic"),
                      ("data.mnist_t10k", source == "mnist")):
        if not used:
            flat.pop(key, None)
    if flat.get("train.momentum", config.TrainConfig.momentum) == 0:
        flat["train.nesterov"] = False                 # Nesterov needs momentum
    if "train.warmup_epochs" in flat:                  # warmup within the run
        flat["train.warmup_epochs"] = min(flat["train.warmup_epochs"],
                                          flat.get("train.epochs", config.TrainConfig.epochs))
    if "train.accumulation_steps" in flat:             # at least a row per micro-batch
        flat["train.accumulation_steps"] = min(
            flat["train.accumulation_steps"],
            flat.get("train.batch_size", config.TrainConfig.batch_size))
    if flat.get("train.optimizer", "sgd") == "adamw":  # SGD's keys keep their defaults
        flat.pop("train.momentum", None)
        flat.pop("train.nesterov", None)
    else:                                              # and AdamW's under SGD
        for key in ("train.betas", "train.eps", "train.amsgrad"):
            flat.pop(key, None)
    if flat.get("model.layers"):                       # the MLP's keys keep their defaults
        for key in ("model.hidden", "model.activation", "model.dropout"):
            flat.pop(key, None)
    if flat.get("train.schedule") != "plateau":        # the plateau's keys only with it
        for key in config.PLATEAU_KEYS:
            flat.pop(f"train.{key}", None)
    if flat.get("train.loss") == "mse":                # no accuracy to watch
        flat.pop("run.best_metric", None)
    if flat.get("model.dtype") == "float64":           # 16-bit sums are of float32 gradients
        flat["train.comm_dtype"] = "float32"
    if flat.get("train.deterministic"):                # exact float32 sums, grain by grain
        flat["train.accumulation_steps"] = 1
        flat["train.comm_dtype"] = "float32"
        flat["train.grains"] = min(flat.get("train.grains", config.TrainConfig.grains),
                                   flat.get("train.batch_size", config.TrainConfig.batch_size))
    return flat


def toml_text(value):
    """VALUE as TOML text for --set, written here independently of config.toml_value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)   # 1e-05, inf, nan: all TOML
    if isinstance(value, list):
        return "[" + ", ".join(map(toml_text, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_text(k)} = {toml_text(v)}" for k, v in value.items()) + "}"
    escaped = (c if c.isprintable() and c not in '"\\' else
               f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}" for c in value)
    return '"' + "".join(escaped) + '"'


def set_directly(flat):
    """The Config with these fields set by dataclasses.replace, no parser involved."""
    cfg = config.Config()
    for key, value in flat.items():
        section, name = key.split(".")
        value = tuple(value) if isinstance(value, list) else TYPES[key](value)
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section),
                                                                      **{name: value})})
    return cfg


def test_every_key_has_strategies():
    assert set(VALID) == set(TYPES)
    assert set(OUT_OF_RANGE) <= set(TYPES) and set(TYPES.values()) <= set(WRONG_TYPE)


@BOUNDED
@given(flat=valid_settings())
def test_valid_config_round_trips(flat):
    cfg = config.from_dict(nest(flat))
    assert config.from_toml(config.to_toml(cfg)) == cfg
    with scratch() as tmp:
        (tmp / "c.toml").write_text(config.to_toml(cfg), encoding="utf-8")
        loaded = config.load(tmp / "c.toml")   # its paths resolved, as the run records them
        assert loaded == config.resolved_paths(cfg)
        assert config.load(tmp / "c.toml", base=loaded) == loaded


@settings(BOUNDED, max_examples=200)
@given(text=TEXT)
def test_any_text_survives_the_saved_config(text):
    """A path of any characters, saved in config.toml or a checkpoint, reads back."""
    cfg = config.from_dict({"model": {"init": text}})
    assert config.from_toml(config.to_toml(cfg)).model.init == text


@BOUNDED
@given(flat=valid_settings())
def test_set_overrides_equal_setting_directly(flat):
    overrides = [f"{key}={toml_text(value)}" for key, value in flat.items()]
    assert config.load(None, overrides) == config.resolved_paths(set_directly(flat))


def refused_naming(words, tree):
    with pytest.raises(UserError) as refused:
        config.from_dict(tree)
    assert words in str(refused.value)


@BOUNDED
@given(flat=valid_settings(), key=st.sampled_from(sorted(OUT_OF_RANGE)), bad=st.data())
def test_out_of_range_value_is_refused_by_name(flat, key, bad):
    value = bad.draw(OUT_OF_RANGE[key])
    refused_naming(key, nest({**flat, key: value}))
    with pytest.raises(UserError):
        config.load(None, [f"{key}={toml_text(value)}"])


@BOUNDED
@given(flat=valid_settings(), key=st.sampled_from(sorted(TYPES)), bad=st.data())
def test_wrong_type_is_refused_by_name(flat, key, bad):
    value = bad.draw(WRONG_TYPE[TYPES[key]])
    refused_naming(key, nest({**flat, key: value}))
    with pytest.raises(UserError):
        config.load(None, [f"{key}={toml_text(value)}"])


NAME = st.from_regex(r"[a-z_]{1,12}", fullmatch=True)


@BOUNDED
@given(flat=valid_settings(), section=st.sampled_from(sorted(SECTIONS)) | NAME, name=NAME,
       value=SMALL | TEXT)
def test_unknown_key_or_section_is_refused_by_name(flat, section, name, value):
    key = f"{section}.{name}"
    assume(key not in TYPES)
    unknown = f"unknown key {key}" if section in SECTIONS else f"unknown section [{section}]"
    refused_naming(unknown, nest({**flat, key: value}))
    with pytest.raises(UserError, match=re.escape(unknown)):
        config.load(None, [f"{key}={toml_text(value)}"])


@BOUNDED
@given(text=st.text(max_size=40))
def test_any_override_text_is_a_config_or_a_user_error(text):
    try:
        assert isinstance(config.load(None, [text]), config.Config)
    except UserError:
        pass


TOML_LIKE = st.lists(st.sampled_from(["[train]", "[model]", "[run]", "[x.y]", "lr", "hidden",
                                      "epochs", "dir", "=", " = ", "0.1", "-3", "[1, 2]",
                                      '"a"', "'b'", "true", "\n", "#", "{", "}", "[", "]",
                                      ".", ","]) | st.text(max_size=3), max_size=30).map("".join)


@BOUNDED
@given(content=TOML_LIKE.map(str.encode) | st.binary(max_size=40))
def test_any_config_file_is_a_config_or_a_user_error(content):
    with scratch() as tmp:
        (tmp / "c.toml").write_bytes(content)
        try:
            assert isinstance(config.load(tmp / "c.toml"), config.Config)
        except UserError:
            pass


# ----------------------------------------------------------------------------- data

@contextlib.contextmanager
def no_hang(seconds=10):
    """Fail, rather than wait forever, if the block takes longer than `seconds`."""
    def hung(signum, frame):
        raise TimeoutError(f"still loading after {seconds} s")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def load(source, path, loss="cross_entropy", dtype="float64", val_fraction=0.0):
    cfg = config.DataConfig(source=source, path=str(path), val_fraction=val_fraction)
    with no_hang():
        return data.load(cfg, loss, dtype, seed=0)


def loads_or_refuses(source, path, loss="cross_entropy"):
    """The Dataset at path, checked to be well-formed, or None for a UserError."""
    try:
        d = load(source, path, loss)
    except UserError:
        return None
    for x, y in ((d.x, d.y), (d.x_val, d.y_val)):
        if x is None:
            continue
        assert x.ndim == 2 and x.shape[1] == d.num_inputs and len(x) == len(y) > 0
        assert x.dtype == np.float64 and np.isfinite(x).all()
        if d.num_classes:
            assert y.dtype == np.int64 and 0 <= y.min() and y.max() < d.num_classes
        else:
            assert y.shape[1] == d.num_outputs and np.isfinite(y).all()
    return d


INT_DTYPES = [np.int8, np.uint8, np.int16, np.int32, np.int64, np.uint64]
X_DTYPES = [np.float16, np.float32, np.float64, *INT_DTYPES]


def x_arrays(rows, cols):
    return st.sampled_from(X_DTYPES).flatmap(lambda t: arrays(
        t, (rows, cols), elements=st.integers(0, 100) if np.dtype(t).kind in "iu" else
        st.floats(-1e4, 1e4, width=np.dtype(t).itemsize * 8)))


def label_arrays(n, classes):
    return st.sampled_from(INT_DTYPES).flatmap(
        lambda t: arrays(t, n, elements=st.integers(0, classes - 1)))


@st.composite
def npz_contents(draw):
    """(arrays, loss): x (n, D) of numbers, y integer labels of at least two classes or
    float targets for mse, maybe x_val and y_val of the same kind."""
    n, features = draw(st.integers(2, 20)), draw(st.integers(1, 6))
    sizes = {"x": n, **({"x_val": draw(st.integers(1, 8))} if draw(st.booleans()) else {})}
    loss = draw(st.sampled_from(["cross_entropy", "mse"]))
    labels = loss == "cross_entropy" or draw(st.booleans())   # mse one-hot encodes labels
    classes, outputs = draw(st.integers(2, 6)), draw(st.integers(1, 3))
    out = {}
    for xn, rows in sizes.items():
        yn = xn.replace("x", "y")
        out[xn] = draw(x_arrays(rows, features))
        if labels:
            out[yn] = draw(label_arrays(rows, classes))
        else:
            out[yn] = draw(arrays(st.sampled_from([np.float32, np.float64]), (rows, outputs),
                                  elements=st.floats(-1e4, 1e4, width=32)))
    if labels and out["y"].max() == 0:
        out["y"][0] = 1   # at least two classes
    if labels and "y_val" in out and out["y_val"].max() > out["y"].max():
        out["y"][0] = out["y_val"].max()   # the classes are the training labels'
    return out, loss


@BOUNDED
@given(contents=npz_contents(), dtype=st.sampled_from(["float32", "float64"]),
       val_fraction=st.sampled_from([0.0, 0.25]))
def test_valid_npz_loads_as_given(contents, dtype, val_fraction):
    saved, loss = contents
    with scratch() as tmp:
        np.savez(tmp / "d.npz", **saved)
        if "x_val" in saved:   # the file's own: another val_fraction would have no effect
            val_fraction = 0.0
        d = load("npz", tmp / "d.npz", loss, dtype, val_fraction)
    x, y = saved["x"], saved["y"]
    labels = np.issubdtype(y.dtype, np.integer)
    y_dtype = np.int64 if labels else dtype   # labels are int64, targets the model's dtype
    assert d.x.dtype == dtype and d.y.dtype == y_dtype
    if labels:   # the classes are the training labels' (validation labels lie within)
        assert d.num_classes == d.num_outputs == int(y.max()) + 1
    else:
        assert d.num_classes is None and d.num_outputs == y.shape[1]
    if "x_val" in saved or val_fraction == 0:   # the arrays as given, in their order
        for name in ("x", "y", "x_val", "y_val"):
            want = saved.get(name)
            got = getattr(d, name)
            assert (got is None) == (want is None)
            if want is not None:
                np.testing.assert_array_equal(got, want.astype(got.dtype), strict=True)
    else:   # split: a share of the samples held out, every sample in exactly one part
        n_val = max(1, round(len(x) * val_fraction))
        assert (len(d.x), len(d.x_val)) == (len(x) - n_val, n_val)
        rows = np.concatenate([d.x, d.x_val]).tolist()
        assert sorted(map(tuple, rows)) == sorted(map(tuple, x.astype(dtype).tolist()))
        assert sorted(np.concatenate([d.y, d.y_val]).tolist()) == sorted(y.tolist())


def damaged(raw, structure=()):
    """Bytes like `raw` with a few bytes changed (anywhere, or often at the offsets in
    `structure`), or cut short, or with bytes added at the end."""
    where = st.integers(0, len(raw) - 1)
    if structure:
        where = where | st.sampled_from(sorted(structure))
    edits = st.lists(st.tuples(where, st.integers(0, 255)), min_size=1, max_size=3)
    return st.one_of(edits.map(lambda e: _edit(raw, e)),
                     st.integers(0, len(raw) - 1).map(lambda n: raw[:n]),
                     st.binary(min_size=1, max_size=8).map(lambda extra: raw + extra))


def _edit(raw, edits):
    out = bytearray(raw)
    for at, byte in edits:
        out[at] = byte
    return bytes(out)


def zip_headers(raw):
    """Offsets of the fixed fields of every zip header in raw (flags, method, sizes, name
    lengths): the bytes whose damage takes the most varied paths through zipfile."""
    offsets = set()
    for signature, size in ((b"PK\x03\x04", 30), (b"PK\x01\x02", 46), (b"PK\x05\x06", 22)):
        at = raw.find(signature)
        while at >= 0:
            offsets.update(range(at + 4, min(at + size, len(raw))))
            at = raw.find(signature, at + 1)
    return offsets


def npz_bytes(compressed):
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    (np.savez_compressed if compressed else np.savez)(
        buf, x=rng.normal(size=(6, 3)), y=np.arange(6) % 3, x_val=rng.normal(size=(2, 3)),
        y_val=np.array([0, 2]))
    return buf.getvalue()


NPZ = {False: npz_bytes(False), True: npz_bytes(True)}


@settings(BOUNDED, max_examples=200)
@given(compressed=st.booleans(), change=st.data())
def test_damaged_npz_loads_or_is_refused(compressed, change):
    raw = NPZ[compressed]
    with scratch() as tmp:
        (tmp / "d.npz").write_bytes(change.draw(damaged(raw, zip_headers(raw))))
        loads_or_refuses("npz", tmp / "d.npz")


MNIST_NAMES = [name + gz for name in data.MNIST_FILES.values() for gz in ("", ".gz")]


@settings(BOUNDED, max_examples=150)
@given(name=st.sampled_from(MNIST_NAMES), inside=st.booleans(), change=st.data())
def test_damaged_idx_or_gzip_loads_or_is_refused(name, inside, change):
    """One file of an MNIST folder damaged: its bytes, or (inside) for a .gz file the IDX
    bytes it holds, compressed again."""
    gz = name.endswith(".gz")
    with scratch() as tmp:
        path = fake_mnist(tmp / "m", gz) / name
        raw = path.read_bytes()
        if gz and inside:
            inner = gzip.decompress(raw)
            path.write_bytes(gzip.compress(change.draw(damaged(inner, idx_header(inner)))))
        else:
            path.write_bytes(change.draw(damaged(raw, () if gz else idx_header(raw))))
        loads_or_refuses("mnist", tmp / "m")


def idx_header(raw):
    """Offsets of an IDX file's header: the magic number, then 4 bytes per dimension."""
    return range(4 + 4 * raw[3])


@BOUNDED
@given(header=st.tuples(st.integers(0, 255), st.integers(0, 4)),
       dims=st.lists(st.integers(0, 2**32 - 1) | st.integers(0, 20) |
                     st.sampled_from([2**16, 2**31, 2**32 - 1]), max_size=4),
       body=st.integers(0, 400))
def test_any_idx_header_loads_or_is_refused(header, dims, body):
    """The images file's type byte, rank and dimensions drawn at random."""
    dtype, ndim = header
    with scratch() as tmp:
        folder = fake_mnist(tmp / "m", gz=False)
        raw = bytes([0, 0, dtype, ndim]) + np.array(dims, ">u4").tobytes() + bytes(body)
        (folder / "train-images-idx3-ubyte").write_bytes(raw)
        loads_or_refuses("mnist", folder)
