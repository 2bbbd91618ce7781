"""python -m dpbp.launch, the supervisor: restarts after failures, shrinking to the slots
left, stop requests, and no process left behind.

Faults come from tests/faults.py, run as the ranks' module (--module tests.faults), each
once over all the attempts of a job (DPBP_FAULT_ONCE). After every test no process whose
command line names the test's folder may remain (the run directory is in each rank's
command line)."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from dpbp import launch as supervisor
from dpbp.errors import EXIT_RESTARTS_EXHAUSTED, UserError
from dpbp.service import checkpoint, config, hostfile, processes
from tests.conftest import ROOT, model_arrays, mpi_env, run_train, run_with_timeout, tiny_run

TINY = ["--set", "data.samples=300", "--set", "model.hidden=[8]"]   # 3 steps an epoch
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the supervisor's hold on its processes is Linux's "
                                       "(/proc, prctl)")


def job_processes(tag):
    """Pids of live processes (this one aside) whose command line contains `tag`."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if tag.encode() in f.read():
                        found.append(int(name))
            except OSError:
                pass
    return found


@pytest.fixture(autouse=True)
def nothing_left_behind(tmp_path):
    yield
    deadline = time.monotonic() + 10
    while (left := job_processes(str(tmp_path))) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == [], "processes of the job outlived its supervisor"


def fault_env(tmp_path, faults):
    once = tmp_path / "once"
    once.mkdir(exist_ok=True)
    return {"DPBP_FAULT": faults, "DPBP_FAULT_ONCE": str(once), "PYTHONPATH": str(ROOT)}


def launch(options, train_args, env=None, timeout=180):
    return run_with_timeout([sys.executable, "-m", "dpbp.launch", *options, "--", *train_args],
                            timeout, env=env)


def start(options, train_args, env=None):
    """The supervisor as a process, for tests that signal it."""
    return subprocess.Popen([sys.executable, "-m", "dpbp.launch", *options, "--", *train_args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=mpi_env(env), cwd=ROOT, start_new_session=True)


def finish(proc, timeout=120):
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the supervisor did not end in {timeout} s:\n" + "\n".join(
            proc.communicate()))


def wait_for(condition, proc, what, seconds=60):
    deadline = time.monotonic() + seconds
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the supervisor ended before {what}:\n" + "\n".join(proc.communicate()))
        assert time.monotonic() < deadline, f"no {what} in {seconds} s"
        time.sleep(0.05)


def restarts(run):
    path = run / "restarts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def marker_pid(tmp_path, fault):
    """The pid of the rank that carried out `fault` (tests/faults.py's DPBP_FAULT_ONCE)."""
    path = tmp_path / "once" / fault.replace(":", "-")
    return int(path.read_text()) if path.exists() and path.read_text() else None


# ----------------------------------------------------------------------------- hostfiles

def test_hostfiles_of_both_mpis(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("# the cluster\nnode01:4\n\nnode02 slots=2 max_slots=8  # Open MPI\n"
                    "node03\nnode01:2\nnode04:0\n")
    hosts = hostfile.read(path)
    assert hosts == [("node01", 6), ("node02", 2), ("node03", 1)]
    assert hostfile.total(hosts) == 9
    assert hostfile.render(hosts, "mpich") == "node01:6\nnode02:2\nnode03:1\n"
    assert hostfile.render(hosts, "openmpi").splitlines()[1] == "node02 slots=2"
    for bad in ("node01:four", "node01 slots=x", "node01 node02", "a:1:2"):
        path.write_text(bad + "\n")
        with pytest.raises(UserError, match="line 1: cannot read"):
            hostfile.read(path)
    with pytest.raises(UserError, match="cannot read it"):
        hostfile.read(tmp_path / "missing")
    path.write_text("\ufeffnode01:2\n", encoding="utf-8")   # a Windows editor's mark
    assert hostfile.read(path) == [("node01", 2)]
    for digits in ("node01:\u0663", "node01 slots=\u00b2"):   # int() would take the first
        path.write_text(digits + "\n", encoding="utf-8")
        with pytest.raises(UserError, match="line 1: cannot read"):
            hostfile.read(path)


def test_which_rank_failed_is_weighed_once_the_job_ended():
    """A rank's own failure line may be the consequence of another's death and come
    first: the launcher's word on the process that ended the job wins (a record once
    named rank 0 for a killed rank 1). For the watchdog's exit 4 every rank's watchdog
    fires, and the launcher names the first: the rank that froze is the one stuck
    outside MPI, or the one that did not say it waited. Where nothing tells, why not."""
    evidence = supervisor.Evidence(2)
    evidence.read(b"dpbp: rank 0 failed: Exception: Other MPI error; ending the job\n")
    evidence.read(b"=   PID 101 RUNNING AT vm\n")
    evidence.pids = {100: 0, 101: 1}   # seen before or after the line: mapped at the end
    assert evidence.rank(9) == (1, None)
    evidence.pids = {100: 0}
    assert evidence.rank(9) == (None, "the launcher named process 101, not a rank this "
                                      "supervisor saw running")
    watchdog = b"dpbp: rank %d: no training step finished in 2 s (run.watchdog_seconds), %s"
    for lines, world, rank in (
            ([b"waiting in MPI for another rank", b"stuck outside MPI (in faults.py:9 x)",
              b"waiting in MPI for another rank"], 3, 1),
            ([b"waiting in MPI for another rank", None, b"waiting in MPI for another rank"],
             3, 1),   # stopped whole (SIGSTOP): its watchdog said nothing
            ([b"waiting in MPI for another rank", None, None], 3, None)):
        evidence = supervisor.Evidence(world)
        evidence.pids = {100: 0}
        for r, line in enumerate(lines):
            if line:
                evidence.read(watchdog % (r, line))
        evidence.read(b"=   PID 100 RUNNING AT vm\n")   # rank 0's watchdog ended the job
        found, why = evidence.rank(4)
        assert found == rank and (why is None) == (rank is not None)
    assert why == ("the watchdog ended the job (exit 4); no rank's watchdog said it was "
                   "stuck outside MPI, and 2 ranks did not say it waited in MPI")


class Stops:
    """StopRequests without signals: `sleep` runs `meanwhile` instead of waiting."""

    def __init__(self, meanwhile=lambda: None):
        self.received, self.meanwhile = [], meanwhile

    def sleep(self, seconds):
        self.meanwhile()


def test_a_hostfile_malformed_at_a_restart_is_read_again_then_named_with_the_job(
        tmp_path, capsys):
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost:two\n")   # an operator half-way through an edit
    args = supervisor.parse(["--hostfile", str(hosts), "--"])
    cause = {"exit_code": 9, "signal": "SIGKILL", "rank": 1}
    fixed = supervisor.hosts_again(args, Stops(lambda: hosts.write_text("localhost:2\n")), 2,
                               cause)
    assert fixed == (2, [("localhost", 2)])
    assert "line 1: cannot read 'localhost:two'" in capsys.readouterr().err
    hosts.write_text("localhost:two\n")
    with pytest.raises(UserError, match=r"line 1: cannot read 'localhost:two'.*; the job that "
                                        r"ended with exit 9 \(rank 1, SIGKILL\) was not "
                                        "restarted"):
        supervisor.hosts_again(args, Stops(), 2, cause)


def test_a_full_disk_while_recording_a_restart_is_one_line(tmp_path, capsys):
    (tmp_path / "restarts.jsonl").symlink_to("/dev/full")   # every write: ENOSPC
    cfg = config.load(None, [f'run.dir="{tmp_path}"'])
    supervisor.log_restart(cfg, 1, {"exit_code": 9, "signal": "SIGKILL", "rank": 1}, 2, None, 0)
    out, err = capsys.readouterr()
    assert "dpbp.launch: restart 1: the job ended with exit 9" in out
    assert err == (f"dpbp.launch: restart 1 is not recorded in {tmp_path / 'restarts.jsonl'} "
                   "(No space left on device); restarting all the same\n")


def test_stale_segments_are_removed_only_when_nobody_holds_them(tmp_path):
    stale, opened, mapped = (f"/dev/shm/mpich_shm_dpbp_test_{os.getpid()}_{n}"
                             for n in range(3))
    for path in (stale, opened, mapped):
        with open(path, "wb") as f:
            f.write(b"x" * 4096)
    holders = [subprocess.Popen(["sleep", "60"], stdin=open(opened)),
               subprocess.Popen([sys.executable, "-c", "import mmap, sys, time; "
                                 f"f = open({mapped!r}, 'r+b'); m = mmap.mmap(f.fileno(), 0); "
                                 "f.close(); print('mapped', flush=True); time.sleep(60)"],
                                stdout=subprocess.PIPE, text=True)]
    try:
        assert holders[1].stdout.readline() == "mapped\n"   # held by its mapping alone
        removed = processes.remove_stale_segments(settle=0.1)
        assert stale in removed and opened not in removed and mapped not in removed
        assert not os.path.exists(stale) and os.path.exists(opened) and os.path.exists(mapped)
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()
        for path in (stale, opened, mapped):
            if os.path.exists(path):
                os.unlink(path)


# ----------------------------------------------------------------------------- the command line

def test_help_and_bad_arguments(tmp_path):
    r = launch(["--help"], [])
    assert r.returncode == 0 and "--max-restarts" in r.stdout
    assert f"{EXIT_RESTARTS_EXHAUSTED} gave up" in r.stdout
    (tmp_path / "hosts").write_text("localhost:1\n")
    (tmp_path / "bad").write_text("localhost:one\n")
    (tmp_path / "digits").write_text("localhost slots=²\n")   # a digit, not an ASCII one
    for options, message in (
            (["-n", "0"], "-n must be at least 1"),
            (["--max-restarts", "-1"], "--max-restarts must be at least 0"),
            (["-n", "2", "--hostfile", str(tmp_path / "hosts")], "not -n and --hostfile"),
            (["--hostfile", str(tmp_path / "bad")], "line 1: cannot read 'localhost:one'"),
            (["--hostfile", str(tmp_path / "hosts"), "--min-ranks", "2"],
             "1 slot, fewer than --min-ranks 2"),
            (["--launcher", "srun"], "inside a Slurm allocation"),
            (["--module", "no_such_module"], "--module no_such_module: no such module here"),
            (["--hostfile", str(tmp_path / "digits")], "line 1: cannot read 'localhost slots=²'"),
            (["--frobnicate"], "unrecognized arguments")):
        r = launch(options, [*TINY, "--set", f'run.dir="{tmp_path / "run"}"'],
                   env={"SLURM_JOB_ID": ""})
        assert r.returncode == 2, (options, r.stderr)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("dpbp: error: "), r.stderr
        assert message in r.stderr, (options, r.stderr)
    assert not (tmp_path / "run").exists()


def test_hosts_inline_and_options_for_the_launcher(tmp_path):
    """-H gives the hosts as a hostfile does, fixed for the run; --launcher-args reach
    mpirun as given (here a variable that every rank sees), unless they set what
    dpbp.launch sets; the trainer's options before `--` are pointed after it."""
    args = supervisor.parse(["-H", "node01:2,node02,node01:1", "--launcher-args",
                                "-bind-to core -genv A 'b c'", "--", "--quiet"])
    assert args.hosts == [("node01", 3), ("node02", 1)] and args.train_args == ["--quiet"]
    assert supervisor.world_size(args) == (4, args.hosts)
    assert args.launcher_args == ["-bind-to", "core", "-genv", "A", "b c"]
    for argv, message in (
            (["-n", "2", "--config", "my.toml"], "unrecognized arguments: --config my.toml; "
             "dpbp.train's options go after --: python -m dpbp.launch [options] -- --config"),
            (["-H", "a:2", "-n", "2"], "not -n and -H"),
            (["-H", "a:two"], "-H a:two: cannot read 'a:two'; expected HOST:SLOTS"),
            (["-H", "a:1", "--launcher", "srun"], "-H is for mpirun"),
            (["--launcher-args", "-np 4"], "-np sets the rank count, which dpbp.launch sets"),
            (["--launcher-args=--host=a,b"], "--host=a,b sets the hosts"),
            (["--launcher", "srun", "--launcher-args", "-n4 --exclusive"], "-n4 sets the rank "
             "count, which dpbp.launch sets itself: give -n, or leave it to the allocation")):
        with pytest.raises(UserError, match=re.escape(message)):
            supervisor.parse(argv)
    run = tmp_path / "run"
    mpirun = supervisor.Launcher("mpirun", "dpbp.train")
    env_flag = "-genv OPENBLAS_NUM_THREADS 1" if mpirun.flavour == "mpich" else \
        "-x OPENBLAS_NUM_THREADS=1"
    r = launch(["-H", "localhost:2", "--launcher-args", env_flag],
               [*TINY, "--set", "train.epochs=1", "--set", f'run.dir="{run}"'])
    assert r.returncode == 0, r.stderr
    assert "2 ranks" in r.stdout and "OPENBLAS_NUM_THREADS=1 set by the user" in r.stdout


def test_bad_input_ends_it_at_once(tmp_path):
    r = launch(["-n", "2"], [*TINY, "--set", "train.epochs=0"])   # seen before any launch
    assert r.returncode == 2 and "train.epochs" in r.stderr and "dpbp.launch: restart" not in r.stdout
    run = tmp_path / "run"
    r = launch(["-n", "2"], ["--set", 'data.source="npz"', "--set",   # seen by the job
                             f'data.path="{tmp_path / "missing.npz"}"', "--set",
                             f'run.dir="{run}"'])
    assert r.returncode == 2 and "missing.npz" in r.stderr, r.stderr
    assert "which a restart cannot heal" in r.stderr and "dpbp.launch: restart" not in r.stdout
    assert restarts(run) == []


# ----------------------------------------------------------------------------- restarts

def test_a_killed_rank_is_restarted_and_the_run_ends_as_if_nothing_happened(tmp_path):
    run = tmp_path / "run"
    args = [*TINY, "--set", "train.epochs=4", "--set", "train.checkpoint_every_steps=2",
            "--set", f'run.dir="{run}"']
    r = launch(["-n", "2", "--module", "tests.faults"], args,
               env=fault_env(tmp_path, "kill:1:5"))   # epoch 2, after the step-4 save
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("dpbp.launch: restart") == 1 and "restart 1: the job ended with " \
        "exit 9 (rank 1, SIGKILL); resuming from step 4" in r.stdout, r.stdout
    [entry] = restarts(run)
    assert entry["cause"] == {"exit_code": 9, "signal": "SIGKILL", "rank": 1}
    assert entry["world_size"] == 2 and entry["resume_step"] == 4 and entry["time"]
    assert entry["resume_from"].endswith("epoch-0001-batch-000001.npz")
    reference = tmp_path / "reference"
    r = run_train([*TINY, "--set", "train.epochs=4", "--set", f'run.dir="{reference}"'], ranks=2)
    assert r.returncode == 0, r.stderr
    final = "checkpoints/epoch-0004.npz"
    ours, theirs = model_arrays(run / final), model_arrays(reference / final)
    assert all(np.array_equal(ours[k], theirs[k]) for k in theirs)   # same world size: bitwise


STOPPER = """
import atexit, os, signal, sys
import dpbp.train

def stop_the_launcher():   # mpirun stopped once the ranks are done: it never exits
    if os.environ.get("PMI_RANK") == "0":
        with open(f"/proc/{os.getppid()}/stat") as f:   # the rank's proxy; its parent:
            os.kill(int(f.read().rsplit(")", 1)[1].split()[1]), signal.SIGSTOP)

atexit.register(stop_the_launcher)
dpbp.train.cli()
"""


def test_a_launcher_that_outlives_its_ranks_is_ended_but_a_suspended_job_is_not(tmp_path):
    """A job stopped whole (SIGSTOP to mpirun and its ranks) for longer than the grace is
    left alone, and goes on when continued; a launcher that never exits after its ranks
    have all ended (the job finished) is ended after the grace: exit 0, no restart."""
    (tmp_path / "stopper.py").write_text(STOPPER)
    run = tmp_path / "run"
    grace = "import sys, dpbp.launch as l; l.LAUNCHER_GRACE = 1.0; sys.exit(l.main())"
    proc = subprocess.Popen(
        [sys.executable, "-c", grace, "-n", "2", "--module", "stopper", "--", *TINY,
         "--set", "train.epochs=40", "--set", f'run.dir="{run}"'], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True,
        env=mpi_env({"PYTHONPATH": f"{tmp_path}:{ROOT}"}))
    try:
        wait_for(lambda: [p for p, _ in checkpoint.list_all(run) if p >= (2, 0)], proc,
                 "second epoch")
        job = [pid for pid in job_processes(str(run)) if pid != proc.pid]   # mpirun, ranks
        for pid in job:
            os.kill(pid, signal.SIGSTOP)
        time.sleep(2.0)   # twice the grace, and more: stopped ranks have not ended
        assert proc.poll() is None
        for pid in job:
            os.kill(pid, signal.SIGCONT)
        out, err = finish(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out + err
    assert "did not exit in 1 s after all its ranks ended; ended it" in err, err
    assert json.loads((run / "run.json").read_text())["state"] == "completed"
    assert restarts(run) == [] and checkpoint.list_all(run)[-1][0] == (40, 0)


@pytest.mark.parametrize("fault, code, why", [
    ("nan:0:4", 3, "which a restart cannot heal"),
    ("sigterm:1:4", 143, "the job stopped on SIGTERM from outside this supervisor"),
    ("exit:1:4", None, None)])
def test_what_a_retry_cannot_heal_is_not_retried(tmp_path, fault, code, why):
    """Divergence (3) ends the supervisor at once, and so does a stop that someone asked
    of the ranks themselves (a SIGTERM to a rank: Slurm, scancel, kill); an unknown failure
    (a rank's sys.exit(5)) is retried."""
    run = tmp_path / "run"
    env = fault_env(tmp_path, fault)
    r = launch(["-n", "2", "--module", "tests.faults"],
               [*TINY, "--set", "train.epochs=3", "--set", f'run.dir="{run}"'], env=env)
    if code is not None:
        assert r.returncode == code and why in r.stderr, r.stderr
        assert restarts(run) == [] and "dpbp.launch: restart" not in r.stdout
    else:
        assert r.returncode == 0, r.stderr
        assert [e["cause"]["rank"] for e in restarts(run)] == [1]


def test_restarts_exhausted_with_stdout_closed(tmp_path):
    """Piped into `head -1`, the supervisor's stdout closes before its first line: its
    lines stop there, and the job, its restarts and their records go on."""
    run = tmp_path / "run"
    env = {"DPBP_FAULT": "kill:1:4", "PYTHONPATH": str(ROOT)}   # every attempt: no ONCE
    reader, writer = os.pipe()
    os.close(reader)   # the reader is gone
    proc = subprocess.Popen(
        [sys.executable, "-m", "dpbp.launch", "-n", "2", "--max-restarts", "2", "--module",
         "tests.faults", "--", *TINY, "--set", "train.epochs=3", "--set",
         f'run.dir="{run}"'], stdout=writer, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env=mpi_env(env), start_new_session=True)
    os.close(writer)
    _, err = finish(proc)
    assert proc.returncode == EXIT_RESTARTS_EXHAUSTED and "Traceback" not in err, err
    assert "after 2 restarts: giving up" in err
    assert [e["restart"] for e in restarts(run)] == [1, 2]
    assert [e["resume_step"] for e in restarts(run)] == [3, 3]


def test_a_job_that_exits_0_before_the_end_is_not_done(tmp_path):
    """A launcher that reports success although training stopped early (MPICH's mpirun
    can, after a second Ctrl-C) is taken for a failure."""
    (tmp_path / "quitter.py").write_text("import sys\nsys.exit(0)\n")
    r = launch(["-n", "1", "--max-restarts", "1", "--module", "quitter"],
               [*TINY, "--set", f'run.dir="{tmp_path / "run"}"'],
               env={"PYTHONPATH": str(tmp_path)})
    assert r.returncode == EXIT_RESTARTS_EXHAUSTED, r.stdout + r.stderr
    assert "restart 1: the job ended with exit 0; resuming afresh" in r.stdout


def test_ranks_that_lose_their_launcher_are_ended_and_the_job_restarted(tmp_path):
    """A killed hydra_pmi_proxy leaves its ranks running as orphans: the supervisor (a
    child subreaper) gets them, ends them and restarts the job."""
    run = tmp_path / "run"
    proc = start(["-n", "2", "--module", "tests.faults"],
                 [*TINY, "--set", "train.epochs=3", "--set", f'run.dir="{run}"'],
                 env=fault_env(tmp_path, "hang:1:4"))
    try:
        wait_for(lambda: marker_pid(tmp_path, "hang:1:4"), proc, "hung rank")
        rank = marker_pid(tmp_path, "hang:1:4")
        with open(f"/proc/{rank}/stat") as f:
            proxy = int(f.read().rsplit(")", 1)[1].split()[1])
        with open(f"/proc/{proxy}/cmdline", "rb") as f:
            assert b"hydra_pmi_proxy" in f.read()
        os.kill(proxy, signal.SIGKILL)
        out, err = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out + err
    [entry] = restarts(run)
    assert entry["cause"]["lost_launcher"] is True and entry["cause"]["rank"] in (0, 1)


# ----------------------------------------------------------------------------- shrinking

def test_shrinking_to_the_slots_left_gives_the_weights_of_an_uninterrupted_run(
        tmp_path, uneven_npz):
    """train.deterministic at 3 ranks; a rank is killed, the job restarts at 3; then a
    health check drops a slot from the hostfile and a rank dies (a lost node): the job
    restarts at 2 and ends with bitwise the weights of one uninterrupted process."""
    run, hosts = tmp_path / "run", tmp_path / "hosts"
    hosts.write_text("localhost:3   # MPICH's form\n")
    args = ["--set", 'data.source="npz"', "--set", f'data.path="{uneven_npz}"',
            "--set", "data.shuffle=true", "--set", "train.batch_size=32",
            "--set", "model.hidden=[16]", "--set", "train.epochs=4",
            "--set", "train.deterministic=true", "--set", "train.checkpoint_every_steps=3"]
    proc = start(["--hostfile", str(hosts), "--min-ranks", "2", "--module", "tests.faults"],
                 [*args, "--set", f'run.dir="{run}"'],
                 env=fault_env(tmp_path, "kill:1:5,hang:2:16"))   # 7 steps an epoch
    try:
        wait_for(lambda: marker_pid(tmp_path, "hang:2:16"), proc, "second failure")
        hosts.write_text("# node lost\nlocalhost slots=2\n")   # Open MPI's form
        os.kill(marker_pid(tmp_path, "hang:2:16"), signal.SIGKILL)
        out, err = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out + err
    assert [(e["world_size"], e["resume_step"]) for e in restarts(run)] == [(3, 3), (2, 15)]
    assert "3 ranks" in out and "2 ranks (MPICH" in out
    reference = tmp_path / "reference"
    r = run_train([*args, "--set", f'run.dir="{reference}"'])
    assert r.returncode == 0, r.stderr
    final = "checkpoints/epoch-0004.npz"
    ours, theirs = model_arrays(run / final), model_arrays(reference / final)
    assert all(np.array_equal(ours[k], theirs[k]) for k in theirs)


def test_too_few_slots_left_gives_up(tmp_path):
    run, hosts = tmp_path / "run", tmp_path / "hosts"
    hosts.write_text("localhost:2\n")
    proc = start(["--hostfile", str(hosts), "--min-ranks", "2", "--module", "tests.faults"],
                 [*TINY, "--set", "train.epochs=3", "--set", f'run.dir="{run}"'],
                 env=fault_env(tmp_path, "hang:1:4"))
    try:
        wait_for(lambda: marker_pid(tmp_path, "hang:1:4"), proc, "hung rank")
        hosts.write_text("localhost:1\n")
        os.kill(marker_pid(tmp_path, "hang:1:4"), signal.SIGKILL)
        out, err = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_RESTARTS_EXHAUSTED, out + err
    assert "1 slot left, fewer than --min-ranks 2: giving up" in err and restarts(run) == []


# ----------------------------------------------------------------------------- stopping

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT],
                         ids=lambda s: s.name)
def test_a_stop_signal_to_the_supervisor_checkpoints_and_does_not_restart(tmp_path, signum):
    run = tmp_path / "run"
    proc = start(["-n", "2"], [*TINY, "--set", "train.epochs=100000", "--set",
                               f'run.dir="{run}"'])
    try:
        wait_for(lambda: [p for p, _ in checkpoint.list_all(run) if p >= (2, 0)], proc,
                 "second epoch")
        proc.send_signal(signum)
        out, err = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signum, out + err
    stopped_by = "SIGINT" if signum == signal.SIGINT else "SIGTERM"   # SIGHUP passed on as TERM
    assert f"dpbp: stopped by {stopped_by} after" in out and "continue with the same " \
        "command and --resume" in out
    assert json.loads((run / "run.json").read_text())["state"] == "stopped"
    assert "dpbp.launch: restart" not in out and restarts(run) == []
    if signum == signal.SIGINT:   # after Ctrl-C, the same command continues the run
        epochs = checkpoint.list_all(run)[-1][0][0] + 1
        r = launch(["-n", "2"], [*TINY, "--set", f"train.epochs={epochs}", "--set",
                                 f'run.dir="{run}"'])
        assert r.returncode == 0 and "resume: from" in r.stdout, r.stdout + r.stderr
        assert f"done: {epochs} epochs" in r.stdout


def test_a_run_that_stopped_early_is_done(tmp_path, tiny_npz):
    """Early stopping (exit 0) is the run's success, not a failure to restart; and the
    same command on the finished run is done at once."""
    run = tmp_path / "run"
    args = tiny_run(tiny_npz, run, "--set", "train.epochs=9", "--set",
                    "train.early_stopping_patience=1")
    for _ in range(2):
        r = launch(["-n", "1"], args)
        assert r.returncode == 0 and "dpbp.launch: restart" not in r.stdout, r.stdout + r.stderr
        assert json.loads((run / "run.json").read_text())["state"] == "early_stopped"
    assert "nothing to do" in r.stdout and restarts(run) == []


def test_a_second_ctrl_c_ends_the_job_at_once_and_never_exits_0(tmp_path):
    """mpirun itself may exit 0 after two quick Ctrl-Cs; the supervisor ends the job at
    the second and exits 130."""
    run = tmp_path / "run"
    proc = start(["-n", "2"], [*TINY, "--set", "train.epochs=100000", "--set",
                               f'run.dir="{run}"'])
    try:
        wait_for(lambda: checkpoint.list_all(run), proc, "first epoch")
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out + err
    assert "dpbp.launch: restart" not in out and restarts(run) == []


def test_a_killed_supervisor_takes_the_job_down(tmp_path):
    """... and leaves no file behind: the launcher's hostfile has no name."""
    run, hosts, tmp = tmp_path / "run", tmp_path / "hosts", tmp_path / "tmp"
    hosts.write_text("localhost:2\n")
    tmp.mkdir()
    proc = start(["--hostfile", str(hosts)], [*TINY, "--set", "train.epochs=100000", "--set",
                                              f'run.dir="{run}"'], env={"TMPDIR": str(tmp)})
    try:
        wait_for(lambda: checkpoint.list_all(run), proc, "first epoch")
        assert len(job_processes(str(run))) >= 3   # supervisor, mpirun, 2 ranks
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        deadline = time.monotonic() + 10
        while job_processes(str(run)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert job_processes(str(run)) == []
        assert not [name for name in os.listdir(tmp) if name.startswith("dpbp-hosts")]
    finally:
        if proc.poll() is None:
            proc.kill()
