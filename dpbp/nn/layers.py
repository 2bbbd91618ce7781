"""Layers, each with its forward and backward side by side, all with the same methods.

Shapes use one vocabulary throughout dpbp:
    B     rows in this rank's shard of the global batch (may be 0)
    F     the shape of one row's features: activations are (B, *F), never assumed 2-D
    D_in  input width of a Linear, D_out its output width

Every layer has the methods of `Layer`, with the same signatures, and the model
(model.py) is a loop over them that never asks which layer it holds:

    declare(in_shape)        -> Declared: the output shape for rows of `in_shape`, the
                                parameters' shapes, the non-trainable buffers' shapes
    place(index, input_grad, input_free)
                             where the model put it (Layer's own method): its index in
                             the network; whether backward must return the input's
                             gradient; whether forward may write over its input
    bind(params, buffers)    views into the model's flat parameter buffer and its buffer
                             arrays, in declare's order
    init_(rng)               the initial parameters, drawn from rng
    flops(in_shape)          floating-point operations per row, forward and backward
    forward(x, ctx)          training: x (B, *F_in) -> y (B, *F_out), caching for backward
    infer(x)                 evaluation: forward's arithmetic, caching nothing, so that
                             several threads may run it at once
    backward(dy, grads, ctx) dy (B, *F_out) -> dx (B, *F_in); writes the parameters'
                             gradients into `grads`: one set of views per segment of
                             the pass (ctx.segments), each into a flat buffer laid out
                             like the parameters (the model's, or a grain's own)
    scratch_bytes()          the working memory it holds that does not grow with the
                             rows (a convolution's blocks): 0 for most layers

`ctx` (a Context) carries what a training pass hands every layer alike: each row's key
for random draws, the segments of the pass, and the function that sums small arrays over
the global batch. A pass may hold several segments (under train.deterministic, one per
grain of the rank): a layer whose bits depend on how rows are grouped (a matrix product,
a block of images) works segment by segment, each from its own first row, and writes
each segment's parameter gradients into that segment's views, so that a segment's bits
never depend on what else the pass holds. Elementwise work spans the pass.

Forward writes into its input x only where the model says it is free (input_free: the
output of a layer before that declares it `output_free`, which its backward never reads;
never the data); backward may overwrite dy, which nothing needs after.
Parameter views are updated in place, never rebound. Each layer writes its output (and
its input gradient) over a free input or into a buffer of its own, made on the first
call and again only when a call brings more rows, so the array a layer returns is
overwritten by its next call; `infer` allocates instead.
"""

import math

import numpy as np

from dpbp.nn import noise


def alone(partials):
    """The sum over the global batch in one process: this pass is the whole batch."""
    return np.asarray(partials).sum(axis=0)


class Context:
    """What a training pass hands every layer beside its input (the same for all layers):
    keys        (B,) uint64, each row's key for random draws (noise.row_keys), or None
    batch_sum   partials (S, ...), one small array per segment of this pass -> (...),
                their sum over every segment of the global batch, every rank's; called
                once per pass by every rank (collective, parallel/step.py), in a float
                dtype exact under train.deterministic; a plain sum in one process
    segments    the rows of each segment of the pass, [slice, ...] in order, covering it;
                None: one segment, all rows (segments_of)
    """

    def __init__(self, keys=None, batch_sum=alone, segments=None):
        self.keys, self.batch_sum, self.segments = keys, batch_sum, segments

    def segments_of(self, B):
        """The segments of a pass of B rows: [slice(0, B)] unless the pass was cut."""
        return [slice(0, B)] if self.segments is None else self.segments


ALONE = Context()   # one process, no random draws: the default


class Declared:
    """What a layer needs for rows of a given shape:
    out         the shape of one output row
    params      ((name, shape), ...): trainable, views into the flat parameter buffer
    buffers     ((name, shape, dtype), ...): non-trainable, views into the buffer array
                of their dtype (None: the parameters' dtype)
    """

    def __init__(self, out, params=(), buffers=()):
        self.out, self.params, self.buffers = tuple(out), tuple(params), tuple(buffers)


def is_channels_last(a):
    """Whether rows of images a (B, C, H, W) are a view of channels-last memory (B, H, W,
    C), as the convolutions give them (conv.py); one channel counts as C order."""
    return a.ndim == 4 and a.shape[1] > 1 and a.strides[1] < a.strides[3]


def rows_of(buf, B, F, dtype, like=None):
    """A buffer with room for (B, *F) of dtype: `buf` itself when it is big enough. Laid
    out like the array `like` where given (channels-last images stay channels-last, so
    that elementwise work runs through both in the same order), else in C order."""
    last = like is not None and is_channels_last(like)
    if buf is None or buf.shape[0] < B or buf.shape[1:] != tuple(F) or buf.dtype != dtype \
            or is_channels_last(buf) != last:
        buf = np.empty((B, *F), dtype=dtype) if not last else \
            np.empty((B, *F[1:], F[0]), dtype=dtype).transpose(0, 3, 1, 2)
    return buf


class Layer:
    """The interface, with the defaults of a layer that has no parameters and keeps the
    shape of its input."""
    draws = False         # forward draws random numbers (then it needs ctx.keys)
    values_per_row = 0    # forward normalises with statistics of the global batch, this
                          # many values per row and channel: it needs the whole batch in
                          # one pass, and 2 values or more per channel (0: no statistics)
    output_free = False   # forward's output may be overwritten by the next layer: this
                          # layer's own buffer (or its input, where that was free), which
                          # its backward never reads
    index, input_grad, input_free = 0, True, False   # until the model places it
    out = None            # the buffer output() writes into where x is not free

    def place(self, index, input_grad, input_free):
        """From the model: this layer's index in the network (its parameters' names,
        its random draws); whether backward must return its input's gradient (not
        below the first layer with parameters); whether forward may write over x."""
        self.index, self.input_grad, self.input_free = index, input_grad, input_free

    def declare(self, in_shape):
        return Declared(out=tuple(in_shape))

    def bind(self, params, buffers):
        pass

    def init_(self, rng):
        pass

    def flops(self, in_shape):
        return 0

    def scratch_bytes(self):
        return 0

    def output(self, x):
        """Where forward writes an output of x's shape and dtype: over x where it is
        free, else into this layer's own buffer."""
        if self.input_free:
            return x
        self.out = rows_of(self.out, len(x), x.shape[1:], x.dtype, like=x)
        return self.out[:len(x)]


class Linear(Layer):
    """y = x W^T + b, with W of shape (D_out, D_in) as in torch.nn.Linear."""
    output_free = True   # backward reads x and W, never y

    def __init__(self, out_features):
        if isinstance(out_features, bool) or not isinstance(out_features, int) \
                or out_features < 1:
            raise ValueError(f"out_features must be an integer >= 1, got {out_features!r}")
        self.D_out = out_features
        self.y = self.dx = None   # this layer's own row buffers

    def declare(self, in_shape):
        if len(in_shape) != 1:
            raise ValueError(f"linear takes rows of features (D_in,), got rows of shape "
                             f"{tuple(in_shape)}; put a flatten before it (torch's Linear "
                             "would act on the last axis alone)")
        return Declared(out=(self.D_out,),
                        params=(("weight", (self.D_out, in_shape[0])), ("bias", (self.D_out,))))

    def bind(self, params, buffers):
        self.W, self.b = params   # views into the flat parameter buffer

    def init_(self, rng):
        """torch.nn.Linear's default init: W and b uniform in +-1/sqrt(D_in)."""
        bound = 1.0 / np.sqrt(self.W.shape[1])
        self.W[...] = rng.uniform(-bound, bound, size=self.W.shape)
        self.b[...] = rng.uniform(-bound, bound, size=self.b.shape)

    def flops(self, in_shape):
        # forward x W^T + b; backward dW, db, and dx unless no layer before needs it
        D_out, D_in = self.W.shape
        return (2 + 2 + 2 * self.input_grad) * D_in * D_out + 2 * D_out

    def forward(self, x, ctx):
        # x (B, D_in) -> y (B, D_out); one product per segment
        self.x = x
        B, D_out = len(x), self.W.shape[0]
        self.y = rows_of(self.y, B, (D_out,), self.W.dtype)
        y = self.y[:B]
        for s in ctx.segments_of(B):
            np.matmul(x[s], self.W.T, out=y[s])
        y += self.b
        return y

    def infer(self, x):
        # x (B, D_in) -> y (B, D_out): forward's arithmetic, caching nothing
        y = np.matmul(x, self.W.T)
        y += self.b
        return y

    def backward(self, dy, grads, ctx):
        # dy (B, D_out) -> dx (B, D_in), or None where no layer before needs it;
        # grads = [(dW (D_out, D_in), db (D_out,)) per segment], overwritten
        B, D_in = len(dy), self.W.shape[1]
        segments = ctx.segments_of(B)
        for s, (dW, db) in zip(segments, grads):
            np.matmul(dy[s].T, self.x[s], out=dW)
            np.sum(dy[s], axis=0, out=db)
        if not self.input_grad:   # e.g. the first layer: nobody needs the data's gradient
            return None
        self.dx = rows_of(self.dx, B, (D_in,), self.W.dtype)
        for s in segments:
            np.matmul(dy[s], self.W, out=self.dx[s])
        return self.dx[:B]


class ReLU(Layer):
    output_free = True   # backward reads the mask alone

    def __init__(self):
        self.positive = None

    def flops(self, in_shape):
        return 2 * math.prod(in_shape)   # forward x * (x > 0), backward dy * mask

    def forward(self, x, ctx):
        # x (B, *F) -> y (B, *F), over x where it is free (the output of a Linear)
        B = len(x)
        self.positive = rows_of(self.positive, B, x.shape[1:], np.bool_, like=x)
        self.mask = np.greater(x, 0, out=self.positive[:B])
        return np.multiply(x, self.mask, out=self.output(x))

    def infer(self, x):
        # x (B, *F) -> y (B, *F): forward's arithmetic, caching nothing
        return np.multiply(x, np.greater(x, 0))

    def backward(self, dy, grads, ctx):
        # dy (B, *F) -> dx (B, *F), in place
        return np.multiply(dy, self.mask, out=dy)


class Tanh(Layer):
    def __init__(self):
        self.scratch = None

    def flops(self, in_shape):
        return 4 * math.prod(in_shape)   # forward tanh, backward dy * (1 - y^2)

    def forward(self, x, ctx):
        # x (B, *F) -> y (B, *F), over x where it is free
        self.y = np.tanh(x, out=self.output(x))
        return self.y

    def infer(self, x):
        # x (B, *F) -> y (B, *F), caching nothing
        return np.tanh(x)

    def backward(self, dy, grads, ctx):
        # dy (B, *F) -> dx (B, *F), in place: dtanh/dx = 1 - y^2
        B = len(dy)
        self.scratch = rows_of(self.scratch, B, dy.shape[1:], dy.dtype, like=dy)
        d = np.multiply(self.y, self.y, out=self.scratch[:B])
        np.subtract(1, d, out=d)
        return np.multiply(dy, d, out=dy)


class Sigmoid(Layer):
    def __init__(self):
        self.scratch = None

    def flops(self, in_shape):
        return 7 * math.prod(in_shape)   # forward 0.5 (1 + tanh(x/2)), backward dy y (1 - y)

    def forward(self, x, ctx):
        # x (B, *F) -> y (B, *F), over x where it is free
        self.y = self.sigmoid(x, self.output(x))
        return self.y

    def infer(self, x):
        # x (B, *F) -> y (B, *F), caching nothing
        return self.sigmoid(x, np.empty_like(x))

    @staticmethod
    def sigmoid(x, out):
        # 0.5 (1 + tanh(x/2)) never overflows, unlike 1/(1+exp(-x))
        y = np.multiply(x, 0.5, out=out)
        np.tanh(y, out=y)
        y += 1
        y *= 0.5
        return y

    def backward(self, dy, grads, ctx):
        # dy (B, *F) -> dx (B, *F), in place: dsigmoid/dx = y (1 - y)
        B = len(dy)
        self.scratch = rows_of(self.scratch, B, dy.shape[1:], dy.dtype, like=dy)
        d = np.subtract(1, self.y, out=self.scratch[:B])
        d *= self.y
        return np.multiply(dy, d, out=dy)


class Dropout(Layer):
    """Inverted dropout, as torch.nn.Dropout in training: each unit is zeroed with
    probability p and the others are scaled by 1 / (1 - p); `infer` passes x through.

    The mask is not drawn from a generator with a state: unit u of a row (its index in
    the row's features, flattened) is kept when noise.bits of the row's key
    (noise.row_keys: the run's seed, the optimizer step, the row's index in the training
    set), this layer's index in the network and u is at least p * 2^64. So a row's mask
    is the same whichever rank holds it and whatever else that rank holds, and a resumed
    run draws the same masks.
    """
    draws, output_free = True, True   # backward reads the mask alone

    def __init__(self, p):
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise ValueError(f"p must be a number in [0, 1), got {p!r}")
        self.p = p
        self.threshold = np.uint64(int(p * 2.0**64))   # kept: bits >= threshold, 1 - p of them
        self.scale = 1.0 / (1.0 - p)
        self.bits = self.tmp = self.kept = self.mask = self.y = None   # row buffers

    def flops(self, in_shape):
        return 3 * math.prod(in_shape)   # forward kept * scale, x * mask; backward dy * mask

    def forward(self, x, ctx):
        # x (B, *F), ctx.keys (B,) uint64 -> y (B, *F) = x * mask, mask in {0, scale};
        # into a buffer of its own, x free or not
        if ctx.keys is None:
            raise ValueError("Dropout.forward needs each row's key (noise.row_keys)")
        B, F, D = len(x), x.shape[1:], math.prod(x.shape[1:])
        self.bits, self.tmp = (rows_of(a, B, (D,), np.uint64) for a in (self.bits, self.tmp))
        self.kept = rows_of(self.kept, B, F, np.bool_, like=x)
        self.mask, self.y = (rows_of(a, B, F, x.dtype, like=x) for a in (self.mask, self.y))
        bits = noise.bits(ctx.keys, self.index, self.bits[:B], self.tmp[:B])
        kept = np.greater_equal(bits.reshape(B, *F), self.threshold, out=self.kept[:B])
        self.m = np.multiply(kept, x.dtype.type(self.scale), out=self.mask[:B])
        return np.multiply(x, self.m, out=self.y[:B])

    def infer(self, x):
        # x (B, *F) -> x: no dropout in evaluation
        return x

    def backward(self, dy, grads, ctx):
        # dy (B, *F) -> dx (B, *F), in place: the same mask
        return np.multiply(dy, self.m, out=dy)
