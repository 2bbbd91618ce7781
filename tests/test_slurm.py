"""Under a real Slurm: launch/slurm.sbatch trains, a preempted job checkpoints, is
requeued and ends bitwise like an uninterrupted run, and the supervisor restarts and stops
jobs with srun as its launcher.

They need a Slurm that accepts jobs from here: tests/slurm/local-slurm.sh starts a
one-machine one (.ci/run does, and exports SLURM_CONF and DPBP_TEST_SLURM=1); elsewhere
they skip. Every job has a time limit, every wait a timeout, and each test cancels its
jobs when it ends."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from dpbp.errors import UserError
from dpbp.service import checkpoint
from tests.conftest import ROOT, model_arrays, mpi_env, run_train

SCRIPT = ROOT / "tests" / "slurm" / "local-slurm.sh"
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
         "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def slurm_missing():
    """Why the Slurm tests cannot run here, or None."""
    if os.environ.get("DPBP_TEST_SLURM") != "1" or not os.environ.get("SLURM_CONF"):
        return ("no Slurm for the tests: start one with tests/slurm/local-slurm.sh up and "
                "export SLURM_CONF and DPBP_TEST_SLURM=1 (.ci/run does)")
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                           timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"sinfo failed: {e}"
    if r.returncode != 0 or not r.stdout.strip():
        return f"sinfo failed: {r.stderr.strip()}"
    return None


needs_slurm = pytest.mark.skipif(slurm_missing() is not None,
                                 reason=slurm_missing() or "Slurm is up")

# A deterministic run whose epochs take long enough to be interrupted in the middle
TRAIN = ["--set", "data.samples=1200", "--set", "model.hidden=[32]", "--set",
         "train.batch_size=64", "--set", "train.deterministic=true", "--set",
         "train.checkpoint_every_steps=5"]


def test_the_local_slurm_script_is_valid_shell():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


@pytest.fixture
def jobs():
    """Job ids submitted by a test; cancelled when it ends, whatever happened."""
    ids = []
    yield ids
    for job in ids:
        subprocess.run(["scancel", job], capture_output=True, timeout=60)
    for job in ids:
        wait_state(job, ENDED | {""}, 60)


def sbatch(jobs, options, command, env):
    r = subprocess.run(["sbatch", "--parsable", "--chdir", str(ROOT), "--time=10",
                        *options, *command], capture_output=True, text=True, timeout=60,
                       env=mpi_env(env), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    jobs.append(r.stdout.strip().split(";")[0])
    return jobs[-1]


def job(job_id):
    """scontrol's fields of the job, as a dict ({} once Slurm forgot it)."""
    r = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True,
                       timeout=60)
    return dict(re.findall(r"(\w+)=(\S*)", r.stdout)) if r.returncode == 0 else {}


def wait_state(job_id, states, seconds):
    deadline = time.monotonic() + seconds
    while (state := job(job_id).get("JobState", "")) not in states:
        assert time.monotonic() < deadline, f"job {job_id} still {state} after {seconds} s"
        time.sleep(0.2)
    return state


def wait_for(condition, what, job_id, seconds=60):
    deadline = time.monotonic() + seconds
    while not condition():
        assert job(job_id).get("JobState") not in ENDED, \
            f"job {job_id} ended before {what}: {job(job_id)}"
        assert time.monotonic() < deadline, f"no {what} in {seconds} s"
        time.sleep(0.05)


def newest_step(run):
    """Steps done at the newest checkpoint in `run`, -1 where there is none yet."""
    found = checkpoint.list_all(run)
    try:
        return checkpoint.load(found[-1][1])["step"] if found else -1
    except (UserError, OSError):   # pruned between the listing and the load
        return newest_step(run)


@needs_slurm
def test_sbatch_trains_to_the_end(tmp_path, jobs):
    run, out = tmp_path / "run", tmp_path / "job.out"
    job_id = sbatch(jobs, ["--nodes=1", "--ntasks=2", "--ntasks-per-node=2",
                           f"--output={out}"],
                    [str(ROOT / "launch" / "slurm.sbatch"), *TRAIN, "--set", "train.epochs=2"],
                    {"PYTHON": sys.executable, "RUN_DIR": str(run)})
    assert wait_state(job_id, ENDED, 120) == "COMPLETED", \
        out.read_text()
    text = out.read_text()
    assert "2 ranks (MPICH" in text and "epoch 2/2" in text and "done: 2 epochs" in text
    assert (run / "checkpoints" / "epoch-0002.npz").exists()
    # the same sbatch submitted again: the run is finished, so the job is done at once
    again = sbatch(jobs, ["--nodes=1", "--ntasks=2", "--ntasks-per-node=2",
                          f"--output={out}"],
                   [str(ROOT / "launch" / "slurm.sbatch"), *TRAIN, "--set", "train.epochs=2"],
                   {"PYTHON": sys.executable, "RUN_DIR": str(run)})
    assert wait_state(again, ENDED, 120) == "COMPLETED", out.read_text()
    text = out.read_text()
    assert "nothing to do: the run in" in text and "dpbp.launch: restart" not in text


def rank_pids(run):
    """Pids of the ranks (python -m dpbp.train) training in `run`."""
    found = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv[1:3] == [b"-m", b"dpbp.train"] and str(run).encode() in b" ".join(argv):
            found.append(int(name))
    return found


@needs_slurm
def test_a_preempted_job_is_requeued_and_ends_with_the_uninterrupted_weights(tmp_path, jobs):
    """A deterministic job interrupted three times, each start after a requeue waiting
    cred_expire (~11 s): a rank killed (restarts off, so the job fails, leaving MPICH's
    shared memory behind, and is requeued by hand: the script removes the stale segment,
    or MPI_Init would fail); `scancel --signal=TERM` (the ranks checkpoint and stop, the
    script requeues); `scontrol requeue` (Slurm signals and requeues). It resumes each
    time and ends with bitwise the weights of an uninterrupted run."""
    run, out = tmp_path / "run", tmp_path / "job.out"
    args = [*TRAIN, "--set", "train.epochs=40"]   # 680 steps
    job_id = sbatch(jobs, ["--nodes=1", "--ntasks=2", "--ntasks-per-node=2",
                           f"--output={out}"],
                    [str(ROOT / "launch" / "slurm.sbatch"), *args],
                    {"PYTHON": sys.executable, "RUN_DIR": str(run), "DPBP_MAX_RESTARTS": "0"})

    def after(restarts, steps):
        """Wait until the job started for the `restarts`-th time and trained `steps`."""
        at = newest_step(run)
        wait_for(lambda: job(job_id).get("Restarts") == str(restarts) and
                 out.exists() and out.read_text().count("resume: from") == restarts and
                 newest_step(run) >= at + steps, f"start {restarts}", job_id, seconds=120)

    after(0, 10)
    os.kill(rank_pids(run)[0], signal.SIGKILL)
    assert wait_state(job_id, ENDED, 120) == "FAILED"   # the supervisor gave up: 75
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)
    after(1, 10)
    subprocess.run(["scancel", "--signal=TERM", job_id], check=True, timeout=60)
    after(2, 10)
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)
    state = wait_state(job_id, ENDED, 180)
    text = out.read_text()
    assert state == "COMPLETED" and job(job_id)["Restarts"] == "3", text
    assert "giving up (exit 75)" in text and "slurm.sbatch: removed stale /dev/shm/" in text
    assert text.count("dpbp: stopped by SIGTERM") == 2 and "done: 40 epochs" in text, text
    assert text.count("requeueing job") == 1   # by the script; the others by hand, by Slurm
    reference = tmp_path / "reference"
    r = run_train([*args, "--set", f'run.dir="{reference}"'], timeout=300)
    assert r.returncode == 0, r.stderr
    final = "checkpoints/epoch-0040.npz"
    ours, theirs = model_arrays(run / final), model_arrays(reference / final)
    assert all(np.array_equal(ours[k], theirs[k]) for k in theirs)


@needs_slurm
def test_the_supervisor_with_srun_restarts_and_stops(tmp_path, jobs):
    """python -m dpbp.launch --launcher srun in a batch job: a killed rank is restarted
    as a new srun step; SIGTERM to the supervisor reaches the ranks through scancel, they
    checkpoint and it exits 143 without restarting."""
    run, out, once = tmp_path / "run", tmp_path / "job.out", tmp_path / "once"
    once.mkdir()
    supervisor = [sys.executable, "-m", "dpbp.launch", "--launcher", "srun", "--module",
                  "tests.faults", "--", *TRAIN, "--set", "train.epochs=100000",
                  "--set", f'run.dir="{run}"']
    job_id = sbatch(jobs, ["--nodes=1", "--ntasks=2", f"--output={out}", "--wrap",
                           "exec " + " ".join(f"'{a}'" for a in supervisor)], [],
                    {"DPBP_FAULT": "kill:1:7", "DPBP_FAULT_ONCE": str(once),
                     "PYTHONPATH": str(ROOT)})
    log = run / "restarts.jsonl"
    wait_for(lambda: log.exists() and newest_step(run) >= 15, "restart and progress", job_id)
    subprocess.run(["scancel", "--batch", "--signal=TERM", job_id], check=True, timeout=60)
    state = wait_state(job_id, ENDED, 120)
    text = out.read_text()
    assert state == "FAILED" and job(job_id)["ExitCode"] == "143:0", text
    [entry] = [json.loads(line) for line in log.read_text().splitlines()]
    assert entry["world_size"] == 2 and entry["resume_step"] == 5 and entry["cause"]["rank"] == 1
    assert "dpbp: stopped by SIGTERM" in text and text.count("dpbp.launch: restart") == 1
