"""Matrix products whose bits depend on what a BLAS kernel's bits may depend on, on any CPU.

OpenBLAS picks its kernels by CPU. With some (the Haswell ones, picked on CPUs without
AVX-512) the bits of a product depend on how BLAS splits it between threads, and on its
number of rows (the rows left over from a kernel's tiles are summed another way); with
others (SkylakeX) they depend on neither. A bitwise claim tested only on the second kind
passes there and fails on the first. This stand-in for numpy's products rescales each
product's result by a factor that depends on
    the BLAS threads   1 + 2^-20 when the product runs on more than one BLAS thread
    the rows           1 + 2^-22 (rows mod 4096): two products whose row counts differ
                       (by less than 4096) round differently
a few units in the last place of float32, so the tests catch code whose bits depend on
the thread count or on how rows are grouped into products, on every CPU. The rows of a
product are those of its left operand (shape[-2]); a stand-in for another product (a
convolution's) names its own with `rows_of`.

    python -m tests.sensitive MODULE [ARGS...]   # python -m MODULE ARGS, with it
    install() / uninstall()                      # in this process (the `sensitive` fixture)

Test code only: dpbp never imports it.
"""

import runpy
import sys

import numpy as np

from dpbp.parallel.threads import blas_threads

_real = {}   # name -> numpy's own function, while a stand-in replaces it


def left_rows(a, *_):
    """The rows of a product whose left operand is `a` (1 for a vector)."""
    return np.shape(a)[-2] if np.ndim(a) > 1 else 1


def factor(rows):
    """What a product of `rows` rows is multiplied by, at this thread count."""
    f = 1.0
    if blas_threads() > 1:
        f *= 1 + 2.0 ** -20   # as if split between threads, with other rounding
    return f * (1 + (rows % 4096) * 2.0 ** -22)   # as if its rows were tiled another way


def stand_in(product, rows_of=left_rows):
    """A function that computes `product(*args, **kwargs)` (into `out=` too) and rescales
    the result as `factor` says, for the rows that rows_of(*args) gives."""
    def sensitive(*args, **kwargs):
        result = product(*args, **kwargs)
        f = factor(rows_of(*args))
        if f == 1.0:
            return result
        if isinstance(result, np.ndarray):
            result *= f   # in place: `out=` holds the rescaled result too
            return result
        return result * f
    return sensitive


def install(names=("matmul",), rows_of=left_rows):
    """From now on numpy.NAME (each of `names`; dpbp's layers call numpy.matmul) is
    sensitive to the thread count and the rows, in this process."""
    for name in names:
        _real.setdefault(name, getattr(np, name))
        setattr(np, name, stand_in(_real[name], rows_of))


def uninstall():
    for name, real in _real.items():
        setattr(np, name, real)
    _real.clear()


def main():
    install()
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
