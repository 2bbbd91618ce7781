"""Sums whose bits do not depend on their order: the arithmetic of train.deterministic.

Floating-point addition is not associative, so a sum over ranks depends on how it is
grouped, and so on the world size. But values that are all multiples of one power of
two, 2^k, and whose magnitudes add up to less than 2^(k+p) (p = 24 mantissa bits for
float32, 53 for float64) add up exactly, in any order and any grouping: every partial
sum is a multiple of 2^k below 2^(k+p), so it is representable and no addition rounds.

train.deterministic rounds every grain's gradient to such a grid, one k per parameter
array, chosen from the largest magnitude in that array over all grains (agreed over
ranks) with room for `grains` of them. After that the sum over grains, on one rank and
then across ranks with Allreduce, is exact. The price is the rounding: the largest
value of an array, over all grains, keeps p - 3 - ceil(log2 grains) bits or more (19 for
float32 and 4 grains); every other value, in any grain, keeps the same absolute
precision 2^k, so values far smaller than that largest one keep fewer bits, and those
below 2^(k-1) become 0.
"""

import math

import numpy as np


def abs_max(a):
    """max |a| as a Python float; inf when a holds NaN or Inf (comparable, unlike NaN)."""
    hi, lo = float(a.max()), float(a.min())
    if math.isnan(hi) or math.isnan(lo):
        return math.inf
    return max(hi, -lo)


def grid(largest, grains, dtype):
    """The exponent k of the grid 2^k for an array whose grains' values are at most
    `largest` in magnitude, so that `grains` such arrays, rounded to 2^k, add up exactly
    in `dtype`; None when no k of dtype does (largest is Inf, or near dtype's maximum).

    With M = largest < 2^e and h = ceil(log2 grains), k = e + h + 2 - p: then
    M < 2^(k+p-2), as round_to_grid_ needs, and each rounded value is at most
    M + 2^(k-1), so the magnitudes of all grains add up to at most
    2^h (2^(k+p-2-h) + 2^(k-1)) <= 2^(k+p-1) < 2^(k+p).
    """
    info = np.finfo(dtype)
    p = info.nmant + 1
    k_min = info.minexp - info.nmant        # the subnormals' spacing: every value is on it
    k_max = info.maxexp - p - 1             # the largest k whose 1.5 * 2^(k+p-1) is finite
    if not math.isfinite(largest):
        return None
    h = (grains - 1).bit_length()
    k = k_min if largest == 0 else max(k_min, math.frexp(largest)[1] + h + 2 - p)
    return k if k <= k_max else None


def round_to_grid_(a, k):
    """Round every value of `a` (|a| < 2^(k+p-2)) in place to the nearest multiple of 2^k,
    ties to even. Adding C = 1.5 * 2^(k+p-1) moves a into [2^(k+p-1), 2^(k+p)], where the
    spacing of `a`'s dtype is exactly 2^k, so the addition rounds to the grid; taking C
    away again is exact."""
    C = _shift(a.dtype, k)
    a += C
    a -= C
    return a


def _shift(dtype, k):
    return dtype.type(1.5 * 2.0 ** (k + np.finfo(dtype).nmant))   # 1.5 * 2^(k+p-1)


def add_rounded_(grains, grids, chunk=1 << 16):
    """Round every grain in place to `grids` (one k per array: grains[g][i] is array i of
    grain g), then add all grains into the last one, exactly. Chunk by chunk, so that a
    chunk of every grain is rounded and added while it is in cache."""
    for i, k in enumerate(grids):
        C = _shift(grains[0][i].dtype, k)
        flat = [arrays[i].reshape(-1) for arrays in grains]
        for start in range(0, flat[0].size, chunk):
            total = flat[-1][start:start + chunk]
            total += C
            total -= C
            for other in flat[:-1]:
                part = other[start:start + chunk]
                part += C
                part -= C
                total += part          # exact: values on the grid, sums bounded
