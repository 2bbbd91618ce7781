"""Failures under a real mpirun: each one stops every rank cleanly and damages nothing.

A failing rank ends the job, divergence, ranks that loaded different data, Ctrl-C to the
whole job, non-finite steps, replicas that drift, a hung rank, a save killed half-way,
a full disk, old checkpoints pruned; a rank frozen in set-up (also before the config is
read), SIGTERM in set-up, SIGHUP,
a launcher that is gone.

The tiny dataset has 17 training samples: at batch_size 4, five steps per epoch (the
last with one sample), so steps 0-4 are epoch 1, 5-9 epoch 2 and 10-14 epoch 3.
"""

import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

from dpbp.service import checkpoint, processes
from tests.conftest import (
    ROOT,
    assert_refused,
    assert_same_run,
    metrics,
    model_arrays,
    mpi_env,
    mpirun,
    run_train,
    run_with_timeout,
    tiny_run,
)


@pytest.mark.parametrize("fault,expect", [
    ("raise:1:2", "rank 1 failed: RuntimeError: injected fault at step 2"),
    ("exit:2:3", "rank 2 failed: exited with sys.exit(5)"),
    ("kill:1:2", None),   # SIGKILL leaves no last word: the launcher reports it
])
def test_one_failing_rank_ends_the_whole_job(tmp_path, tiny_npz, fault, expect):
    # With the watchdog off, a rank that waited on the failed one would wait until the
    # timeout fails the test: the job ending by itself is the proof, on a machine of any
    # speed, that no rank waits.
    r = run_train(tiny_run(tiny_npz, tmp_path / "run", "--set", "run.watchdog_seconds=0"),
                  ranks=3, env={"DPBP_FAULT": fault}, timeout=120)
    assert r.returncode != 0
    if expect:
        lines = [line for line in r.stderr.splitlines() if line.startswith("dpbp")]
        assert lines == [f"dpbp: {expect}; ending the job"], r.stderr
    assert not (tmp_path / "run" / "checkpoints" / "epoch-0001.npz").exists()


def test_divergence_stops_every_rank_and_saves_nothing_of_it(tmp_path, tiny_npz):
    run_dir = tmp_path / "run"
    r = run_train(tiny_run(tiny_npz, run_dir, "--set", "train.lr=1e30"), ranks=3)
    assert_refused(r, "non-finite loss or gradient in epoch 1, batch 2 (step 2)", code=3)
    assert "RuntimeWarning" not in r.stderr
    assert os.listdir(run_dir / "checkpoints") == []
    assert (run_dir / "metrics.jsonl").read_text() == ""
    # the same directory takes a new attempt at once: nothing there is worth keeping
    r = run_train(tiny_run(tiny_npz, run_dir, "--set", "train.lr=0.05"), ranks=2)
    assert r.returncode == 0, r.stderr
    assert "ended before its first checkpoint; starting afresh" in r.stdout
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3


def test_ranks_that_loaded_different_data_are_stopped(tmp_path, tiny_npz):
    other = tmp_path / "other.npz"
    with np.load(tiny_npz) as f:
        np.savez(other, **dict({k: f[k] for k in f.files}, x=f["x"] + 1))   # same shapes
    rank_args = [[sys.executable, "-m", "dpbp.train",
                  *tiny_run(path, tmp_path / "run")] for path in (tiny_npz, other)]
    cmd = mpirun(1) + rank_args[0] + [":", "-n", "1"] + rank_args[1]   # one MPMD job
    r = run_with_timeout(cmd, timeout=120)
    assert_refused(r, "the ranks loaded different configs or data")
    assert not (tmp_path / "run").exists()


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
        assert ckpts == ["epoch-0001.npz", "last.npz"]
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
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["epoch-0001.npz", "last.npz"]


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
    assert "dpbp: rank 0: no training step finished in 2 s (run.watchdog_seconds), waiting " \
        "in MPI for another rank;" in r.stderr   # which one froze, for people and dpbp.launch
    assert "dpbp: rank 1: no training step finished in 2 s (run.watchdog_seconds), stuck " \
        "outside MPI (in faults.py:" in r.stderr


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
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["epoch-0001.npz", "last.npz"]
    checkpoint.load(run_dir / "checkpoints" / "epoch-0001.npz")


def test_old_checkpoints_are_pruned_after_a_newer_one_is_safe(tmp_path, tiny_npz):
    run_dir = tmp_path / "run"
    r = run_train(tiny_run(tiny_npz, run_dir, "--set", "run.keep_checkpoints=2",
                           "--set", "train.checkpoint_every_steps=2"))
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["epoch-0002-batch-000004.npz",
                                                           "epoch-0003.npz", "last.npz"]


# ----------------------------------------------------------------------------- hardening

def test_a_rank_frozen_while_loading_the_data_is_ended_by_the_watchdog(tmp_path, tiny_npz):
    """The watchdog watches set-up too: a rank that freezes while it loads the data (it
    sleeps for an hour) leaves the others waiting in the next agreement, until the
    watchdog ends the job with its usual message."""
    run_dir = tmp_path / "run"
    r = run_train(tiny_run(tiny_npz, run_dir, "--set", "run.watchdog_seconds=2"), ranks=2,
                  env={"DPBP_FAULT": "hangload:1:0"}, timeout=60)
    assert r.returncode != 0
    assert "dpbp: rank 0: set-up did not finish in 2 s (run.watchdog_seconds)" in r.stderr
    assert not run_dir.exists()   # made only once set-up is done


def test_the_watchdog_watches_before_the_config_is_read(tmp_path):
    """From the command's start: a process that freezes while it reads the config (a
    stalled filesystem under the config file, or under the checkpoint a resume reads)
    is ended by the watchdog at the limit the command starts it with, the default of
    run.watchdog_seconds (lowered from the test side to 1 s), with its stack."""
    r = run_train(["--set", f'run.dir="{tmp_path / "run"}"'], timeout=60,
                  env={"DPBP_FAULT": "hangconfig:0:0", "DPBP_FAULT_WATCHDOG": "1"})
    assert r.returncode == 4, r.stderr
    assert "dpbp: rank 0: set-up did not finish in 1 s (run.watchdog_seconds)" in r.stderr
    assert "in load_config" in r.stderr   # the frozen place, in the stack
    assert not (tmp_path / "run").exists()


def test_sigterm_during_set_up_exits_143_and_writes_nothing(tmp_path, tiny_npz):
    run_dir = tmp_path / "run"
    r = run_train(tiny_run(tiny_npz, run_dir), ranks=2, env={"DPBP_FAULT": "termload:0:0"})
    assert r.returncode == 128 + signal.SIGTERM, r.stderr
    assert "dpbp: stopped by SIGTERM during set-up; nothing was trained" in r.stderr
    assert "Traceback" not in r.stderr and not run_dir.exists()


@pytest.mark.parametrize("name,point,entry", [
    ("SIGINT", "import:numpy", "-m"),                   # dpbp.train's first import
    ("SIGTERM", "call:dpbp.parallel.comm.init", "-m"),   # before StopSignals is set up
    ("SIGINT", "import:mpi4py.MPI", "-m"),              # while MPI starts
    ("SIGINT", "import:numpy", "script"),               # the dpbp-train script's
])
def test_a_stop_signal_from_the_first_line_on_ends_set_up_as_documented(tmp_path, tiny_npz,
                                                                        name, point, entry):
    """Ctrl-C or SIGTERM at a chosen point of the start (tests/signal_at.py), not by
    timing: always the one documented line and 128 + the signal's number."""
    run_dir = tmp_path / "run"
    r = run_with_timeout([sys.executable, "-m", "tests.signal_at", name, point, entry,
                          *tiny_run(tiny_npz, run_dir)], 60, env={"PYTHONPATH": str(ROOT)})
    assert r.returncode == 128 + signal.Signals[name], r.stderr
    assert r.stderr == f"dpbp: stopped by {name} during set-up; nothing was trained\n"
    assert r.stdout == "" and not run_dir.exists()


def test_sighup_checkpoints_and_resume_is_bitwise(tmp_path, tiny_npz, uninterrupted):
    """SIGHUP (a closed terminal or ssh session) is a stop request like SIGTERM."""
    run_dir = tmp_path / "run"
    r = run_train(tiny_run(tiny_npz, run_dir), ranks=2, env={"DPBP_FAULT": "sighup:1:6"})
    assert r.returncode == 128 + signal.SIGHUP, r.stderr
    assert "stopped by SIGHUP" in r.stdout
    r = run_train(tiny_run(tiny_npz, run_dir, "--resume"), ranks=2)
    assert r.returncode == 0, r.stderr
    assert_same_run(uninterrupted, run_dir)


def alive(pid):
    try:
        return processes.stat(pid)[1] != b"Z"
    except OSError:
        return False


def test_ranks_whose_launcher_is_killed_stop_instead_of_training_on(tmp_path):
    """MPICH's hydra_pmi_proxy, the launcher's process on a node, is SIGKILLed: its ranks
    notice that their parent is gone and stop (as on SIGHUP) within seconds, instead of
    training on as orphans for hours."""
    run_dir = tmp_path / "run"
    cmd = mpirun(2) + [sys.executable, "-m", "dpbp.train", "--set", f'run.dir="{run_dir}"',
                       "--set", "data.samples=2000", "--set", "train.epochs=100000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=mpi_env(), start_new_session=True)
    ranks = []
    try:
        for line in proc.stdout:   # wait until training is under way
            if line.startswith("epoch"):
                break
        everyone = processes.table()
        proxies = [p for p, (parent, _) in everyone.items() if parent == proc.pid]
        ranks = [r for r, (parent, _) in everyone.items() if parent in proxies]
        if not ranks:
            pytest.skip("this launcher starts its ranks without a proxy process")
        for p in proxies:
            os.kill(p, signal.SIGKILL)
        deadline = threading.Event()
        for _ in range(300):   # at most 30 s; an orphan would train for hours
            if not any(alive(r) for r in ranks):
                break
            deadline.wait(0.1)
        assert not any(alive(r) for r in ranks), "ranks outlived their launcher"
    finally:
        for r in ranks:
            if alive(r):
                os.kill(r, signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
