"""N ranks under a real mpirun end with the same weights as one process (float64, 1e-10).

The tiny dataset has 17 training samples in global batches of 8, 8 and 1: shards are
uneven at 3 ranks (2, 3, 3), and in the last batch some ranks get no sample at all.
"""

import json

import numpy as np
import pytest

from tests.conftest import model_arrays, run_train


def sets(**keys):
    out = []
    for key, value in keys.items():
        out += ["--set", f"{key.replace('__', '.')}={value}"]
    return out


def train(tmp_path, name, npz, ranks, extra):
    run_dir = tmp_path / name
    args = sets(data__source='"npz"', data__path=f'"{npz}"', model__dtype='"float64"',
                model__hidden="[6, 4]", train__batch_size=8, train__epochs=4, train__lr=0.1,
                run__dir=f'"{run_dir}"', run__keep_checkpoints=0) + extra
    result = run_train(args, ranks=ranks)
    assert result.returncode == 0, result.stderr
    final = model_arrays(run_dir / "checkpoints" / "epoch-0004.npz")
    with np.load(run_dir / "checkpoints" / "epoch-0004.npz") as f:
        momentum = f["optimizer.momentum_buffer"]
    metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return final, momentum, metrics, result


@pytest.fixture
def regression_npz(tmp_path):
    rng = np.random.default_rng(8)
    path = tmp_path / "regression.npz"
    np.savez(path, x=rng.normal(size=(17, 5)), y=rng.normal(size=(17, 2)),
             x_val=rng.normal(size=(7, 5)), y_val=rng.normal(size=(7, 2)))
    return path


@pytest.mark.parametrize("ranks,loss,extra", [
    (2, "cross_entropy", sets(train__momentum=0.9, train__nesterov="true",
                              train__weight_decay=0.01)),
    (3, "cross_entropy", sets(train__momentum=0.9, model__activation='"tanh"')),
    (3, "mse", sets(train__momentum=0.5, data__shuffle="false",
                    model__activation='"sigmoid"', train__loss='"mse"')),
])
def test_n_ranks_match_one_process(tmp_path, tiny_npz, regression_npz, ranks, loss, extra):
    npz = tiny_npz if loss == "cross_entropy" else regression_npz
    one, one_buf, one_metrics, _ = train(tmp_path, "one", npz, None, extra)
    many, many_buf, many_metrics, result = train(tmp_path, "many", npz, ranks, extra)
    assert f"dpbp 0.1.0: {ranks} ranks" in result.stdout
    assert one.keys() == many.keys() and len(one) == 6
    for name in one:
        np.testing.assert_allclose(many[name], one[name], rtol=0, atol=1e-10, err_msg=name)
    np.testing.assert_allclose(many_buf, one_buf, rtol=0, atol=1e-10)
    for a, b in zip(one_metrics, many_metrics):
        for key in ("train_loss", "val_loss"):
            assert b[key] == pytest.approx(a[key], abs=1e-12)
        assert b["val_accuracy"] == a["val_accuracy"]
        assert (a["world_size"], b["world_size"]) == (1, ranks)
    # training really moved the weights (so equality above is not vacuous)
    first = model_arrays(tmp_path / "one" / "checkpoints" / "epoch-0001.npz")
    assert np.abs(first["model.0.weight"] - one["model.0.weight"]).max() > 1e-3
