"""A short run on real MNIST (the 10k/10k subset in ../shared/data/mnist) under mpirun,
validated on 1,000 held-out training images."""

import json

import pytest

from tests.conftest import MNIST, ROOT, run_train


@pytest.mark.skipif(not MNIST.is_dir(), reason=f"real MNIST not present at {MNIST}")
def test_mnist_reaches_95_percent(tmp_path):
    r = run_train(["--config", str(ROOT / "configs" / "mnist.toml"),   # its first half
                   "--set", f'data.path="{MNIST}"', "--set", f'run.dir="{tmp_path / "run"}"',
                   "--set", "train.epochs=10"], ranks=2, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "9000 train / 1000 val, 784 features, 10 classes" in r.stdout   # t10k: the test set
    final = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")][-1]
    assert final["epoch"] == 10 and final["val_accuracy"] >= 0.95
