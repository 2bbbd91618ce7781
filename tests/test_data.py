"""Data sources and sharding: what loads, and how. (What is refused, and with which message:
test_bad_input.py; what random damage does: test_properties.py.)"""

import numpy as np
import pytest

from dpbp import config, data, sharding, synthetic
from tests.conftest import MNIST, fake_mnist


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


def test_values_beyond_float32_load_in_float64(tmp_path):
    """(and are refused in float32: test_bad_input.py, x-beyond-float32)"""
    path = write_npz(tmp_path, x=np.array([[1e39], [0.0]]), y=np.array([0, 1]))
    assert load(path=path).x.dtype == np.float64


# ----------------------------------------------------------------------------- IDX / MNIST

@pytest.mark.parametrize("gz", [False, True])
def test_idx_folder_raw_or_gz(tmp_path, gz):
    d = load("mnist", fake_mnist(tmp_path / "m", gz))
    assert d.x.shape == (12, 16) and d.x_val.shape == (6, 16) and d.num_classes == 10
    assert 0 <= d.x.min() and d.x.max() <= 1


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
