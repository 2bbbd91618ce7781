"""Data sources: what loads, and how.

What is refused, and with which message: test_bad_input.py; what random damage does:
test_properties.py; which rows each rank takes: test_sharding.py.
"""

import io
import os
import re
import zipfile
import zlib

import numpy as np
import pytest

from dpbp.errors import UserError
from dpbp.service import config, data, synthetic
from dpbp.service.npy import NpyFile
from tests.conftest import MNIST, fake_mnist, model_arrays, run_train


def load(source="npz", path="", loss="cross_entropy", val_fraction=0.0, dtype="float64",
         samples=100, **more):
    cfg = config.DataConfig(source=source, path=str(path), val_fraction=val_fraction,
                            samples=samples, **more)
    return data.load(cfg, loss, dtype, seed=0)


def load_test(source, path, train, loss="cross_entropy", dtype="float64", **more):
    cfg = config.DataConfig(source=source, path=str(path), **more)
    return data.load_test(cfg, loss, dtype, train)


def write_npz(tmp_path, **arrays):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    return path


def test_npz_with_validation_arrays(tmp_path):
    rng = np.random.default_rng(0)
    path = write_npz(tmp_path, x=rng.normal(size=(10, 3)), y=np.arange(10) % 4,
                     x_val=rng.normal(size=(5, 3)), y_val=np.array([0, 1, 2, 3, 3]))
    d = load(path=path, val_fraction=0.1)    # the default: the file's validation set
    assert (len(d.x), len(d.x_val), d.num_classes, d.num_outputs) == (10, 5, 4, 4)
    assert d.x.dtype == np.float64 and d.y.dtype == np.int64
    with pytest.raises(UserError, match=r"holds its own validation set \(x_val, y_val\), so "
                       "data.val_fraction = 0.5 has no effect"):
        load(path=path, val_fraction=0.5)


@pytest.mark.parametrize("changed", ["x", "y", "x_val", "y_val"])
def test_the_identity_covers_every_array(tmp_path, changed):
    """One value of any array changed, the shapes and dtypes kept (relabelled data, say):
    the identity differs, so a resume or an evaluation on such data is refused."""
    rng = np.random.default_rng(0)
    arrays = dict(x=rng.normal(size=(10, 3)), y=np.arange(10) % 4,
                  x_val=rng.normal(size=(5, 3)), y_val=np.array([0, 1, 2, 3, 3]))
    before = data.identity(load(path=write_npz(tmp_path, **arrays)))
    arrays[changed] = arrays[changed].copy()
    arrays[changed][1] = arrays[changed][0] if changed.startswith("y") else 0.5
    after = data.identity(load(path=write_npz(tmp_path, **arrays)))
    assert after != before
    assert [part.split(" crc ")[0] for part in after.split("; ")] == [
        "x (10, 3) float64", "y (10,) int64", "x_val (5, 3) float64", "y_val (5,) int64"]


def test_the_crc_covers_every_block_of_a_large_array():
    """Large arrays (and inputs read from disk) are checked block by block: a change in
    any block changes the CRC, as it changes zlib's CRC of the whole."""
    a = np.arange(3 * (1 << 21), dtype=np.float64).reshape(-1, 3)   # 48 MiB: 3 blocks
    whole = zlib.crc32(a.view(np.uint8))
    assert data.crc32(a) == whole
    a[1, 0] = -1.0                                                   # in the first block
    assert data.crc32(a) == zlib.crc32(a.view(np.uint8)) != whole


def test_val_fraction_split_is_seeded_and_disjoint(tmp_path):
    x = np.arange(40, dtype=float).reshape(20, 2)
    path = write_npz(tmp_path, x=x, y=np.arange(20) % 2)
    d = load(path=path, val_fraction=0.25)
    assert (len(d.x), len(d.x_val)) == (15, 5)
    seen = sorted(d.x[:, 0].tolist() + d.x_val[:, 0].tolist())
    assert seen == x[:, 0].tolist()   # every sample exactly once
    assert np.array_equal(load(path=path, val_fraction=0.25).x_val, d.x_val)


def test_npz_float_targets_for_mse(tmp_path):
    path = write_npz(tmp_path, x=np.ones((4, 2)), y=np.zeros((4, 3)))
    d = load(path=path, loss="mse")
    assert d.num_classes is None and d.num_outputs == 3 and d.x_val is None


def test_mse_with_integer_labels_is_classification(tmp_path):
    path = write_npz(tmp_path, x=np.ones((4, 2)), y=np.array([0, 1, 2, 1]))
    d = load(path=path, loss="mse")
    assert d.num_classes == 3 and d.num_outputs == 3


def test_values_beyond_float32_load_in_float64(tmp_path):
    """(and are refused in float32: test_bad_input.py, x-beyond-float32)"""
    path = write_npz(tmp_path, x=np.array([[1e39], [0.0]]), y=np.array([0, 1]))
    assert load(path=path).x.dtype == np.float64


# ----------------------------------------------------------------------------- IDX / MNIST

@pytest.mark.parametrize("gz", [False, True])
def test_idx_folder_raw_or_gz(tmp_path, gz):
    """Validation holds out training images; the t10k pair is the test set, which
    load_test alone reads. With data.mnist_t10k = "val" (runs made before that key) the
    t10k pair is the validation set, and there is no test set."""
    folder = fake_mnist(tmp_path / "m", gz)
    d = load("mnist", folder, val_fraction=0.25)
    assert d.x.shape == (9, 16) and d.x_val.shape == (3, 16) and d.num_classes == 10
    assert 0 <= d.x.min() and d.x.max() <= 1
    x, y = load_test("mnist", folder, d)
    assert x.shape == (6, 16) and y.tolist() == list(range(6))
    before = load("mnist", folder, val_fraction=0.25, mnist_t10k="val")
    assert before.x.shape == (12, 16) and np.array_equal(before.x_val, x)
    with pytest.raises(UserError, match="no test set apart from its validation set"):
        load_test("mnist", folder, before, mnist_t10k="val")
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):   # training needs
        (folder / (name + (".gz" if gz else ""))).unlink()              # no t10k files
    assert load("mnist", folder, val_fraction=0.25).x.shape == (9, 16)


def test_test_sets_of_npz_and_npy_and_sources_without_one(tmp_path):
    rng = np.random.default_rng(0)
    arrays = dict(x=rng.normal(size=(8, 3)), y=np.arange(8) % 2,
                  x_test=rng.normal(size=(4, 3)), y_test=np.array([0, 1, 1, 0]))
    path = write_npz(tmp_path, **arrays)
    d = load(path=path)
    assert d.x_val is None and len(d.x) == 8   # x_test is not trained or validated on
    x, y = load_test("npz", path, d)
    assert np.array_equal(x, arrays["x_test"]) and y.tolist() == [0, 1, 1, 0]
    (tmp_path / "f").mkdir()
    for name, a in arrays.items():
        np.save(tmp_path / "f" / f"{name}.npy", a)
    assert np.array_equal(load_test("npy", tmp_path / "f", d)[0], arrays["x_test"])
    with pytest.raises(UserError, match="y_test holds label 2, outside the network's 2 classes"):
        load_test("npz", write_npz(tmp_path, **dict(arrays, y_test=np.array([0, 1, 2, 0]))), d)
    with pytest.raises(UserError, match="the npz data at .* has no test set"):
        load_test("npz", write_npz(tmp_path, x=arrays["x"], y=arrays["y"]), d)
    with pytest.raises(UserError, match="the synthetic data has no test set"):
        load_test("synthetic", "", d)


@pytest.mark.skipif(not MNIST.is_dir(), reason=f"real MNIST not present at {MNIST}")
def test_real_mnist_folder():
    d = load("mnist", MNIST, dtype="float32", val_fraction=0.1)
    assert d.x.shape == (9000, 784) and d.x_val.shape == (1000, 784)
    assert d.num_classes == 10 and d.x.dtype == np.float32
    assert load_test("mnist", MNIST, d, dtype="float32")[0].shape == (10000, 784)


# ----------------------------------------------------------------------------- synthetic

def test_synthetic_is_a_pure_function_of_the_seed():
    a, b = synthetic.make_digits(500, 3), synthetic.make_digits(500, 3)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], synthetic.make_digits(500, 4)[0])
    x, y = a
    assert x.shape == (500, 256) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    assert set(np.unique(y)) == set(range(10))


def test_synthetic_source_split():
    d = load("synthetic", samples=200, val_fraction=0.1, dtype="float32")
    assert (len(d.x), len(d.x_val), d.num_inputs, d.num_classes) == (180, 20, 256, 10)


# ----------------------------------------------------------------------------- csv

def write_csv(tmp_path, text, name="d.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def csv_of(x, y, header=True):
    lines = (["label," + ",".join(f"f{j}" for j in range(x.shape[1]))] if header else [])
    lines += [",".join([str(label)] + [repr(float(v)) for v in row]) for label, row in zip(y, x)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("header", [True, False])
def test_csv_holds_the_same_data_as_npz(tmp_path, header):
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(30, 4)), rng.integers(0, 3, size=30)
    from_csv = load("csv", write_csv(tmp_path, csv_of(x, y, header)), val_fraction=0.2)
    from_npz = load("npz", write_npz(tmp_path, x=x, y=y), val_fraction=0.2)
    for key in ("x", "y", "x_val", "y_val"):   # the same values, the same split
        assert np.array_equal(getattr(from_csv, key), getattr(from_npz, key))
    assert from_csv.y.dtype == np.int64 and from_csv.num_classes == 3


def test_csv_blank_lines_crlf_and_regression_targets(tmp_path):
    path = write_csv(tmp_path, "target,a\r\n0.5,1\r\n\r\n1.5,2\r\n2,3\r\n")
    d = load("csv", path, loss="mse")
    assert d.num_classes is None and d.num_outputs == 1
    assert d.y.ravel().tolist() == [0.5, 1.5, 2.0] and d.x.ravel().tolist() == [1, 2, 3]


@pytest.mark.parametrize("text,message", [
    ("label,a,b\n0,1,2\n1,3\n", "line 3 has 2 columns, the first data row has 3"),
    ("0,1,2\n\n1,2,3,4\n", "line 3 has 4 columns, the first data row has 3"),
    ("label,a\n0,1\n1,x7\n", "line 3, column 2: 'x7' is not a number"),
    ("0,1,oops\n1,2,3\n", "line 1, column 3: 'oops' is not a number"),
    ("label,a\n", "no data rows after the header"),
    ("", "no data rows"),
    ("0\n1\n", "has 1 column; expected the label first"),
    ("label,a\n0,1\n1,nan\n", "line 3: NaN or Inf"),
    ("0,1\n1,1e999\n", "line 2: NaN or Inf"),
    ("0,1\n1.5,2\n", "line 2: label 1.5 is not an integer class label (for train.loss = "
     '"cross_entropy" the first column holds 0 .. C-1; for regression targets set '
     'train.loss = "mse")'),
    ("0,1\n-1,2\n", "line 2: negative class label -1"),
    ("0,1\n70000,2\n", "line 2: class label 70000; labels must be 0 .. C-1"),
])
def test_bad_csv_names_the_line(tmp_path, text, message):
    path = write_csv(tmp_path, text)
    with pytest.raises(UserError, match=re.escape(f"{path}: ") + ".*" + re.escape(message)):
        load("csv", path)


def test_csv_that_is_missing_or_not_text(tmp_path):
    with pytest.raises(UserError, match="no such file .*nope.csv"):
        load("csv", tmp_path / "nope.csv")
    path = tmp_path / "bin.csv"
    path.write_bytes(b"0,1\n\xff\xfe\x00,2\n")
    with pytest.raises(UserError, match="bin.csv: not UTF-8 text"):
        load("csv", path)


# ----------------------------------------------------------------------------- npy

def write_npy(tmp_path, **arrays):
    folder = tmp_path / "npy"
    folder.mkdir(exist_ok=True)
    for name, a in arrays.items():
        np.save(folder / f"{name}.npy", a)
    return folder


@pytest.mark.parametrize("x_dtype", [np.float32, np.float64, np.uint8])
def test_npy_stays_on_disk_and_matches_npz(tmp_path, x_dtype):
    rng = np.random.default_rng(2)
    x = (rng.random(size=(40, 6)) * 200).astype(x_dtype)
    y = rng.integers(0, 4, size=40)
    d = load("npy", write_npy(tmp_path, x=x, y=y), val_fraction=0.25, dtype="float32")
    ref = load("npz", write_npz(tmp_path, x=x, y=y), val_fraction=0.25, dtype="float32")
    assert isinstance(d.x, data.Rows) and isinstance(d.x_val, data.Rows)
    assert isinstance(d.x.base, NpyFile)             # rows are read from the file on demand
    assert d.x.shape == ref.x.shape and d.x.dtype == np.float32 and len(d.x_val) == 10
    assert np.array_equal(np.asarray(d.x), ref.x) and np.array_equal(d.x_val[:], ref.x_val)
    assert np.array_equal(d.y, ref.y) and np.array_equal(d.y_val, ref.y_val)
    rows = np.array([29, 0, 7])
    assert np.array_equal(d.x[rows], ref.x[rows]) and d.x[rows].dtype == np.float32
    assert data.crc32(d.x) == data.crc32(ref.x) == zlib.crc32(ref.x.view(np.uint8))


def test_npy_with_its_own_validation_set(tmp_path):
    rng = np.random.default_rng(3)
    folder = write_npy(tmp_path, x=rng.normal(size=(8, 2)), y=np.arange(8) % 2,
                       x_val=rng.normal(size=(3, 2)), y_val=np.array([0, 1, 1]))
    d = load("npy", folder, dtype="float64")
    assert (len(d.x), len(d.x_val), d.num_classes) == (8, 3, 2)


def test_npy_regression_targets(tmp_path):
    folder = write_npy(tmp_path, x=np.ones((5, 2)), y=np.zeros((5, 3)))
    d = load("npy", folder, loss="mse")
    assert d.num_classes is None and d.num_outputs == 3 and d.y.shape == (5, 3)


def test_bad_npy_folder_names_the_file(tmp_path):
    folder = write_npy(tmp_path, y=np.array([0, 1, 0]))
    with pytest.raises(UserError, match="missing x.npy"):
        load("npy", folder)
    with pytest.raises(UserError, match="no such folder"):
        load("npy", tmp_path / "absent")
    for setup, message in [
        (lambda f: (f / "x.npy").write_bytes(b"PK\x03\x04 not npy"), "x.npy: not a readable .npy"),
        (lambda f: (f / "x.npy").write_bytes(
            (f / "y.npy").read_bytes()[:-8]), "x.npy: not a readable .npy"),
        (lambda f: np.save(f / "x.npy", np.array([[1, "a"]], dtype=object)),
         "x.npy: not a readable .npy"),
        (lambda f: np.save(f / "x.npy", np.zeros((4, 2))), "x has 4 samples but y has 3"),
        (lambda f: np.save(f / "x.npy", np.array([[1.0, np.nan]] * 3)), "x holds NaN or Inf"),
        (lambda f: np.save(f / "x.npy", np.full((3, 2), 1e300)), "too large for float32"),
        (lambda f: np.save(f / "x.npy", np.array([[1, -3e19]] * 3)), "values up to 3e+19 in "
                                                                    "magnitude"),
        (lambda f: (np.save(f / "x.npy", np.zeros((3, 2))),
                    np.save(f / "x_val.npy", np.zeros((1, 2)))), "x_val and y_val must come"),
    ]:
        for name in ("x.npy", "x_val.npy"):
            (folder / name).unlink(missing_ok=True)
        setup(folder)
        with pytest.raises(UserError, match=re.escape(str(folder)) + ".*" + re.escape(message)):
            load("npy", folder, dtype="float32")
    (folder / "x.npy").unlink()
    np.save(folder / "x.npy", np.zeros((3, 2)))
    (folder / "y.npy").unlink()
    with pytest.raises(UserError, match="missing y.npy"):
        load("npy", folder)
    np.save(folder / "y.npy", np.arange(3) % 2)
    (folder / "x_val.npy").unlink(missing_ok=True)
    np.save(folder / "x.npy", np.array([[1, -128]] * 3, np.int8))   # abs(-128) = -128 in int8
    assert np.asarray(load("npy", folder).x).min() == -128
    np.save(folder / "x.npy", np.asfortranarray(np.zeros((3, 2))))
    with pytest.raises(UserError, match="x.npy: saved in Fortran order"):
        load("npy", folder)


@pytest.mark.parametrize("shape, dtype", [((301, 3), np.float64), ((37, 1500), np.float32),
                                          ((50, 700), np.uint8), ((9, 4100), np.uint8)])
def test_npy_rows_come_in_whole_verified_blocks(tmp_path, shape, dtype):
    """Rows read by number or slice, in any order, from blocks of many rows, of one row,
    and at the file's short last block, are the array's own."""
    x = np.random.default_rng(4).integers(0, 250, size=shape).astype(dtype)
    np.save(tmp_path / "x.npy", x)
    a = NpyFile(tmp_path / "x.npy")
    assert (a.shape, a.dtype, len(a)) == (x.shape, x.dtype, len(x))
    n = len(x)
    for rows in (np.array([n - 1, 0, 5, 5, 2]), np.arange(n)[::-1], np.array([-1]),
                 np.array([], dtype=np.int64)):
        assert np.array_equal(a[rows], x[rows])
    for rows in (slice(None), slice(3, n - 1), slice(n - 2, None), slice(4, 4), slice(0, n, 3)):
        assert np.array_equal(a[rows], x[rows]) and a[rows].flags.writeable


def test_npy_changed_or_truncated_under_a_reader_is_an_error_when_read(tmp_path):
    """A memory map would give the new values without a word, or SIGBUS: here the rows of
    a changed block are refused, a truncated file is one line, and a file replaced by a
    rename is still the one that was opened."""
    x = np.arange(6000, dtype=np.float64).reshape(1000, 6)   # 85 rows a block
    path = tmp_path / "x.npy"
    np.save(path, x)
    a = NpyFile(path)
    live = np.load(path, mmap_mode="r+")
    live[500, 2] = -1.0   # in place, as a careless user's script does
    live.flush()
    del live
    assert np.array_equal(a[np.array([0, 999])], x[[0, 999]])   # other blocks: still good
    for rows in (np.array([3, 501]), slice(400, 600)):
        with pytest.raises(UserError, match=re.escape(f"{path} changed on disk while this "
                                                      "command read it (rows 425 to 509 ")):
            a[rows]
    np.save(tmp_path / "other.npy", x * 2)
    os.replace(tmp_path / "other.npy", path)   # a new file under the name, then cut short
    with open(path, "r+b") as f:
        f.truncate(200)
    assert np.array_equal(a[np.array([999, 0])], x[[999, 0]])   # the file as opened
    np.save(path, x)
    c = NpyFile(path)
    with open(path, "r+b") as f:
        f.truncate(3000)
    with pytest.raises(UserError, match=re.escape(f"{path} was truncated while this command "
                                                  "read it (3,000 bytes")):
        c[np.array([900])]


def test_npy_and_csv_train_to_the_npz_weights_under_mpirun(tmp_path):
    """The same numbers from three sources: bitwise the same training at 2 ranks."""
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(90, 5)).astype(np.float32), rng.integers(0, 3, size=90)
    sources = {"npz": write_npz(tmp_path, x=x, y=y), "npy": write_npy(tmp_path, x=x, y=y),
               "csv": write_csv(tmp_path, csv_of(x, y))}
    weights = {}
    for source, path in sources.items():
        run_dir = tmp_path / f"run-{source}"
        r = run_train(["--set", f'data.source="{source}"', "--set", f'data.path="{path}"',
                       "--set", "model.hidden=[8]", "--set", "train.batch_size=16",
                       "--set", "train.epochs=2", "--set", f'run.dir="{run_dir}"'], ranks=2)
        assert r.returncode == 0, r.stderr
        assert "81 train / 9 val, 5 features, 3 classes" in r.stdout
        weights[source] = model_arrays(run_dir / "checkpoints" / "epoch-0002.npz")
    for source in ("npy", "csv"):
        assert all(np.array_equal(weights[source][k], weights["npz"][k]) for k in weights["npz"])


# ----------------------------------------------------------------------------- memory bombs

def npy_header(shape, descr="<f8"):
    """The bytes of a .npy file's header that declares `shape`, with no data after it."""
    f = io.BytesIO()
    np.lib.format.write_array_header_1_0(f, {"descr": descr, "fortran_order": False,
                                             "shape": shape})
    return f.getvalue()


def npz_with(path, members):
    """An .npz of {name: bytes of a .npy}, deflated as numpy.savez_compressed writes it."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, content in members.items():
            z.writestr(name + ".npy", content)


def npy_bytes(a):
    f = io.BytesIO()
    np.save(f, a)
    return f.getvalue()


def test_members_dpbp_does_not_read_are_never_inflated(tmp_path):
    """An unused member that declares 8 TB is not touched: the data load as if it were
    not there."""
    x, y = np.ones((6, 3)), np.arange(6) % 2
    npz_with(tmp_path / "d.npz", {"x": npy_bytes(x), "y": npy_bytes(y),
                                  "junk": npy_header((10 ** 12,))})
    d = data.load(config.DataConfig(source="npz", path=str(tmp_path / "d.npz")),
                  "cross_entropy", "float64", 0)
    assert len(d.x) + len(d.x_val) == 6


def test_a_member_larger_than_memory_is_refused_before_it_is_inflated(tmp_path):
    npz_with(tmp_path / "d.npz", {"x": npy_header((10 ** 12,)), "y": npy_bytes(np.arange(6))})
    with pytest.raises(UserError, match=r"its member 'x' needs 8,000,000,000,000 bytes, more "
                                        "than the .* bytes of memory available"):
        data.load(config.DataConfig(source="npz", path=str(tmp_path / "d.npz")),
                  "cross_entropy", "float64", 0)


def test_values_too_large_to_train_on_are_named(tmp_path):
    """float64 values whose products overflow: the data are refused with a line that says
    so, instead of training until a non-finite loss advises a lower learning rate."""
    path = tmp_path / "huge.csv"
    path.write_text("0,1e300,2.0\n1,3.0,4.0\n0,5.0,6.0\n1,7.0,8.0\n")   # label first
    with pytest.raises(UserError, match=r"values up to 1e\+300 in magnitude: a network's "
                                        "products of them overflow float64"):
        data.load(config.DataConfig(source="csv", path=str(path)), "cross_entropy",
                  "float64", 0)



# ----------------------------------------------------------------------------- classes

def labelled(tmp_path, y, y_val=None):
    arrays = {"x": np.zeros((len(y), 2)), "y": np.array(y)}
    if y_val is not None:
        arrays.update(x_val=np.zeros((len(y_val), 2)), y_val=np.array(y_val))
    np.savez(tmp_path / "d.npz", **arrays)
    return config.DataConfig(source="npz", path=str(tmp_path / "d.npz"))


def test_the_classes_come_from_the_training_labels_or_the_network(tmp_path):
    d = data.load(labelled(tmp_path, [0, 1, 2, 1]), "cross_entropy", "float64", 0)
    assert d.num_classes == d.num_outputs == 3
    d = data.load(labelled(tmp_path, [0, 1, 1, 0]), "cross_entropy", "float64", 0, classes=5)
    assert d.num_classes == 5   # a 5-class network, data with 2 of them


def test_validation_labels_beyond_the_training_classes_are_named(tmp_path):
    """Training labels 0..2, validation labels 5: a 6-class network that never sees
    classes 3..5 in training would report 0 % without a word; it is refused instead."""
    cfg = labelled(tmp_path, [0, 1, 2, 1], y_val=[5, 5])
    with pytest.raises(UserError, match=r"y_val holds label 5, outside the 3 classes of the "
                                        r"training labels \(0 .. 2\); set model.classes = 6"):
        data.load(cfg, "cross_entropy", "float64", 0)
    assert data.load(cfg, "cross_entropy", "float64", 0, classes=6).num_classes == 6
    with pytest.raises(UserError, match="y holds label 2, outside the network's 2 classes"):
        data.load(labelled(tmp_path, [0, 1, 2]), "cross_entropy", "float64", 0, classes=2)


def test_an_npy_source_given_a_file_says_so(tmp_path):
    np.savez(tmp_path / "good.npz", x=np.zeros((2, 2)), y=np.arange(2))
    with pytest.raises(UserError, match=r"good.npz is a file; data.source = \"npy\" reads a "
                                        r"folder of x.npy and y.npy \(for an .npz file: "
                                        r"data.source = \"npz\"\)"):
        data.load(config.DataConfig(source="npy", path=str(tmp_path / "good.npz")),
                  "cross_entropy", "float64", 0)
