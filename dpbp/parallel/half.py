"""16-bit gradient sums (train.comm_dtype = "float16" or "bfloat16"): half the bytes on the
wire, every rank ending with the same bits.

A reduce-scatter then an allgather, both of 16-bit values: each rank receives its part of
every rank's buffer (Alltoallv), adds the parts up in float32 in rank order, rounds the
sum to 16 bits and sends it to all (Allgatherv). float16 reaches only 65504: every rank
first multiplies its values by one power of two that all agree on (from the largest
magnitude on any rank, with a factor 2 to spare), so that the sum cannot overflow while
small values keep as many bits as the range allows; the sum is divided by it again.
bfloat16 has float32's range and needs no scaling, and is rounded to nearest even.
Non-finite values stay non-finite.
"""

import math
import time

import numpy as np

from dpbp.parallel.sharding import shard_sizes

FLOAT16_MAX = 65504.0   # the largest finite float16


def to_bfloat16(x, out):
    """float32 array x -> bfloat16 bit patterns in uint16 `out`, rounded to nearest even."""
    bits = x.view(np.uint32)
    rounded = bits + (0x7FFF + ((bits >> 16) & 1))      # carries into the exponent on overflow
    out[...] = rounded >> 16
    out[np.isnan(x)] = 0x7FC0                           # a NaN stays a NaN
    return out


def from_bfloat16(packed, out):
    """bfloat16 bit patterns (uint16) -> float32 `out` (exact)."""
    out.view(np.uint32)[...] = packed.astype(np.uint32) << 16
    return out


class Buffers:
    """The 16-bit buffers of a sum of n values over `size` ranks, made once: the whole
    packed buffer, and `size` parts of this rank's share."""

    def __init__(self, n, rank, size):
        self.counts = np.array(shard_sizes(n, size))   # rank r sums part r of every buffer
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        self.mine = slice(self.starts[rank], self.starts[rank] + self.counts[rank])
        c = int(self.counts[rank])
        self.packed, self.parts = np.empty(n, np.uint16), np.empty(c * size, np.uint16)


def scale_for(comm, buf):
    """Collective. The power of two that every rank multiplies its float16 values by: the
    largest that keeps the sum over ranks below float16's maximum, with a factor 2 to
    spare for rounding up, and a float32 number, as its inverse is."""
    peak = float(np.max(np.abs(buf))) if buf.size else 0.0
    peak = comm.allreduce_max_(np.array([peak]))[0]
    if not 0 < peak < math.inf:
        return 1.0
    return min(2.0 ** math.floor(math.log2(FLOAT16_MAX / (2 * peak * comm.size))), 2.0 ** 126)


def allreduce_16_(comm, buf, kind, b):
    """Collective. Replace the float32 `buf` with its sum over ranks, sending 16-bit values
    of `kind`; `b` = Buffers(buf.size, comm.rank, comm.size). Every rank ends with the
    same bits. Timed into comm.wait_seconds, conversions included."""
    if comm.size == 1:
        return buf
    waited, t0 = comm.wait_seconds, time.perf_counter()
    scale = 1.0
    if kind == "float16":
        scale = scale_for(comm, buf)
        np.multiply(buf, scale, out=buf)
        b.packed.view(np.float16)[...] = buf
    else:
        to_bfloat16(buf, b.packed)
    c, size = int(b.counts[comm.rank]), comm.size
    comm.alltoallv_(b.packed, b.counts, b.starts, b.parts, [c] * size, [c * r for r in range(size)])
    total = buf[b.mine]   # this rank's part of the sum, accumulated in float32
    total[...] = 0
    for part in b.parts.reshape(size, c):   # in rank order, the same on every rank
        total += (part.view(np.float16) if kind == "float16"
                  else from_bfloat16(part, np.empty(c, np.float32)))
    if kind == "float16":
        b.packed[b.mine].view(np.float16)[...] = total
    else:
        to_bfloat16(total, b.packed[b.mine])
    comm.allgatherv_in_place_(b.packed, b.counts, b.starts)
    if kind == "float16":
        buf[...] = b.packed.view(np.float16)
        buf *= 1 / scale
    else:
        from_bfloat16(b.packed, buf)
    comm.wait_seconds = waited + time.perf_counter() - t0
    return buf
