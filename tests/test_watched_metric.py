"""run.best_metric and the plateau schedule end to end: the best checkpoint, early stopping
and the learning rate follow the watched metric (val_accuracy here, higher is better),
as the references in tests/test_history.py decide; a branch from a mid-epoch checkpoint
and a run at 2 ranks decide bit for bit as the uninterrupted run of one process."""

import json

import dpbp.train
from dpbp.service import checkpoint
from tests.conftest import metrics, model_arrays, run_train, tiny_run
from tests.test_history import PlateauReference, keras_early_stopping

FINAL = "epoch-0006.npz"   # where early stopping ends the runs below


def watched_run(npz, run_dir, *more):
    """8 epochs of 5 steps on the tiny dataset, watching val_accuracy (7 validation
    samples: ties are common) with the best checkpoint, early stopping (patience 4) and
    the plateau schedule (halving the lr at every epoch without improvement, after a
    one-epoch warmup); a mid-epoch checkpoint every 3 steps, all kept."""
    sets = dict(train__epochs=8, run__best_metric="val_accuracy", run__keep_best="true",
                train__early_stopping_patience=4, train__schedule="plateau",
                train__plateau_patience=0, train__plateau_factor=0.5, train__warmup_epochs=1,
                train__deterministic="true", train__checkpoint_every_steps=3,
                run__keep_checkpoints=0)
    return tiny_run(npz, run_dir, *[a for k, v in sets.items()
                                     for a in ("--set", f"{k.replace('__', '.')}={v}")], *more)


def test_the_best_checkpoint_early_stopping_and_the_lr_follow_val_accuracy(
        tmp_path, tiny_npz, in_process):
    run_dir = tmp_path / "run"
    code, out, _ = in_process(dpbp.train.main, watched_run(tiny_npz, run_dir))
    assert code == 0, out
    m = metrics(run_dir)
    accuracy, losses, E = [e["val_accuracy"] for e in m], [e["val_loss"] for e in m], len(m)
    assert E == keras_early_stopping(accuracy, 4, 0.0, "max") < 8
    assert "stopped early (no val_accuracy improvement > 0 in 4 epochs)" in out
    best = accuracy.index(max(accuracy)) + 1   # the earlier of equal ones
    assert best != losses.index(min(losses)) + 1   # val_loss would have chosen another
    saved = checkpoint.load(checkpoint.best_path(run_dir))
    assert saved["epoch"] == best
    assert json.loads((run_dir / "run.json").read_text())["best"]["epoch"] == best
    reference = PlateauReference(0.05, "max", 0.5, 0, 1e-4, 0, 0.0)   # watches epochs 2 on
    lrs = [0.05, 0.05] + [reference.step(a) for a in accuracy[1:E - 1]]
    assert [e["lr"] for e in m] == lrs and len(set(lrs)) >= 3   # cut twice, as torch would
    code, _, err = in_process(dpbp.train.main, watched_run(tiny_npz, run_dir, "--resume", "--set",
                                                      "run.best_metric=val_loss"))
    assert code == 2 and "run.best_metric was \"val_accuracy\"" in err, err
    code, _, err = in_process(dpbp.train.main, ["--set", "data.samples=40", "--set",
                                           "data.val_fraction=0", "--set",
                                           "train.schedule=plateau", "--set",
                                           f'run.dir="{tmp_path / "noval"}"'])
    assert code == 2 and 'train.schedule = "plateau" needs validation data' in err, err


def test_a_branch_mid_epoch_and_two_ranks_decide_as_one_uninterrupted_process(
        tmp_path, tiny_npz, in_process):
    """The plateau's rate, the best checkpoint and early stopping come from the metric
    history in metrics.jsonl, the same bits at any world size (train.deterministic)."""
    one, branch, two = tmp_path / "one", tmp_path / "branch", tmp_path / "two"
    assert in_process(dpbp.train.main, watched_run(tiny_npz, one))[0] == 0
    mid = one / "checkpoints" / "epoch-0003-batch-000003.npz"   # epoch 4 trains at a cut lr
    code, out, _ = in_process(dpbp.train.main, watched_run(tiny_npz, branch, "--resume", mid))
    assert code == 0 and f"resume: from {mid}" in out
    r = run_train(watched_run(tiny_npz, two), ranks=2)
    assert r.returncode == 0, r.stderr
    keys = ("epoch", "train_loss", "val_loss", "val_accuracy", "lr", "stopped")
    for run_dir in (branch, two):
        assert [[e.get(k) for k in keys] for e in metrics(run_dir)] == \
            [[e.get(k) for k in keys] for e in metrics(one)], run_dir
        for name in (FINAL, "best.npz"):
            a, b = (model_arrays(d / "checkpoints" / name) for d in (one, run_dir))
            assert all(a[k].tobytes() == b[k].tobytes() for k in a), (run_dir, name)

