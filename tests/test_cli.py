"""`python -m dpbp.train` as users run it: one process, under mpirun, with bad input."""

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from tests.conftest import ROOT, model_arrays, mpirun, run_train, run_with_timeout

METRIC_KEYS = {"epoch", "train_loss", "val_loss", "val_accuracy", "lr", "seconds",
               "samples_per_second", "world_size"}


def tiny_run(npz, run_dir, *extra):
    """Arguments for a sub-second run on the tiny dataset."""
    return ["--set", 'data.source="npz"', "--set", f'data.path="{npz}"',
            "--set", "model.hidden=[8]", "--set", "train.batch_size=4",
            "--set", "train.epochs=3", "--set", f'run.dir="{run_dir}"', *extra]


def snapshot(folder):
    """{relative path: bytes} of every file under folder."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = open(path, "rb").read()
    return out


def assert_refused(r, message, code=2):
    """Stopped with `code` and exactly one dpbp line, naming the problem; no traceback."""
    lines = [line for line in r.stderr.splitlines() if line.startswith("dpbp")]
    assert r.returncode == code and len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_help():
    r = run_train(["--help"])
    assert r.returncode == 0 and r.stderr == ""
    for option in ("--config", "--set", "--resume", "batch_size = 128", "exit codes"):
        assert option in r.stdout


def test_single_process_run_writes_checkpoints_and_metrics(tmp_path, tiny_npz):
    run_dir = tmp_path / "run"
    r = run_train(tiny_run(tiny_npz, run_dir))
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert "dpbp 0.1.0: 1 rank" in r.stdout and "batch: global 4, per rank 4" in r.stdout
    assert sorted(os.listdir(run_dir / "checkpoints")) == [
        "epoch-0001.npz", "epoch-0002.npz", "epoch-0003.npz"]
    lines = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    assert all(METRIC_KEYS <= m.keys() and m["world_size"] == 1 for m in lines)
    assert [line for line in r.stdout.splitlines() if line.startswith("epoch ")][-1].startswith(
        "epoch 3/3  train_loss ")
    with np.load(run_dir / "checkpoints" / "epoch-0003.npz", allow_pickle=False) as f:
        assert int(f["epoch"]) == 3 and int(f["step"]) == 15   # 5 global batches per epoch
        assert "[train]" in str(f["config"])
        assert not [k for k in f.files if k.startswith("model.") and
                    k not in ("model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias")]
    saved = (run_dir / "config.toml").read_text()
    assert saved.startswith("# dpbp: the resolved config of this run\n[run]\n")


def test_mpi_run_prints_once_and_reports_per_rank_batch(tmp_path, tiny_npz):
    r = run_train(tiny_run(tiny_npz, tmp_path / "run", "--set", "train.batch_size=8"), ranks=3)
    assert r.returncode == 0 and r.stderr == "", r.stderr   # other ranks print nothing
    assert r.stdout.count("dpbp 0.1.0: 3 ranks") == 1
    assert "batch: global 8, per rank 2-3" in r.stdout
    assert len([line for line in r.stdout.splitlines() if line.startswith("epoch ")]) == 3


def test_second_run_never_clobbers_the_first(tmp_path, tiny_npz):
    run_dir = tmp_path / "run"
    assert run_train(tiny_run(tiny_npz, run_dir)).returncode == 0
    before = snapshot(run_dir)
    r = run_train(tiny_run(tiny_npz, run_dir))
    assert_refused(r, "already holds a run")
    assert "--resume" in r.stderr
    assert snapshot(run_dir) == before


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


def test_init_from_npz(tmp_path, tiny_npz):
    rng = np.random.default_rng(0)
    weights = {"model.0.weight": rng.normal(size=(8, 5)), "model.0.bias": np.zeros(8),
               "model.2.weight": rng.normal(size=(3, 8)), "model.2.bias": np.zeros(3)}
    good = tmp_path / "good.npz"
    np.savez(good, **weights)
    args = tiny_run(tiny_npz, tmp_path / "a", "--set", f'model.init="{good}"',
                    "--set", "train.epochs=1", "--set", "train.lr=1e-9")
    assert run_train(args).returncode == 0
    after = model_arrays(tmp_path / "a" / "checkpoints" / "epoch-0001.npz")
    np.testing.assert_allclose(after["model.0.weight"], weights["model.0.weight"], atol=1e-6)


@pytest.mark.parametrize("failure", ["ImportError('No module named mpi4py')",
                                     "RuntimeError('cannot load MPI library')"])
def test_without_mpi_trains_as_one_process(tmp_path, tiny_npz, failure):
    fake = tmp_path / "fake" / "mpi4py"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "MPI.py").write_text(f"raise {failure}\n")
    env = {"PYTHONPATH": f"{fake.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = run_train(tiny_run(tiny_npz, tmp_path / "run"), env=env)
    assert r.returncode == 0, r.stderr
    assert "1 rank (no MPI)" in r.stdout
    assert (tmp_path / "run" / "checkpoints" / "epoch-0003.npz").exists()
    # ...but a launcher that promised 4 ranks gets a clear refusal, not 4 duplicate runs
    r = run_train(tiny_run(tiny_npz, tmp_path / "run2"), env=dict(env, PMI_SIZE="4"))
    assert_refused(r, "launched as one of 4 ranks, but MPI could not be loaded")


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


def test_default_run_under_mpirun_4(tmp_path):
    """The README's command: default config, synthetic data, 4 ranks on this machine."""
    r = run_train([], ranks=4, cwd=tmp_path, timeout=300)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    metrics = [json.loads(line) for line in open(tmp_path / "runs/default/metrics.jsonl")]
    assert len(metrics) == 10 and metrics[-1]["world_size"] == 4
    assert metrics[-1]["val_accuracy"] >= 0.97
    assert "4 ranks" in r.stdout and "global 128, per rank 32" in r.stdout


def test_console_script_entry_point():
    exe = os.path.join(os.path.dirname(sys.executable), "dpbp-train")
    if not os.path.exists(exe):
        pytest.skip("dpbp-train not installed beside this Python")
    r = run_with_timeout([exe, "--help"], timeout=60)
    assert r.returncode == 0 and "usage: python -m dpbp.train" in r.stdout


def test_synthetic_data_defeats_a_linear_model(tmp_path):
    """The default data is image-like: a linear model (no hidden layer) stays far below the
    >= 97 % that the default MLP reaches (test_default_run_under_mpirun_4)."""
    r = run_train(["--set", "model.hidden=[]", "--set", "train.epochs=15",
                   "--set", f'run.dir="{tmp_path / "run"}"'])
    assert r.returncode == 0, r.stderr
    final = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")][-1]
    assert final["val_accuracy"] < 0.9


def test_killed_run_resumes_to_the_same_weights(tmp_path, tiny_npz):
    """A rank killed in epoch 2 ends the job; --resume from the epoch-1 checkpoint then
    finishes with bitwise the weights of a run that was never interrupted."""
    full = run_train(tiny_run(tiny_npz, tmp_path / "full"), ranks=2)
    assert full.returncode == 0, full.stderr
    args = tiny_run(tiny_npz, tmp_path / "crash")
    crashed = run_train(args, ranks=2, env={"DPBP_FAULT": "kill:1:7"})   # 5 steps per epoch
    assert crashed.returncode != 0
    assert sorted(os.listdir(tmp_path / "crash" / "checkpoints")) == ["epoch-0001.npz"]
    resumed = run_train(args + ["--resume"], ranks=2)
    assert resumed.returncode == 0, resumed.stderr
    a = model_arrays(tmp_path / "full" / "checkpoints" / "epoch-0003.npz")
    b = model_arrays(tmp_path / "crash" / "checkpoints" / "epoch-0003.npz")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


@pytest.mark.parametrize("loss,y", [("cross_entropy", np.array([0, 1, 2, 1, 0, 2])),
                                    ("mse", np.linspace(0, 1, 12).reshape(6, 2))])
def test_metrics_are_null_where_they_do_not_apply(tmp_path, loss, y):
    data = tmp_path / "d.npz"
    np.savez(data, x=np.arange(12.0).reshape(6, 2) / 12, y=y)
    run_dir = tmp_path / "run"
    r = run_train(["--set", 'data.source="npz"', "--set", f'data.path="{data}"',
                   "--set", f'train.loss="{loss}"', "--set", "data.val_fraction=0.5" if
                   loss == "mse" else "data.val_fraction=0", "--set", "train.epochs=1",
                   "--set", f'run.dir="{run_dir}"'])
    assert r.returncode == 0, r.stderr
    m = json.loads(open(run_dir / "metrics.jsonl").read())
    if loss == "cross_entropy":   # no validation set at all
        assert m["val_loss"] is None and m["val_accuracy"] is None
        assert "val_loss -  val_acc -" in r.stdout
    else:                         # regression: a validation loss, but no accuracy
        assert m["val_loss"] > 0 and m["val_accuracy"] is None
        assert "val_acc -" in r.stdout


def test_resume_with_malformed_metrics_is_refused(tmp_path, tiny_npz):
    run_dir = tmp_path / "run"
    assert run_train(tiny_run(tiny_npz, run_dir, "--set", "train.epochs=1")).returncode == 0
    (run_dir / "metrics.jsonl").write_text("{not json\n")
    before = snapshot(run_dir)
    r = run_train(tiny_run(tiny_npz, run_dir, "--resume"), ranks=2)
    assert_refused(r, "metrics.jsonl is malformed")
    assert snapshot(run_dir) == before


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


def test_a_foreign_config_toml_is_not_clobbered(tmp_path, tiny_npz):
    run_dir = tmp_path / "proj"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text("# my own notes\n")
    r = run_train(tiny_run(tiny_npz, run_dir))
    assert_refused(r, "has a config.toml that dpbp did not write")
    assert (run_dir / "config.toml").read_text() == "# my own notes\n"


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
                                         "epoch-0003.npz.damaged", "epoch-0004.npz.damaged"]
    for name in os.listdir(ckpts):
        if name.endswith(".npz"):
            (ckpts / name).write_bytes(b"garbage")
    before = snapshot(run_dir)
    r = run_train(tiny_run(tiny_npz, run_dir, "--resume"), ranks=2)
    assert_refused(r, "none of the 3 checkpoints in")
    assert snapshot(run_dir) == before


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


def test_missing_mpi_under_a_launcher_is_reported_once(tmp_path, tiny_npz):
    fake = tmp_path / "fake" / "mpi4py"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "MPI.py").write_text("raise ImportError('libmpi.so: cannot open shared object')\n")
    env = {"PYTHONPATH": str(fake.parent)}
    r = run_train(tiny_run(tiny_npz, tmp_path / "run"), ranks=3, env=env)
    assert_refused(r, "launched as one of 3 ranks")
    assert not (tmp_path / "run").exists()


def test_two_runs_into_one_directory_at_once(tmp_path, tiny_npz):
    """The second of two simultaneous runs is refused; it does not write over the first."""
    import fcntl
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / ".lock", "a") as held:   # as a running job holds it
        held.write("host elsewhere, pid 42\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = run_train(tiny_run(tiny_npz, run_dir), ranks=2)
    assert_refused(r, "is in use by another dpbp run (host elsewhere, pid 42); wait for it, "
                      "or if that process is gone, remove")
    assert sorted(os.listdir(run_dir)) == [".lock", "checkpoints"]


def test_resume_notes_what_it_ignores_or_resplits(tmp_path, tiny_npz):
    run_dir = tmp_path / "run"
    assert run_train(tiny_run(tiny_npz, run_dir, "--set", "train.epochs=1")).returncode == 0
    r = run_train(tiny_run(tiny_npz, run_dir, "--resume", "--set", 'model.init="w.npz"',
                           "--set", "run.seed=5", "--set", "train.epochs=2"))
    assert r.returncode == 0, r.stderr
    assert 'model.init changed from "" to "w.npz" (ignored' in r.stdout
    assert "run.seed changed from 0 to 5 (the data order and validation split" in r.stdout


def test_a_finished_run_without_checkpoints_keeps_its_metrics(tmp_path, tiny_npz):
    run_dir = tmp_path / "run"
    assert run_train(tiny_run(tiny_npz, run_dir)).returncode == 0
    for path in (run_dir / "checkpoints").iterdir():   # e.g. deleted to save space
        path.unlink()
    before = snapshot(run_dir)
    r = run_train(tiny_run(tiny_npz, run_dir, "--set", "train.lr=0.2"))
    assert_refused(r, "holds metrics of 3 epochs but no checkpoint")
    assert snapshot(run_dir) == before


def test_run_dir_entries_that_are_folders(tmp_path, tiny_npz):
    run_dir = tmp_path / "run"
    (run_dir / "config.toml").mkdir(parents=True)
    assert_refused(run_train(tiny_run(tiny_npz, run_dir), ranks=2), "config.toml: cannot read")
    (run_dir / "config.toml").rmdir()
    (run_dir / "metrics.jsonl").mkdir()
    assert_refused(run_train(tiny_run(tiny_npz, run_dir), ranks=2), "metrics.jsonl: cannot read")


def test_print_config_round_trip(tmp_path, tiny_npz):
    """--print-config prints the resolved config; passed back with --config it gives the
    very same run."""
    args = tiny_run(tiny_npz, tmp_path / "a", "--set", "train.lr=0.2",
                    "--set", 'train.schedule="cosine"', "--set", "train.warmup_epochs=1")
    r = run_train(args + ["--print-config"])
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert not (tmp_path / "a").exists()
    saved = tmp_path / "printed.toml"
    saved.write_text(r.stdout.replace(str(tmp_path / "a"), str(tmp_path / "b")))
    assert run_train(args).returncode == 0
    assert run_train(["--config", str(saved)]).returncode == 0
    a = model_arrays(tmp_path / "a" / "checkpoints" / "epoch-0003.npz")
    b = model_arrays(tmp_path / "b" / "checkpoints" / "epoch-0003.npz")
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_quiet_prints_nothing_and_a_terminal_gets_a_progress_bar(tmp_path, tiny_npz):
    r = run_train(tiny_run(tiny_npz, tmp_path / "q", "--quiet"))
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""
    import fcntl
    import pty
    import struct
    import termios
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))   # 100 columns
    proc = subprocess.Popen([sys.executable, "-m", "dpbp.train",
                             *tiny_run(tiny_npz, tmp_path / "tty")], stdout=follower,
                            stderr=subprocess.PIPE, cwd=ROOT)
    os.close(follower)
    guard = threading.Timer(120, proc.kill)   # a hung run ends the reads below
    guard.start()
    out = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:   # the terminal closed
            break
        if not chunk:
            break
        out += chunk
    guard.cancel()
    assert proc.wait(timeout=60) == 0
    assert b"epoch 1/3:" in out and b"step/s" in out   # tqdm's bar, cleared after each epoch
    assert b"epoch 3/3  train_loss" in out
