"""dpbp/service/startup.py in one process: the checks across ranks before training, on
ranks that are threads of this process (tests/thread_ranks.py).

Ranks that read different configs or data stop, every one of them, with one line; under
train.deterministic, so do ranks that compute with other arithmetic. Under a real
mpirun: test_failures.py and test_reproducibility.py.
"""

import threading

import pytest

from dpbp.parallel.comm import AgreedExit
from dpbp.service import config, startup
from tests.thread_ranks import run_ranks

CFG = config.load(None, [])
DATA = "x (10, 3) float64 crc 0000000a; y (10,) int64 crc 0000000b"


def stops(check):
    """What each of two ranks does: None (goes on) or the exit code it stops with."""
    def rank(comm):
        try:
            check(comm)
        except AgreedExit as e:
            return e.code
        return None
    return run_ranks(2, rank)[0]


@pytest.mark.parametrize("differ", ["config", "data"])
def test_ranks_that_read_different_config_or_data_all_stop(capsys, differ):
    assert stops(lambda comm: startup.check_same_inputs(comm, CFG, DATA)) == [None, None]
    assert capsys.readouterr().err == ""

    def check(comm):
        cfg = config.load(None, ["train.lr=0.2"]) if differ == "config" and comm.rank else CFG
        data = DATA.replace("0b", "0c") if differ == "data" and comm.rank else DATA
        startup.check_same_inputs(comm, cfg, data)

    assert stops(check) == [2, 2]
    assert capsys.readouterr().err == ("dpbp: error: the ranks loaded different configs or "
                                       "data; check that every node sees the same files\n")


def test_ranks_that_compute_with_other_arithmetic_all_stop(capsys, monkeypatch):
    """train.deterministic: rank 1 on a node of another CPU type is named, with both."""
    assert stops(startup.check_arithmetic) == [None, None]
    monkeypatch.setattr(startup, "arithmetic",
                        lambda: f"kernels of {threading.current_thread().name}")

    def check(comm):
        threading.current_thread().name = f"rank {comm.rank}"
        startup.check_arithmetic(comm)

    assert stops(check) == [2, 2]
    assert capsys.readouterr().err == (
        "dpbp: error (rank 1): train.deterministic: rank 1 computes with kernels of rank 1, "
        "rank 0 with kernels of rank 0; the same bits need the same CPU type, numpy and BLAS "
        "on every node (or train.deterministic = false)\n")
