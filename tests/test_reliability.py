"""Failures under a real mpirun: stops that checkpoint and resume exactly, non-finite steps,
replicas that drift, a hung rank, a save killed half-way, a full disk.

The tiny dataset has 17 training samples: at batch_size 4, five steps per epoch (the
last with one sample), so steps 0-4 are epoch 1, 5-9 epoch 2 and 10-14 epoch 3.
"""

import json
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

from dpbp.service import checkpoint
from tests.conftest import model_arrays, mpi_env, mpirun, run_train
from tests.test_cli import assert_refused, snapshot, tiny_run

FULL = "epoch-0003.npz"


def metrics(run_dir):
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def assert_same_run(a, b):
    """Bitwise the same final weights and momentum, and the same losses and accuracies."""
    with np.load(a / "checkpoints" / FULL) as f, np.load(b / "checkpoints" / FULL) as g:
        for name in f.files:
            if name.startswith(("model.", "optimizer.")):
                assert f[name].tobytes() == g[name].tobytes(), name
    keys = ("epoch", "train_loss", "val_loss", "val_accuracy", "lr", "skipped_steps")
    assert [[m[k] for k in keys] for m in metrics(a)] == [[m[k] for k in keys] for m in metrics(b)]


@pytest.fixture
def uninterrupted(tmp_path, tiny_npz):
    run_dir = tmp_path / "full"
    r = run_train(tiny_run(tiny_npz, run_dir), ranks=2)
    assert r.returncode == 0, r.stderr
    return run_dir


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
    assert f"saved {run_dir / 'checkpoints' / saved}; continue with --resume" in r.stdout
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
    a, b = model_arrays(full / "checkpoints" / FULL), model_arrays(run_dir / "checkpoints" / FULL)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-12)
    for m, n in zip(metrics(full), metrics(run_dir)):
        assert m["train_loss"] == pytest.approx(n["train_loss"], rel=1e-12)
        assert m["val_accuracy"] == n["val_accuracy"]
    assert metrics(run_dir)[-1]["world_size"] == 3


def test_ctrl_c_to_the_whole_job_checkpoints_and_resumes(tmp_path):
    """A real SIGINT to mpirun and every rank (what Ctrl-C in a terminal sends). A job
    that went on would need hours for its epochs: stopping before the 60 s timeout is
    the proof that it stopped, on a machine of any speed."""
    run_dir = tmp_path / "run"
    cmd = mpirun(2) + [sys.executable, "-m", "dpbp.train", "--set", f'run.dir="{run_dir}"',
                       "--set", "data.samples=2000", "--set", "train.epochs=100000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=mpi_env(), start_new_session=True)
    guard = threading.Timer(120, os.killpg, (proc.pid, signal.SIGKILL))   # never hang
    guard.start()
    try:
        for line in proc.stdout:   # wait until training is under way
            if line.startswith("epoch") and " 2/100000" in line:
                break
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        guard.cancel()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "stopped by SIGINT" in out and "Traceback" not in err
    newest = checkpoint.list_all(run_dir)[-1][1]
    assert checkpoint.load(newest)["epoch"] >= 2
    r = run_train(["--set", f'run.dir="{run_dir}"', "--resume", "--set", "train.epochs=3"]
                  if checkpoint.load(newest)["epoch"] < 3 else
                  ["--set", f'run.dir="{run_dir}"', "--resume", "--set",
                   f"train.epochs={checkpoint.load(newest)['epoch'] + 1}"], ranks=2)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_nan_on_one_rank_is_caught_on_every_rank_in_the_same_step(tmp_path, tiny_npz, policy):
    run_dir = tmp_path / "run"
    r = run_train(tiny_run(tiny_npz, run_dir, "--set", f'train.on_nonfinite="{policy}"',
                           "--set", "run.sync_check_steps=1"),
                  ranks=3, env={"DPBP_FAULT": "nan:1:6"})
    ckpts = sorted(os.listdir(run_dir / "checkpoints"))
    if policy == "stop":
        assert_refused(r, "non-finite loss or gradient in epoch 2, batch 2 (step 7)", code=3)
        assert ckpts == ["epoch-0001.npz"]
    else:   # the step is dropped on every rank alike, so replicas stay identical
        assert r.returncode == 0, r.stderr
        assert [m["skipped_steps"] for m in metrics(run_dir)] == [0, 1, 0]
        assert all(np.isfinite(m["train_loss"]) for m in metrics(run_dir))
    for name in ckpts:
        for a in model_arrays(run_dir / "checkpoints" / name).values():
            assert np.isfinite(a).all()


def test_replicas_that_drift_apart_are_caught(tmp_path, tiny_npz):
    run_dir = tmp_path / "run"
    r = run_train(tiny_run(tiny_npz, run_dir, "--set", "run.sync_check_steps=2"), ranks=2,
                  env={"DPBP_FAULT": "perturb:1:6"})
    assert_refused(r, "replicas diverged by step 8", code=3)
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["epoch-0001.npz"]


def test_watchdog_ends_a_hung_job_with_every_rank_stack(tmp_path, tiny_npz):
    run_dir = tmp_path / "run"
    # The hung rank sleeps for an hour: only the watchdog can end the job before the
    # timeout fails the test, on a machine of any speed.
    r = run_train(tiny_run(tiny_npz, run_dir, "--set", "run.watchdog_seconds=2"), ranks=2,
                  env={"DPBP_FAULT": "hang:1:6"}, timeout=60)
    assert r.returncode != 0
    for rank in (0, 1):
        assert f"dpbp: rank {rank}: no training step finished in 2 s" in r.stderr, r.stderr
    assert 'faults.py", line' in r.stderr and "in inject" in r.stderr   # the hung rank's place


def test_a_save_killed_half_way_damages_nothing(tmp_path, tiny_npz, uninterrupted):
    """Rank 0 killed while writing the epoch-2 checkpoint: epoch 1's is intact, the
    partial file never carries a checkpoint's name, and --resume ends bitwise the same."""
    run_dir = tmp_path / "run"
    r = run_train(tiny_run(tiny_npz, run_dir), ranks=2, env={"DPBP_FAULT": "killsave:0:10"})
    assert r.returncode != 0
    names = os.listdir(run_dir / "checkpoints")
    assert "epoch-0001.npz" in names and "epoch-0002.npz" not in names
    assert any(n.endswith(".partial") for n in names)
    checkpoint.load(run_dir / "checkpoints" / "epoch-0001.npz")   # verifies its digest
    r = run_train(tiny_run(tiny_npz, run_dir, "--resume"), ranks=2)
    assert r.returncode == 0, r.stderr
    assert not any(n.endswith(".partial") for n in os.listdir(run_dir / "checkpoints"))
    assert_same_run(uninterrupted, run_dir)


def test_a_full_disk_stops_cleanly_and_keeps_earlier_checkpoints(tmp_path, tiny_npz):
    run_dir = tmp_path / "run"
    r = run_train(tiny_run(tiny_npz, run_dir), ranks=2, env={"DPBP_FAULT": "nospace:0:10"})
    assert_refused(r, "epoch-0002.npz (No space left on device); earlier checkpoints are "
                      "intact, --resume continues from the newest")
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["epoch-0001.npz"]
    checkpoint.load(run_dir / "checkpoints" / "epoch-0001.npz")


def test_old_checkpoints_are_pruned_after_a_newer_one_is_safe(tmp_path, tiny_npz):
    run_dir = tmp_path / "run"
    r = run_train(tiny_run(tiny_npz, run_dir, "--set", "run.keep_checkpoints=2",
                           "--set", "train.checkpoint_every_steps=2"))
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["epoch-0002-batch-000004.npz",
                                                           "epoch-0003.npz"]


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
    assert sorted(os.listdir(branch / "checkpoints")) == ["epoch-0002.npz", "epoch-0003.npz"]
    a, b = model_arrays(uninterrupted / "checkpoints" / FULL), model_arrays(branch / "checkpoints" / FULL)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert snapshot(run_dir) == before


def test_resume_of_a_format_1_checkpoint_at_the_same_world_size(tmp_path, tiny_npz):
    """dpbp 0.1's checkpoints (no digest, no partial loss sums) resume under mpirun."""
    run_dir = tmp_path / "run"
    assert run_train(tiny_run(tiny_npz, run_dir, "--set", "train.epochs=1"), ranks=2
                     ).returncode == 0
    path = run_dir / "checkpoints" / "epoch-0001.npz"
    with np.load(path) as f:
        old = {k: f[k] for k in f.files
               if k not in ("digest", "batch", "skipped", "counted", "loss_sums")}
    np.savez(path, **dict(old, format_version=np.int64(1)))
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
