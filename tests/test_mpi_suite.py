"""Runs the pytest-mpi tests in tests/mpi under a real mpirun, in a subprocess with a timeout."""

import sys

import pytest

from tests.conftest import ROOT, mpirun, run_with_timeout


@pytest.mark.parametrize("ranks", [2, 3])
def test_mpi_suite(ranks):
    cmd = mpirun(ranks) + [sys.executable, "-m", "mpi4py", "-m", "pytest", "--with-mpi", "-q",
                           "-p", "no:cacheprovider", str(ROOT / "tests" / "mpi")]
    r = run_with_timeout(cmd, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count(" passed") == ranks and "failed" not in r.stdout
    assert "skipped" not in r.stdout, r.stdout
