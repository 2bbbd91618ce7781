"""Datasets: where samples come from, checked once at load time.

Every rank loads the same arrays (data is small next to the network's work) and trains
on its own rows of each global batch; see sharding.py. Sources (`data.source`):

    synthetic  jittered, noisy digit glyphs generated from the seed (see synthetic.py)
    npz        arrays x (n, D) and y: (n,) integer labels or (n, C) float targets;
               optional x_val, y_val are the validation set
    npy        a folder of x.npy and y.npy (optional x_val.npy, y_val.npy), as for npz;
               the x arrays stay on disk, and rows are read (verified, and cast to the
               model's dtype) as batches need them (npy.py), so ranks on one node share
               the page cache instead of each holding a copy
    csv        a .csv file: the label (or regression target) in the first column, the
               features after it; a first line whose first field is not a number is a
               header, and skipped
    mnist      a folder with the four IDX files of MNIST (raw or .gz); pixels scaled to
               [0, 1]; the t10k pair is the validation set. Fashion-MNIST, KMNIST, ... too.

Without a validation set in the source, `data.val_fraction` of the samples (chosen by
the seed) are held out; 0 means no validation.
"""

import gzip
import math
import os
import re
import warnings
import zlib
from dataclasses import dataclass

import numpy as np

from dpbp.errors import UserError
from dpbp.parallel.evaluation import input_limit
from dpbp.service import synthetic
from dpbp.service.config import MAX_CLASSES
from dpbp.service.files import read_npz
from dpbp.service.npy import NpyFile

MNIST_FILES = {
    "x": "train-images-idx3-ubyte", "y": "train-labels-idx1-ubyte",
    "x_val": "t10k-images-idx3-ubyte", "y_val": "t10k-labels-idx1-ubyte",
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
    arrays = {"x": data.x, "y": data.y, "x_val": data.x_val, "y_val": data.y_val}

    def cast(a):   # the dtype load() gives it for a network of `dtype`
        return np.dtype(dtype) if dtype is not None and a.ndim == 2 else a.dtype
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
    x: np.ndarray | Rows       # (n, D_in) in the model's dtype (Rows: read from disk)
    y: np.ndarray              # (n,) int64 labels, or (n, C) float targets
    x_val: np.ndarray | Rows | None
    y_val: np.ndarray | None
    num_classes: int | None    # None for float (regression) targets: no accuracy
    num_outputs: int           # the network's output width C

    @property
    def num_inputs(self):
        return self.x.shape[1]

    def describe(self):
        val = f"{len(self.x_val)} val" if self.x_val is not None else "no validation set"
        kind = f"{self.num_classes} classes" if self.num_classes else \
            f"{self.num_outputs} regression outputs"
        return f"{len(self.x)} train / {val}, {self.num_inputs} features, {kind}"


def load(data_cfg, loss, dtype, seed, classes=0):
    """The Dataset that `data_cfg` names, validated for `loss`, inputs cast to `dtype`.

    Integer labels name classes 0 .. C-1, and C belongs to the network: `classes` (from
    model.classes, or a checkpoint's output width), else the training labels' largest
    plus one. Every label, training and validation, must lie below C."""
    if data_cfg.source == "synthetic":
        x, y = synthetic.make_digits(data_cfg.samples, seed)
        arrays, where = {"x": x, "y": y}, "synthetic data"
    elif data_cfg.source == "npz":
        arrays, where = _read_npz(data_cfg.path), data_cfg.path
    elif data_cfg.source == "npy":
        arrays, where = _open_npy(data_cfg.path), data_cfg.path
    elif data_cfg.source == "csv":
        arrays, where = _read_csv(data_cfg.path, loss), data_cfg.path
    else:
        arrays, where = _read_mnist(data_cfg.path), data_cfg.path
    arrays = _check(arrays, where, loss)
    num_classes = None
    if arrays["y"].ndim == 1:   # before a split: the training file's labels
        num_classes = _classes(arrays, classes, where)
    if "x_val" not in arrays and data_cfg.val_fraction > 0:
        arrays = _split(arrays, data_cfg.val_fraction, seed, where)
    x, y = arrays["x"], arrays["y"]
    x_val, y_val = arrays.get("x_val"), arrays.get("y_val")
    if num_classes == 1:
        raise UserError(f"{where}: y holds a single class (0); classification needs at "
                        "least two (or model.classes >= 2)")
    num_outputs = num_classes if num_classes else y.shape[1]

    def cast(a):   # inputs and float targets take the model's dtype; labels stay int64
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

    return Dataset(cast(x), cast(y), cast(x_val), cast(y_val), num_classes, num_outputs)


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


def _open_npy(folder):
    """x.npy, y.npy (and x_val.npy, y_val.npy if present) from `folder`. The x arrays stay
    on disk, as NpyFiles: read once here for their checksums, then by rows. The targets,
    small next to them, are read into memory."""
    if os.path.isfile(folder):
        raise UserError(f"data.path: {folder} is a file; data.source = \"npy\" reads a "
                        "folder of x.npy and y.npy (for an .npz file: data.source = \"npz\")")
    if not os.path.isdir(folder):
        raise UserError(f"data.path: no such folder {folder} (expected x.npy and y.npy)")
    arrays = {}
    for key in NPY_FILES:
        path = os.path.join(folder, key + ".npy")
        if not os.path.exists(path):
            if key in ("x", "y"):
                raise UserError(f"{folder}: missing {key}.npy (a data.source = \"npy\" "
                                "folder holds x.npy and y.npy, optionally x_val.npy and "
                                "y_val.npy)")
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
                            "train.loss = \"cross_entropy\" the first column holds 0 .. C-1)")
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


def _read_mnist(folder):
    if not os.path.isdir(folder):
        if os.path.isfile(folder):
            raise UserError(f"data.path: {folder} is a file; data.source = \"mnist\" reads "
                            "a folder of the four MNIST IDX files")
        raise UserError(f"data.path: no such folder {folder} (expected the four MNIST IDX files)")
    arrays = {}
    for key, name in MNIST_FILES.items():
        candidates = [os.path.join(folder, name), os.path.join(folder, name + ".gz")]
        path = next((p for p in candidates if os.path.isfile(p)), None)
        if path is None:
            raise UserError(f"{folder}: missing {name} (or {name}.gz); an MNIST-format folder "
                            f"holds {', '.join(MNIST_FILES.values())}")
        a = _read_idx(path)
        if key.startswith("x"):
            if a.ndim != 3:
                raise UserError(f"{path}: expected images (n, rows, cols), got shape {a.shape}")
            a = a.reshape(len(a), -1).astype(np.float32) / 255.0
        elif a.ndim != 1:
            raise UserError(f"{path}: expected labels (n,), got shape {a.shape}")
        else:
            a = a.astype(np.int64)
        arrays[key] = a
    for x, y in (("x", "y"), ("x_val", "y_val")):
        if len(arrays[x]) != len(arrays[y]):
            raise UserError(f"{folder}: {MNIST_FILES[x]} has {len(arrays[x])} images but "
                            f"{MNIST_FILES[y]} has {len(arrays[y])} labels")
    return arrays


def _check(arrays, where, loss):
    """Validate shapes, dtypes and values; return the arrays in canonical form."""
    for key in ("x", "y"):
        if key not in arrays:
            raise UserError(f"{where}: missing array {key!r} (needs x (n, features) and y)")
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
    if x.ndim != 2 or x.shape[1] == 0:
        raise UserError(f"{where}: {xn} must be 2-D (n, features >= 1), got shape {x.shape}")
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
            raise UserError(f"{where}: {yn} must be integer class labels of shape (n,) for "
                            f"train.loss = \"{loss}\", got {y.dtype} {y.shape}")
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
