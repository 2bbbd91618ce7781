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


@needs_slurm
def test_a_preempted_job_is_requeued_and_ends_with_the_uninterrupted_weights(tmp_path, jobs):
    """Preempted twice: by `scancel --signal=TERM` (the ranks stop, the script requeues)
    and by `scontrol requeue` (Slurm signals and requeues). Each time the ranks save a
    checkpoint; the requeued job resumes from it (each start waits cred_expire, ~11 s)."""
    run, out = tmp_path / "run", tmp_path / "job.out"
    args = [*TRAIN, "--set", "train.epochs=40"]
    job_id = sbatch(jobs, ["--nodes=1", "--ntasks=2", "--ntasks-per-node=2",
                           f"--output={out}"],
                    [str(ROOT / "launch" / "slurm.sbatch"), *args],
                    {"PYTHON": sys.executable, "RUN_DIR": str(run)})
    wait_for(lambda: newest_step(run) >= 10, "checkpoint at step 10", job_id)
    subprocess.run(["scancel", "--signal=TERM", job_id], check=True, timeout=60)
    wait_for(lambda: job(job_id).get("Restarts") == "1" and newest_step(run) >= 10 and
             "resuming" in out.read_text(), "requeued start", job_id, seconds=90)
    first_stop = newest_step(run)
    wait_for(lambda: newest_step(run) >= first_stop + 10, "progress after the requeue",
             job_id, seconds=90)
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)
    state = wait_state(job_id, ENDED, 180)
    text = out.read_text()
    assert state == "COMPLETED" and job(job_id)["Restarts"] == "2", text
    assert text.count("dpbp: stopped by SIGTERM") == 2 and "done: 40 epochs" in text, text
    assert "requeueing job" in text   # the first time by the script, the second by Slurm
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
