"""16-bit gradient sums: bfloat16 conversion (round to nearest even, against brute
force), and the sum over 2 and 3 ranks (threads, tests/thread_ranks.py) at every
magnitude and at the edge of float16's range. On real ranks: tests/mpi/test_comm_mpi.py."""

import numpy as np
import pytest

from dpbp.parallel.half import Buffers, allreduce_16_, from_bfloat16, to_bfloat16
from tests.thread_ranks import run_ranks


def reference(x):
    """Nearest bfloat16 by brute force: the two neighbours of x, the nearer (even on a tie)."""
    out = []
    for v in x.astype(np.float32):
        bits = int(np.array(v).view(np.uint32))
        lo, hi = bits >> 16, (bits >> 16) + 1
        f = [float(np.array(b << 16, np.uint32).view(np.float32)) for b in (lo, hi)]
        d = [abs(float(v) - g) for g in f]
        out.append(lo if d[0] < d[1] or (d[0] == d[1] and lo % 2 == 0) else hi)
    return np.array(out, np.uint16)


def test_rounding_to_nearest_even():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=2000) * 10.0 ** rng.integers(-30, 30, 2000),
                        [0.0, -0.0, 1.0, 1 + 2 ** -8, 1 + 3 * 2 ** -8, -2.5]]).astype(np.float32)
    positive = np.abs(x)
    packed = to_bfloat16(positive, np.empty(x.size, np.uint16))
    np.testing.assert_array_equal(packed, reference(positive))
    back = from_bfloat16(packed, np.empty(x.size, np.float32))
    np.testing.assert_allclose(back, positive, rtol=2 ** -8)


def test_special_values_survive():
    x = np.array([np.inf, -np.inf, np.nan, np.finfo(np.float32).max], np.float32)
    back = from_bfloat16(to_bfloat16(x, np.empty(4, np.uint16)), np.empty(4, np.float32))
    assert back[0] == np.inf and back[1] == -np.inf and np.isnan(back[2])
    assert back[3] == np.inf   # float32's largest rounds up past bfloat16's largest


# ----------------------------------------------------------------------------- the sum over ranks

def summed(kind, parts):
    """allreduce_16_ of parts[r] on rank r (ranks as threads): every rank's result."""
    size, n = len(parts), parts[0].size
    out, _ = run_ranks(size, lambda comm: allreduce_16_(
        comm, parts[comm.rank].copy(), kind, Buffers(n, comm.rank, size)))
    return out


@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("kind,rtol", [("float16", 2e-3), ("bfloat16", 2e-2)])
def test_16_bit_sums_at_every_magnitude(size, kind, rtol):
    """The sum to the format's rounding, bitwise the same on every rank, and neither
    tiny nor huge values lost (float16 is scaled by a power of two all ranks agree on);
    a NaN on one rank stays a NaN."""
    rng = np.random.default_rng(size)
    for magnitude in (1e-7, 1.0, 3e4, 1e30 if kind == "bfloat16" else 6e4):
        parts = [(rng.normal(size=1000) * magnitude).astype(np.float32) for _ in range(size)]
        exact = np.sum([p.astype(np.float64) for p in parts], axis=0)
        out = summed(kind, parts)
        assert all(o.tobytes() == out[0].tobytes() for o in out)
        assert np.isfinite(out[0]).all()
        scale = max(np.abs(p).max() for p in parts) * size
        np.testing.assert_allclose(out[0], exact, rtol=0, atol=rtol * scale)
    poisoned = [np.ones(10, np.float32) for _ in range(size)]
    poisoned[1][3] = np.nan
    out = summed(kind, poisoned)[0]
    assert np.isnan(out[3]) and np.isfinite(np.delete(out, 3)).all()


@pytest.mark.parametrize("size", [2, 3])
def test_float16_sum_at_the_edge_of_its_range(size):
    """Every rank at the largest value the scaling allows for, with the same sign: the
    sum stays below 65504; tiny values are not scaled past float32's range."""
    edge = np.full(4, 65504.0 / size * 0.9999, np.float32)
    out = summed("float16", [edge] * size)[0]
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, edge * size, rtol=2e-3)
    tiny = np.array([1e-36, 0.0, 5e-37], np.float32)
    out = summed("float16", [tiny] * size)[0]
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, tiny * size, rtol=2e-3)
