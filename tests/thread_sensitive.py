"""A matrix product whose bits depend on the BLAS thread count, on any CPU.

With some kernels (OpenBLAS's Haswell ones, picked on CPUs without AVX-512) a product's
bits depend on how BLAS splits it between threads; with others (SkylakeX) they do not.
A bitwise claim tested only on the second kind passes there and fails on the first. This
stand-in for numpy.matmul scales every product made with more than one BLAS thread by
1 + 2^-20 (a few units in the last place of float32), so the tests catch that class of
bug on every CPU.

    python -m tests.thread_sensitive MODULE [ARGS...]   # python -m MODULE ARGS, with it

Test code only: dpbp never imports it.
"""

import runpy
import sys

import numpy as np

from dpbp.parallel.threads import blas_threads

_matmul = np.matmul


def matmul(a, b, /, out=None, **kwargs):
    result = _matmul(a, b, out=out, **kwargs)
    if blas_threads() > 1:
        result *= 1 + 2.0 ** -20   # as if split between threads, with other rounding
    return result


def install():
    """From now on every np.matmul in this process (dpbp's layers call it) is thread-sensitive."""
    np.matmul = matmul


def uninstall():
    np.matmul = _matmul


if __name__ == "__main__":
    install()
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
