"""BLAS threads per rank: the ranks on a host share its cores instead of fighting for them.

numpy's BLAS starts one thread per core in every process, so 2 ranks on 2 cores would
run 4 threads and thrash. Unless the user chose a count (OMP_NUM_THREADS and friends),
each rank gets its cores / the ranks that share them, at least one. Comm counts those
ranks by host name, whatever the transport between them. A rank that the launcher bound
to cores of its own uses all of them.
"""

import functools
import os
from concurrent.futures import ThreadPoolExecutor

from dpbp.errors import plural

USER_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
             "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")


def available_cores():
    """The set of cores this process may run on (its CPU affinity where the OS has one)."""
    try:
        return os.sched_getaffinity(0)
    except AttributeError:   # macOS
        return set(range(os.cpu_count() or 1))


def limit_blas_threads(sharing_ranks, single=False, counted=""):
    """Set this rank's BLAS threads to its cores / `sharing_ranks` (the ranks on this host
    that may run on the same cores; `counted` says how they were counted, Comm.counted),
    or to one when `single` (train.deterministic, whose bits must not depend on how a
    product is split between threads, whatever the user set); return (threads, why) for
    the start-up log."""
    if single:
        _blas().limit(limits=1)
        return 1, "train.deterministic"
    var = set_by_user()
    if var:
        return int(os.environ[var]), f"{var}={os.environ[var]} set by the user"
    cores = len(available_cores())
    threads = max(1, cores // sharing_ranks)
    _blas().limit(limits=threads)
    return threads, cores_for(cores, sharing_ranks, counted)


def set_by_user():
    """The variable (OMP_NUM_THREADS and friends) by which the user chose the BLAS
    threads, or None."""
    return next((var for var in USER_VARS if os.environ.get(var, "").isdigit()), None)


def cores_for(cores, sharing_ranks, counted=""):
    """'2 cores for 2 ranks on this host, counted by host name', for the start-up line."""
    return " ".join([f"{cores} cores for {plural(sharing_ranks, 'rank')}", counted]).strip()


@functools.cache
def _blas():
    """threadpoolctl's handle on the BLAS libraries numpy loaded (found once)."""
    from threadpoolctl import ThreadpoolController
    return ThreadpoolController().select(user_api="blas")


def blas_threads():
    """The BLAS threads this rank computes with (what limit_blas_threads chose)."""
    return max([lib.num_threads for lib in _blas().lib_controllers], default=1)


def blockwise(fn, blocks, threads):
    """[fn(b) for b in blocks], each block computed with single-threaded BLAS, the blocks
    spread over `threads` threads of this process.

    With some kernels (OpenBLAS's Haswell ones, for instance) the bits of a matrix
    product depend on how BLAS splits it between threads, never on which thread runs a
    single-threaded product: so each block has the same bits whatever `threads` is, and
    the rank still uses its cores. fn must be safe to run on several threads at once
    (Model.infer is; Model.forward, which caches for backward, is not)."""
    with _blas().limit(limits=1):
        if threads <= 1 or len(blocks) <= 1:
            return [fn(b) for b in blocks]
        with ThreadPoolExecutor(min(threads, len(blocks))) as pool:
            return list(pool.map(fn, blocks))


def arithmetic():
    """What the bits of a product depend on here, besides the config: numpy's version and
    the CPU-specific code it dispatches to (its exp, log, tanh differ by instruction
    set), and the BLAS library, its version and the kernels it picked for this CPU, e.g.
    "numpy 2.4.6 (X86_V3 X86_V4 AVX512_ICL code), openblas 0.3.31 (SkylakeX kernels)"."""
    import numpy
    from threadpoolctl import threadpool_info
    umath = getattr(getattr(numpy, "_core", None), "_multiarray_umath", None)
    features = getattr(umath, "__cpu_features__", {})
    dispatched = [t for t in getattr(umath, "__cpu_dispatch__", []) if features.get(t)]
    here = f"numpy {numpy.__version__} ({' '.join(dispatched) or 'baseline'} code)"
    blas = [f"{p['internal_api']} {p['version']}" + (f" ({p['architecture']} kernels)"
                                                    if p.get("architecture") else "")
            for p in threadpool_info() if p["user_api"] == "blas"]
    return ", ".join([here, *blas])
