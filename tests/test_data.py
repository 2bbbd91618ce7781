"""Data sources and sharding: what loads, what is refused with a clear message."""

import gzip

import numpy as np
import pytest

from dpbp import config, data, sharding, synthetic
from dpbp.errors import UserError
from tests.conftest import MNIST


def load(source="npz", path="", loss="cross_entropy", val_fraction=0.0, dtype="float64",
         samples=100):
    cfg = config.DataConfig(source=source, path=str(path), val_fraction=val_fraction,
                            samples=samples)
    return data.load(cfg, loss, dtype, seed=0)


def write_npz(tmp_path, **arrays):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    return path


def test_npz_with_validation_arrays(tmp_path):
    rng = np.random.default_rng(0)
    path = write_npz(tmp_path, x=rng.normal(size=(10, 3)), y=np.arange(10) % 4,
                     x_val=rng.normal(size=(5, 3)), y_val=np.array([0, 1, 2, 3, 3]))
    d = load(path=path, val_fraction=0.5)    # ignored: the file has its own validation set
    assert (len(d.x), len(d.x_val), d.num_classes, d.num_outputs) == (10, 5, 4, 4)
    assert d.x.dtype == np.float64 and d.y.dtype == np.int64


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


@pytest.mark.parametrize("arrays,message", [
    (dict(y=np.zeros(3, int)), "missing array 'x'"),
    (dict(x=np.zeros((3, 2))), "missing array 'y'"),
    (dict(x=np.zeros(3), y=np.zeros(3, int)), "x must be 2-D"),
    (dict(x=np.zeros((3, 0)), y=np.zeros(3, int)), "x must be 2-D (n, features >= 1)"),
    (dict(x=np.zeros((3, 2)), y=np.int64(1)), "y has none (a scalar)"),
    (dict(x=np.zeros((3, 2)), y=np.zeros(4, int)), "x has 3 samples but y has 4"),
    (dict(x=np.zeros((0, 2)), y=np.zeros(0, int)), "x is empty"),
    (dict(x=np.array([[1.0, np.nan]]), y=np.zeros(1, int)), "x holds NaN or Inf"),
    (dict(x=np.array([[1.0, np.inf]]), y=np.zeros(1, int)), "x holds NaN or Inf"),
    (dict(x=np.zeros((2, 2)), y=np.array([0.5, 1.0])), "y must be integer class labels"),
    (dict(x=np.zeros((2, 2)), y=np.array([0, -1])), "negative class label -1"),
    (dict(x=np.zeros((2, 2)), y=np.array([0, 0])), "a single class"),
    (dict(x=np.zeros((2, 2)), y=np.array([0, 10**9])), "class label 1000000000; labels must"),
    (dict(x=np.zeros((2, 2)), y=np.array([0, 2**63 + 5], dtype=np.uint64)), "class label 92233"),
    (dict(x=np.array([["a", "b"]]), y=np.zeros(1, int)), "x must hold numbers"),
    (dict(x=np.zeros((2, 2)), y=np.array([0, 1]), x_val=np.zeros((1, 2))),
     "x_val and y_val must come together"),
    (dict(x=np.zeros((2, 2)), y=np.array([0, 1]), x_val=np.zeros((1, 3)),
          y_val=np.array([1])), "x has shape (2, 2) but x_val has (1, 3)"),
])
def test_bad_npz_is_refused_clearly(tmp_path, arrays, message):
    with pytest.raises(UserError, match=".*" + __import__("re").escape(message)):
        load(path=write_npz(tmp_path, **arrays))


def test_values_beyond_float32(tmp_path):
    path = write_npz(tmp_path, x=np.array([[1e39], [0.0]]), y=np.array([0, 1]))
    assert load(path=path).x.dtype == np.float64   # fine in float64
    with pytest.raises(UserError, match="values too large for float32"):
        load(path=path, dtype="float32")


def test_idx_counts_must_agree(tmp_path):
    folder = fake_mnist(tmp_path / "m", gz=False)
    write_idx(folder / "train-labels-idx1-ubyte", np.arange(11) % 10)
    with pytest.raises(UserError, match="train-images-idx3-ubyte has 12 images but "
                                        "train-labels-idx1-ubyte has 11 labels"):
        load("mnist", folder)


def test_mse_targets_must_be_finite_floats(tmp_path):
    path = write_npz(tmp_path, x=np.zeros((2, 2)), y=np.array([[0.0], [np.nan]]))
    with pytest.raises(UserError, match="y holds NaN or Inf"):
        load(path=path, loss="mse")


def test_missing_and_malformed_npz(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load(path=tmp_path / "absent.npz")
    with pytest.raises(UserError, match="no such file"):
        load(path=tmp_path)   # a folder
    single = tmp_path / "single.npz"
    with open(single, "wb") as f:
        np.save(f, np.zeros((3, 2)))
    with pytest.raises(UserError, match=r"one unnamed array \(.npy\)"):
        load(path=single)
    objects = tmp_path / "objects.npz"
    np.savez(objects, x=np.array([object(), object()]), y=np.array([0, 1]))
    with pytest.raises(UserError, match="Object arrays cannot be loaded"):
        load(path=objects)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"this is not a zip file")
    with pytest.raises(UserError, match="not a readable .npz"):
        load(path=bad)
    good = write_npz(tmp_path, x=np.zeros((50, 2)), y=np.arange(50) % 2)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(UserError, match="not a readable .npz"):
        load(path=truncated)


def test_val_fraction_that_leaves_nothing(tmp_path):
    with pytest.raises(UserError, match="leaves no training samples"):
        load(path=write_npz(tmp_path, x=np.zeros((1, 2)), y=np.array([0])), val_fraction=0.5)


# ----------------------------------------------------------------------------- IDX / MNIST

def write_idx(path, array, gz=False):
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    raw = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(raw)


def fake_mnist(folder, gz):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for key, name in data.MNIST_FILES.items():
        n = 6 if key.endswith("val") else 12
        arr = rng.integers(0, 256, size=(n, 4, 4)) if key.startswith("x") else np.arange(n) % 10
        write_idx(folder / (name + (".gz" if gz else "")), arr, gz)
    return folder


@pytest.mark.parametrize("gz", [False, True])
def test_idx_folder_raw_or_gz(tmp_path, gz):
    d = load("mnist", fake_mnist(tmp_path / "m", gz))
    assert d.x.shape == (12, 16) and d.x_val.shape == (6, 16) and d.num_classes == 10
    assert 0 <= d.x.min() and d.x.max() <= 1


def test_idx_truncated_corrupt_missing(tmp_path):
    folder = fake_mnist(tmp_path / "m", gz=False)
    images = folder / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-5])
    with pytest.raises(UserError, match="train-images-idx3-ubyte: the header promises 192"):
        load("mnist", folder)
    images.write_bytes(b"\x00\x00\x0d\x03garbage")
    with pytest.raises(UserError, match="bad magic number"):
        load("mnist", folder)
    images.unlink()
    with pytest.raises(UserError, match="missing train-images-idx3-ubyte"):
        load("mnist", folder)
    with pytest.raises(UserError, match="no such folder"):
        load("mnist", tmp_path / "nowhere")


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_gzip_truncated_or_corrupt(tmp_path, damage):
    folder = fake_mnist(tmp_path / "m", gz=True)
    images = folder / "train-images-idx3-ubyte.gz"
    raw = bytearray(images.read_bytes())
    if damage == "truncate":
        raw = raw[:-6]
    else:
        raw[len(raw) // 2] ^= 0xFF    # inside the deflate stream
    images.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="train-images-idx3-ubyte.gz: cannot read"):
        load("mnist", folder)


@pytest.mark.skipif(not MNIST.is_dir(), reason=f"real MNIST not present at {MNIST}")
def test_real_mnist_folder():
    d = load("mnist", MNIST, dtype="float32")
    assert d.x.shape == (10000, 784) and d.x_val.shape == (10000, 784)
    assert d.num_classes == 10 and d.x.dtype == np.float32


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


# ----------------------------------------------------------------------------- sharding

@pytest.mark.parametrize("n", [0, 1, 2, 7, 8, 33])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 16])
def test_shards_cover_each_batch_exactly_once(n, size):
    parts = [range(n)[sharding.shard(n, r, size)] for r in range(size)]
    assert [i for p in parts for i in p] == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert sharding.shard_sizes(n, size) == [len(p) for p in parts]


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    order = sharding.epoch_order(17, seed=1, epoch=2, shuffle=True)
    assert np.array_equal(order, sharding.epoch_order(17, seed=1, epoch=2, shuffle=True))
    assert not np.array_equal(order, sharding.epoch_order(17, seed=1, epoch=3, shuffle=True))
    assert sorted(order) == list(range(17))
    assert [len(b) for b in sharding.global_batches(order, 8)] == [8, 8, 1]


def test_no_shuffle_is_file_order():
    batches = sharding.global_batches(sharding.epoch_order(10, 0, 5, shuffle=False), 4)
    assert [b.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
