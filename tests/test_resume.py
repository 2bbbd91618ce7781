"""`--resume` end to end: bitwise where it promises bits, and refusals that change nothing.

It continues a run bitwise (after a stop, a signal, a killed rank, from a step
checkpoint), to rounding at another world size, from a chosen checkpoint into a branch,
from dpbp 0.1's checkpoints; it refuses what does not fit and sets damage aside.

The tiny dataset has 17 training samples: at batch_size 4, five steps per epoch (the
last with one sample), so steps 0-4 are epoch 1, 5-9 epoch 2 and 10-14 epoch 3.
"""

import fcntl
import json
import os
import shutil
import signal

import numpy as np
import pytest

from dpbp.service import checkpoint
from tests.conftest import (
    FULL,
    ROOT,
    assert_refused,
    assert_same_run,
    metrics,
    model_arrays,
    relative_run,
    run_train,
    snapshot,
    tiny_run,
    two_folders,
)


@pytest.mark.parametrize("first_ranks,resume_ranks", [(None, None), (2, 3)])
def test_resume_continues_the_run(tmp_path, tiny_npz, first_ranks, resume_ranks):
    """Stopped after 1 epoch and resumed to 3: bitwise the uninterrupted run at the same
    world size; at another world size equal to rounding."""
    f64 = ["--set", 'model.dtype="float64"']
    full = run_train(tiny_run(tiny_npz, tmp_path / "full", *f64), ranks=first_ranks)
    assert full.returncode == 0, full.stderr
    part = tiny_run(tiny_npz, tmp_path / "part", *f64)
    assert run_train(part + ["--set", "train.epochs=1"], ranks=first_ranks).returncode == 0
    r = run_train(part + ["--resume"], ranks=resume_ranks)
    assert r.returncode == 0, r.stderr
    assert "resume: from" in r.stdout and "train.epochs changed from 1 to 3" in r.stdout
    a = model_arrays(tmp_path / "full" / "checkpoints" / "epoch-0003.npz")
    b = model_arrays(tmp_path / "part" / "checkpoints" / "epoch-0003.npz")
    for name in a:
        if first_ranks == resume_ranks:
            np.testing.assert_array_equal(a[name], b[name])
        else:
            np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-12)
    epochs = [json.loads(line)["epoch"] for line in open(tmp_path / "part" / "metrics.jsonl")]
    assert epochs == [1, 2, 3]
    before = snapshot(tmp_path / "part")
    done = run_train(part + ["--resume", "--set", "train.lr=0.5"])
    assert done.returncode == 0 and "nothing to do" in done.stdout
    assert snapshot(tmp_path / "part") == before   # a finished run is left untouched


def test_resume_refuses_another_network(tmp_path, tiny_npz):
    run_dir = tmp_path / "run"
    assert run_train(tiny_run(tiny_npz, run_dir)).returncode == 0
    before = snapshot(run_dir)
    r = run_train(tiny_run(tiny_npz, run_dir, "--set", "model.hidden=[9]", "--resume"))
    assert_refused(r, "model.hidden was [8]")
    assert snapshot(run_dir) == before


def test_killed_run_resumes_to_the_same_weights(tmp_path, tiny_npz):
    """A rank killed in epoch 2 ends the job; --resume from the epoch-1 checkpoint then
    finishes with bitwise the weights of a run that was never interrupted."""
    full = run_train(tiny_run(tiny_npz, tmp_path / "full"), ranks=2)
    assert full.returncode == 0, full.stderr
    args = tiny_run(tiny_npz, tmp_path / "crash")
    crashed = run_train(args, ranks=2, env={"DPBP_FAULT": "kill:1:7"})   # 5 steps per epoch
    assert crashed.returncode != 0
    assert sorted(os.listdir(tmp_path / "crash" / "checkpoints")) == ["epoch-0001.npz",
                                                                      "last.npz"]
    resumed = run_train(args + ["--resume"], ranks=2)
    assert resumed.returncode == 0, resumed.stderr
    a = model_arrays(tmp_path / "full" / "checkpoints" / "epoch-0003.npz")
    b = model_arrays(tmp_path / "crash" / "checkpoints" / "epoch-0003.npz")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_resume_with_malformed_metrics_is_refused(tmp_path, tiny_npz):
    run_dir = tmp_path / "run"
    assert run_train(tiny_run(tiny_npz, run_dir, "--set", "train.epochs=1")).returncode == 0
    (run_dir / "metrics.jsonl").write_text("{not json\n")
    before = snapshot(run_dir)
    r = run_train(tiny_run(tiny_npz, run_dir, "--resume"), ranks=2)
    assert_refused(r, "metrics.jsonl is malformed")
    assert snapshot(run_dir) == before


def test_resume_uses_the_runs_own_config(tmp_path, tiny_npz):
    """--resume alone continues with the saved config; only what the command line says
    explicitly changes (here the number of epochs)."""
    run_dir = tmp_path / "run"
    first = tiny_run(tiny_npz, run_dir, "--set", "train.lr=0.3", "--set", "train.epochs=1")
    assert run_train(first).returncode == 0
    r = run_train(["--resume", "--set", f'run.dir="{run_dir}"', "--set", "train.epochs=2"],
                  ranks=2)
    assert r.returncode == 0, r.stderr
    saved = (run_dir / "config.toml").read_text()
    assert f'path = "{tiny_npz}"' in saved and "lr = 0.3" in saved
    assert "resume: train.epochs changed from 1 to 2" in r.stdout
    assert "lr changed" not in r.stdout and "epoch 2/2" in r.stdout


def test_resume_notes_what_it_ignores_or_resplits(tmp_path, tiny_npz):
    run_dir = tmp_path / "run"
    assert run_train(tiny_run(tiny_npz, run_dir, "--set", "train.epochs=1")).returncode == 0
    r = run_train(tiny_run(tiny_npz, run_dir, "--resume", "--set", 'model.init="w.npz"',
                           "--set", "run.seed=5", "--set", "train.epochs=2"))
    assert r.returncode == 0, r.stderr
    assert f'model.init changed from "" to "{ROOT / "w.npz"}" (ignored' in r.stdout   # resolved
    assert "run.seed changed from 0 to 5 (the data order and validation split" in r.stdout


def test_stale_temporaries_are_cleaned_and_damaged_checkpoints_set_aside(tmp_path, tiny_npz):
    """--resume falls back past checkpoints that do not verify, names them and sets them
    aside; with none left it is a clear error that changes nothing."""
    run_dir = tmp_path / "run"
    assert run_train(tiny_run(tiny_npz, run_dir, "--set", "train.epochs=1")).returncode == 0
    ckpts = run_dir / "checkpoints"
    stale = ckpts / ".tmp-abc123.partial"
    stale.write_bytes(b"half a checkpoint")
    assert run_train(tiny_run(tiny_npz, run_dir, "--set", "train.epochs=2", "--resume"),
                     ranks=2).returncode == 0
    assert not stale.exists()
    (ckpts / "epoch-0003.npz").write_bytes(b"garbage")
    (ckpts / "epoch-0004.npz").write_bytes((ckpts / "epoch-0001.npz").read_bytes())   # renamed
    r = run_train(tiny_run(tiny_npz, run_dir, "--resume"), ranks=2)
    assert r.returncode == 0, r.stderr
    assert "epoch-0004.npz is damaged (checkpoint" in r.stdout and "not the position in its name" in r.stdout
    assert "epoch-0003.npz is damaged (checkpoint" in r.stdout and "not a readable .npz" in r.stdout
    assert f"resume: from {ckpts / 'epoch-0002.npz'} (epoch 2" in r.stdout
    assert sorted(os.listdir(ckpts)) == ["epoch-0001.npz", "epoch-0002.npz", "epoch-0003.npz",
                                         "epoch-0003.npz.damaged", "epoch-0004.npz.damaged",
                                         "last.npz"]
    for name in os.listdir(ckpts):
        if name.endswith(".npz"):
            (ckpts / name).write_bytes(b"garbage")
    before = snapshot(run_dir)
    r = run_train(tiny_run(tiny_npz, run_dir, "--resume"), ranks=2)
    assert_refused(r, "none of the 3 checkpoints in")
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("fault,code,saved", [
    ("sigterm:1:6", 128 + signal.SIGTERM, "epoch-0001-batch-000003.npz"),   # mid-epoch
    ("sigint:0:8", 128 + signal.SIGINT, "epoch-0002.npz"),       # agreed in an epoch's last step
])
def test_a_signal_checkpoints_and_resume_is_bitwise(tmp_path, tiny_npz, uninterrupted, fault,
                                                     code, saved):
    """SIGTERM or SIGINT on one rank during step S: the ranks agree on it after step S + 1
    (the vote runs a step behind), rank 0 saves where they are, and --resume ends bitwise
    where an uninterrupted run ends."""
    run_dir = tmp_path / "run"
    r = run_train(tiny_run(tiny_npz, run_dir), ranks=2, env={"DPBP_FAULT": fault})
    assert r.returncode == code, r.stderr
    assert f"stopped by {signal.Signals(code - 128).name}" in r.stdout
    assert (f"saved {run_dir / 'checkpoints' / saved}; continue with the same command and "
            f"--resume (or --resume auto), in run.dir {run_dir}") in r.stdout
    assert json.loads((run_dir / "run.json").read_text())["state"] == "stopped"
    assert os.path.basename(checkpoint.list_all(run_dir)[-1][1]) == saved
    r = run_train(tiny_run(tiny_npz, run_dir, "--resume"), ranks=2)
    assert r.returncode == 0, r.stderr
    assert_same_run(uninterrupted, run_dir)


def test_resume_from_a_step_checkpoint_after_a_kill_is_bitwise(tmp_path, tiny_npz,
                                                                uninterrupted):
    run_dir = tmp_path / "run"
    args = tiny_run(tiny_npz, run_dir, "--set", "train.checkpoint_every_steps=3",
                    "--set", "run.keep_checkpoints=0")
    r = run_train(args, ranks=2, env={"DPBP_FAULT": "kill:1:13"})
    assert r.returncode != 0
    assert [os.path.basename(p) for _, p in checkpoint.list_all(run_dir)] == [
        "epoch-0000-batch-000003.npz", "epoch-0001.npz", "epoch-0001-batch-000001.npz",
        "epoch-0001-batch-000004.npz", "epoch-0002.npz", "epoch-0002-batch-000002.npz"]
    r = run_train(args + ["--resume"], ranks=2)
    assert r.returncode == 0, r.stderr
    assert "resume: from" in r.stdout and "epoch-0002-batch-000002.npz (epoch 2, batch 2" in r.stdout
    assert_same_run(uninterrupted, run_dir)
    # the first epoch's line: its loss is the whole epoch's, its time and speed the rest's
    line = next(line for line in r.stdout.splitlines() if line.startswith("epoch 3/3"))
    assert line.endswith("samples/s  (resumed after batch 2: time and speed of the rest)")
    assert [m.get("resumed_after_batch") for m in metrics(run_dir)] == [None, None, 2]


def test_resume_at_another_world_size_matches_to_rounding(tmp_path, tiny_npz):
    """Stopped mid-epoch at 2 ranks, resumed at 3: the same global batches in the same
    order, so the weights agree with an uninterrupted run to rounding (float64)."""
    f64 = ("--set", 'model.dtype="float64"')
    full = tmp_path / "full"
    assert run_train(tiny_run(tiny_npz, full, *f64), ranks=2).returncode == 0
    run_dir = tmp_path / "run"
    r = run_train(tiny_run(tiny_npz, run_dir, *f64), ranks=2, env={"DPBP_FAULT": "sigterm:0:7"})
    assert r.returncode == 128 + signal.SIGTERM, r.stderr
    r = run_train(tiny_run(tiny_npz, run_dir, *f64, "--resume"), ranks=3)
    assert r.returncode == 0, r.stderr
    assert ("resume: written by 2 ranks, continued by 3: the same global batches in the same "
            "order; the sums round differently, so the weights agree to rounding") in r.stdout
    a, b = model_arrays(full / "checkpoints" / FULL), model_arrays(run_dir / "checkpoints" / FULL)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-12)
    for m, n in zip(metrics(full), metrics(run_dir)):
        assert m["train_loss"] == pytest.approx(n["train_loss"], rel=1e-12)
        assert m["val_accuracy"] == n["val_accuracy"]
    assert metrics(run_dir)[-1]["world_size"] == 3


def test_resume_from_a_chosen_checkpoint(tmp_path, tiny_npz, uninterrupted):
    """--resume PATH: continuing an older checkpoint in place would fork the run's
    history, so it is refused; branching into a new run directory is how."""
    run_dir = tmp_path / "run"
    assert run_train(tiny_run(tiny_npz, run_dir), ranks=2).returncode == 0
    older = run_dir / "checkpoints" / "epoch-0001.npz"
    before = snapshot(run_dir)
    r = run_train(["--resume", str(older)])
    assert_refused(r, f"{run_dir} holds a newer checkpoint than {older}")
    assert snapshot(run_dir) == before
    branch = tmp_path / "branch"
    r = run_train(["--resume", str(older), "--set", f'run.dir="{branch}"'], ranks=2)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(branch / "checkpoints")) == ["epoch-0002.npz", "epoch-0003.npz",
                                                          "last.npz"]
    a, b = model_arrays(uninterrupted / "checkpoints" / FULL), model_arrays(branch / "checkpoints" / FULL)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("version", [1, 2])
def test_resume_of_a_format_1_or_2_checkpoint_at_the_same_world_size(tmp_path, tiny_npz,
                                                                     version):
    """dpbp 0.1's checkpoints (no digest, no partial loss sums) and those of format 2
    (which do not record the network: it comes from their config) resume under mpirun."""
    run_dir = tmp_path / "run"
    assert run_train(tiny_run(tiny_npz, run_dir, "--set", "train.epochs=1"), ranks=2
                     ).returncode == 0
    path = run_dir / "checkpoints" / "epoch-0001.npz"
    dropped = ("network", "input_shape", "digest") + (
        ("batch", "skipped", "counted", "loss_sums") if version == 1 else ())
    with np.load(path) as f:
        old = dict({k: f[k] for k in f.files if k not in dropped},
                   format_version=np.int64(version))
    np.savez(path, **old, **({"digest": np.str_(checkpoint.digest(old))} if version == 2
                             else {}))
    r = run_train(tiny_run(tiny_npz, run_dir, "--resume", "--set", "train.epochs=2"), ranks=2)
    assert r.returncode == 0, r.stderr


def test_a_branch_keeps_the_history_it_branches_from(tmp_path, tiny_npz):
    """--resume PATH into a new run.dir starts its metrics with the parent's epochs up to
    PATH, not with what an earlier failed run left in that directory."""
    parent = tmp_path / "parent"
    assert run_train(tiny_run(tiny_npz, parent)).returncode == 0
    branch = tmp_path / "branch"
    failed = run_train(tiny_run(tiny_npz, branch, "--set", "run.seed=7"),
                       env={"DPBP_FAULT": "nospace:0:5"})   # fails saving its epoch 1
    assert failed.returncode == 2 and len(metrics(branch)) == 1
    r = run_train(["--resume", str(parent / "checkpoints" / "epoch-0002.npz"),
                   "--set", f'run.dir="{branch}"'])
    assert r.returncode == 0, r.stderr
    assert metrics(branch)[:2] == metrics(parent)[:2]
    assert [m["epoch"] for m in metrics(branch)] == [1, 2, 3]


def test_a_torn_metrics_line_is_dropped(tmp_path, tiny_npz):
    """A crash mid-append leaves a line without its newline: --resume drops it (that epoch
    is trained again)."""
    run_dir = tmp_path / "run"
    r = run_train(tiny_run(tiny_npz, run_dir), ranks=2, env={"DPBP_FAULT": "sigterm:0:12"})
    assert r.returncode == 128 + signal.SIGTERM
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "train_lo')
    r = run_train(tiny_run(tiny_npz, run_dir, "--resume"), ranks=2)
    assert r.returncode == 0, r.stderr
    assert [m["epoch"] for m in metrics(run_dir)] == [1, 2, 3]


# ----------------------------------------------------------------------------- the run's data

def test_a_resume_from_another_folder_trains_on_the_runs_own_data(tmp_path):
    """The run records its data by absolute path and identity: resumed from a folder
    whose data/d.npz differs, it goes on with its own data, bitwise as if never stopped."""
    a, b = two_folders(tmp_path)
    full, run_dir = tmp_path / "full", tmp_path / "run"
    assert run_train(relative_run(full, "--set", "train.epochs=3"), cwd=a).returncode == 0
    assert run_train(relative_run(run_dir, "--set", "train.epochs=1"), cwd=a).returncode == 0
    r = run_train(["--set", f'run.dir="{run_dir}"', "--resume", "--set", "train.epochs=3"],
                  cwd=b)
    assert r.returncode == 0, r.stderr
    assert_same_run(full, run_dir)


def test_a_resume_whose_data_changed_stops_unless_asked_for(tmp_path):
    a, b = two_folders(tmp_path)
    run_dir = tmp_path / "run"
    assert run_train(relative_run(run_dir, "--set", "train.epochs=1"), cwd=a).returncode == 0
    with np.load(a / "data" / "d.npz") as f:   # relabelled: the same inputs and shapes
        arrays = dict(f)
    np.savez(a / "data" / "d.npz", **dict(arrays, y=(arrays["y"] + 1) % 3))
    before = snapshot(run_dir)
    resume = ["--set", f'run.dir="{run_dir}"', "--resume", "--set", "train.epochs=2"]
    r = run_train(resume, cwd=b, ranks=2)
    assert_refused(r, f"the data differ from what {run_dir / 'checkpoints' / 'epoch-0001.npz'}"
                      " was trained on (y: (17,) int64 crc ")
    assert "add --allow-data-change" in r.stderr
    assert snapshot(run_dir) == before
    r = run_train(resume + ["--set", 'data.path="data/d.npz"'], cwd=b)   # naming: not enough
    assert_refused(r, "the data differ from what")
    assert snapshot(run_dir) == before
    r = run_train(resume + ["--set", 'data.path="data/d.npz"', "--allow-data-change"], cwd=b)
    assert r.returncode == 0, r.stderr
    assert "training on other data (--allow-data-change)" in r.stdout
    assert [m.get("data_changed") for m in metrics(run_dir)] == [None, True]
    changes = json.loads((run_dir / "run.json").read_text())["data_changes"]
    assert [c["step"] for c in changes] == [5] and changes[0]["from"] != changes[0]["to"]


def test_a_resume_refused_because_another_run_holds_the_folder_says_so(tmp_path, tiny_npz):
    run_dir = tmp_path / "run"
    assert run_train(tiny_run(tiny_npz, run_dir)).returncode == 0
    with open(run_dir / ".lock", "a+") as held:   # as a live run holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = run_train(["--resume", str(run_dir / "checkpoints" / "epoch-0001.npz")])
    assert_refused(r, f"run.dir {run_dir} is in use by another dpbp run")


def test_the_step_log_resumes_where_the_run_resumes(tmp_path, tiny_npz, uninterrupted):
    """Steps logged after the checkpoint a run resumes from are dropped (they are trained
    again): the resumed run's steps.jsonl has each step once."""
    run_dir = tmp_path / "run"
    log = ("--set", "run.log_every_steps=1", "--set", "train.checkpoint_every_steps=3")
    r = run_train(tiny_run(tiny_npz, run_dir, *log), ranks=2, env={"DPBP_FAULT": "kill:1:8"})
    assert r.returncode != 0
    r = run_train(tiny_run(tiny_npz, run_dir, *log, "--resume"), ranks=2)
    assert r.returncode == 0, r.stderr
    steps = [json.loads(line)["step"] for line in open(run_dir / "steps.jsonl")]
    assert steps == list(range(1, 16))
ADAMW_DROPOUT = ("--set", 'train.optimizer="adamw"', "--set", "train.lr=0.01",
                 "--set", "train.amsgrad=true", "--set", "train.weight_decay=0.01",
                 "--set", "model.dropout=0.25")


def test_adamw_and_dropout_resume_bitwise(tmp_path, tiny_npz):
    """Stopped mid-epoch (SIGTERM) or at an epoch's end (SIGINT) and resumed: the weights,
    the moments and step count, and every logged figure of the uninterrupted run."""
    full = tmp_path / "full"
    assert run_train(tiny_run(tiny_npz, full, *ADAMW_DROPOUT), ranks=2).returncode == 0
    for fault, saved in (("sigterm:1:6", "epoch-0001-batch-000003.npz"),
                         ("sigint:0:8", "epoch-0002.npz")):
        run_dir = tmp_path / fault.replace(":", "-")
        args = tiny_run(tiny_npz, run_dir, *ADAMW_DROPOUT)
        r = run_train(args, ranks=2, env={"DPBP_FAULT": fault})
        assert r.returncode != 0 and saved in r.stdout, r.stderr
        r = run_train(args + ["--resume"], ranks=2)
        assert r.returncode == 0, r.stderr
        assert_same_run(full, run_dir)
    with np.load(full / "checkpoints" / FULL) as f:
        assert int(f["optimizer.step"]) == 15 and "optimizer.max_exp_avg_sq" in f.files


def test_adamw_and_dropout_resume_at_another_world_size_matches_to_rounding(tmp_path,
                                                                           tiny_npz):
    """A row's dropout mask does not depend on which rank holds it, so a run stopped at 3
    ranks and resumed at 2 continues as the uninterrupted one, to rounding (float64), and
    the resumed epoch's loss still counts every rank's part of it (fewer ranks now than
    partial sums saved)."""
    more = ADAMW_DROPOUT + ("--set", 'model.dtype="float64"')
    full, run_dir = tmp_path / "full", tmp_path / "run"
    assert run_train(tiny_run(tiny_npz, full, *more), ranks=2).returncode == 0
    r = run_train(tiny_run(tiny_npz, run_dir, *more), ranks=3, env={"DPBP_FAULT": "sigterm:0:7"})
    assert r.returncode == 128 + signal.SIGTERM, r.stderr
    r = run_train(tiny_run(tiny_npz, run_dir, *more, "--resume"), ranks=2)
    assert r.returncode == 0, r.stderr
    with np.load(full / "checkpoints" / FULL) as f, np.load(run_dir / "checkpoints" / FULL) as g:
        for name in f.files:
            if name.startswith(("model.", "optimizer.")):
                np.testing.assert_allclose(f[name], g[name], rtol=1e-10, atol=1e-12,
                                           err_msg=name)
    for m, n in zip(metrics(full), metrics(run_dir)):
        assert m["train_loss"] == pytest.approx(n["train_loss"], rel=1e-12)


def test_resume_respects_the_early_stopping_count(tmp_path, tiny_npz):
    """Early stopping counts from the run's history: a run stopped by a signal and resumed
    stops at the same epoch, with the same metrics and the same best checkpoint."""
    more = ("--set", "train.epochs=30", "--set", "train.early_stopping_patience=2",
            "--set", "run.keep_best=true", "--set", "run.keep_checkpoints=1") + ADAMW_DROPOUT
    full, run_dir = tmp_path / "full", tmp_path / "run"
    assert run_train(tiny_run(tiny_npz, full, *more), ranks=2).returncode == 0
    stopped = len(metrics(full))
    assert 3 <= stopped < 30 and metrics(full)[-1]["stopped"] == "early_stopping"
    fault = f"sigterm:0:{5 * (stopped - 1) - 3}"   # during the epoch before the last
    r = run_train(tiny_run(tiny_npz, run_dir, *more), ranks=2, env={"DPBP_FAULT": fault})
    assert r.returncode == 128 + signal.SIGTERM, r.stderr
    r = run_train(tiny_run(tiny_npz, run_dir, *more, "--resume"), ranks=2)
    assert r.returncode == 0 and "stopped early" in r.stdout, r.stderr
    keys = ("epoch", "train_loss", "val_loss", "val_accuracy", "stopped")
    assert [[m.get(k) for k in keys] for m in metrics(full)] == \
        [[m.get(k) for k in keys] for m in metrics(run_dir)]
    for name in (f"epoch-{stopped:04d}.npz", "best.npz"):
        a = model_arrays(full / "checkpoints" / name)
        b = model_arrays(run_dir / "checkpoints" / name)
        assert all(a[k].tobytes() == b[k].tobytes() for k in a), name
