"""The arithmetic of train.deterministic (dpbp/parallel/exact.py): exact sums in any order.

Rounded grains add up to the same bits in any order and grouping, and that is the exact
sum (fixed cases and hypothesis, float32 and float64, subnormals and the extremes
included); grid, round_to_grid_, add_rounded_ and abs_max.
"""

import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dpbp.parallel import exact


def rounded(grains_values, dtype):
    """Each grain rounded to the grid of their common largest magnitude, or None."""
    largest = max(exact.abs_max(g) for g in grains_values)
    k = exact.grid(largest, len(grains_values), dtype)
    if k is None:
        return None, None
    return [exact.round_to_grid_(g.copy(), k) for g in grains_values], k


def sums_in_many_orders(values, rng):
    """The elementwise sum of `values` (arrays), taken in several orders and groupings:
    left to right, right to left, a pairwise tree, and split among 'ranks' at random."""
    out = []
    forward = np.zeros_like(values[0])
    for v in values:
        forward = forward + v
    out.append(forward)
    backward = np.zeros_like(values[0])
    for v in reversed(values):
        backward = backward + v
    out.append(backward)
    level = list(values)
    while len(level) > 1:
        level = [level[i] + level[i + 1] if i + 1 < len(level) else level[i]
                 for i in range(0, len(level), 2)]
    out.append(level[0])
    for _ in range(3):
        shuffled = list(values)
        rng.shuffle(shuffled)
        cut = sorted(rng.sample(range(len(shuffled) + 1), 2))
        parts = [shuffled[:cut[0]], shuffled[cut[0]:cut[1]], shuffled[cut[1]:]]
        partial = [sum(p, np.zeros_like(values[0])) for p in parts]
        out.append(partial[2] + partial[0] + partial[1])
    return out


def check_exact(grains_values, dtype, seed=0):
    """Rounded grains: every order gives the same bits, and that is the exact sum (math.fsum
    of the rounded values, correctly rounded, equals it); each value moved by at most half
    the grid, a grid no coarser than largest * 2^(ceil(log2 grains) + 3 - p)."""
    values, k = rounded(grains_values, dtype)
    if values is None:
        return False
    for before, after in zip(grains_values, values):
        assert np.all(after % np.ldexp(dtype(1), k) == 0)
        assert np.all(np.abs(after.astype(np.float64) - before) <= math.ldexp(1, k - 1))
    largest = max(exact.abs_max(g) for g in grains_values)
    p = np.finfo(dtype).nmant + 1
    if largest >= np.finfo(dtype).tiny:   # above the subnormals, the promised precision
        assert math.ldexp(1, k) <= largest * 2.0 ** ((len(values) - 1).bit_length() + 3 - p)
    results = sums_in_many_orders(values, random.Random(seed))
    for r in results:
        assert r.dtype == dtype and r.tobytes() == results[0].tobytes()
    for i in range(values[0].size):
        assert float(results[0].flat[i]) == math.fsum(float(v.flat[i]) for v in values)
    return True


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("grains", [1, 2, 3, 8, 13, 1024])
def test_rounded_grains_add_up_exactly_in_any_order(dtype, grains):
    rng = np.random.default_rng(grains)
    # values over 30 binades, negatives, zeros, and the largest one a power of two
    values = [(rng.normal(size=64) * 2.0 ** rng.integers(-30, 0, size=64)).astype(dtype)
              for _ in range(grains)]
    values[0][0] = 0
    values[-1][1] = -1.0
    assert check_exact(values, dtype)


@settings(max_examples=60, deadline=None)
@given(st.data(), st.sampled_from([np.float32, np.float64]), st.integers(1, 9))
def test_rounded_grains_add_up_exactly_for_any_values(data, dtype, grains):
    """Any finite values, subnormals and the dtype's extremes included; the only refusal
    is a largest value so close to the dtype's maximum that no grid has room."""
    values = [data.draw(hnp.arrays(dtype, 6, elements=st.floats(
        allow_nan=False, allow_infinity=False, width=np.finfo(dtype).bits)))
        for _ in range(grains)]
    largest = max(exact.abs_max(v) for v in values)
    ok = check_exact(values, dtype)
    assert ok or largest > np.finfo(dtype).max / 2 ** 22


def test_adding_rounded_grains_chunk_by_chunk_is_rounding_then_adding():
    """add_rounded_, chunk by chunk in place, equals rounding every grain, then adding."""
    rng = np.random.default_rng(3)
    grains = [[rng.normal(size=(7, 5)).astype(np.float32), rng.normal(size=7).astype(np.float32)]
              for _ in range(3)]
    grids = [exact.grid(max(exact.abs_max(g[i]) for g in grains), 3, np.float32)
             for i in range(2)]
    want = [sum(exact.round_to_grid_(g[i].copy(), grids[i]) for g in grains) for i in range(2)]
    exact.add_rounded_(grains, grids, chunk=4)   # chunks that cut rows of W apart
    for i in range(2):
        assert grains[-1][i].tobytes() == want[i].tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_grid_limits(dtype):
    info = np.finfo(dtype)
    k_min = info.minexp - info.nmant
    assert exact.grid(0.0, 4, dtype) == k_min                      # zeros stay zeros
    assert exact.grid(float(info.smallest_subnormal), 4, dtype) == k_min
    assert exact.grid(math.inf, 4, dtype) is None
    assert exact.grid(float(info.max), 4, dtype) is None           # no room to add 4
    assert exact.grid(1.0, 1, dtype) == 1 + 0 + 2 - (info.nmant + 1)
    assert exact.grid(1.0, 8, dtype) == exact.grid(1.0, 5, dtype) == 1 + 3 + 2 - (info.nmant + 1)


def test_abs_max_sees_nan_anywhere_as_infinite():
    for i in range(5):
        a = np.arange(5, dtype=np.float32) - 2
        a[i] = np.nan
        assert exact.abs_max(a) == math.inf
    assert exact.abs_max(np.array([-3.0, 2.0])) == 3.0
