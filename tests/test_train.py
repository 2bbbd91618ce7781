"""`python -m dpbp.train` as users run it: one process, under mpirun, without MPI.

Also the run directory (never clobbered), the printed config, quiet mode, the progress
bar (under mpirun too), a closed output, --version, the start-up notes, per-step logs.
"""

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from tests.conftest import (
    ROOT,
    assert_refused,
    model_arrays,
    mpi_env,
    mpirun,
    run_module,
    run_train,
    run_with_timeout,
    snapshot,
    tiny_run,
)

METRIC_KEYS = {"epoch", "train_loss", "val_loss", "val_accuracy", "lr", "seconds",
               "samples_per_second", "world_size"}


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
        "epoch-0001.npz", "epoch-0002.npz", "epoch-0003.npz", "last.npz"]
    assert os.readlink(run_dir / "checkpoints" / "last.npz") == "epoch-0003.npz"   # relative
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
    from importlib.metadata import entry_points
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")
               if e.name.startswith("dpbp-")}
    assert scripts["dpbp-train"] == "dpbp.entry:train"   # stop signals held from its start
    assert scripts["dpbp-bench"] == "dpbp.bench:cli"


def test_synthetic_data_defeats_a_linear_model(tmp_path):
    """The default data is image-like: a linear model (no hidden layer) stays far below the
    >= 97 % that the default MLP reaches (test_default_run_under_mpirun_4)."""
    r = run_train(["--set", "model.hidden=[]", "--set", "train.epochs=15",
                   "--set", f'run.dir="{tmp_path / "run"}"'])
    assert r.returncode == 0, r.stderr
    final = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")][-1]
    assert final["val_accuracy"] < 0.9


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
    import pty
    leader, follower = pty.openpty()   # a fresh pseudo-terminal: it reports 0 columns
    proc = subprocess.Popen([sys.executable, "-m", "dpbp.train",
                             *tiny_run(tiny_npz, tmp_path / "tty")], stdout=follower,
                            stderr=subprocess.PIPE, cwd=ROOT)
    os.close(follower)
    out = read_terminal(leader, proc)
    assert proc.wait(timeout=60) == 0
    frames = [f for f in out.split(b"\r") if b"step/s" in f]   # tqdm's bar, cleared after
    assert b"epoch 1/3:" in out and frames, out                  # each epoch
    assert 60 < max(len(f) for f in frames) <= 80   # DEFAULT_SIZE: 0 columns drew none
    assert b"epoch 3/3  train_loss" in out


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


def test_missing_mpi_under_a_launcher_is_reported_once(tmp_path, tiny_npz):
    fake = tmp_path / "fake" / "mpi4py"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "MPI.py").write_text("raise ImportError('libmpi.so: cannot open shared object')\n")
    env = {"PYTHONPATH": str(fake.parent)}
    r = run_train(tiny_run(tiny_npz, tmp_path / "run"), ranks=3, env=env)
    assert_refused(r, "launched as one of 3 ranks")
    assert not (tmp_path / "run").exists()


def test_second_run_never_clobbers_the_first(tmp_path, tiny_npz):
    run_dir = tmp_path / "run"
    assert run_train(tiny_run(tiny_npz, run_dir)).returncode == 0
    before = snapshot(run_dir)
    r = run_train(tiny_run(tiny_npz, run_dir))
    assert_refused(r, "already holds a run")
    assert "--resume" in r.stderr
    assert snapshot(run_dir) == before


def test_a_foreign_config_toml_is_not_clobbered(tmp_path, tiny_npz):
    run_dir = tmp_path / "proj"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text("# my own notes\n")
    r = run_train(tiny_run(tiny_npz, run_dir))
    assert_refused(r, f"run.dir {run_dir} holds {run_dir / 'config.toml'}, a file that dpbp "
                      "writes, but no run record (run.json)")
    assert (run_dir / "config.toml").read_text() == "# my own notes\n"


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
    assert sorted(os.listdir(run_dir)) == [".lock"]   # the other run's: nothing added


def test_run_dir_entries_that_are_folders(tmp_path, tiny_npz):
    run_dir = tmp_path / "run"
    (run_dir / "config.toml").mkdir(parents=True)
    assert_refused(run_train(tiny_run(tiny_npz, run_dir), ranks=2), "config.toml, a file that")
    (run_dir / "config.toml").rmdir()
    (run_dir / "run.json").mkdir()
    assert_refused(run_train(tiny_run(tiny_npz, run_dir), ranks=2), "run.json: cannot read")


def test_a_finished_run_without_checkpoints_keeps_its_metrics(tmp_path, tiny_npz):
    run_dir = tmp_path / "run"
    assert run_train(tiny_run(tiny_npz, run_dir)).returncode == 0
    for path in (run_dir / "checkpoints").iterdir():   # e.g. deleted to save space
        path.unlink()
    before = snapshot(run_dir)
    for args in ([], ["--resume"], ["--resume", "auto"]):
        r = run_train(tiny_run(tiny_npz, run_dir, "--set", "train.lr=0.2", *args))
        assert_refused(r, f"run.dir {run_dir} holds a run (completed) with metrics of 3 epochs "
                          "but no checkpoint")
        assert snapshot(run_dir) == before


# ----------------------------------------------------------------------------- what a newcomer meets

def read_terminal(leader, proc, seconds=120):
    """All that a pseudo-terminal shows until the program ends (killed at `seconds`)."""
    guard = threading.Timer(seconds, proc.kill)   # a hung run ends the reads below
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
    return out


@pytest.mark.parametrize("tee", [False, True])
def test_under_mpirun_the_bar_and_the_lines_never_interleave(tmp_path, tiny_npz, tee):
    """mpirun pipes rank 0's output to itself, and writes it to the terminal: there the
    bar shows. The launcher passes rank 0's lines on late (forced: tests/held_output.py
    holds each until the next epoch's bar is drawn), yet on the rendered screen every
    epoch has a line of its own and no bar is left over. `mpirun ... | tee LOG`: no bar,
    and the log holds every line."""
    import fcntl
    import pty
    import shlex
    import struct
    import termios

    import pyte
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))

    def own_terminal():   # the pseudo-terminal becomes the job's controlling terminal
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    cmd = mpirun(2) + [sys.executable, "-m", "tests.held_output",
                       *tiny_run(tiny_npz, tmp_path / "r")]
    log = tmp_path / "log"
    if tee:
        cmd = ["bash", "-c", f"{shlex.join(cmd)} | tee {log}"]
    proc = subprocess.Popen(cmd, stdin=follower, stdout=follower, stderr=follower, cwd=ROOT,
                            env=mpi_env({"PYTHONPATH": str(ROOT)}), preexec_fn=own_terminal)
    os.close(follower)
    out = read_terminal(leader, proc)
    assert proc.wait(timeout=60) == 0, out
    assert (b"epoch 1/3:" in out and b"step/s" in out) != tee, out
    screen = pyte.Screen(100, 40)
    pyte.ByteStream(screen).feed(out)
    shown = [line.rstrip() for line in screen.display if line.strip()]
    epochs = [line for line in shown if "train_loss" in line]
    assert [line[:21] for line in epochs] == [f"epoch {e}/3  train_loss" for e in (1, 2, 3)]
    assert not any("step/s" in line or "%|" in line for line in shown), "\n".join(shown)
    if tee:
        text = log.read_text()
        assert "\r" not in text and text.count("  train_loss ") == 3 and "done: 3 epochs" in text


def test_progress_off_draws_no_bar():
    from dpbp.service.console import bar_output
    assert bar_output("off", launched=True) is None


def test_progress_on_draws_in_logs_too(tmp_path, tiny_npz):
    r = run_train(tiny_run(tiny_npz, tmp_path / "r", "--progress", "on"))
    assert r.returncode == 0 and "epoch 1/3:" in r.stderr and "step/s" in r.stderr
    r = run_train(tiny_run(tiny_npz, tmp_path / "r2"))   # auto: never in logs
    assert r.returncode == 0 and r.stderr == ""


def test_a_closed_output_does_not_stop_training(tmp_path, tiny_npz):
    """`python -m dpbp.train | head -1`: the lines stop, training goes on to the end."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "dpbp.train", *tiny_run(tiny_npz, run_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                            env=mpi_env())
    assert proc.stdout.readline().startswith(b"dpbp ")
    proc.stdout.close()   # as head does after its line
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, err
    assert b"Traceback" not in err and b"broken pipe" not in err
    assert os.readlink(run_dir / "checkpoints" / "last.npz") == "epoch-0003.npz"
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("module", ["train", "evaluate", "predict", "plot", "bench"])
def test_every_command_tells_its_version(module):
    from dpbp import __version__
    r = run_with_timeout([sys.executable, "-m", f"dpbp.{module}", "--version"], 60)
    assert r.returncode == 0 and r.stdout == f"dpbp {__version__}\n" and r.stderr == ""


def test_the_start_up_names_the_optimizer_and_the_end_the_steps_and_time(tmp_path, tiny_npz):
    r = run_train(tiny_run(tiny_npz, tmp_path / "r", "--set", "train.schedule=cosine",
                           "--set", "train.warmup_epochs=1", "--set", "train.nesterov=true",
                           "--set", "train.weight_decay=5e-4"))
    assert r.returncode == 0, r.stderr
    assert ("optimizer: SGD, lr 0.05 (cosine to 0, after a 1-epoch warmup), momentum 0.9 "
            "(Nesterov), weight decay 0.0005") in r.stdout
    done = r.stdout.strip().splitlines()[-1]
    assert done.startswith("done: 3 epochs, 15 steps in ") and " s; weights sha256 " in done


def test_notes_on_idle_ranks_and_too_many_threads(tmp_path, tiny_npz):
    """A global batch smaller than the world leaves ranks idle; OMP_NUM_THREADS times the
    ranks beyond the cores makes them take turns: both are said at start-up."""
    cores = len(os.sched_getaffinity(0))
    r = run_train(tiny_run(tiny_npz, tmp_path / "r", "--set", "train.batch_size=2"), ranks=3,
                  env={"OMP_NUM_THREADS": str(cores)})
    assert r.returncode == 0, r.stderr
    assert ("note: 1 of the 3 ranks gets no rows in any step (2 rows per global batch); "
            "they still take part in every sum") in r.stdout
    assert f"note: {cores} BLAS thread" in r.stdout and "x 3 ranks on this node's" in r.stdout


def test_a_torchrun_style_launch_without_mpi_is_refused(tmp_path, tiny_npz):
    for rank in ("0", "1"):
        r = run_train(tiny_run(tiny_npz, tmp_path / "r"), env={"WORLD_SIZE": "2", "RANK": rank})
        assert r.returncode == 2 and "Traceback" not in r.stderr
        said = r.stderr.strip().splitlines()
        assert said == ([] if rank == "1" else [
            "dpbp: error: WORLD_SIZE=2 is set, as torchrun sets it, but dpbp's ranks are "
            "started by an MPI launcher: mpirun -n 2 python -m dpbp.train (these processes "
            "would each train alone)"])
    assert not (tmp_path / "r").exists()


def test_a_launcher_that_does_not_match_mpi_is_refused(tmp_path, tiny_npz, run):
    """srun --mpi=none: N worlds of one rank each. Refused with one line, nothing written
    (the variables and ranks: test_comm.py); what dpbp runs as one process inside such an
    allocation (--print-config for dpbp.launch, evaluate, predict) goes on."""
    slurm = {"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "0"}
    r = run_train(tiny_run(tiny_npz, tmp_path / "r"), env=slurm)
    assert_refused(r, "dpbp: error: SLURM_STEP_NUM_TASKS=2: started as one of 2 processes")
    assert not (tmp_path / "r").exists()
    assert run_train(tiny_run(tiny_npz, tmp_path / "r", "--print-config"),
                     env=slurm).returncode == 0
    run_dir, _ = run
    np.save(tmp_path / "x.npy", np.zeros((3, 256), np.float32))
    for module, args in (("dpbp.evaluate", []), ("dpbp.predict", [
            "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy")])):
        r = run_module(module, ["--checkpoint", str(run_dir), *args], env=slurm)
        assert r.returncode == 0, r.stderr


def test_steps_are_logged_when_asked_and_every_record_has_a_time(tmp_path, tiny_npz):
    run_dir = tmp_path / "r"
    r = run_train(tiny_run(tiny_npz, run_dir, "--set", "run.log_every_steps=2"), ranks=2)
    assert r.returncode == 0, r.stderr
    steps = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [2, 4, 6, 8, 10, 12, 14]   # 5 steps per epoch
    assert steps[0]["epoch"] == pytest.approx(0.4) and steps[-1]["lr"] == 0.05
    assert all(np.isfinite(s["loss"]) and s["time"] > 1.7e9 for s in steps)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in records] == [5, 10, 15] and all(m["time"] > 1.7e9 for m in records)
    assert not (tmp_path / "plain" / "steps.jsonl").exists()


def test_the_epoch_line_shows_the_lr_to_four_digits():
    from dpbp.train import format_epoch
    r = dict(epoch=3, train_loss=0.5, val_loss=None, val_accuracy=None, lr=1.00098e-05,
             seconds=0.1, samples_per_second=1000.0)
    assert "  lr 1.001e-05  " in format_epoch(r, 10)   # not 1.00098e-05 beside lr 0.1
