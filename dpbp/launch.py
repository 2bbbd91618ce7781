"""Unattended training: run dpbp.train under an MPI launcher, and when the job fails,
restart it from its newest checkpoint, on the ranks that are left.

    python -m dpbp.launch -n 4 -- --config my.toml                     # a workstation
    python -m dpbp.launch --hostfile hosts --max-restarts 5 --min-ranks 8 -- --config my.toml
    python -m dpbp.launch -H node01:16,node02:16 -- --config my.toml   # fixed hosts
    python -m dpbp.launch --launcher srun -- --config my.toml          # inside sbatch/salloc
    python -m dpbp.launch -n 4 --launcher-args "-bind-to core" -- --config my.toml

The first start adds --resume auto (the run starts, or continues where it stopped). A
failed job (a rank that crashed or was killed, a lost node, the watchdog ending a hang)
is started again with --resume auto --restart after a short backoff, up to
--max-restarts times: it continues with the run's recorded config (run.json). What a
retry cannot heal ends it at once: bad input (exit 2, data changed under the run among
it) and divergence (exit 3). A run that finished, early stopping included, is done. Before
each start the hostfile is read again, so a host whose line was removed is left out; the
job continues on the slots left (down to --min-ranks) with the same global batches, and
under train.deterministic with the same bits. Each restart is one line on stdout and one
JSON record in RUN_DIR/restarts.jsonl. SIGTERM, SIGINT and SIGHUP stop the job with a
checkpoint and no restart. No rank outlives the supervisor (dpbp/service/processes.py),
and a launcher that outlives all its ranks is ended. A closed stdout ends its lines, not
the run. Hosts given inline (-H) are fixed for the whole run: shrinking needs a hostfile.
--launcher-args go to mpirun or srun as given, but for what dpbp.launch sets itself
(the rank count, the hosts). See docs/recovery.md.
"""

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from dpbp.errors import (
    EXIT_BAD_INPUT,
    EXIT_DIVERGED,
    EXIT_HUNG,
    EXIT_RESTARTS_EXHAUSTED,
    ArgumentParser,
    UserError,
    plural,
)
from dpbp.parallel.threads import available_cores
from dpbp.service import checkpoint, config, hostfile, processes, record, run_dir

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STOPPED = {128 + s for s in STOP_SIGNALS}   # the ranks' codes for a stop after a checkpoint
FIRST_BACKOFF, MAX_BACKOFF = 1.0, 30.0   # seconds before a restart: doubling, capped
POLL = 0.1                               # seconds between looks at the running job


def say(text):
    line_to(sys.stdout, f"dpbp.launch: {text}")


def note(text):
    line_to(sys.stderr, f"dpbp.launch: {text}")


def line_to(stream, line):
    """Print a line; where the stream is closed (a reader that is gone: `| head -1`), the
    lines stop there (the stream then leads nowhere) and the supervisor, its job and its
    records go on."""
    try:
        print(line, file=stream, flush=True)
    except (OSError, ValueError):
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


# ----------------------------------------------------------------------------- the job

class Launcher:
    """How to start N ranks of `python -m MODULE ARGS`, and how to ask them to stop;
    `extra`: the user's own options for the launcher (--launcher-args, split)."""

    def __init__(self, kind, module, extra=()):
        self.kind, self.module, self.extra = kind, module, list(extra)
        self.env = dict(os.environ)
        if kind == "srun":
            self.exe, self.flavour = shutil.which("srun"), "srun"
            if not os.environ.get("SLURM_JOB_ID"):
                raise UserError("--launcher srun runs inside a Slurm allocation (sbatch or "
                                "salloc): SLURM_JOB_ID is not set")
        else:
            beside = os.path.join(os.path.dirname(sys.executable), "mpirun")
            self.exe = beside if os.access(beside, os.X_OK) else shutil.which("mpirun")
            self.flavour = self.exe and mpi_flavour(self.exe)
        if not self.exe:
            raise UserError(f"no {kind} found" + ("; pip install mpich brings an "
                                                   "mpirun" if kind == "mpirun" else ""))
        # srun answers SIGTERM by ending its tasks; mpirun's proxies end theirs when it dies
        self.death_signal = signal.SIGTERM if kind == "srun" else signal.SIGKILL

    def command(self, n, hosts_path, train_args):
        rank_cmd = [sys.executable, "-m", self.module, *train_args]
        if self.flavour == "srun":
            plugin = os.environ.get("DPBP_SRUN_MPI", "pmi2")
            return [self.exe, f"--mpi={plugin}", "--kill-on-bad-exit=1", *self.extra,
                    "-n", str(n), *rank_cmd]
        cmd = [self.exe, *self.extra, "-n", str(n)]
        oversubscribed = hosts_path is None and n > len(available_cores()) and \
            "--oversubscribe" not in self.extra
        if self.flavour == "openmpi":
            cmd += ["--hostfile", hosts_path] if hosts_path else (
                ["--oversubscribe"] if oversubscribed else [])
            if os.geteuid() == 0:
                self.env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        else:
            cmd += ["-f", hosts_path] if hosts_path else []
            if oversubscribed:   # waiting ranks yield their core rather than busy-poll it
                self.env.setdefault("MPIR_CVAR_ENABLE_HEAVY_YIELD", "1")
        return cmd + rank_cmd

    def request_stop(self, proc, signum):
        """Pass a stop request on: SIGINT stays SIGINT, SIGTERM and SIGHUP become SIGTERM
        (mpirun ends the ranks on SIGHUP without a checkpoint). mpirun passes SIGTERM and
        SIGINT on to every rank. srun answers its own SIGTERM by killing the tasks, so
        under srun the ranks are asked with scancel, and only while the job runs: when
        Slurm ends a job (scontrol requeue, a preemption) it signals the ranks itself, and
        a second SIGTERM would end them at once, without a checkpoint."""
        sig = signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM
        if self.flavour != "srun":
            if proc.poll() is None:
                os.kill(proc.pid, sig)
        elif slurm_job_state(os.environ["SLURM_JOB_ID"]) == "RUNNING":
            subprocess.run(["scancel", f"--signal={sig.name[3:]}", os.environ["SLURM_JOB_ID"]],
                           timeout=60, check=False)


def slurm_job_state(job):
    """The job's JobState (RUNNING, COMPLETING, ...), or "" where scontrol cannot tell."""
    try:
        out = subprocess.run(["scontrol", "show", "job", job], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    m = re.search(r"JobState=(\w+)", out)
    return m.group(1) if m else ""


def mpi_flavour(exe):
    try:
        version = subprocess.run([exe, "--version"], capture_output=True, text=True,
                                 timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "mpich"
    return "openmpi" if "Open MPI" in version or "OpenRTE" in version else "mpich"


# What launchers and ranks print about a failure (see Evidence).
LAUNCHER_RANK = (re.compile(rb"process rank (\d+) with PID"),           # Open MPI
                 re.compile(rb"srun: error: \S+: tasks? (\d+)"))         # Slurm
PID_LINE = re.compile(rb"^=+\s+PID (\d+) RUNNING AT")                   # MPICH (Hydra)
OWN_LINE = re.compile(rb"dpbp: rank (\d+) failed")                       # dpbp's comm.run
WATCHDOG_LINE = re.compile(rb"dpbp: rank (\d+): .*\(run\.watchdog_seconds\), "
                           rb"(stuck outside|waiting in) MPI")          # dpbp's Watchdog
SIGNAL_LINE = re.compile(rb"(?:\(signal|on signal) (\d+)")
LAUNCHER_GRACE = 30.0   # seconds a launcher may outlive all its ranks before it is ended


class Evidence:
    """Which rank failed, from what the job's lines and processes said, weighed once it
    ended (`rank`). The launcher's word on the process that ended the job comes first
    (or a rank that lost its launcher), over a rank's own failure line, which may be the
    consequence of another's. But for
    the watchdog's exit 4 the launcher names the rank whose watchdog fired first, and
    every rank's watchdog fires: the rank that froze is the one that said it was stuck
    outside MPI, or else the one rank that did not say it waited in MPI for another."""

    def __init__(self, world):
        self.world = world
        self.pids = {}           # pid -> rank, of the ranks seen running
        self.named = self.pid = self.own = self.lost = self.signum = None
        self.stuck, self.waiting = set(), set()

    def read(self, line):
        for pattern in LAUNCHER_RANK:
            m = pattern.search(line)
            if m and self.named is None:
                self.named = int(m.group(1))
        m = PID_LINE.search(line)
        if m and self.pid is None:
            self.pid = int(m.group(1))   # mapped to a rank at the end: pids keeps growing
        m = OWN_LINE.search(line)
        if m and self.own is None:
            self.own = int(m.group(1))
        m = WATCHDOG_LINE.search(line)
        if m:
            (self.stuck if m.group(2) == b"stuck outside" else self.waiting).add(int(m.group(1)))
        m = SIGNAL_LINE.search(line)
        if m and self.signum is None:
            self.signum = int(m.group(1))

    def rank(self, code):
        """(rank, None) where the evidence names the rank that failed, else (None, why)."""
        if code == EXIT_HUNG:
            silent = set(range(self.world)) - self.waiting
            if self.stuck:
                return min(self.stuck), None
            if len(silent) == 1 and self.waiting:
                return silent.pop(), None   # stopped or frozen whole: its watchdog too
            return None, ("the watchdog ended the job (exit 4); no rank's watchdog said it "
                          "was stuck outside MPI, and "
                          + (f"{plural(len(silent), 'rank')} did not say" if self.waiting
                             else "none said") + " it waited in MPI")
        for rank in (self.named, self.lost, self.pids.get(self.pid)):
            if rank is not None:
                return rank, None
        if self.pid is not None:   # a rank's own line could be a consequence of this one
            return None, (f"the launcher named process {self.pid}, not a rank this "
                          "supervisor saw running")
        if self.own is not None:
            return self.own, None
        return None, "neither the launcher nor a rank said which rank failed"


class Attempt:
    """One run of the launcher, watched to its end; `cause()` says how it ended."""

    def __init__(self, launcher, cmd, world, pass_fds=()):
        self.launcher, self.world = launcher, world
        self.proc = processes.start(cmd, launcher.death_signal, launcher.env, pass_fds)
        self.evidence = Evidence(world)
        self.lost = False      # ranks whose launcher-side parent died
        self.stuck = False     # the launcher outlived its ranks by LAUNCHER_GRACE: ended
        self.alive = None      # pids of the ranks seen running that still run
        # the launchers report a failed rank on stdout (MPICH) or stderr: both are read
        self.relays = [processes.relay(self.proc.stdout, sys.stdout.buffer, self.read),
                       processes.relay(self.proc.stderr, sys.stderr.buffer, self.read)]

    def read(self, line):
        self.evidence.read(line)

    def watch(self, stops):
        """Until the launcher ends (or ranks lose it, or it outlives them): pass stop
        requests on, learn which pid is which rank (looking at every poll until each rank
        was seen, for at most 30 s, then every half second, for ranks that lost their
        launcher). Returns the exit code (128 + N for a launcher ended by signal N)."""
        forwarded, tick, ended_at = False, 0, None
        try:
            while self.proc.poll() is None:
                if len(stops.received) > 1:   # a second request: end it now
                    break
                if stops.received and not forwarded:
                    self.launcher.request_stop(self.proc, stops.received[0])
                    forwarded = True
                tick += 1
                starting = len(self.evidence.pids) < self.world and tick < 300   # (not ours under srun)
                if starting or tick % 5 == 0:
                    self.look()
                    if self.lost:
                        break
                    ended_at = self.ranks_ended(ended_at)
                    if self.stuck:
                        break
                time.sleep(POLL)
        finally:
            processes.end_all(self.proc)   # what is left of it, if anything
        for relay in self.relays:
            relay.join(timeout=10)
        code = self.proc.returncode
        return 128 - code if code < 0 else code

    def look(self):
        pids = self.evidence.pids
        running = processes.descendants(self.proc.pid)
        for pid in running:
            if pid not in pids:
                rank = processes.rank_of(pid)
                if rank is not None:
                    pids[pid] = rank
        self.alive = running & set(pids)
        for pid in processes.orphans(self.proc.pid):
            self.lost = True
            if self.evidence.lost is None:
                self.evidence.lost = pids.get(pid, processes.rank_of(pid))

    def ranks_ended(self, since):
        """When every rank seen (all of them) has ended while the launcher runs on: the
        time that was first seen (`since`, or now); past LAUNCHER_GRACE, `stuck`. A
        launcher stopped with its ranks (a job suspended whole) is left alone."""
        if len(self.evidence.pids) < self.world or self.alive:
            return None
        since = since or time.monotonic()
        self.stuck = time.monotonic() - since > LAUNCHER_GRACE
        return since

    def cause(self, code):
        signum = self.evidence.signum
        if signum is None and not self.lost and 128 < code < 128 + signal.NSIG:
            signum = code - 128   # the launcher's code for a rank ended by a signal
        try:
            name = signal.Signals(signum).name if signum and not self.stuck else None
        except ValueError:
            name = None
        rank, unknown = self.evidence.rank(code)
        why = {"exit_code": code, "signal": name, "rank": rank}
        if unknown and not self.stuck:
            why["rank_unknown"] = unknown
        if self.lost:
            why["lost_launcher"] = True
        if self.stuck:
            why["launcher_stuck"] = True
        return why


def describe(cause):
    if cause.get("launcher_stuck"):
        return (f"its launcher still running {LAUNCHER_GRACE:g} s after all its ranks ended "
                "(ended by this supervisor)")
    bits = [f"rank {cause['rank']}" if cause["rank"] is not None else "",
            cause["signal"] or "", "its launcher died" if cause.get("lost_launcher") else ""]
    bits = ", ".join(b for b in bits if b)
    return f"exit {cause['exit_code']}" + (f" ({bits})" if bits else "")


# ----------------------------------------------------------------------------- signals

class StopRequests:
    """While installed: SIGTERM, SIGINT and SIGHUP (a closed terminal or ssh session)
    are requests to stop the job, recorded in `received`, not the end of this process."""

    def __init__(self):
        self.received = []

    def __enter__(self):
        self._previous = {s: signal.signal(s, self._handler) for s in STOP_SIGNALS}
        return self

    def _handler(self, signum, frame):
        self.received.append(signum)

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def sleep(self, seconds):
        """Sleep, cut short by a stop request."""
        deadline = time.monotonic() + seconds
        while not self.received and time.monotonic() < deadline:
            time.sleep(min(POLL, max(0.0, deadline - time.monotonic())))

    def code(self):
        return 128 + self.received[0]


# ----------------------------------------------------------------------------- the run

def resolve(args):
    """The job's resolved config, as dpbp.train itself resolves its arguments."""
    train_args = [a for a in args.train_args if a != "--quiet"]
    r = subprocess.run([sys.executable, "-m", "dpbp.train", *train_args, "--print-config"],
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        sys.stderr.write(r.stderr)
        raise SystemExit(r.returncode)
    return config.from_toml(r.stdout, "the config printed by dpbp.train --print-config")


def world_size(args):
    """(ranks, hosts or None): the hostfile's slots, read now; else those of -H; else
    -n; else the tasks of the Slurm allocation we are in; else this machine's cores."""
    if args.hostfile:
        hosts = hostfile.read(args.hostfile)
        return hostfile.total(hosts), hosts
    if args.hosts:   # -H: the same hosts at every start
        return hostfile.total(args.hosts), args.hosts
    if args.n:
        return args.n, None
    if os.environ.get("SLURM_NTASKS", "").isdigit():
        return int(os.environ["SLURM_NTASKS"]), None
    return len(available_cores()), None


def done(cfg):
    """The run is finished: its record says it completed, or stopped early."""
    try:
        found = record.read(cfg.run.dir)
    except UserError:
        return False
    return found is not None and found.state in record.FINISHED


def resume_point(cfg):
    """(path, step) of the checkpoint a restart continues from: the newest valid one in
    the run directory; (None, 0) where there is none (the job starts afresh)."""
    if not checkpoint.list_all(cfg.run.dir):
        return None, 0
    try:
        path, state, _ = run_dir.newest_checkpoint(cfg.run.dir)
    except UserError:
        return None, None   # none is valid: the resumed job will say so
    return path, state["step"]


def log_restart(cfg, attempt, cause, world, path, step):
    """One restart: a line on stdout and a JSON record in RUN_DIR/restarts.jsonl (where
    it cannot be written, a full disk say, a line says so and the restart goes on)."""
    entry = dict(time=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                 restart=attempt, cause=cause, world_size=world, resume_step=step,
                 resume_from=path)
    log = os.path.join(cfg.run.dir, "restarts.jsonl")
    try:
        os.makedirs(cfg.run.dir, exist_ok=True)   # a job may fail before it made the folder
        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
    except OSError as e:
        note(f"restart {attempt} is not recorded in {log} ({e.strerror}); restarting all "
             "the same")
    where = (f"from step {step} ({path})" if path else "afresh (no checkpoint yet)"
             if step == 0 else "with --resume, though no checkpoint verifies")
    say(f"restart {attempt}: the job ended with {describe(cause)}; resuming {where} on "
        f"{plural(world, 'rank')}")


def run_attempt(launcher, args, hosts, world, train_args, stops):
    """Start the job on `world` ranks (with `hosts`, if any), watch it to its end."""
    fd = None if hosts is None else unnamed_hostfile(hosts, launcher.flavour)
    try:
        hosts_path = None if fd is None else f"/dev/fd/{fd}"   # the launcher's own copy
        try:
            attempt = Attempt(launcher, launcher.command(world, hosts_path, train_args), world,
                              () if fd is None else (fd,))
        except OSError as e:
            raise UserError(f"cannot start {launcher.exe}: {e.strerror}") from None
        return attempt, attempt.watch(stops)
    finally:
        if fd is not None:
            os.close(fd)


def unnamed_hostfile(hosts, flavour):
    """A file descriptor of the hostfile for the launcher, in a file without a name
    (O_TMPFILE, or unlinked as soon as it is made), so that nothing is left behind even
    when this supervisor is killed. The launcher, given it (pass_fds), reads /dev/fd/N."""
    folder, text = tempfile.gettempdir(), hostfile.render(hosts, flavour).encode()
    try:
        try:
            fd = os.open(folder, os.O_TMPFILE | os.O_RDWR, 0o600)
        except (AttributeError, OSError):   # no O_TMPFILE here (or on that filesystem)
            fd, path = tempfile.mkstemp(prefix="dpbp-hosts-")
            os.unlink(path)
        try:
            with os.fdopen(os.dup(fd), "wb") as f:
                f.write(text)
        except OSError:
            os.close(fd)
            raise
        return fd
    except OSError as e:
        raise UserError(f"cannot write the launcher's hostfile in {folder} "
                        f"({e.strerror})") from None


def verdict(code, cfg, stops):
    """The supervisor's exit code after an attempt ended with `code`, or None to restart."""
    if stops.received:   # we asked the job to stop: 0 only if it did finish
        if code == 0 and done(cfg):
            return 0
        asked = code == 0 or code in STOPPED or len(stops.received) > 1
        note(f"stopped by {signal.Signals(stops.received[0]).name}: the job ended with "
             f"{code}; not restarting")
        return stops.code() if asked else code
    if code == 0 and done(cfg):
        return 0
    if code in STOPPED:   # e.g. scancel --signal=TERM to the steps, or a kill to the ranks
        note(f"the job stopped on {signal.Signals(code - 128).name} from outside this "
             "supervisor (its ranks saved a checkpoint); not restarting")
        return code
    if code in (EXIT_BAD_INPUT, EXIT_DIVERGED):
        note(f"the job ended with {code}, which a restart cannot heal; not restarting")
        return code
    return None


def supervise(args, cfg, launcher, stops):
    """Start the job, watch it, decide, restart it, until it is done or given up.
    Returns the exit code."""
    world, hosts = world_size(args)
    train_args = first_args(args.train_args)
    say(f"run dir {cfg.run.dir}; {plural(world, 'rank')} via {launcher.kind}; up to "
        f"{plural(args.max_restarts, 'restart')}")
    restarts, backoff = 0, FIRST_BACKOFF
    while True:
        if stops.received:
            return stops.code()
        attempt, code = run_attempt(launcher, args, hosts, world, train_args, stops)
        if attempt.stuck:   # its ranks ended, it did not: they may have finished the run
            note(f"the launcher did not exit in {LAUNCHER_GRACE:g} s after all its ranks "
                 "ended; ended it")
            code = 0 if done(cfg) else code
        decided = verdict(code, cfg, stops)
        if decided is not None:
            return decided
        cause = attempt.cause(code)
        run_dir.record_failure(cfg.run.dir, f"the job ended with {describe(cause)}")
        if restarts >= args.max_restarts:
            note(f"the job ended with {describe(cause)}, after "
                 f"{plural(restarts, 'restart')}: giving up (exit {EXIT_RESTARTS_EXHAUSTED})")
            return EXIT_RESTARTS_EXHAUSTED
        stops.sleep(backoff)
        if stops.received:
            return stops.code()
        backoff = min(2 * backoff, MAX_BACKOFF)
        found = hosts_again(args, stops, backoff, cause)   # a host may have been dropped
        if found is None:
            return stops.code()
        world, hosts = found
        if world < args.min_ranks:
            note(f"the job ended with {describe(cause)}; {plural(world, 'slot')} left, "
                 f"fewer than --min-ranks {args.min_ranks}: giving up (exit "
                 f"{EXIT_RESTARTS_EXHAUSTED})")
            return EXIT_RESTARTS_EXHAUSTED
        removed = processes.remove_stale_segments()
        if removed:
            note(f"removed {plural(len(removed), 'stale MPI shared-memory segment')} "
                 f"that ranks killed before MPI_Finalize left: {' '.join(removed)}")
        path, step = resume_point(cfg)
        train_args = restart_args(args.train_args, cfg)
        restarts += 1
        log_restart(cfg, restarts, cause, world, path, step)


def hosts_again(args, stops, backoff, cause):
    """(world, hosts) read again before a restart (world_size). A hostfile that cannot be
    read (an operator may be editing it) is read once more after `backoff` seconds; then
    a UserError names its problem and the job that failed (`cause`). None where a stop
    request came meanwhile."""
    try:
        return world_size(args)
    except UserError as e:
        note(f"{e}; reading it again in {backoff:g} s")
    stops.sleep(backoff)
    if stops.received:
        return None
    try:
        return world_size(args)
    except UserError as e:
        raise UserError(f"{e}; the job that ended with {describe(cause)} was not "
                        "restarted") from None


def check_module(name):
    """The module each rank runs (--module) can be found here: otherwise every rank of
    every attempt would fail the same way."""
    try:
        found = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):   # a parent package that is not there, or "a..b"
        found = False
    if not found:
        raise UserError(f"--module {name}: no such module here (python -m {name} would fail "
                        "on every rank); check its name and PYTHONPATH")


def first_args(train_args):
    """The trainer's arguments at the supervisor's first start: the user's, with
    --resume auto where they name no --resume (the run starts, or continues where the
    same command left it: docs/operations.md#the-resume-contract)."""
    named = any(a == "--resume" or a.startswith("--resume=") for a in train_args)
    return list(train_args) + ([] if named else ["--resume", "auto"])


def restart_args(train_args, cfg):
    """The trainer's arguments at a restart: the user's (which the trainer then does not
    apply: a restart continues with the run's recorded config), the run directory, and
    --resume auto --restart, which come last and so win."""
    return [*train_args, "--set", f"run.dir={config.toml_value(cfg.run.dir)}",
            "--resume", "auto", "--restart"]


# The launchers' options for what dpbp.launch sets itself: {what: (options, instead)}.
OWN_OPTIONS = {
    "mpirun": {"the rank count": (("-n", "-np", "--n", "--np", "-c"),
                                  "give -n, or the slots of --hostfile or -H"),
               "the hosts": (("-f", "-hostfile", "--hostfile", "-machinefile", "--machinefile",
                              "-host", "--host", "-hosts", "--hosts", "-H",
                              "--default-hostfile"), "give --hostfile or -H")},
    "srun": {"the rank count": (("-n", "--ntasks"), "give -n, or leave it to the allocation"),
             "the MPI plugin": (("--mpi",), "set DPBP_SRUN_MPI")},
}


def launcher_args(text, kind):
    """--launcher-args split as a shell would, refused where an option sets what
    dpbp.launch sets itself."""
    try:
        extra = shlex.split(text)
    except ValueError as e:
        raise UserError(f"--launcher-args {text!r}: cannot split it ({e})") from None
    for word in extra:
        name = "-n" if kind == "srun" and re.fullmatch(r"-n\d+", word) else \
            word.split("=", 1)[0]
        for what, (names, instead) in OWN_OPTIONS[kind].items():
            if name in names:
                raise UserError(f"--launcher-args: {word} sets {what}, which dpbp.launch "
                                f"sets itself: {instead}")
    return extra


def check_slots(world, min_ranks):
    if world < min_ranks:
        raise UserError(f"{plural(world, 'slot')}, fewer than --min-ranks {min_ranks}")


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.help:
        print(PARSER.format_help(), end="")
        return 0
    if {"-h", "--help", "--print-config"} & set(args.train_args):   # nothing to supervise
        return subprocess.run([sys.executable, "-m", "dpbp.train", *args.train_args]
                              ).returncode
    launcher = Launcher(args.launcher, args.module, args.launcher_args)
    check_module(args.module)
    check_slots(world_size(args)[0], args.min_ranks)
    processes.become_subreaper()   # ranks that lose their launcher come to us, not init
    with StopRequests() as stops:
        cfg = resolve(args)
        return supervise(args, cfg, launcher, stops)


def parse(argv):
    """The supervisor's options (before `--`) and dpbp.train's arguments (after it)."""
    if "--" in argv:
        at = argv.index("--")
        own, train_args = argv[:at], argv[at + 1:]
    else:
        own, train_args = argv, []
    for i in range(len(own) - 1):   # its value may start with a dash: "--map-by core"
        if own[i] == "--launcher-args":
            own = [*own[:i], f"--launcher-args={own[i + 1]}", *own[i + 2:]]
            break
    args, unknown = PARSER.parse_known_args(own)
    if unknown:
        hint = "" if "--" in argv else (
            f"; dpbp.train's options go after --: python -m dpbp.launch [options] -- "
            f"{shlex.join(unknown)}")
        raise UserError(f"unrecognized arguments: {shlex.join(unknown)}{hint} (see "
                        f"{PARSER.prog} --help)")
    args.train_args = train_args
    args.hosts = hostfile.parse_list(args.hosts) if args.hosts is not None else None
    args.launcher_args = launcher_args(args.launcher_args or "", args.launcher)
    given = [name for name, on in (("-n", args.n is not None), ("--hostfile", args.hostfile),
                                   ("-H", args.hosts is not None)) if on]
    if len(given) > 1:
        raise UserError(f"give one of -n, --hostfile and -H, not {' and '.join(given)} (with "
                        "hosts, their slots are the ranks)")
    if given and given[0] != "-n" and args.launcher == "srun":
        raise UserError(f"{given[0]} is for mpirun; under srun the allocation decides the "
                        "hosts")
    for name, low in (("n", 1), ("max_restarts", 0), ("min_ranks", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise UserError(f"--{name.replace('_', '-')} must be at least {low}, got {value}"
                            if name != "n" else f"-n must be at least 1, got {value}")
    return args


PARSER = ArgumentParser(
    prog="python -m dpbp.launch", add_help=False,
    formatter_class=argparse.RawDescriptionHelpFormatter,
    usage="python -m dpbp.launch [-n N | --hostfile FILE | -H HOST:SLOTS,...] "
          "[--max-restarts K]\n       [--min-ranks M] [--launcher mpirun|srun] "
          "[--launcher-args ARGS] [--module MODULE]\n       -- [arguments of dpbp.train]",
    description="Run dpbp.train under an MPI launcher and restart it from its newest "
                "checkpoint when it\nfails, on the ranks that are left (docs/recovery.md).",
    epilog="\n".join([
        "starts: the first with --resume auto added (unless the arguments name a --resume):",
        "  the run starts, or continues where it stopped, with these arguments applied.",
        "restarts: after any failure but bad input and divergence (a rank that crashed or",
        "  was killed, a lost node, the watchdog's exit 4, the launcher's own errors), with",
        f"  --resume auto --restart (the recorded config), after {FIRST_BACKOFF:g} s, then "
        f"twice as long each time (at most {MAX_BACKOFF:g} s);",
        "  each is a line on stdout and a JSON record in RUN_DIR/restarts.jsonl.",
        "exit codes: 0 the run finished (its last epoch, or early stopping); 2 bad input",
        "  and 3 diverged, never retried;",
        "  128+N stopped by signal N (SIGTERM, SIGINT or SIGHUP, passed on to the job as a",
        "  stop request: it saves a checkpoint, and nothing restarts);",
        f"  {EXIT_RESTARTS_EXHAUSTED} gave up: --max-restarts used up, or fewer slots than "
        "--min-ranks;",
        "  any other code: the job's own, when it ended so while stopping."]))
PARSER.add_argument("-h", "--help", action="store_true", help="show this help and exit")
PARSER.add_argument("-n", type=int, metavar="N",
                    help="ranks, when no hostfile or -H gives them (default: the tasks of "
                         "the Slurm allocation, else this machine's cores)")
PARSER.add_argument("--hostfile", metavar="FILE",
                    help="hosts and their slots (host:slots or host slots=N lines), read "
                         "again before every restart; the ranks are its total slots")
PARSER.add_argument("-H", "--hosts", metavar="HOST:SLOTS,...",
                    help="hosts and their slots inline, e.g. -H node01:4,node02:4 (a HOST "
                         "alone has 1 slot); fixed for the whole run: to leave a host out "
                         "at a restart, give a --hostfile instead")
PARSER.add_argument("--launcher-args", metavar="ARGS",
                    help="options for mpirun or srun, passed as given, e.g. "
                         "--launcher-args \"-bind-to core -genv FOO 1\"; not the rank "
                         "count or the hosts, which dpbp.launch sets")
PARSER.add_argument("--max-restarts", type=int, default=3, metavar="K",
                    help="restart a failed job at most K times (default 3)")
PARSER.add_argument("--min-ranks", type=int, default=1, metavar="M",
                    help="give up when the hostfile has fewer than M slots left (default 1)")
PARSER.add_argument("--launcher", choices=("mpirun", "srun"), default="mpirun",
                    help="mpirun (MPICH or Open MPI, default) or srun inside a Slurm "
                         "allocation (srun --mpi=$DPBP_SRUN_MPI, default pmi2)")
PARSER.add_argument("--module", default="dpbp.train", metavar="MODULE",
                    help="the module each rank runs with python -m (default dpbp.train); "
                         "a wrapper around dpbp.train, such as the tests' fault injection")


def cli():
    try:
        code = main()
    except UserError as e:
        print(f"dpbp: error: {e}", file=sys.stderr, flush=True)
        code = EXIT_BAD_INPUT
    sys.exit(code)


if __name__ == "__main__":
    cli()
