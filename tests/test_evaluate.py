"""`python -m dpbp.evaluate` end to end, on a real tiny run, in one process and under mpirun."""

import json
import shutil

import numpy as np
import pytest

from dpbp.service import data as datasets
from tests.conftest import (
    assert_refused,
    ckpt,
    relative_run,
    run_module,
    run_train,
    two_folders,
)


@pytest.mark.parametrize("ranks", [None, 2, 3])
def test_evaluate_reproduces_the_runs_validation_metrics(run, ranks):
    run_dir, metrics = run
    for m in metrics:
        r = run_module("dpbp.evaluate", ["--checkpoint", ckpt(run_dir, m["epoch"]), "--json"],
                       ranks)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)   # one JSON object and nothing else
        assert out["epoch"] == m["epoch"] and out["samples"] == 60
        assert out["accuracy"] == m["val_accuracy"]          # exactly
        assert out["loss"] == m["val_loss"]   # the same blocks, the same bits, any world
        cm = np.array(out["confusion_matrix"])
        assert cm.shape == (10, 10) and cm.sum() == 60 and cm.dtype.kind == "i"
        assert np.trace(cm) / 60 == out["accuracy"]
        assert out["class_samples"] == cm.sum(axis=1).tolist()
        assert out["per_class_accuracy"] == [cm[i, i] / cm[i].sum() for i in range(10)]


def test_confusion_matrix_is_the_same_at_any_world_size(run):
    run_dir, _ = run
    outs = [json.loads(run_module("dpbp.evaluate", ["--checkpoint", ckpt(run_dir, 2), "--json"],
                                  ranks).stdout) for ranks in (None, 3)]
    assert outs[0]["confusion_matrix"] == outs[1]["confusion_matrix"]


def test_evaluate_text_report(run):
    run_dir, metrics = run
    r = run_module("dpbp.evaluate", ["--checkpoint", ckpt(run_dir, 2)], ranks=2)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    hits = round(metrics[1]["val_accuracy"] * 60)
    assert f"accuracy {100 * metrics[1]['val_accuracy']:.2f}% ({hits}/60)" in r.stdout
    assert "per-class accuracy:" in r.stdout and "class   9:" in r.stdout
    assert "confusion matrix (rows: true class, columns: predicted class):" in r.stdout


def test_evaluate_on_other_data_with_set(run, tmp_path):
    """--set points the checkpoint at other data; the validation split follows the seed."""
    run_dir, _ = run
    x, y = datasets.synthetic.make_digits(200, 5)
    np.savez(tmp_path / "other.npz", x_val=x[:50], y_val=y[:50], x=x[50:], y=y[50:])
    r = run_module("dpbp.evaluate", ["--checkpoint", ckpt(run_dir, 2), "--json",
                                     "--set", 'data.source="npz"',
                                     "--set", f'data.path="{tmp_path / "other.npz"}"'])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["samples"] == 50 and sum(out["class_samples"]) == 50


def test_evaluate_regression_reports_loss_only(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 3))
    np.savez(tmp_path / "reg.npz", x=x, y=x @ rng.normal(size=(3, 2)))
    r = run_train(["--set", 'data.source="npz"', "--set", f'data.path="{tmp_path / "reg.npz"}"',
                   "--set", 'train.loss="mse"', "--set", "model.hidden=[4]",
                   "--set", "train.epochs=1", "--set", "data.val_fraction=0.25",
                   "--set", f'run.dir="{tmp_path / "run"}"'])
    assert r.returncode == 0, r.stderr
    val_loss = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())["val_loss"]
    r = run_module("dpbp.evaluate", ["--checkpoint", ckpt(tmp_path / "run", 1), "--json"])
    out = json.loads(r.stdout)
    assert out["loss"] == val_loss and out["accuracy"] is None
    assert out["confusion_matrix"] is None and "loss only" in out["note"]
    r = run_module("dpbp.evaluate", ["--checkpoint", ckpt(tmp_path / "run", 1)])
    assert r.returncode == 0 and "regression targets: loss only" in r.stdout


def test_evaluate_refuses_bad_input(run, tmp_path):
    run_dir, _ = run
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a checkpoint")
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.zeros((10, 5)), y=np.arange(10) % 10)
    cases = [
        (2, ["--checkpoint", str(tmp_path / "missing.npz")], "checkpoint: no such file"),
        (None, ["--checkpoint", str(garbage)], "is not a readable .npz file"),
        (None, [], "--checkpoint required"),
        (None, ["--checkpoint", ckpt(run_dir, 1), "--set", "model.hidden=[32]"],
         f"model.hidden = [32] would change the network of checkpoint {ckpt(run_dir, 1)} "
         "(256 -> linear 16, relu, linear 10; model.hidden = [16]): it runs its own network"),
        (2, ["--checkpoint", ckpt(run_dir, 1), "--set", 'data.source="npz"',
             "--set", f'data.path="{wrong}"'], "the data's rows have shape (5,), but the "
         "network of checkpoint " + ckpt(run_dir, 1) + " (256 -> linear 16, relu, linear "
         "10) takes (256,)"),
        (2, ["--checkpoint", ckpt(run_dir, 1), "--set", "data.val_fraction=0"],
         "has no validation set"),
        (None, ["--checkpoint", ckpt(run_dir, 1), "--split", "test"],
         "the synthetic data has no test set"),
    ]
    for ranks, args, message in cases:
        assert_refused(run_module("dpbp.evaluate", args, ranks), message)


def test_evaluate_and_predict_help_show_required_options_as_required():
    """In the usage line, a required option stands without brackets (--help and
    --version work without it)."""
    from dpbp import evaluate, predict
    usage = evaluate.PARSER.format_usage()
    assert " --checkpoint PATH" in usage and "[--checkpoint" not in usage
    assert "[--split {val,test}]" in usage and "[--json]" in usage
    usage = " ".join(predict.PARSER.format_usage().split())
    assert "--checkpoint PATH --input X.npy --output Y.npy" in usage and "[--input" not in usage
    assert predict.PARSER.parse_args(["--version"]).version


def test_evaluate_from_another_folder_uses_the_runs_own_data(tmp_path):
    """The checkpoint names its data by absolute path and identity: evaluated from a
    folder whose data/d.npz differs, it still gives the run's logged metrics; once the
    run's file is replaced, evaluation stops unless the command line names the data."""
    a, b = two_folders(tmp_path)
    run_dir = tmp_path / "run"
    assert run_train(relative_run(run_dir, "--set", "train.epochs=1"), cwd=a).returncode == 0
    logged = json.loads((run_dir / "metrics.jsonl").read_text())
    args = ["--checkpoint", ckpt(run_dir, 1), "--json"]
    out = json.loads(run_module("dpbp.evaluate", args, cwd=b).stdout)
    assert (out["loss"], out["accuracy"]) == (logged["val_loss"], logged["val_accuracy"])
    shutil.copy(b / "data" / "d.npz", a / "data" / "d.npz")
    assert_refused(run_module("dpbp.evaluate", args, cwd=b, ranks=2),
                   f"the data differ from what {ckpt(run_dir, 1)} was trained on")
    r = run_module("dpbp.evaluate", args + ["--set", 'data.path="data/d.npz"'], cwd=b)
    assert r.returncode == 0 and "as the command line asks" in r.stderr, r.stderr
    assert json.loads(r.stdout)["samples"] == 7


def test_a_run_directory_stands_for_its_newest_valid_checkpoint(run, tmp_path):
    run_dir, metrics = run
    r = run_module("dpbp.evaluate", ["--checkpoint", str(run_dir), "--json"], ranks=2)
    out = json.loads(r.stdout)
    assert r.returncode == 0 and out["checkpoint"] == ckpt(run_dir, 2) and out["epoch"] == 2
    assert out["loss"] == metrics[1]["val_loss"]
    (tmp_path / "empty").mkdir()
    assert_refused(run_module("dpbp.evaluate", ["--checkpoint", str(tmp_path / "empty")]),
                   f"--checkpoint: no checkpoint in {tmp_path / 'empty' / 'checkpoints'}")


def test_the_classes_are_the_networks_not_the_datas(tmp_path):
    """A 5-class network evaluated on data holding labels 0 and 1 only; labels beyond its
    classes are named as such, not as a shape that does not fit."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "five.npz", x=rng.normal(size=(60, 4)), y=np.arange(60) % 5)
    np.savez(tmp_path / "two.npz", x=rng.normal(size=(30, 4)), y=np.arange(30) % 2)
    np.savez(tmp_path / "eight.npz", x=rng.normal(size=(30, 4)), y=np.arange(30) % 8)
    r = run_train(["--set", "data.source=npz", "--set", f'data.path="{tmp_path / "five.npz"}"',
                   "--set", "model.hidden=[8]", "--set", "train.epochs=1",
                   "--set", f'run.dir="{tmp_path / "run"}"'])
    assert r.returncode == 0, r.stderr
    args = ["--checkpoint", str(tmp_path / "run"), "--json", "--set"]
    r = run_module("dpbp.evaluate", args + [f'data.path="{tmp_path / "two.npz"}"'])
    out = json.loads(r.stdout)
    assert r.returncode == 0 and len(out["per_class_accuracy"]) == 5, r.stderr
    assert out["class_samples"][2:] == [0, 0, 0]
    assert_refused(run_module("dpbp.evaluate", args + [f'data.path="{tmp_path / "eight.npz"}"'],
                              ranks=2), "y holds label 7, outside the network's 5 classes")


def as_recorded_before_mnist_t10k(run_dir):
    """Rewrite a run's checkpoints and config.toml as dpbp wrote them before the key
    data.mnist_t10k existed: the same, without that key (digests made again)."""
    from dpbp.service import checkpoint
    drop = 'mnist_t10k = "val"\n'
    for path in (run_dir / "checkpoints").glob("epoch-*.npz"):
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files if k != "digest"}
        assert drop in str(arrays["config"])
        arrays["config"] = np.str_(str(arrays["config"]).replace(drop, ""))
        arrays["digest"] = np.str_(checkpoint.digest(arrays))
        np.savez(path, **arrays)
    toml = run_dir / "config.toml"
    toml.write_text(toml.read_text().replace(drop, ""))


def test_a_run_from_before_mnist_had_a_test_set_keeps_validating_on_t10k(tmp_path):
    """A run recorded before data.mnist_t10k validated on the t10k pair: it evaluates and
    resumes so (a test set apart it has not; with data.mnist_t10k = "test" named on the
    command line, evaluate --split test measures on t10k)."""
    from tests.conftest import fake_mnist
    folder = fake_mnist(tmp_path / "mnist", gz=False)
    run_dir = tmp_path / "old"
    r = run_train(["--set", "data.source=mnist", "--set", f'data.path="{folder}"', "--set",
                   "model.hidden=[4]", "--set", "train.batch_size=4", "--set", "train.epochs=1",
                   "--set", "data.mnist_t10k=val", "--set", f'run.dir="{run_dir}"'])
    assert r.returncode == 0 and "data: mnist, 12 train / 6 val" in r.stdout, r.stderr
    as_recorded_before_mnist_t10k(run_dir)
    val = json.loads(run_module("dpbp.evaluate", ["--checkpoint", str(run_dir), "--json"]).stdout)
    assert (val["split"], val["samples"]) == ("val", 6)
    assert val["loss"] == json.loads((run_dir / "metrics.jsonl").read_text())["val_loss"]
    test = ["--checkpoint", str(run_dir), "--split", "test", "--set", "data.mnist_t10k=test",
            "--json"]
    one, two = (json.loads(run_module("dpbp.evaluate", test, ranks).stdout)
                for ranks in (None, 2))
    assert (one["loss"], one["accuracy"]) == (two["loss"], two["accuracy"])   # any world
    from dpbp.evaluate import report
    assert report(one).startswith(f"checkpoint {run_dir / 'checkpoints' / 'epoch-0001.npz'} "
                                  "(epoch 1): mnist test set, 6 samples")
    r = run_train(["--resume", "--set", f'run.dir="{run_dir}"', "--set", "train.epochs=2"])
    assert r.returncode == 0 and "data: mnist, 12 train / 6 val" in r.stdout, r.stderr
    assert 'mnist_t10k = "val"' in (run_dir / "config.toml").read_text()
