"""dpbp/parallel/comm.py in a world of one process: every verb, agreement, init().

At world size 1 every verb returns its input as documented, `agreement` turns bad input
into one line and an AgreedExit, and `init()` without a launcher is a world of one. On
real ranks: tests/mpi/test_comm_mpi.py.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from dpbp.errors import UserError
from dpbp.parallel.comm import AgreedExit, Comm, agreement, count_sharing
from tests.conftest import ROOT

LAUNCHER_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "SLURM_STEP_NUM_TASKS")


@pytest.fixture
def one():
    return Comm(None)


def test_a_world_of_one(one):
    assert (one.rank, one.size, one.ranks_sharing_cores) == (0, 1, 1)
    assert one.oversubscribed is False and one.library == "no MPI"
    assert one.wait_seconds == 0.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_reductions_return_their_input_unchanged(one, dtype):
    buf = (np.arange(6) - 2).astype(dtype)
    want = buf.copy()
    assert one.allreduce_(buf) is buf and buf.tobytes() == want.tobytes()
    assert one.allreduce_max_(buf) is buf and buf.tobytes() == want.tobytes()
    assert one.allreduce_max_(buf, like=np.zeros(1 << 21)) is buf
    assert buf.tobytes() == want.tobytes()
    ballot = np.array([3], np.int64)
    one.start_allreduce_max_(ballot).Wait()
    assert ballot.tolist() == [3]


@pytest.mark.parametrize("value", [-7, 0, 5, np.int64(12)])
def test_integer_min_and_max_are_the_value(one, value):
    for got in (one.allreduce_min(value), one.allreduce_max(value)):
        assert got == value and type(got) is int


def test_allgatherv_fills_out_with_mine(one):
    mine = np.array([1.5, -2.0, 3.25])
    out = np.full(3, np.nan)
    assert one.allgatherv_(mine, out, [3]) is out
    assert out.tobytes() == mine.tobytes()
    empty = np.empty(0)
    assert one.allgatherv_(np.empty(0), empty, [0]) is empty


def test_broadcasts_return_their_input(one):
    buf = np.array([4.0, 5.0])
    assert one.bcast_(buf) is buf and buf.tolist() == [4.0, 5.0]
    obj = {"epoch": 3, "path": "x.npz"}
    assert one.bcast_obj(obj) is obj
    assert one.barrier() is None


def test_replicas_are_identical_in_a_world_of_one(one):
    assert one.replicas_identical(np.linspace(0, 1, 10)) is True
    assert one.replicas_identical(np.array([np.nan])) is True


def test_agreement_without_an_error_goes_on(one, capsys):
    with agreement(one):
        pass
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("code", [None, 3])
def test_agreement_turns_a_user_error_into_one_line_and_an_agreed_exit(one, capsys, code):
    with pytest.raises(AgreedExit) as stop:
        with agreement(one) if code is None else agreement(one, code):
            raise UserError("data.path: no such file")
    assert stop.value.code == (2 if code is None else code)
    out, err = capsys.readouterr()
    assert out == "" and err == "dpbp: error: data.path: no such file\n"


def test_agreement_passes_other_exceptions_through(one, capsys):
    with pytest.raises(ZeroDivisionError):
        with agreement(one):
            1 / 0
    assert capsys.readouterr() == ("", "")


def without_launcher(**extra):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS
           and not k.startswith(("PMI_", "PMIX_", "OMPI_COMM_WORLD_"))}
    env.update(extra)
    return env


INIT = ("from dpbp.parallel.comm import init; c = init(); "
        "print(c.rank, c.size, c.library == 'no MPI')")


def test_init_without_a_launcher_is_a_world_of_one():
    r = subprocess.run([sys.executable, "-c", INIT], capture_output=True, text=True,
                       env=without_launcher(), cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[:2] == ["0", "1"]


def test_init_without_mpi4py_and_without_a_launcher_is_a_world_of_one(tmp_path):
    fake = tmp_path / "mpi4py"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "MPI.py").write_text("raise ImportError('No module named mpi4py.MPI')\n")
    r = subprocess.run([sys.executable, "-c", INIT], capture_output=True, text=True,
                       env=without_launcher(PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}"),
                       cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "1", "True"]



@pytest.mark.parametrize("env,said", [
    ({"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "0"},
     "SLURM_STEP_NUM_TASKS=2: started as one of 2 processes by a Slurm step (srun)"),
    ({"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1"}, None),   # rank 1 stops silently
    ({"OMPI_COMM_WORLD_SIZE": "3"}, "OMPI_COMM_WORLD_SIZE=3: started as one of 3 processes "
     "by Open MPI's mpirun"),
    ({"PMI_SIZE": "2", "PMI_RANK": "0", "SLURM_STEP_NUM_TASKS": "1"},   # mpirun in a
     "PMI_SIZE=2: started as one of 2 processes by MPICH's PMI (its mpirun, or srun "
     "--mpi=pmi2)"),                                                  # Slurm step: its own
])
def test_a_launcher_that_does_not_match_the_world_stops_it(one, monkeypatch, capsys, env,
                                                           said):
    from dpbp.parallel.comm import check_launcher
    for var in LAUNCHER_VARS + ("SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(var, raising=False)
    check_launcher(one)   # no launcher: a world of one is right
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    with pytest.raises(AgreedExit) as stop:
        check_launcher(one)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err == "" if said is None else (err.startswith(f"dpbp: error: {said}, but MPI (no "
                                                          "MPI) has a world of 1") and
                                           err.count("\n") == 1 and "srun --mpi=pmi2" in err)
    monkeypatch.setenv(next(iter(env)), "1")   # a world of one announced: right
    check_launcher(one)


def test_the_ranks_sharing_cores_are_counted_by_host_and_affinity():
    """(ranks sharing this rank's cores, ranks on its host, how they were counted), from
    every rank's (host, cores): ranks on other hosts never count; a rank bound to cores
    of its own shares them with no one."""
    same = [("a", [0, 1])] * 3 + [("b", [0, 1])]
    assert count_sharing(same, "a", [0, 1]) == (3, 3, "on this host, counted by host name")
    assert count_sharing(same, "b", [0, 1]) == (1, 1, "on this host, counted by host name")
    bound = [("a", [0]), ("a", [1]), ("a", [0, 1])]
    assert count_sharing(bound, "a", [0]) == (
        2, 3, "of 3 on this host, counted by host name and CPU affinity")
