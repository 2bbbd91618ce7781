"""launch/ scripts: valid shell, and they really run a short training."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from dpbp.service import checkpoint
from tests.conftest import ROOT, mpi_env, run_with_timeout

SCRIPTS = sorted((ROOT / "launch").glob("*.sh")) + sorted((ROOT / "launch").glob("*.sbatch"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shell_syntax(script):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout


# ----------------------------------------------------------------------------- Slurm
# slurm.sbatch (and the supervisor it runs) here with stand-ins for srun (the command as
# one process, no MPI; it notes its pid), scancel (records its arguments and sends the signal to that process)
# and scontrol (a running job; records the other commands), in a job whose id is 4242.
# tests/test_slurm.py runs it under a real Slurm.

@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\n'
                                  'while [[ $1 == -* ]]; do [[ $1 == -n ]] && shift; shift; done\n'
                                  f'echo $$ > {tmp_path}/step.pid\nexec "$@"\n')
    (bin_dir / "scancel").write_text(
        f'#!/usr/bin/env bash\necho "$@" >> {tmp_path}/scancel\n'
        f'[[ $1 == --signal=TERM ]] && kill -TERM "$(cat {tmp_path}/step.pid)"\n')
    (bin_dir / "scontrol").write_text(
        '#!/usr/bin/env bash\nif [[ $1 == show ]]; then echo "   JobState=RUNNING Reason=None"; '
        f'else echo "$@" >> {tmp_path}/scontrol; fi\n')
    for name in ("srun", "scancel", "scontrol"):
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable,
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "dpbp", "SLURM_CPUS_PER_TASK": "1",
           "RUN_DIR": str(tmp_path / "run")}
    return env


def sbatch(args, env, timeout=120):
    return run_with_timeout(["bash", str(ROOT / "launch" / "slurm.sbatch"), *args], timeout,
                            env=env)


TINY = ["--set", "data.samples=300", "--set", "model.hidden=[8]"]


def test_slurm_sbatch_trains_then_resumes(fake_slurm, tmp_path):
    """The resume contract's Slurm columns: a new submission of the same script continues
    the run with its arguments applied (train.epochs=2 trains on); a submission of a
    finished run ends at once with 0; a requeued job (SLURM_RESTART_COUNT > 0) continues
    with the recorded config, whatever its arguments say."""
    r = sbatch([*TINY, "--set", "train.epochs=1"], fake_slurm)
    assert r.returncode == 0 and "epoch 1/1" in r.stdout, r.stderr
    assert "resume: from" not in r.stdout
    r = sbatch([*TINY, "--set", "train.epochs=2"], fake_slurm)   # submitted again
    assert r.returncode == 0, r.stderr
    assert "resume: from" in r.stdout and "epoch 2/2" in r.stdout
    assert (tmp_path / "run" / "checkpoints" / "epoch-0002.npz").exists()
    r = sbatch([*TINY, "--set", "train.epochs=2"], fake_slurm)   # once more: finished
    assert r.returncode == 0 and "nothing to do" in r.stdout, r.stderr
    assert "dpbp.launch: restart" not in r.stdout
    r = sbatch([*TINY, "--set", "train.epochs=3"], dict(fake_slurm, SLURM_RESTART_COUNT="1"))
    assert r.returncode == 0 and "nothing to do" in r.stdout, r.stderr   # recorded: 2
    assert "are not applied on a restart" in r.stdout and "train.epochs = 3" in r.stdout
    assert not (tmp_path / "scontrol").exists()   # nothing to requeue


def test_slurm_sbatch_requeues_on_sigterm(fake_slurm, tmp_path):
    """SIGTERM to the batch script (Slurm's --signal=B:TERM@...) reaches the ranks through
    scancel, they checkpoint and stop; the script requeues the job, and the next start
    resumes from that checkpoint."""
    proc = subprocess.Popen(
        ["bash", str(ROOT / "launch" / "slurm.sbatch"), *TINY, "--set", "train.epochs=100000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=mpi_env(fake_slurm),
        cwd=ROOT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not [p for p, _ in checkpoint.list_all(tmp_path / "run") if p >= (2, 0)]:
            assert proc.poll() is None, "the job ended before its second epoch"
            assert time.monotonic() < deadline, "no second epoch in 60 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143 and "SIGTERM (time limit near)" in err, err
    assert (tmp_path / "scancel").read_text() == "--signal=TERM 4242\n"   # not to srun
    assert "dpbp: stopped by SIGTERM" in out
    assert (tmp_path / "scontrol").read_text() == "requeue 4242\n"
    r = sbatch([*TINY, "--set", "train.epochs=1"], fake_slurm)   # submitted again, fewer
    assert r.returncode == 0 and "nothing to do" in r.stdout, r.stderr   # epochs: done
