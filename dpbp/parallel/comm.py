"""All communication between ranks. The only module in dpbp that imports mpi4py.

A `Comm` knows its `rank`, `size`, and `ranks_sharing_cores` (the ranks on this host,
counted by host name, whose cores overlap this rank's; `counted` says so for the
start-up line), and has a few verbs:
in-place `allreduce_` on a flat array, `allreduce_max_`, `allreduce_min`/`allreduce_max`
of an integer, the non-blocking `start_allreduce_max_`, `allgatherv_`, `alltoallv_`,
`allgatherv_in_place_`, `bcast_`, `bcast_obj`, `barrier`, `replicas_identical` and
`wait` (of a non-blocking one). The
seconds spent in the gradient sums add up in `wait_seconds`, which the benchmark reads as
the communication share of a step. `agreement(comm)` is the collective check that turns
bad input seen on some ranks into one message and a clean stop on all of them. The hot
path uses mpi4py's buffer API (no pickling), and every verb costs nothing at world size 1.

`init()` returns a world of one when there is no launcher, no mpi4py or no MPI library,
so `python -m dpbp.train` runs the same code as `mpirun -n 4 python -m dpbp.train`.
`run()` wraps an entry point so that an exception on any rank ends the whole job.
"""

import contextlib
import os
import signal
import socket
import sys
import time
import traceback
import warnings
import zlib

import numpy as np

from dpbp.errors import Stopped, UserError
from dpbp.parallel.threads import available_cores

# Environment variables through which launchers announce the world before MPI_Init: its
# size, this process's rank, and who set them. In this order: an mpirun started inside a
# Slurm allocation sets its own beside those of the Slurm step around it.
LAUNCHER_VARS = {
    "PMI_SIZE": ("PMI_RANK", "MPICH's PMI (its mpirun, or srun --mpi=pmi2)"),
    "OMPI_COMM_WORLD_SIZE": ("OMPI_COMM_WORLD_RANK", "Open MPI's mpirun"),
    "PMIX_SIZE": ("PMIX_RANK", "PMIx"),
    "SLURM_STEP_NUM_TASKS": ("SLURM_PROCID", "a Slurm step (srun)"),
}
_LAUNCHER_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
# How long a rank waiting for a collective sleeps between progress checks when ranks
# outnumber cores (see Comm.oversubscribed), for sums of at least YIELD_MIN_BYTES: the
# wait for a smaller one is too short to give away (measured: sleeping made the default
# network, a 0.4 MB gradient, a third slower at 4 ranks on 2 cores; it made the 7.5 MB
# gradient of the benchmark network faster).
YIELD_SECONDS = 50e-6
YIELD_MIN_BYTES = 1 << 20


def count_sharing(peers, host, cores):
    """(ranks sharing cores, ranks on this host, how they were counted) for the rank on
    `host` that may run on `cores`, given every rank's (host name, cores): the ranks on
    the same host whose cores overlap this one's, this rank included. A rank that the
    launcher bound to cores of its own shares them with no one."""
    on_host = [set(c) for h, c in peers if h == host]
    sharing = sum(bool(c & set(cores)) for c in on_host)
    if sharing == len(on_host):
        return sharing, len(on_host), "on this host, counted by host name"
    return (sharing, len(on_host),
            f"of {len(on_host)} on this host, counted by host name and CPU affinity")


class _Done:
    """A request that is already complete (the world of one process)."""

    def Wait(self):
        pass


class AgreedExit(Exception):
    """Every rank agreed to stop with this exit code; the reason, `message` on every
    rank, was printed once, by the lowest rank that found it."""

    def __init__(self, code, message=None):
        super().__init__(code)
        self.code, self.message = code, message


class Comm:
    """The verbs dpbp needs from MPI. `mpi_comm=None` is a world of one process."""

    def __init__(self, mpi_comm=None, library="no MPI"):
        self._comm = mpi_comm
        self.library = library
        self.wait_seconds = 0.0
        # ranks_sharing_cores: ranks on this host that may run on the same cores as this one
        if mpi_comm is None:
            self.rank, self.size, self.ranks_sharing_cores = 0, 1, 1
            self.ranks_on_host, self.counted = 1, ""
            self.oversubscribed = False
            return
        from mpi4py import MPI
        self._MPI = MPI
        self.rank, self.size = mpi_comm.Get_rank(), mpi_comm.Get_size()
        # Counted by host name, not by MPI's shared-memory split: under a transport
        # that treats every rank as remote (MPICH's MPIR_CVAR_NOLOCAL, for one) that split
        # finds every rank alone, and each would start a thread per core.
        cores = available_cores()
        host = MPI.Get_processor_name() or socket.gethostname()
        peers = mpi_comm.allgather((host, sorted(cores)))   # once, at start-up
        self.ranks_sharing_cores, self.ranks_on_host, self.counted = count_sharing(
            peers, host, cores)
        # More ranks than cores: a rank that waits must leave its core to the ones that
        # still compute, instead of spinning in MPI's busy-polling progress loop. Agreed
        # by all ranks (it picks non-blocking collectives, which must match on every rank).
        self.oversubscribed = bool(self.allreduce_max(int(self.ranks_sharing_cores >
                                                          len(cores))))

    def allreduce_(self, buf):
        """Collective. Replace `buf` (a contiguous array) with its elementwise sum over ranks."""
        if self.size > 1:
            self._allreduce_waiting(buf, self._MPI.SUM, buf)
        return buf

    def _allreduce_waiting(self, buf, op, like):
        """Allreduce(op) of `buf` in place, timed into wait_seconds. Where the ranks may
        arrive far apart, at the sum of a buffer as large as `like`, and share cores,
        wait yielding the core to the ranks still computing, not spinning."""
        t0 = time.perf_counter()
        if self.oversubscribed and like.nbytes >= YIELD_MIN_BYTES:
            self._wait_yielding(self._comm.Iallreduce(self._MPI.IN_PLACE, buf, op=op))
        else:
            self._comm.Allreduce(self._MPI.IN_PLACE, buf, op=op)
        self.wait_seconds += time.perf_counter() - t0

    @staticmethod
    def _wait_yielding(request):
        """Complete a non-blocking request, giving the core away between progress checks."""
        while not request.Test():
            time.sleep(YIELD_SECONDS)

    def start_allreduce_max_(self, buf):
        """Collective, non-blocking: start replacing the int64 array `buf` with its
        elementwise maximum over ranks. Returns a request whose Wait() completes it (MPI
        progresses it meanwhile, inside other calls); `buf` must not be touched until then."""
        if self.size == 1:
            return _Done()
        return self._comm.Iallreduce(self._MPI.IN_PLACE, buf, op=self._MPI.MAX)

    def allreduce_max_(self, buf, like=None):
        """Collective. Replace the float64 array `buf` with its elementwise maximum over
        ranks (exact: a maximum never rounds). It waits as allreduce_ does for `like`
        (default `buf`): give the buffer that allreduce_ sums next, and the ranks, which
        arrive as far apart as they would there, wait the same way."""
        if self.size > 1:
            self._allreduce_waiting(buf, self._MPI.MAX, buf if like is None else like)
        return buf

    def allreduce_min(self, value):
        """Collective. The minimum of an integer over ranks."""
        if self.size == 1:
            return int(value)
        buf = np.array([value], dtype=np.int64)
        self._comm.Allreduce(self._MPI.IN_PLACE, buf, op=self._MPI.MIN)
        return int(buf[0])

    def allreduce_max(self, value):
        """Collective. The maximum of an integer over ranks."""
        return -self.allreduce_min(-value)

    def allgatherv_(self, mine, out, counts):
        """Collective. Fill `out` with every rank's `mine` (counts[r] values from rank r),
        concatenated in rank order."""
        if self.size == 1:
            out[...] = mine
        else:
            self._comm.Allgatherv(mine, [out, list(counts)])
        return out

    def bcast_(self, buf, root=0):
        """Collective. Overwrite `buf` on every rank with root's `buf`."""
        if self.size > 1:
            self._comm.Bcast(buf, root=root)
        return buf

    def bcast_obj(self, obj, root=0):
        """Collective. Root's small Python object (a string, a dict of numbers) on every rank."""
        if self.size == 1:
            return obj
        return self._comm.bcast(obj, root=root)

    def barrier(self):
        """Collective. Return once every rank has called it."""
        if self.size > 1:
            self._comm.Barrier()

    def replicas_identical(self, array):
        """Collective. True when `array` holds the same bytes on every rank."""
        if self.size == 1:
            return True
        crc = zlib.crc32(np.ascontiguousarray(array).view(np.uint8))
        return self.allreduce_min(crc) == -self.allreduce_min(-crc)

    def alltoallv_(self, send, send_counts, send_starts, recv, recv_counts, recv_starts):
        """Collective. Send send[send_starts[q]:][:send_counts[q]] to rank q, and receive
        from rank r recv_counts[r] values into recv at recv_starts[r]."""
        self._comm.Alltoallv([send, (list(send_counts), list(send_starts))],
                             [recv, (list(recv_counts), list(recv_starts))])

    def allgatherv_in_place_(self, buf, counts, starts):
        """Collective. `buf` holds this rank's counts[rank] values at starts[rank]; fill in
        every other rank's at theirs."""
        self._comm.Allgatherv(self._MPI.IN_PLACE, [buf, (list(counts), list(starts))])


def wait(request):
    """Complete a non-blocking collective (a request from start_allreduce_max_). Every
    wait for other ranks happens in this module, which is how a watchdog tells a rank
    that waits for another from one that is stuck (supervise.Watchdog)."""
    request.Wait()


@contextlib.contextmanager
def agreement(comm, code=2):
    """Collective. Run a block on every rank; if it raised a UserError on any rank, stop all.

    The lowest failing rank prints its message, once; every rank then raises
    AgreedExit(code, message), which `run()` turns into a plain exit with that code: no
    traceback, no MPI_Abort. The block itself must not call collectives (a failing rank
    would never reach them). Other exceptions pass through to `run()`, which aborts the
    job.
    """
    error = None
    try:
        yield
    except UserError as e:
        error = e
    first = comm.allreduce_min(comm.rank if error is not None else comm.size)
    if first == comm.size:
        return
    if comm.rank == first:
        where = f" (rank {first})" if first > 0 else ""
        print(f"dpbp: error{where}: {error}", file=sys.stderr, flush=True)
    message = comm.bcast_obj(str(error) if comm.rank == first else None, root=first)
    raise AgreedExit(code, message)   # rank 0 records it (the run record's cause)


def launched():
    """True when an MPI launcher (mpirun, mpiexec, srun) started this process."""
    return any(var in os.environ for var in _LAUNCHER_RANK_VARS)


def announced_world():
    """(size, rank, variable) of the world a launcher (mpirun, mpiexec, srun) announced
    in the environment, or (1, 0, None) without one."""
    for var, (rank_var, _) in LAUNCHER_VARS.items():
        if os.environ.get(var, "").isdigit():
            rank = os.environ.get(rank_var, "0")
            return int(os.environ[var]), int(rank) if rank.isdigit() else 0, var
    return 1, 0, None


def check_launcher(comm):
    """Stop where a launcher announced a world of N processes and MPI's world is not N:
    the launcher does not speak to the MPI that mpi4py uses (srun --mpi=none, another
    MPI's mpirun), so each process would run alone, as a world of its own, and all
    would write the same files. Every process sees the same, so all stop (exit 2); the
    one the launcher numbered 0 says so, once."""
    size, rank, var = announced_world()
    if var is None or size == comm.size:
        return
    if rank == 0:
        print(f"dpbp: error: {var}={size}: started as one of {size} processes by "
              f"{LAUNCHER_VARS[var][1]}, but MPI ({comm.library}) has a world of "
              f"{comm.size}: the launcher does not match the MPI that mpi4py uses, so each "
              "process would train alone. Under Slurm: srun --mpi=pmi2 (srun --mpi=list "
              "shows the choices); else the mpirun of mpi4py's MPI (python -m mpi4py "
              "--mpi-library names it)", file=sys.stderr, flush=True)
    raise AgreedExit(2)


def init():
    """Start MPI if it is there and return the world's Comm; a world of one otherwise.
    Processes started by a launcher of another kind (torchrun sets WORLD_SIZE and RANK,
    not MPI's variables) are refused: each would train alone."""
    others = os.environ.get("WORLD_SIZE", "")
    if others.isdigit() and int(others) > 1 and not launched():
        raise UserError(f"WORLD_SIZE={others} is set, as torchrun sets it, but dpbp's ranks "
                        f"are started by an MPI launcher: mpirun -n {others} python -m "
                        "dpbp.train (these processes would each train alone)")
    try:
        with warnings.catch_warnings():   # mpi4py's own "suspicious MPI execution
            warnings.simplefilter("ignore", RuntimeWarning)   # environment": check_launcher
            from mpi4py import MPI
    except (ImportError, RuntimeError, OSError) as e:
        size = announced_world()[0]
        if size > 1:
            raise UserError(
                f"launched as one of {size} ranks, but MPI could not be loaded ({e}); "
                "install it with `pip install mpich`, or build mpi4py against your "
                "cluster's MPI: `pip install --no-binary=mpi4py mpi4py`") from None
        return Comm(None)
    library = " ".join(MPI.Get_library_version().splitlines()[0].split())
    return Comm(MPI.COMM_WORLD, library)


def _running_mpi():
    """The mpi4py.MPI module if MPI is up (initialised, not finalised), else None."""
    MPI = sys.modules.get("mpi4py.MPI")
    if MPI is not None and MPI.Is_initialized() and not MPI.Is_finalized():
        return MPI
    return None


def abort(code):
    """End every rank of the job (MPI_Abort); just this process where there is no MPI."""
    MPI = _running_mpi()
    if MPI is not None and MPI.COMM_WORLD.Get_size() > 1:
        sys.stderr.flush()
        # The launcher forwards our stderr and handles the abort on separate channels;
        # a moment's pause lets it pass the message on before it tears the job down.
        time.sleep(0.25)
        MPI.COMM_WORLD.Abort(code)
    os._exit(code)


def _rank():
    """This process's rank, from MPI once it runs, else from the launcher's environment."""
    MPI = _running_mpi()
    if MPI is not None:
        return MPI.COMM_WORLD.Get_rank()
    for var in (*_LAUNCHER_RANK_VARS, "SLURM_PROCID", "RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def run(main):
    """Call `main()` and exit with its code, making sure that a failure on one rank ends all.

    A plain exception on one rank would leave the others blocked in their next collective
    forever. Here any exception, `sys.exit` included, prints one line naming the rank and
    the error (after the traceback, for errors that are bugs rather than bad input) and
    calls MPI_Abort, which ends every rank with a non-zero exit code.
    """
    try:
        code = main()
    except AgreedExit as e:
        sys.exit(e.code)
    except BrokenPipeError:   # e.g. `python -m dpbp.evaluate ... | head`: the reader has
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # all it wanted
        abort(141)   # 128 + SIGPIPE, as a shell reports a pipeline cut short; nothing to say
    except Stopped as e:   # a signal during set-up: every rank that got it ends the job
        if _rank() == 0:
            print(f"dpbp: stopped by {signal.Signals(e.signum).name} during set-up; nothing "
                  "was trained", file=sys.stderr, flush=True)
        abort(128 + e.signum)
    except BaseException as e:  # noqa: BLE001 -- everything must end the whole job
        if isinstance(e, SystemExit):
            code = e.code if isinstance(e.code, int) and e.code != 0 else 1
            what = f"exited with sys.exit({e.code!r})"
        elif isinstance(e, KeyboardInterrupt):
            code, what = 130, "interrupted"
        elif isinstance(e, UserError):   # bad input seen outside an agreement
            if _running_mpi() is None:
                # no MPI to agree through (it failed to load): every rank fails alike,
                # so rank 0 alone reports it
                if _rank() == 0:
                    print(f"dpbp: error: {e}", file=sys.stderr, flush=True)
                sys.exit(2)
            code, what = 2, str(e)
        else:
            code, what = 1, f"{type(e).__name__}: {e}"
            traceback.print_exc()
        print(f"dpbp: rank {_rank()} failed: {what}; ending the job", file=sys.stderr,
              flush=True)
        abort(code)
    sys.exit(code or 0)
