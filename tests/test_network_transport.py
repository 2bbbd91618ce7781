"""The multi-node path, on one machine: the key equivalences with every rank talking to the
others through the network, and the thread budget counted per host.

On one host MPI moves messages through shared memory. To test the path that ranks on
separate nodes take, the runs here force the network:
- MPICH: MPIR_CVAR_NOLOCAL=1 sends every message through the network module, as if each
  rank were on a node of its own; UCX_TLS=tcp,self then keeps the UCX network module
  (the one the mpich wheel uses) off its own shared-memory transports, so the bytes go
  through TCP sockets (test_the_forced_transport_is_tcp checks that).
- Open MPI: the MCA parameters of `--mca pml ob1 --mca btl tcp,self`, given through the
  environment (OMPI_MCA_*), which mpirun reads as it reads the option.
Every run is tiny: the point is the path, not the speed.
"""

import hashlib
import json
import os
import signal
import sys

import numpy as np
import pytest

from dpbp.parallel.comm import count_sharing
from tests.conftest import model_arrays, mpirun, run_train, run_with_timeout


def network_env():
    """The environment that makes the launcher's MPI send every message over TCP."""
    if "--oversubscribe" in mpirun(1):   # conftest.mpirun: Open MPI's launcher
        return {"OMPI_MCA_pml": "ob1", "OMPI_MCA_btl": "tcp,self"}
    return {"MPIR_CVAR_NOLOCAL": "1", "UCX_TLS": "tcp,self"}


def sets(*pairs):
    out = []
    for pair in pairs:
        out += ["--set", pair]
    return out


def train(run_dir, args, ranks, fault=None):
    """python -m dpbp.train over the network transport (ranks=None: one process, no
    mpirun); the completed process."""
    env = network_env() if ranks else {}
    if fault:
        env["DPBP_FAULT"] = fault
    return run_train(args + sets(f'run.dir="{run_dir}"', "run.keep_checkpoints=0"),
                     ranks=ranks, env=env, timeout=120)


def logged(run_dir):
    keys = ("train_loss", "val_loss", "val_accuracy", "lr", "skipped_steps")
    return [[json.loads(line)[k] for k in keys] for line in open(run_dir / "metrics.jsonl")]


# ----------------------------------------------------------------------------- the transport

def test_the_forced_transport_is_tcp():
    """With the environment above, UCX (MPICH's network module here) reports TCP between
    the two ranks of this host, not shared memory."""
    code = ("from mpi4py import MPI; import numpy as np; b = np.ones(4); "
            "MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, b); assert (b == 2).all(); "
            "MPI.COMM_WORLD.rank or print('the sum is', int(b[0]), flush=True)")
    env = dict(network_env(), UCX_LOG_LEVEL="info")
    r = run_with_timeout(mpirun(2) + [sys.executable, "-c", code], 60, env=env)
    assert r.returncode == 0 and "the sum is 2" in r.stdout, r.stdout + r.stderr
    ucx = [line for line in (r.stdout + r.stderr).splitlines() if "intra-node cfg" in line]
    if not ucx:
        pytest.skip("this MPI does not use UCX; nothing more to check")
    assert all("tcp/" in line and "sysv" not in line and "cma" not in line for line in ucx), ucx


# ----------------------------------------------------------------------------- threads per host

def test_ranks_are_counted_by_host_not_by_transport(tmp_path, tiny_npz):
    """Every rank alone on its 'node' as far as MPI's transport knows: the two ranks still
    share this host's cores, and the start-up line says so."""
    r = train(tmp_path / "run", sets('data.source="npz"', f'data.path="{tiny_npz}"',
                                     "train.batch_size=8", "train.epochs=1"), 2)
    assert r.returncode == 0, r.stderr
    cores = len(os.sched_getaffinity(0))
    threads = max(1, cores // 2)
    first = r.stdout.splitlines()[0]
    assert (f"{threads} BLAS thread{'s' * (threads > 1)} per rank ({cores} cores for 2 ranks "
            "on this host, counted by host name)") in first, first


def test_count_sharing():
    """The ranks on this host whose cores overlap this rank's, whatever their order."""
    two_hosts = [("a", [0, 1]), ("b", [0, 1]), ("a", [0, 1]), ("b", [0, 1])]
    assert count_sharing(two_hosts, "a", {0, 1}) == (2, 2, "on this host, counted by host name")
    bound = [("a", [0]), ("a", [1]), ("a", [2, 3]), ("a", [2, 3])]   # bound by the launcher
    assert count_sharing(bound, "a", {0}) == (
        1, 4, "of 4 on this host, counted by host name and CPU affinity")
    assert count_sharing(bound, "a", {2, 3})[0] == 2
    overlapping = [("a", [0, 1]), ("a", [1])]
    assert count_sharing(overlapping, "a", {0, 1})[0] == 2
    assert count_sharing([("a", [0, 1])], "a", {0, 1}) == (1, 1, "on this host, counted by "
                                                                 "host name")


# ----------------------------------------------------------------------------- N ranks = 1

def test_n_ranks_over_tcp_match_one_process(tmp_path, tiny_npz):
    """float64 to 1e-10 after 3 epochs: 17 samples in global batches of 8, 8 and 1, so
    shards are uneven at 3 ranks (2-3-3) and in the last batch ranks have no rows."""
    args = sets('data.source="npz"', f'data.path="{tiny_npz}"', 'model.dtype="float64"',
                "model.hidden=[6, 4]", "train.batch_size=8", "train.epochs=3", "train.lr=0.1",
                "train.momentum=0.9")
    final = {}
    for ranks in (None, 2, 3):
        run_dir = tmp_path / f"run-{ranks}"
        r = train(run_dir, args, ranks)
        assert r.returncode == 0, r.stderr
        final[ranks] = model_arrays(run_dir / "checkpoints" / "epoch-0003.npz")
    first = model_arrays(tmp_path / "run-None" / "checkpoints" / "epoch-0001.npz")
    assert np.abs(first["model.0.weight"] - final[None]["model.0.weight"]).max() > 1e-3
    for ranks in (2, 3):
        assert final[ranks].keys() == final[None].keys()
        for name, one in final[None].items():
            np.testing.assert_allclose(final[ranks][name], one, rtol=0, atol=1e-10,
                                       err_msg=f"{name} at {ranks} ranks")


# ----------------------------------------------------------------------------- bitwise

@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """195 training samples in batches of 32: six full batches and one of 3 rows (at 3
    ranks, a rank with no row), and the deterministic run of one process on them."""
    folder = tmp_path_factory.mktemp("network")
    rng = np.random.default_rng(11)
    centers = rng.normal(size=(3, 12)) * 2
    y, y_val = rng.integers(0, 3, size=195), rng.integers(0, 3, size=50)
    np.savez(folder / "uneven.npz", x=centers[y] + rng.normal(size=(195, 12)), y=y,
             x_val=centers[y_val] + rng.normal(size=(50, 12)), y_val=y_val)
    args = sets('data.source="npz"', f'data.path="{folder / "uneven.npz"}"',
                "model.hidden=[16, 8]", "train.batch_size=32", "train.epochs=3",
                "train.lr=0.1", "train.deterministic=true")
    r = train(folder / "one", args, None)
    assert r.returncode == 0, r.stderr
    return args, folder / "one"


def weights_sha256(run_dir):
    h = hashlib.sha256()
    with np.load(run_dir / "checkpoints" / "epoch-0003.npz", allow_pickle=False) as f:
        for key in sorted(k for k in f.files if k.startswith(("model.", "optimizer."))):
            h.update(key.encode() + f[key].tobytes())
    return h.hexdigest()


def test_deterministic_bits_over_tcp_at_1_2_3_ranks(tmp_path, uneven):
    args, one = uneven
    for ranks in (2, 3):
        r = train(tmp_path / f"run-{ranks}", args, ranks)
        assert r.returncode == 0, r.stderr
        assert weights_sha256(tmp_path / f"run-{ranks}") == weights_sha256(one), ranks
        assert logged(tmp_path / f"run-{ranks}") == logged(one), ranks


def test_deterministic_resume_over_tcp_at_another_world_size(tmp_path, uneven):
    """Stopped by SIGTERM mid-epoch at 2 ranks, resumed at 3: bitwise the one process."""
    args, one = uneven
    run_dir = tmp_path / "run"
    r = train(run_dir, args, 2, fault="sigterm:1:9")
    assert r.returncode == 128 + signal.SIGTERM, r.stdout + r.stderr
    r = train(run_dir, args + ["--resume"], 3)
    assert r.returncode == 0, r.stderr
    assert "resume: from" in r.stdout and "3 ranks" in r.stdout.splitlines()[0]
    assert weights_sha256(run_dir) == weights_sha256(one)
    assert logged(run_dir) == logged(one)
