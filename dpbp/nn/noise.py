"""Random bits that are a pure function of where they are used: a counter-based generator.

Dropout needs a random mask for every (row, unit) of a layer's output, and data
parallelism needs that mask not to depend on which rank holds the row, nor on how many
rows that rank holds, nor on what was drawn before. So there is no generator state: the
bits of unit u of layer l for a row are a hash of

    (run seed, optimizer step, the row's index in the training set, l, u)

The hash is SplitMix64's finalizer (Steele, Lea and Flood, "Fast splittable pseudorandom
number generators", 2014; the output function of java.util.SplittableRandom), a
bijection of 64-bit integers whose every output bit depends on every input bit. Inputs
are folded in one at a time, each XORed in and mixed again, vectorised over numpy
uint64 arrays (whose arithmetic wraps modulo 2^64, as the hash needs).

    row_keys(seed, step, index)   (B,) keys, one per row, from the first three
    bits(keys, layer, out, tmp)   (B, D) uniform 64-bit integers from the rows' keys
"""

import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)   # 2^64 / golden ratio: SplitMix64's increment
M1, M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def mix_(z, tmp=None):
    """SplitMix64's finalizer of the uint64 array z (ndim >= 1), in place; `tmp`, if
    given, is scratch space of z's shape. Returns z."""
    tmp = np.empty_like(z) if tmp is None else tmp
    for shift, multiplier in ((30, M1), (27, M2)):
        z ^= np.right_shift(z, np.uint64(shift), out=tmp)
        z *= multiplier
    z ^= np.right_shift(z, np.uint64(31), out=tmp)
    return z


def fold_(z, word, tmp=None):
    """z = mix(z ^ word + GOLDEN), in place: one more input folded into the keys z."""
    z ^= word
    z += GOLDEN
    return mix_(z, tmp)


def row_keys(seed, step, index):
    """(B,) uint64: one key per row, from the run's seed, the optimizer step and each
    row's index in the training set (index: (B,) integers >= 0)."""
    z = np.full(1, seed, dtype=np.uint64)
    fold_(fold_(z, np.uint64(step)), np.uint64(0xD809))   # 0xD809: "dropout", a domain
    return fold_(np.asarray(index, dtype=np.uint64) ^ z, np.uint64(0))


def bits(keys, layer, out, tmp):
    """Uniform random bits for unit u of layer `layer` of each row whose key is in
    `keys` (B,), written into out (B, D) uint64; tmp is scratch of out's shape."""
    per_layer = fold_(keys.copy(), np.uint64(layer))
    np.bitwise_xor(per_layer[:, None], np.arange(out.shape[1], dtype=np.uint64)[None, :],
                   out=out)
    return fold_(out, np.uint64(0), tmp)
