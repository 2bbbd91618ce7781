"""Datasets: where samples come from, checked once at load time.

Every rank loads the same arrays (data is small next to the network's work) and trains
on its own rows of each global batch; see sharding.py. Sources (`data.source`):

    synthetic  jittered, noisy digit glyphs generated from the seed (see synthetic.py),
               images (n, 1, 16, 16)
    npz        arrays x (n, D) or images (n, C, H, W), and y: (n,) integer labels or
               (n, C) float targets; optional x_val, y_val are the validation set
    npy        a folder of x.npy and y.npy (optional x_val.npy, y_val.npy), as for npz;
               the x arrays stay on disk, and rows are read (verified, and cast to the
               model's dtype) as batches need them (npy.py), so ranks on one node share
               the page cache instead of each holding a copy
    csv        a .csv file: the label (or regression target) in the first column, the
               features after it; a first line whose first field is not a number is a
               header, and skipped
    mnist      a folder with the IDX files of MNIST (raw or .gz), images (n, 1, 28, 28),
               pixels scaled to [0, 1]; the t10k pair is the test set (or, data.mnist_t10k
               = "val", the validation set). Fashion-MNIST, KMNIST, ... too.

Images keep their shape for a network given as a list of layers (model.layers, which
starts with a convolution, say); for the multilayer perceptron of model.hidden, every
source's images are flattened into rows of C H W features, in torch's order.

Without a validation set in the source, `data.val_fraction` of the training samples
(chosen by the seed) are held out; 0 means no validation. A test set (the t10k pair;
x_test and y_test of npz and npy) is read only by `load_test`, for
`dpbp.evaluate --split test`: never while training.
"""

import gzip
import math
import os
import re
import warnings
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np

from dpbp.errors import UserError
from dpbp.parallel.evaluation import input_limit
from dpbp.service import synthetic
from dpbp.service.config import MAX_CLASSES, DataConfig
from dpbp.service.files import read_npz
from dpbp.service.npy import NpyFile

MNIST_FILES = {
    "x": "train-images-idx3-ubyte", "y": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte",
}


class Rows:
    """Rows of an array that stays on disk (an npy.NpyFile), read, verified and cast to
    `dtype` when indexed: `rows[slice]` or `rows[array of row numbers]` returns a new
    contiguous array of just those rows (a UserError where the file changed since it was
    opened). `index` (sorted row numbers of `base`, or None for all) is a validation
    split taken without copying the whole array. Ranks on one node then share the file's
    pages in the page cache instead of each holding a private copy."""

    def __init__(self, base, index, dtype):
        self.base, self.index, self.dtype = base, index, np.dtype(dtype)
        self.shape = (len(base) if index is None else len(index),) + base.shape[1:]
        self.ndim = len(self.shape)

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, rows):
        picked = self.base[rows] if self.index is None else self.base[self.index[rows]]
        with np.errstate(over="ignore"):   # load() checked that every value fits
            return np.ascontiguousarray(picked, dtype=self.dtype)

    def __array__(self, dtype=None, copy=None):   # np.asarray(rows): the whole array, read
        return self[:] if dtype is None else self[:].astype(dtype, copy=False)


def read_rows(a, rows):
    """(x, None): the rows `rows` of `a`, an array in memory or Rows read from disk. Where
    a's file changed or was cut short since it was opened: (rows of NaN in their place,
    the UserError). A step on NaN rows is not finite on every rank alike (train_step),
    so no rank updates, and the guard then stops every rank with the problem
    (guard.after_step): reading adds no collective to a step."""
    if not isinstance(a, Rows):
        return a[rows], None
    try:
        return a[rows], None
    except UserError as e:   # DP: the NaN tells every rank, in the gradient sum
        count = len(np.arange(len(a))[rows])
        return np.full((count, *a.shape[1:]), np.nan, dtype=a.dtype), e


def row_chunks(a, nbytes=1 << 22):
    """The rows of `a` (an array or Rows) in consecutive blocks of about `nbytes`, so a
    pass over a large array on disk never holds more than one block in memory."""
    row_bytes = max(1, math.prod(a.shape[1:]) * np.dtype(a.dtype).itemsize)
    step = max(1, nbytes // row_bytes)
    for start in range(0, len(a), step):
        yield a[start:start + step]


def all_finite(a):
    """No NaN or Inf in `a` (an array, NpyFile or Rows); checked block by block (an
    NpyFile knows from its opening pass)."""
    if isinstance(a, NpyFile):
        return a.finite
    if not np.issubdtype(a.dtype, np.floating):
        return True
    return all(np.isfinite(block).all() for block in row_chunks(a))


def largest(a):
    """The largest magnitude of the values of `a` (an array or Rows, whose values
    all_finite found finite; Inf where the cast to its dtype overflowed), block by
    block. For Rows, that of its whole file (from its opening pass, npy.NpyFile), cast
    to the Rows' dtype: casting keeps the order, so the largest cast value is the cast
    largest, and a split is checked with its file."""
    if isinstance(a, Rows):
        with np.errstate(over="ignore"):
            return float(np.float64(a.base.largest).astype(a.dtype))   # float64: exact
    return max((float(np.abs(b).max()) for b in row_chunks(a) if b.size), default=0)


def crc32(a, dtype=None):
    """CRC-32 of the bytes of `a` (an array or Rows), computed block by block; with
    `dtype`, of its values cast to that dtype."""
    crc = 0
    for block in row_chunks(a):
        crc = zlib.crc32(np.ascontiguousarray(block, dtype=dtype).view(np.uint8), crc)
    return crc


def identity(data, dtype=None):
    """What the data are, cheap to compare: every array's name, shape, dtype and CRC-32,
    e.g. "x (1800, 256) float32 crc 5d0f2a1c; y (1800,) int64 crc 0b7e..." (the text
    that checkpoints keep; identity_arrays reads it back). With `dtype`, the identity the
    same data have when loaded for a network of that dtype (inputs and float targets
    cast to it), to compare with a checkpoint of another model.dtype."""
    return arrays_identity({"x": data.x, "y": data.y, "x_val": data.x_val, "y_val": data.y_val},
                           dtype)


def arrays_identity(arrays, dtype=None):
    """identity() of the arrays {name: array or None} (`dtype`: see identity)."""
    def cast(a):   # the dtype load() gives it for a network of `dtype`
        return np.dtype(dtype) if dtype is not None and a.ndim >= 2 else a.dtype
    return "; ".join(f"{name} {tuple(a.shape)} {cast(a)} crc {crc32(a, cast(a)):08x}"
                     for name, a in arrays.items() if a is not None)


_IDENTITY_PART = re.compile(r"^(\w+) \(([\d, ]*)\) (\w+) crc ([0-9a-f]{8})$")


def identity_arrays(text):
    """{name: {"shape", "dtype", "crc32"}} from identity's text (the run record's form);
    {} for text that is not such an identity (a damaged or foreign one)."""
    out = {}
    for part in text.split("; ") if text else []:
        m = _IDENTITY_PART.match(part)
        if m is None:
            return {}
        shape = [int(d) for d in m.group(2).replace(" ", "").split(",") if d]
        out[m.group(1)] = {"shape": shape, "dtype": m.group(3), "crc32": m.group(4)}
    return out


def identity_text(arrays):
    """identity's text from identity_arrays' form: its inverse."""
    return "; ".join(f"{name} {tuple(a['shape'])} {a['dtype']} crc {a['crc32']}"
                     for name, a in arrays.items())


def identity_difference(then, now):
    """The first array in which two identities' texts differ, with both checksums, e.g.
    'y: (17,) int64 crc 1f2e3d4c now, (17,) int64 crc 0a1b2c3d then'."""
    then, now = identity_arrays(then), identity_arrays(now)
    first = next((name for name in {**then, **now} if then.get(name) != now.get(name)), "x")

    def shown(arrays):
        return identity_text({first: arrays[first]}).split(" ", 1)[1] if first in arrays \
            else "absent"
    return f"{first}: {shown(now)} now, {shown(then)} then"


@dataclass(frozen=True)
class Dataset:
    x: np.ndarray | Rows       # (n, D_in) or (n, C, H, W) in the model's dtype (Rows: on disk)
    y: np.ndarray              # (n,) int64 labels, or (n, C) float targets
    x_val: np.ndarray | Rows | None
    y_val: np.ndarray | None
    num_classes: int | None    # None for float (regression) targets: no accuracy
    num_outputs: int           # the network's output width C

    @property
    def row_shape(self):
        return tuple(self.x.shape[1:])

    @property
    def num_inputs(self):   # numbers per row: features, or C H W of an image
        return math.prod(self.row_shape)

    def describe(self):
        val = f"{len(self.x_val)} val" if self.x_val is not None else "no validation set"
        kind = f"{self.num_classes} classes" if self.num_classes else \
            f"{self.num_outputs} regression outputs"
        return f"{len(self.x)} train / {val}, {rows_described(self.row_shape)}, {kind}"


def rows_described(shape):
    """'256 features' or 'images 1x28x28' for rows of `shape`."""
    return f"{shape[0]} features" if len(shape) == 1 else f"images {'x'.join(map(str, shape))}"


def flattened(x, images):
    """x as the network takes it: as it is for a list of layers (`images`), else rows of
    features, images flattened in torch's (C, H, W) order (a view where x allows; an
    npy.NpyFile reading the same file)."""
    return x if images or x is None or x.ndim <= 2 else x.reshape(len(x), -1)


def load(data_cfg, loss, dtype, seed, classes=0, images=False):
    """The Dataset that `data_cfg` names, validated for `loss`, inputs cast to `dtype`;
    images as (n, C, H, W) where `images` (a network of model.layers), else flattened.

    Integer labels name classes 0 .. C-1, and C belongs to the network: `classes` (from
    model.classes, or a checkpoint's output width), else the training labels' largest
    plus one. Every label, training and validation, must lie below C."""
    source, where = data_cfg.source, data_cfg.path
    if source == "synthetic":
        x, y = synthetic.make_digits(data_cfg.samples, seed)
        side = synthetic.IMAGE_SIDE
        arrays, where = {"x": x.reshape(len(x), 1, side, side), "y": y}, "synthetic data"
    elif source == "npz":
        arrays = _read_npz(where)
    elif source == "npy":
        arrays = _open_npy(where)
    elif source == "csv":
        arrays = _read_csv(where, loss)
    elif data_cfg.mnist_t10k == "val":   # the t10k pair validates (runs made before the key)
        arrays = _read_mnist(where, MNIST_FILES)
        arrays["x_val"], arrays["y_val"] = arrays.pop("x_test"), arrays.pop("y_test")
    else:
        arrays = _read_mnist(where, ("x", "y"))
    arrays = _check(arrays, where, loss)
    arrays = {k: flattened(a, images) if k.startswith("x") else a for k, a in arrays.items()}
    if source in ("npz", "npy") and "x_val" in arrays and \
            data_cfg.val_fraction not in (0, DataConfig.val_fraction):
        raise UserError(f"{where} holds its own validation set (x_val, y_val), so "
                        f"data.val_fraction = {data_cfg.val_fraction:g} has no effect; leave "
                        f"it at its default {DataConfig.val_fraction:g}, or 0")
    num_classes = None
    if arrays["y"].ndim == 1:   # before a split: the training file's labels
        num_classes = _classes(arrays, classes, where)
    if "x_val" not in arrays and data_cfg.val_fraction > 0:
        arrays = _split(arrays, data_cfg.val_fraction, seed, where)
    x, y = arrays["x"], arrays["y"]
    if num_classes == 1:
        raise UserError(f"{where}: y holds a single class (0); classification needs at "
                        "least two (or model.classes >= 2)")
    num_outputs = num_classes if num_classes else y.shape[1]
    x_val, y_val = (_cast(arrays.get(k), dtype, where) for k in ("x_val", "y_val"))
    return Dataset(_cast(x, dtype, where), _cast(y, dtype, where), x_val, y_val,
                   num_classes, num_outputs)


def load_test(data_cfg, loss, dtype, train, images=False):
    """(x, y): the test set of the data `data_cfg` names, checked as training data are,
    and against `train` (their Dataset: the features, the classes or outputs). It is the
    t10k pair for mnist, x_test and y_test of an npz file or npy folder; read only here,
    for `dpbp.evaluate --split test`. A UserError for data without one."""
    source, where = data_cfg.source, data_cfg.path
    if source == "mnist" and data_cfg.mnist_t10k == "val":
        raise UserError(f"{where}: this run validates on the t10k pair (data.mnist_t10k = "
                        "\"val\", as runs made before that key did), so it has no test set "
                        "apart from its validation set; --split val measures on it")
    arrays = {"mnist": lambda: _read_mnist(where, ("x_test", "y_test")),
              "npz": lambda: read_npz(where, "data.path", names=("x_test", "y_test")),
              "npy": lambda: _open_npy(where, ("x_test", "y_test"))}.get(source, dict)()
    if not arrays:
        has = ("the t10k pair for mnist; x_test and y_test in an npz file or npy folder")
        raise UserError(f"the {source} data{f' at {where}' if where else ''} has no test set "
                        f"({has}); --split val measures on the run's validation set")
    if len(arrays) != 2:
        raise UserError(f"{where}: x_test and y_test must come together")
    x, y = _check_pair(arrays["x_test"], arrays["y_test"], "x_test", "y_test", where, loss)
    x = flattened(x, images)
    if x.shape[1:] != train.row_shape or (y.ndim == 2 and y.shape[1] != train.num_outputs):
        raise UserError(f"{where}: x_test {x.shape} and y_test {y.shape} do not fit the "
                        f"training data's {rows_described(train.row_shape)} and "
                        f"{train.num_outputs} outputs")
    if y.ndim == 1 and train.num_classes and len(y) and y.max() >= train.num_classes:
        raise UserError(f"{where}: y_test holds label {int(y.max())}, outside the "
                        f"network's {train.num_classes} classes")
    return _cast(x, dtype, where), _cast(y, dtype, where)


def _cast(a, dtype, where):
    """Inputs and float targets in the model's dtype (labels stay int64), checked to fit it."""
    if a is None or a.ndim == 1:
        return a
    if isinstance(a, NpyFile):   # stays on disk; its rows are cast as they are read
        out = Rows(a, None, dtype)
    elif isinstance(a, Rows):
        out = Rows(a.base, a.index, dtype)
    else:
        with np.errstate(over="ignore"):   # overflow is reported just below
            out = np.ascontiguousarray(a, dtype=dtype)
    biggest = largest(out)   # _check_pair refused NaN: an Inf here is overflow
    if not math.isfinite(biggest):
        raise UserError(f"{where}: values too large for {np.dtype(dtype).name} (beyond "
                        f"{np.finfo(dtype).max:.3g}); scale the data or use float64")
    if biggest > input_limit(dtype):   # their products would overflow
        raise UserError(f"{where}: values up to {biggest:.3g} in magnitude: a network's "
                        f"products of them overflow {np.dtype(dtype).name} (beyond "
                        f"{np.finfo(dtype).max:.3g}); scale the data, e.g. standardise "
                        "the features")
    return out


def _classes(arrays, classes, where):
    """The number of classes C, checked against every label (see load)."""
    C = classes or int(arrays["y"].max()) + 1
    for name in ("y", "y_val"):
        if name in arrays and len(arrays[name]) and arrays[name].max() >= C:
            bad = int(arrays[name].max())
            if classes:
                raise UserError(f"{where}: {name} holds label {bad}, outside the network's "
                                f"{C} classes")
            raise UserError(f"{where}: {name} holds label {bad}, outside the {C} classes of "
                            f"the training labels (0 .. {C - 1}); set model.classes = "
                            f"{bad + 1} if the training data lack the highest classes")
    return C


def _read_npz(path):
    return read_npz(path, "data.path", names=("x", "y", "x_val", "y_val"))


NPY_FILES = ("x", "y", "x_val", "y_val")


def _open_npy(folder, names=NPY_FILES):
    """NAME.npy of `names` from `folder` (x and y must be there; x_val, y_val, x_test and
    y_test may). The x arrays stay on disk, as NpyFiles: read once here for their
    checksums, then by rows. The targets, small next to them, are read into memory."""
    if os.path.isfile(folder):
        raise UserError(f"data.path: {folder} is a file; data.source = \"npy\" reads a "
                        "folder of x.npy and y.npy (for an .npz file: data.source = \"npz\")")
    if not os.path.isdir(folder):
        raise UserError(f"data.path: no such folder {folder} (expected x.npy and y.npy)")
    arrays = {}
    for key in names:
        path = os.path.join(folder, key + ".npy")
        if not os.path.exists(path):
            if key in ("x", "y"):
                raise UserError(f"{folder}: missing {key}.npy (a data.source = \"npy\" "
                                "folder holds x.npy and y.npy, optionally x_val.npy and "
                                "y_val.npy, x_test.npy and y_test.npy)")
            continue
        try:
            arrays[key] = NpyFile(path) if key.startswith("x") else _read_npy(path)
        except OSError as e:
            raise UserError(f"{path}: cannot read it ({e.strerror})") from None
    return arrays


def _read_npy(path):
    """The array of a small .npy file, read into memory (without unpickling)."""
    try:
        with open(path, "rb") as f:
            if f.read(6) != b"\x93NUMPY":
                raise ValueError("it does not start with the .npy magic string")
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"{path}: not a readable .npy file ({e})") from None


def _read_csv(path, loss):
    """A .csv file: label (or regression target) in the first column, then the features.

    A first line whose first field is not a number is a header, and skipped. Labels must be
    integers for cross-entropy; for MSE the first column is a float target."""
    if not os.path.isfile(path):
        raise UserError(f"data.path: no such file {path} (expected a .csv file)")
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline()
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text (expected comma-separated numbers)") from None
    skip = int(first.strip() != "" and not _is_number(first.split(",")[0]))   # a header
    try:
        with np.errstate(over="ignore"), warnings.catch_warnings(), \
                open(path, encoding="utf-8") as f:
            warnings.simplefilter("ignore")   # "input contained no data": reported below
            table = np.loadtxt(f, delimiter=",", skiprows=skip, ndmin=2, comments=None,
                               dtype=np.float64)
    except (ValueError, UnicodeDecodeError):
        raise UserError(_csv_problem(path, skip)) from None
    if table.size == 0:
        raise UserError(f"{path}: no data rows" + (" after the header" if skip else ""))
    if table.shape[1] < 2:
        raise UserError(f"{path}: has {table.shape[1]} column; expected the label first, "
                        "then at least one feature column")
    bad = np.flatnonzero(~np.isfinite(table).all(axis=1))
    if len(bad):
        raise UserError(f"{path}: line {_line_of_row(path, skip, bad[0])}: NaN or Inf "
                        "(or a number too large for float64)")
    labels = table[:, 0]
    if loss == "cross_entropy":
        fractional = np.flatnonzero(labels != np.round(labels))
        if len(fractional):
            raise UserError(f"{path}: line {_line_of_row(path, skip, fractional[0])}: label "
                            f"{labels[fractional[0]]:g} is not an integer class label (for "
                            "train.loss = \"cross_entropy\" the first column holds 0 .. C-1; "
                            "for regression targets set train.loss = \"mse\")")
        if labels.min() < 0:
            row = int(np.argmin(labels))
            raise UserError(f"{path}: line {_line_of_row(path, skip, row)}: negative class "
                            f"label {labels[row]:g} (labels are 0 .. C-1)")
        if np.abs(labels).max() >= MAX_CLASSES:   # before the cast, which could wrap
            row = int(np.argmax(np.abs(labels)))
            raise UserError(f"{path}: line {_line_of_row(path, skip, row)}: class label "
                            f"{labels[row]:g}; labels must be 0 .. C-1 with C at most "
                            f"{MAX_CLASSES}")
        labels = labels.astype(np.int64)
    return {"x": table[:, 1:], "y": labels}


def _is_number(field):
    try:
        float(field)
        return True
    except ValueError:
        return False


def _csv_problem(path, skip):
    """Why numpy could not read the .csv: the first ragged or non-numeric line, by number."""
    width = None
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if number <= skip or not line.strip():
                continue
            fields = line.rstrip("\r\n").split(",")
            if width is None:
                width = len(fields)
            if len(fields) != width:
                return (f"{path}: line {number} has {len(fields)} columns, the first data "
                        f"row has {width}; every row needs the label and the same features")
            for column, field in enumerate(fields, start=1):
                if not _is_number(field):
                    return (f"{path}: line {number}, column {column}: {field.strip()[:40]!r} "
                            "is not a number")
    return f"{path}: not a table of comma-separated numbers"


def _line_of_row(path, skip, row):
    """The line number in the file of data row `row` (0-based; blank lines are skipped)."""
    with open(path, encoding="utf-8") as f:
        seen = -1
        for number, line in enumerate(f, start=1):
            if number > skip and line.strip():
                seen += 1
                if seen == row:
                    return number
    return "?"


def _read_idx(path):
    """An IDX file (raw or .gz) as a numpy array; UserError if truncated or corrupt."""
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:   # gzip.BadGzipFile is an OSError
        raise UserError(f"{path}: cannot read ({e}); the file is corrupt or truncated") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(f"{path}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = math.prod(dims)   # exact: np.prod would wrap around in int64
    if len(raw) - header != expected:
        raise UserError(f"{path}: the header promises {expected} bytes of data for shape "
                        f"{dims}, the file holds {len(raw) - header}; it is truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _read_mnist(folder, names):
    """The arrays `names` (keys of MNIST_FILES) of an MNIST-format folder: images as
    float32 (n, 1, rows, cols) scaled to [0, 1], labels as int64."""
    if not os.path.isdir(folder):
        if os.path.isfile(folder):
            raise UserError(f"data.path: {folder} is a file; data.source = \"mnist\" reads "
                            "a folder of MNIST IDX files")
        raise UserError(f"data.path: no such folder {folder} (expected MNIST IDX files)")
    arrays = {}
    for key in names:
        name = MNIST_FILES[key]
        candidates = [os.path.join(folder, name), os.path.join(folder, name + ".gz")]
        path = next((p for p in candidates if os.path.isfile(p)), None)
        if path is None:
            raise UserError(f"{folder}: missing {name} (or {name}.gz); an MNIST-format folder "
                            f"holds {', '.join(MNIST_FILES.values())}")
        a = _read_idx(path)
        if key.startswith("x"):
            if a.ndim != 3:
                raise UserError(f"{path}: expected images (n, rows, cols), got shape {a.shape}")
            a = a[:, None].astype(np.float32) / 255.0
        elif a.ndim != 1:
            raise UserError(f"{path}: expected labels (n,), got shape {a.shape}")
        else:
            a = a.astype(np.int64)
        arrays[key] = a
    for x, y in (("x", "y"), ("x_test", "y_test")):
        if x in arrays and len(arrays[x]) != len(arrays[y]):
            raise UserError(f"{folder}: {MNIST_FILES[x]} has {len(arrays[x])} images but "
                            f"{MNIST_FILES[y]} has {len(arrays[y])} labels")
    return arrays


def _check(arrays, where, loss):
    """Validate shapes, dtypes and values; return the arrays in canonical form."""
    for key in ("x", "y"):
        if key not in arrays:
            raise UserError(f"{where}: missing array {key!r} (needs x (n, features) or "
                            "(n, C, H, W), and y)")
    if ("x_val" in arrays) != ("y_val" in arrays):
        raise UserError(f"{where}: x_val and y_val must come together")
    out = {}
    for xn, yn in (("x", "y"), ("x_val", "y_val")):
        if xn in arrays:
            out[xn], out[yn] = _check_pair(arrays[xn], arrays[yn], xn, yn, where, loss)
    if "x_val" in out:
        for a, b in (("x", "x_val"), ("y", "y_val")):
            if out[a].shape[1:] != out[b].shape[1:]:
                raise UserError(f"{where}: {a} has shape {out[a].shape} but {b} has "
                                f"{out[b].shape}; they must agree after the first axis")
    return out


def _check_pair(x, y, xn, yn, where, loss):
    """One (inputs, targets) pair, checked; labels come back as int64, targets 2-D."""
    if x.ndim not in (2, 4) or 0 in x.shape[1:]:
        hint = f"; for images of one channel add its axis, {xn}[:, None]" if x.ndim == 3 else ""
        raise UserError(f"{where}: {xn} must be (n, features) or images (n, C, H, W), sizes "
                        f">= 1, got shape {x.shape}{hint}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise UserError(f"{where}: {xn} must hold numbers, got dtype {x.dtype}")
    if len(x) == 0:
        raise UserError(f"{where}: {xn} is empty (0 samples)")
    if y.ndim == 0 or len(y) != len(x):
        raise UserError(f"{where}: {xn} has {len(x)} samples but {yn} has "
                        f"{len(y) if y.ndim else 'none (a scalar)'}")
    if not all_finite(x):
        raise UserError(f"{where}: {xn} holds NaN or Inf values")
    if loss == "cross_entropy" or (y.ndim == 1 and np.issubdtype(y.dtype, np.integer)):
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            hint = ("; for regression targets set train.loss = \"mse\""
                    if np.issubdtype(y.dtype, np.floating) else "")
            raise UserError(f"{where}: {yn} must be integer class labels of shape (n,) for "
                            f"train.loss = \"{loss}\", got {y.dtype} {y.shape}{hint}")
        if y.min() < 0:
            raise UserError(f"{where}: {yn} has negative class label {int(y.min())}")
        if y.max() >= MAX_CLASSES:
            raise UserError(f"{where}: {yn} has class label {int(y.max())}; labels must be "
                            f"0 .. C-1 with C at most {MAX_CLASSES}")
        return x, y.astype(np.int64)
    if not np.issubdtype(y.dtype, np.floating):
        raise UserError(f"{where}: {yn} must be float targets for train.loss = \"mse\", "
                        f"got dtype {y.dtype}")
    y = y.reshape(len(y), -1) if y.ndim == 1 else y
    if y.ndim != 2:
        raise UserError(f"{where}: {yn} must be (n,) or (n, outputs), got {y.shape}")
    if not np.isfinite(y).all():
        raise UserError(f"{where}: {yn} holds NaN or Inf values")
    return x, y


def _split(arrays, fraction, seed, where):
    """Hold out `fraction` of the samples, chosen by the seed, as the validation set."""
    n = len(arrays["x"])
    n_val = max(1, int(round(n * fraction)))
    if n_val >= n:
        raise UserError(f"{where}: data.val_fraction = {fraction} leaves no training samples "
                        f"out of {n}")
    perm = np.random.default_rng([seed, 0x5A11]).permutation(n)
    train, val = np.sort(perm[n_val:]), np.sort(perm[:n_val])
    x = arrays["x"]
    if isinstance(x, NpyFile):   # stays on disk: the split is a list of row numbers
        return {"x": Rows(x, train, x.dtype), "y": arrays["y"][train],
                "x_val": Rows(x, val, x.dtype), "y_val": arrays["y"][val]}
    return {"x": x[train], "y": arrays["y"][train], "x_val": x[val], "y_val": arrays["y"][val]}


# ----------------------------------------------------------------------------- shapes alone

def peek(data_cfg, loss, classes=0, images=False):
    """(input shape, outputs) of the data that `data_cfg` names, without loading its
    inputs: one row's shape from the x array's header (a csv file, small by nature, is
    read whole), images flattened unless `images` (as load does), and the outputs from
    the targets (`classes` if given, for labels), so a network can be built for them
    (dpbp.bench --config)."""
    if data_cfg.source == "synthetic":
        side = synthetic.IMAGE_SIDE
        return (1, side, side) if images else (side * side,), classes or synthetic.NUM_CLASSES
    if data_cfg.source == "csv":
        arrays = _read_csv(data_cfg.path, loss)
        x_shape, y = arrays["x"].shape, arrays["y"]
    elif data_cfg.source == "npy":
        arrays = _open_npy(data_cfg.path)   # x memory-mapped: its header alone is read
        x_shape, y = arrays["x"].shape, arrays["y"]
    elif data_cfg.source == "npz":
        y = read_npz(data_cfg.path, "data.path", names=("y",)).get("y")
        x_shape = _npz_shape(data_cfg.path, "x")
    else:
        x_shape, y = _mnist_shapes(data_cfg.path)
    if len(x_shape) < 2 or y is None or y.ndim not in (1, 2) or len(y) == 0:
        raise UserError(f"data.path {data_cfg.path}: expected x (n, features ...) and y "
                        "(n,) or (n, outputs)")
    row = tuple(x_shape[1:]) if images else (math.prod(x_shape[1:]),)
    if y.ndim == 2:
        return row, y.shape[1]
    is_labels = np.issubdtype(y.dtype, np.integer)
    return row, (classes or int(y.max()) + 1) if is_labels else 1


def _npz_shape(path, name):
    """The shape in the header of array `name` of the .npz at `path` (read_npz checked
    that it is one); nothing else of it is read."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open(name + ".npy") as f:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            return read(f)[0]
    except KeyError:
        raise UserError(f"{path}: missing array {name!r} (needs x (n, features) and y)"
                        ) from None
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise UserError(f"data.path: {path} is not a readable .npz file ({e})") from None


def _mnist_shapes(folder):
    """(shape of the training images as load gives them, the training labels) of an
    MNIST-format folder: the images' IDX header alone is read."""
    arrays = {}
    for key in ("x", "y"):
        name = MNIST_FILES[key]
        found = [p for p in (os.path.join(folder, name), os.path.join(folder, name + ".gz"))
                 if os.path.isfile(p)]
        if not found:
            raise UserError(f"data.path: {folder} has no {name} (or {name}.gz); an "
                            "MNIST-format folder holds the four IDX files")
        arrays[key] = _idx_shape(found[0]) if key == "x" else _read_idx(found[0])
    shape = arrays["x"]
    return (shape[0], 1, *shape[1:]), arrays["y"].astype(np.int64)


def _idx_shape(path):
    """The shape in an IDX file's header (raw or .gz)."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[:3] != b"\x00\x00\x08":
                raise UserError(f"{path}: not an IDX file of unsigned bytes (bad magic number)")
            dims = f.read(4 * head[3])
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"{path}: cannot read ({e}); the file is corrupt or truncated") from None
    if len(dims) < 4 * head[3] or head[3] < 2:
        raise UserError(f"{path}: truncated IDX header, or not images (n, rows, cols)")
    return tuple(int(d) for d in np.frombuffer(dims, dtype=">u4"))
