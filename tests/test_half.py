"""bfloat16 conversion (used for reduced-precision gradient sums): round to nearest even."""

import numpy as np

from dpbp.parallel.half import from_bfloat16, to_bfloat16


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
