"""Architecture rules that keep the code easy to see: checked, not just written down."""

import ast
import subprocess
import sys

from tests.conftest import ROOT


def imported_modules(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


def test_only_comm_imports_mpi4py():
    importers = sorted(str(p.relative_to(ROOT / "dpbp")) for p in (ROOT / "dpbp").rglob("*.py")
                       if any(m.split(".")[0] == "mpi4py" for m in imported_modules(p)))
    assert importers == ["parallel/comm.py"]


def test_importing_the_trainer_starts_no_mpi_and_no_torch():
    code = ("import sys, dpbp.train; print(sorted(m for m in "
            "('mpi4py.MPI', 'torch', 'threadpoolctl') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr
