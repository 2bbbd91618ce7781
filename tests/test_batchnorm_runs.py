"""Networks with batchnorm1d and batchnorm2d, end to end: N ranks under mpirun against
one process in float64 (uneven shards, a rank with no rows in the last batch); under
train.deterministic the same bits at 4 ranks and across a resume mid-epoch at another
world size, running statistics included, with products whose bits depend on their row
count (tests/sensitive.py); and the refusals at start-up: a global batch of one row,
micro-batches, another eps or momentum on resume. The layer itself: test_norm.py."""

import signal

import numpy as np
import pytest

from tests.conftest import metrics, model_arrays, run_train
from tests.test_cnn import cnn_run, final, images, sha256, toml

LAYERS = [{"type": "conv2d", "out_channels": 3, "kernel_size": 3, "padding": 1},
          {"type": "batchnorm2d"},
          {"type": "relu"},
          {"type": "maxpool2d", "kernel_size": 2},
          {"type": "flatten"},
          {"type": "linear", "out_features": 6},
          {"type": "batchnorm1d", "momentum": "cumulative"},
          {"type": "relu"},
          {"type": "linear", "out_features": 3}]


@pytest.fixture
def images17(tmp_path):
    """17 training images: at batch_size 5, batches of 5, 5, 5 and 2 (at 3 ranks shards of
    2-2-1, and 1-1-0 in the last); 7 to validate."""
    rng = np.random.default_rng(3)
    (x, y), (x_val, y_val) = images(rng, 17), images(rng, 7)
    path = tmp_path / "images.npz"
    np.savez(path, x=x, y=y, x_val=x_val, y_val=y_val)
    return path


def bn_run(npz, run_dir, *more, epochs=3):
    return cnn_run(npz, run_dir, f"model.layers={toml(LAYERS)}", "train.batch_size=5",
                   *more, layers=LAYERS, epochs=epochs)


def test_n_ranks_match_one_process_and_the_statistics_moved(tmp_path, images17, train):
    """float64: 2 and 3 ranks end with one process's weights and running statistics to
    1e-10, and its logged losses."""
    code, out, err = train(bn_run(images17, tmp_path / "one"))
    assert code == 0, err
    assert "batchnorm2d, relu" in out and "linear 6, batchnorm1d cumulative, relu" in out, out
    one = model_arrays(final(tmp_path / "one", 3))
    assert one["model.6.num_batches_tracked"] == 12 and one["model.1.num_batches_tracked"] == 12
    assert np.abs(one["model.6.running_var"] - 1).max() > 0.01
    for ranks in (2, 3):
        run_dir = tmp_path / f"ranks-{ranks}"
        r = run_train(bn_run(images17, run_dir), ranks=ranks)
        assert r.returncode == 0, r.stderr
        many = model_arrays(final(run_dir, 3))
        assert many.keys() == one.keys()
        for name in one:
            np.testing.assert_allclose(many[name], one[name], rtol=0, atol=1e-10, err_msg=name)
        for a, b in zip(metrics(tmp_path / "one"), metrics(run_dir)):
            assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-12)
            assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-12)


def test_deterministic_bits_at_4_ranks_and_across_a_resume_mid_epoch(tmp_path, images17,
                                                                     train, sensitive):
    """float32, train.deterministic: one process, 4 ranks, and a run stopped mid-epoch at 2
    ranks and resumed at 3 end with the same bits (running statistics included) and
    log; a resume that changes eps or momentum is refused."""
    args = ["train.deterministic=true", 'model.dtype="float32"', "train.grains=3"]
    code, _, err = train(bn_run(images17, tmp_path / "one", *args))
    assert code == 0, err
    expected = sha256(final(tmp_path / "one", 3))
    r = run_train(bn_run(images17, tmp_path / "four", *args), ranks=4, thread_sensitive=True)
    assert r.returncode == 0, r.stderr
    stopped = bn_run(images17, tmp_path / "resumed", *args)
    r = run_train(stopped, ranks=2, env={"DPBP_FAULT": "sigterm:1:5"}, thread_sensitive=True)
    assert r.returncode == 128 + signal.SIGTERM, r.stderr
    assert "-batch-" in r.stdout, r.stdout   # stopped mid-epoch
    changed = [{**spec, "eps": 1e-3} if spec["type"] == "batchnorm2d" else spec
               for spec in LAYERS]
    code, _, err = train(stopped + ["--resume", "--set", f"model.layers={toml(changed)}"])
    assert code == 2 and "model.layers" in err, err
    r = run_train(stopped + ["--resume"], ranks=3, thread_sensitive=True)
    assert r.returncode == 0, r.stderr
    for run in ("four", "resumed"):
        assert sha256(final(tmp_path / run, 3)) == expected, run
        assert [m["train_loss"] for m in metrics(tmp_path / run)] == \
            [m["train_loss"] for m in metrics(tmp_path / "one")]


@pytest.mark.parametrize("sets,words", [
    (["train.batch_size=1"], "layer 6 (batchnorm1d) would see 1 value per channel in a "
     "global batch of 1 row (train.batch_size = 1), which has no variance (torch refuses it "
     "too); set train.batch_size = 3, say"),
    (["train.batch_size=8"], "layer 6 (batchnorm1d) would see 1 value per channel in a "
     "global batch of 1 row (the last batch of the 17 training samples at "
     "train.batch_size = 8)"),
    (["train.accumulation_steps=2"], "layer 1 (batchnorm2d) normalises with the statistics "
     "of the whole global batch, which train.accumulation_steps = 2 would cut into "
     "micro-batches; set train.accumulation_steps = 1"),
])
def test_refused_at_start_up(tmp_path, images17, train, sets, words):
    code, _, err = train(bn_run(images17, tmp_path / "run", *sets))
    assert code == 2 and words in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()
