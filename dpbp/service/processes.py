"""The job as processes: start the MPI launcher so that it cannot outlive its supervisor,
and end it and every rank it started, whatever state they are in.

The ranks do not all stay children of the launcher: MPICH's hydra_pmi_proxy starts each
rank in a session of its own, and a proxy that dies leaves its ranks to init. So:
  * the supervisor becomes a child subreaper (Linux prctl), so that orphaned ranks are
    re-parented to it rather than to init, and it finds them as its descendants;
  * the launcher starts in a session of its own (a terminal's Ctrl-C reaches only the
    supervisor, which passes a stop request on) with a parent-death signal, so that even
    a supervisor killed with SIGKILL takes the launcher, and with it its ranks, down;
  * `end_all` kills the launcher's process group and every descendant of the supervisor.

Ranks killed before MPI_Finalize leave MPICH's shared-memory segments in /dev/shm, and
a later job whose segment gets the same name (a requeued Slurm job keeps its id) fails
in MPI_Init; `remove_stale_segments` removes those that no live process holds.
"""

import ctypes
import os
import signal
import subprocess
import threading
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
RANK_VARS = (b"PMI_RANK", b"OMPI_COMM_WORLD_RANK", b"PMIX_RANK", b"SLURM_PROCID")
SEGMENT_PREFIXES = ("mpich_shm_", "vader_segment.", "sm_segment.")   # MPICH, Open MPI
SHM = "/dev/shm"


def _prctl(option, value):
    """prctl(2) on Linux; False where it is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def become_subreaper():
    """Orphaned descendants of this process are re-parented to it, not to init."""
    return _prctl(PR_SET_CHILD_SUBREAPER, 1)


def start(cmd, death_signal, env=None, pass_fds=()):
    """Popen `cmd` in a new session, stdout and stderr piped, with `death_signal` sent to
    it when the thread that calls this dies (the main thread: call it from there), that
    is, when this process dies. Set in the child before exec; if this process died
    before that, the child ends itself at once. `pass_fds` stay open in the child."""
    parent = os.getpid()

    def in_child():
        _prctl(PR_SET_PDEATHSIG, death_signal)
        if os.getppid() != parent:
            os.kill(os.getpid(), death_signal)

    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, preexec_fn=in_child, pass_fds=pass_fds)


def stat(pid):
    """(parent pid, state) of process `pid`, from /proc/PID/stat (OSError once it is gone;
    the state is b"Z" for a zombie)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()   # after the command name, which may hold ")"
    if len(fields) < 2:
        raise OSError(f"/proc/{pid}/stat is cut short")
    return int(fields[1]), fields[0]


def table():
    """{pid: (parent pid, state)} of every process, from /proc."""
    out = {}
    for name in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if name.isdigit():
            try:
                out[int(name)] = stat(name)
            except OSError:
                continue   # ended meanwhile
    return out


def descendants(root=None):
    """Pids of the live (not zombie) descendants of `root` (default: this process)."""
    processes = table()
    root = os.getpid() if root is None else root
    found, frontier = set(), [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, (ppid, _) in processes.items() if ppid == parent]
        found.update(children)
        frontier += children
    return {pid for pid in found if processes.get(pid, (0, b"Z"))[1] != b"Z"}


def orphans(launcher_pid):
    """Pids of this process's own children other than the launcher: ranks whose
    launcher-side parent died, re-parented here (see become_subreaper)."""
    me = os.getpid()
    return {pid for pid, (ppid, state) in table().items()
            if ppid == me and pid != launcher_pid and state != b"Z"}


def rank_of(pid):
    """The MPI rank that the launcher gave process `pid` (from its environment), or None."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(item.partition(b"=")[::2] for item in f.read().split(b"\0"))
    except OSError:
        return None
    for var in RANK_VARS:
        if env.get(var, b"").isdigit():
            return int(env[var])
    return None


def reap(launcher_pid):
    """Collect the exit status of re-parented children that ended, so that none stays a
    zombie (not the launcher's: its Popen waits for it)."""
    me = os.getpid()
    for pid, (ppid, state) in table().items():
        if ppid == me and state == b"Z" and pid != launcher_pid:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


def end_all(launcher, seconds=10.0):
    """SIGKILL the launcher's process group and every descendant of this process, until
    none is left (or `seconds` pass); then collect the launcher's exit status."""
    if launcher.poll() is None:
        try:
            os.killpg(launcher.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + seconds
    while True:
        left = descendants()   # the launcher, ranks, and ranks that lost their parent
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        reap(launcher.pid)
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    launcher.wait()


def relay(stream, out, on_line):
    """A thread that copies `stream` (bytes, line by line) to `out` (a binary file) and
    calls on_line(line) for each; join it to wait for the end of the stream."""
    def copy():
        for line in iter(stream.readline, b""):
            try:
                out.write(line)
                out.flush()
            except (OSError, ValueError):
                pass   # our stderr is gone: keep draining, or the job would block on it
            on_line(line)
        stream.close()

    thread = threading.Thread(target=copy, name="dpbp-relay", daemon=True)
    thread.start()
    return thread


def _held():
    """Real paths of every file in /dev/shm that some process has open or mapped."""
    held = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{name}/fd"):
                held.add(os.readlink(f"/proc/{name}/fd/{fd}"))
            with open(f"/proc/{name}/maps", encoding="utf-8", errors="replace") as f:
                held.update(line.split(None, 5)[5].strip() for line in f
                            if f" {SHM}/" in line)
        except OSError:
            continue   # ended meanwhile, or not ours to read
    return held


def _unheld_segments():
    """MPI shared-memory segments in /dev/shm owned by this user that no live process
    holds open or mapped."""
    try:
        names = [n for n in os.listdir(SHM) if n.startswith(SEGMENT_PREFIXES)]
    except OSError:
        return set()
    ours = set()
    for name in names:
        path = os.path.join(SHM, name)
        try:
            if os.stat(path).st_uid == os.getuid():
                ours.add(path)
        except OSError:
            continue   # removed meanwhile
    return ours - _held() if ours else set()


def remove_stale_segments(settle=0.5):
    """Remove the MPI shared-memory segments of this user that no live process holds
    open or mapped, now and again `settle` seconds later (a job that is just creating
    one holds it open; one that is just finishing removes its own): left by ranks
    killed before MPI_Finalize. Returns the paths removed."""
    stale = _unheld_segments()
    if stale and settle:
        time.sleep(settle)
        stale &= _unheld_segments()
    removed = []
    for path in sorted(stale):
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:
            pass
    return removed
