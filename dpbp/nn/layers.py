"""Layers, each with its forward and backward side by side.

Shapes use one vocabulary throughout dpbp:
    B     rows in this rank's shard of the global batch (may be 0)
    D_in  input width of a layer, D_out its output width
Backward reuses what forward cached, and writes weight gradients in place into views of
the model's flat gradient buffer (`dW`, `db`), never rebinding them.

The layers allocate nothing after their first call: each writes its output (and its
input gradient) into a buffer of its own, made on the first call and again only when a
call brings more rows, so the array a layer returns is overwritten by its next call.
(`infer`, for evaluation, allocates instead, so that several threads may run it.)
"""

import numpy as np

from dpbp.nn import noise


def rows_of(buf, B, D, dtype):
    """A buffer with room for (B, D) of dtype: `buf` itself when it is big enough."""
    if buf is None or buf.shape[0] < B or buf.shape[1] != D or buf.dtype != dtype:
        buf = np.empty((B, D), dtype=dtype)
    return buf


class Linear:
    """y = x W^T + b, with W of shape (D_out, D_in) as in torch.nn.Linear."""

    def __init__(self, W, b, dW, db):
        self.W, self.b, self.dW, self.db = W, b, dW, db   # views into flat buffers
        self.y = self.dx = None                           # this layer's own row buffers

    def forward(self, x):
        # x (B, D_in) -> y (B, D_out)
        self.x = x
        B, D_out = len(x), self.W.shape[0]
        self.y = rows_of(self.y, B, D_out, self.W.dtype)
        y = np.matmul(x, self.W.T, out=self.y[:B])
        y += self.b
        return y

    def infer(self, x):
        # x (B, D_in) -> y (B, D_out): forward's arithmetic, caching nothing
        y = np.matmul(x, self.W.T)
        y += self.b
        return y

    def backward(self, dy, need_dx=True, into=None):
        # dy (B, D_out) -> dx (B, D_in); sets dW (D_out, D_in) and db (D_out,), or the
        # pair of arrays `into` (train.deterministic: one gradient per grain)
        dW, db = (self.dW, self.db) if into is None else into
        np.matmul(dy.T, self.x, out=dW)
        np.sum(dy, axis=0, out=db)
        if not need_dx:   # the first layer: nobody needs the gradient of the data
            return None
        B, D_in = len(dy), self.W.shape[1]
        self.dx = rows_of(self.dx, B, D_in, self.W.dtype)
        return np.matmul(dy, self.W, out=self.dx[:B])


class ReLU:
    def __init__(self):
        self.positive = None

    def forward(self, x):
        # x (B, D) -> y (B, D), in place: x is the fresh output of a Linear
        B, D = x.shape
        self.positive = rows_of(self.positive, B, D, np.bool_)
        self.mask = np.greater(x, 0, out=self.positive[:B])
        return np.multiply(x, self.mask, out=x)

    @staticmethod
    def infer(x):
        # x (B, D) -> y (B, D), in place: forward's arithmetic, caching nothing
        return np.multiply(x, np.greater(x, 0), out=x)

    def backward(self, dy):
        # dy (B, D) -> dx (B, D)
        return np.multiply(dy, self.mask, out=dy)


class Tanh:
    def __init__(self):
        self.scratch = None

    def forward(self, x):
        # x (B, D) -> y (B, D), in place
        self.y = self.infer(x)
        return self.y

    @staticmethod
    def infer(x):
        # x (B, D) -> y (B, D), in place, caching nothing
        return np.tanh(x, out=x)

    def backward(self, dy):
        # dy (B, D) -> dx (B, D), in place: dtanh/dx = 1 - y^2
        B, D = dy.shape
        self.scratch = rows_of(self.scratch, B, D, dy.dtype)
        d = np.multiply(self.y, self.y, out=self.scratch[:B])
        np.subtract(1, d, out=d)
        return np.multiply(dy, d, out=dy)


class Sigmoid:
    def __init__(self):
        self.scratch = None

    def forward(self, x):
        # x (B, D) -> y (B, D), in place
        self.y = self.infer(x)
        return self.y

    @staticmethod
    def infer(x):
        # x (B, D) -> y (B, D), in place, caching nothing; 0.5 (1 + tanh(x/2)) never
        # overflows, unlike 1/(1+exp(-x))
        y = np.multiply(x, 0.5, out=x)
        np.tanh(y, out=y)
        y += 1
        y *= 0.5
        return y

    def backward(self, dy):
        # dy (B, D) -> dx (B, D), in place: dsigmoid/dx = y (1 - y)
        B, D = dy.shape
        self.scratch = rows_of(self.scratch, B, D, dy.dtype)
        d = np.subtract(1, self.y, out=self.scratch[:B])
        d *= self.y
        return np.multiply(dy, d, out=dy)



class Dropout:
    """Inverted dropout, as torch.nn.Dropout in training: each unit is zeroed with
    probability p and the others are scaled by 1 / (1 - p); `infer` passes x through.

    The mask is not drawn from a generator with a state: unit u of a row is kept when
    noise.bits of the row's key (noise.row_keys: the run's seed, the optimizer step, the
    row's index in the training set), this layer's `index` in the network and u is at
    least p * 2^64. So a row's mask is the same whichever rank holds it and whatever else
    that rank holds, and a resumed run draws the same masks.
    """

    def __init__(self, p, index):
        self.p, self.index = p, index
        self.threshold = np.uint64(int(p * 2.0**64))   # kept: bits >= threshold, 1 - p of them
        self.scale = 1.0 / (1.0 - p)
        self.bits = self.tmp = self.kept = self.mask = self.y = None   # row buffers

    def forward(self, x, keys):
        # x (B, D), keys (B,) uint64 -> y (B, D) = x * mask, mask in {0, scale}; not in
        # place: x is the activation's output, which Tanh and Sigmoid keep for backward
        if keys is None:
            raise ValueError("Dropout.forward needs each row's key (noise.row_keys)")
        B, D = x.shape
        self.bits, self.tmp = (rows_of(a, B, D, np.uint64) for a in (self.bits, self.tmp))
        self.kept = rows_of(self.kept, B, D, np.bool_)
        self.mask, self.y = (rows_of(a, B, D, x.dtype) for a in (self.mask, self.y))
        bits = noise.bits(keys, self.index, self.bits[:B], self.tmp[:B])
        kept = np.greater_equal(bits, self.threshold, out=self.kept[:B])
        self.m = np.multiply(kept, x.dtype.type(self.scale), out=self.mask[:B])
        return np.multiply(x, self.m, out=self.y[:B])

    @staticmethod
    def infer(x):
        # x (B, D) -> x: no dropout in evaluation
        return x

    def backward(self, dy):
        # dy (B, D) -> dx (B, D), in place: the same mask
        return np.multiply(dy, self.m, out=dy)
