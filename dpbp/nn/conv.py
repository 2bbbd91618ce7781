"""Convolution, pooling and flattening of images, in PyTorch's layout and semantics.

Shapes, beside layers.py's B and F:
    C, H, W        an input image's channels, height and width: rows of (C, H, W)
    C_out, Ho, Wo  the output's
    kh, kw         the kernel (a window); sh, sw the stride; ph, pw the zero padding
    K              the values under one window of all channels, C kh kw

Rows of images are (B, C, H, W) in and (B, C_out, Ho, Wo) out, as torch.nn.Conv2d and
the pooling layers take and give them. Inside a layer the work is channels-last: the
image (B, H, W, C) keeps each pixel's channels side by side, so a convolution is one
matrix product per block of images, (pixels, kh kw C) @ (kh kw C, C_out), and a
pooling window is a handful of strided views. The arrays these layers return are
(B, C, H, W) views of channels-last memory: the next layer takes them as they are (an
activation works on any layout, and allocates its buffers laid out like its input:
layers.rows_of), and Flatten puts them in torch's (C, H, W) order.

Work that grows with the rows is done in blocks of BLOCK images (`blocks`), counted from
the first row of each segment of the pass (layers.Context: a shard's, a grain's, an
evaluation block's first row), never from the rank's share or from free memory: a block's
products then have the same row counts whichever rank computes them, and some BLAS kernels
round differently for other row counts. The scratch memory of a convolution is a few
blocks, whatever the batch (scratch_bytes): a block's columns, and for the input gradient
one product per window offset added into a padded block, never the columns' gradient.
"""

import math

import numpy as np
from numpy.lib.stride_tricks import as_strided

from dpbp.nn.layers import Declared, Layer, is_channels_last, rows_of

BLOCK = 4          # images per block inside a convolution: a block's columns stay in
                   # a core's L2 cache (1 MB) for kernels of up to 3x3x32 on 14x14 images
FEW_CHANNELS = 8   # below it, columns are copied one window offset at a time


def pair(value, name):
    """(a, b) from an int or a pair of ints, as torch's kernel_size, stride, padding."""
    values = (value, value) if isinstance(value, int) and not isinstance(value, bool) \
        else tuple(value) if isinstance(value, (list, tuple)) else None
    if values is None or len(values) != 2 or any(
            isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise ValueError(f"{name} must be an integer or a pair of integers, got {value!r}")
    return values


def out_size(size, kernel, stride, padding):
    """torch's output size along one axis (floor mode, no dilation)."""
    return (size + 2 * padding - kernel) // stride + 1


def channels_last(x):
    """x (B, C, H, W) as (B, H, W, C): a view, contiguous where x is channels-last memory."""
    return x.transpose(0, 2, 3, 1)


def images(x_last):
    """(B, H, W, C) channels-last as torch's (B, C, H, W): a view."""
    return x_last.transpose(0, 3, 1, 2)


def offsets(x_last, out_hw, kernel, stride):
    """The kh kw strided views (n, Ho, Wo, C) of a padded channels-last image, one per
    offset in the window, in row-major order (torch's order on ties)."""
    (Ho, Wo), (kh, kw), (sh, sw) = out_hw, kernel, stride
    return [x_last[:, i:i + (Ho - 1) * sh + 1:sh, j:j + (Wo - 1) * sw + 1:sw]
            for i in range(kh) for j in range(kw)]


def windows(padded, out_hw, kernel, stride):
    """(n, Ho, Wo, kh, kw, C): every window of a padded channels-last block, a view."""
    sB, sH, sW, sC = padded.strides
    (Ho, Wo), (kh, kw), (sh, sw) = out_hw, kernel, stride
    return as_strided(padded, (len(padded), Ho, Wo, kh, kw, padded.shape[3]),
                      (sB, sh * sH, sw * sW, sH, sW, sC), writeable=False)


def blocks(segments):
    """(start, stop) of each block of at most BLOCK rows, counted from each segment's
    first row: the one place where a layer splits its rows, the segments' rows in
    order (the last block of a segment may be shorter)."""
    return [(start, min(start + BLOCK, s.stop))
            for s in segments for start in range(s.start, s.stop, BLOCK)]


def add_rowwise(rows, v):
    """rows (n, k) += v (k,), through a wider view where n allows (numpy's loop is
    slow over short rows); the same sums either way."""
    wide = math.gcd(len(rows), 16)
    rows.reshape(-1, wide * len(v))[...] += np.tile(v, wide)


class Window:
    """What a convolution and a pooling share: kernel, stride and padding (pairs), the
    output size they give, and the check that the kernel fits its input."""

    def window(self, kernel_size, stride, padding):
        self.kernel, self.stride = pair(kernel_size, "kernel_size"), pair(stride, "stride")
        self.padding = pair(padding, "padding")
        if min(self.kernel) < 1 or min(self.stride) < 1 or min(self.padding) < 0:
            raise ValueError("kernel_size and stride must be >= 1, padding >= 0, got "
                             f"{kernel_size!r}, {stride!r}, {padding!r}")

    def out_hw(self, in_shape, name):
        """(Ho, Wo) for rows of `in_shape`; ValueError where they are not images or the
        kernel is larger than the padded image."""
        if len(in_shape) != 3:
            raise ValueError(f"{name} takes rows of images (C, H, W), got rows of shape "
                             f"{tuple(in_shape)}")
        H, W = in_shape[1:]
        padded = (H + 2 * self.padding[0], W + 2 * self.padding[1])
        if self.kernel[0] > padded[0] or self.kernel[1] > padded[1]:
            raise ValueError(f"its kernel {self.kernel[0]}x{self.kernel[1]} is larger than "
                             f"its input {H}x{W}" + (f" padded to {padded[0]}x{padded[1]}"
                                                     if padded != (H, W) else "")
                             + f" (rows of shape {tuple(in_shape)})")
        return tuple(out_size(n, k, s, p) for n, k, s, p in
                     zip((H, W), self.kernel, self.stride, self.padding))

    def pad(self, x, buf):
        """x (n, C, H, W) as channels-last (n, H + 2 ph, W + 2 pw, C): copied into the
        first n rows of `buf`, whose border holds the padding already (padded_buffer);
        without padding, a view of x."""
        (ph, pw), (n, H, W) = self.padding, (len(x), *x.shape[2:])
        if not any(self.padding):
            return channels_last(x)
        buf[:n, ph:ph + H, pw:pw + W, :] = channels_last(x)
        return buf[:n]

    def padded_buffer(self, buf, x, fill):
        """A buffer with room for x padded, (B, H + 2 ph, W + 2 pw, C), its border
        `fill`: `buf` where it has the room (as rows_of), None without padding."""
        B, C, H, W = x.shape
        shape = (H + 2 * self.padding[0], W + 2 * self.padding[1], C)
        if not any(self.padding):
            return None
        if buf is None or buf.shape[0] < B or buf.shape[1:] != shape or buf.dtype != x.dtype:
            buf = np.full((B, *shape), fill, x.dtype)
        return buf


class Conv2d(Window, Layer):
    """y = the cross-correlation of x with W, plus b, as torch.nn.Conv2d: W (C_out, C,
    kh, kw), b (C_out,); stride and zero padding per axis; no dilation, no groups."""
    output_free = True   # backward reads x and W, never y

    def __init__(self, out_channels, kernel_size, stride=1, padding=0, bias=True):
        if isinstance(out_channels, bool) or not isinstance(out_channels, int) \
                or out_channels < 1:
            raise ValueError(f"out_channels must be an integer >= 1, got {out_channels!r}")
        if not isinstance(bias, bool):
            raise ValueError(f"bias must be true or false, got {bias!r}")
        self.C_out, self.bias = out_channels, bias
        self.window(kernel_size, stride, padding)
        self.y = self.dx = self.scratch = self.part = self.unit = None   # own buffers
        self.dpadded = self.dpart = None   # the input gradient's scratch

    def declare(self, in_shape):
        Ho, Wo = self.out_hw(in_shape, "conv2d")
        params = [("weight", (self.C_out, in_shape[0], *self.kernel))]
        if self.bias:
            params.append(("bias", (self.C_out,)))
        return Declared(out=(self.C_out, Ho, Wo), params=params)

    def bind(self, params, buffers):
        self.W, self.b = params[0], params[1] if self.bias else None   # views

    def init_(self, rng):
        """torch.nn.Conv2d's default init: W and b uniform in +-1/sqrt(C kh kw)."""
        bound = 1.0 / math.sqrt(math.prod(self.W.shape[1:]))
        self.W[...] = rng.uniform(-bound, bound, size=self.W.shape)
        if self.b is not None:
            self.b[...] = rng.uniform(-bound, bound, size=self.b.shape)

    def flops(self, in_shape):
        # per output value: forward 2 K, backward dW 2 K, and dx 2 K unless no layer
        # before needs it (its adds per window offset counted in it); the bias once each way
        C_out, Ho, Wo = self.declare(in_shape).out
        K = in_shape[0] * self.kernel[0] * self.kernel[1]
        return ((2 + 2 + 2 * self.input_grad) * K + 2 * self.bias) * C_out * Ho * Wo

    def matrix(self):
        """W as (C_out, K), K in the order of a channels-last window: (kh, kw, C)."""
        return np.ascontiguousarray(self.W.transpose(0, 2, 3, 1).reshape(self.C_out, -1))

    def new_scratch(self, x, scratch=None):
        """(padded, columns): a block of x padded with zeros, (BLOCK, H + 2 ph, W + 2 pw,
        C), and its windows as rows, (BLOCK Ho Wo, K); `scratch` where it fits x."""
        C, H, W = x.shape[1:]
        (ph, pw), (Ho, Wo) = self.padding, self.out_hw(x.shape[1:], "conv2d")
        shapes = ((BLOCK, H + 2 * ph, W + 2 * pw, C),
                  (BLOCK * Ho * Wo, C * self.kernel[0] * self.kernel[1]))
        if scratch is None or scratch[0].dtype != x.dtype or \
                tuple(a.shape for a in scratch) != shapes:
            scratch = np.zeros(shapes[0], x.dtype), np.empty(shapes[1], x.dtype)
        return scratch

    def columns(self, x, scratch, out_hw):
        """The windows of the images x (n <= BLOCK, C, H, W), one row per output pixel:
        (n Ho Wo, K), written into the scratch."""
        padded, columns = scratch
        n, (ph, pw), (H, W) = len(x), self.padding, x.shape[2:]
        block = padded[:n]
        block[:, ph:ph + H, pw:pw + W, :] = channels_last(x)   # the border stays zero
        cols = columns[:n * out_hw[0] * out_hw[1]]
        by_offset = cols.reshape(n, *out_hw, *self.kernel, -1)   # (n, Ho, Wo, kh, kw, C)
        if x.shape[1] >= FEW_CHANNELS:
            np.copyto(by_offset, windows(block, out_hw, self.kernel, self.stride))
        else:   # numpy's copy loops over the channels innermost: one offset at a time
            for k, view in enumerate(offsets(block, out_hw, self.kernel, self.stride)):
                by_offset[:, :, :, k // self.kernel[1], k % self.kernel[1]] = view
        return cols

    def convolve(self, x, y_last, scratch, segments):
        """y_last (B, Ho, Wo, C_out) = the convolution of x (B, C, H, W), block by block
        from each segment's first row; returned as (B, C_out, Ho, Wo)."""
        Wk, out_hw = self.matrix(), y_last.shape[1:3]
        rows = y_last.reshape(-1, self.C_out)   # (B Ho Wo, C_out)
        per_image = out_hw[0] * out_hw[1]
        for start, stop in blocks(segments):
            y = np.matmul(self.columns(x[start:stop], scratch, out_hw), Wk.T,
                          out=rows[start * per_image:stop * per_image])
            if self.b is not None:
                add_rowwise(y, self.b)
        return images(y_last)

    def forward(self, x, ctx):
        # x (B, C, H, W) -> y (B, C_out, Ho, Wo), a view of channels-last memory
        self.x = x
        B, (Ho, Wo) = len(x), self.out_hw(x.shape[1:], "conv2d")
        self.y = rows_of(self.y, B, (Ho, Wo, self.C_out), x.dtype)
        self.scratch = self.new_scratch(x, self.scratch)
        return self.convolve(x, self.y[:B], self.scratch, ctx.segments_of(B))

    def infer(self, x):
        # x (B, C, H, W) -> y (B, C_out, Ho, Wo): forward's arithmetic, caching nothing
        Ho, Wo = self.out_hw(x.shape[1:], "conv2d")
        return self.convolve(x, np.empty((len(x), Ho, Wo, self.C_out), x.dtype),
                             self.new_scratch(x), [slice(0, len(x))])

    def backward(self, dy, grads, ctx):
        # dy (B, C_out, Ho, Wo) -> dx (B, C, H, W) channels-last, or None where no layer
        # before needs it; grads = [(dW (C_out, C, kh, kw), db (C_out,)) per segment],
        # overwritten
        x, Wk = self.x, self.matrix()
        B, out_hw = len(x), dy.shape[2:]
        per_image = out_hw[0] * out_hw[1]
        # (B Ho Wo, C_out): a view where dy is channels-last (as from pooling), else a copy
        rows = np.ascontiguousarray(channels_last(dy)).reshape(-1, self.C_out)
        self.part = rows_of(self.part, 2, Wk.shape, Wk.dtype)
        dWk, part = self.part[0], self.part[1]   # dW in the window's order, one block's
        if self.input_grad:
            self.dx = rows_of(self.dx, B, (*x.shape[2:], x.shape[1]), x.dtype)
            W_ij = np.ascontiguousarray(self.W.transpose(2, 3, 0, 1))   # (kh, kw, C_out, C)
        for segment, dW_db in zip(ctx.segments_of(B), grads):
            dWk[...] = 0
            if self.b is not None:
                dW_db[1][...] = 0
            for start, stop in blocks([segment]):
                d = rows[start * per_image:stop * per_image]   # (n Ho Wo, C_out)
                np.matmul(d.T, self.columns(x[start:stop], self.scratch, out_hw), out=part)
                dWk += part
                if self.b is not None:
                    dW_db[1] += np.matmul(self.ones(BLOCK * per_image, d.dtype)[:len(d)], d)
                if self.input_grad:
                    self.input_gradient(d, W_ij, self.dx[start:stop])
            np.copyto(dW_db[0], dWk.reshape(self.C_out, *self.kernel, -1).transpose(0, 3, 1, 2))
        return images(self.dx[:B]) if self.input_grad else None

    def ones(self, n, dtype):
        """(n,) ones, for the bias gradient's sum over a block's rows as a product."""
        if self.unit is None or len(self.unit) != n or self.unit.dtype != dtype:
            self.unit = np.ones(n, dtype)
        return self.unit

    def input_gradient(self, d, W_ij, dx):
        """dx (n, H, W, C) = the input gradient of a block of n images, from d (n Ho Wo,
        C_out), the output gradient's rows: for each offset (i, j) of the window, d @
        W[:, :, i, j] added to the pixels that offset reached, in a padded scratch image
        (the padding's share dropped). No columns: kh kw products of C_out x C."""
        n, H, W, C = dx.shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.padding
        Ho, Wo = out_size(H, kh, sh, ph), out_size(W, kw, sw, pw)
        self.dpadded = rows_of(self.dpadded, BLOCK, (H + 2 * ph, W + 2 * pw, C), dx.dtype)
        self.dpart = rows_of(self.dpart, BLOCK * Ho * Wo, (C,), dx.dtype)
        padded, part = self.dpadded[:n], self.dpart[:len(d)]
        padded[...] = 0
        for i in range(kh):
            for j in range(kw):
                np.matmul(d, W_ij[i, j], out=part)
                padded[:, i:i + (Ho - 1) * sh + 1:sh, j:j + (Wo - 1) * sw + 1:sw] += \
                    part.reshape(n, Ho, Wo, C)
        np.copyto(dx, padded[:, ph:ph + H, pw:pw + W])

    def scratch_bytes(self):
        return sum(a.nbytes for a in (*(self.scratch or ()), self.part, self.unit,
                                      self.dpadded, self.dpart) if a is not None)


class Pool(Window, Layer):
    """What the two poolings share: their arguments, as torch's (stride = kernel_size
    by default, floor mode), and their output's shape."""

    def __init__(self, kernel_size, stride=None, padding=0):
        self.window(kernel_size, kernel_size if stride is None else stride, padding)
        if any(p * 2 > k for p, k in zip(self.padding, self.kernel)):
            raise ValueError(f"padding {list(self.padding)} is more than half the kernel "
                             f"{list(self.kernel)} (torch refuses it too)")
        self.y = self.padded = self.dx = self.taken = self.hit = self.share = None   # own

    def declare(self, in_shape):
        return Declared(out=(in_shape[0], *self.out_hw(in_shape, self.name)))


class MaxPool2d(Pool):
    """The largest value of each window, as torch.nn.MaxPool2d (padding with -inf); the
    gradient goes to one element per window, the first largest in row-major order, the
    one torch picks on ties (which ReLU makes common)."""
    name = "maxpool2d"

    def flops(self, in_shape):
        # per output value: kh kw - 1 maxima forward; backward a multiply-add per offset
        C, Ho, Wo = self.declare(in_shape).out
        k = self.kernel[0] * self.kernel[1]
        return (k - 1 + 2 * k) * C * Ho * Wo

    def pool(self, x_last, out):
        # x_last (B, H', W', C) padded channels-last -> out (B, Ho, Wo, C), the maxima
        views = offsets(x_last, out.shape[1:3], self.kernel, self.stride)
        np.copyto(out, views[0])
        for v in views[1:]:
            np.maximum(out, v, out=out)
        return images(out)

    def forward(self, x, ctx):
        # x (B, C, H, W) -> y (B, C, Ho, Wo), a view of channels-last memory
        B, (Ho, Wo) = len(x), self.out_hw(x.shape[1:], self.name)
        self.padded = self.padded_buffer(self.padded, x, -np.inf)
        self.x_last = self.pad(x, self.padded)   # backward reads it, and y
        self.y = rows_of(self.y, B, (Ho, Wo, x.shape[1]), x.dtype)
        return self.pool(self.x_last, self.y[:B])

    def infer(self, x):
        # x (B, C, H, W) -> y (B, C, Ho, Wo): forward's arithmetic, caching nothing
        Ho, Wo = self.out_hw(x.shape[1:], self.name)
        x_last = self.pad(x, self.padded_buffer(None, x, -np.inf))
        return self.pool(x_last, np.empty((len(x), Ho, Wo, x.shape[1]), x.dtype))

    def backward(self, dy, grads, ctx):
        # dy (B, C, Ho, Wo) -> dx (B, C, H, W) channels-last: each window's dy to its
        # first largest element
        x_last, y = self.x_last, self.y[:len(dy)]
        (ph, pw), (B, Hp, Wp, C) = self.padding, x_last.shape
        self.dx = rows_of(self.dx, B, (Hp, Wp, C), dy.dtype)
        self.taken, self.hit = (rows_of(a, B, y.shape[1:], np.bool_)
                                for a in (self.taken, self.hit))
        self.share = rows_of(self.share, B, y.shape[1:], dy.dtype)
        dx, taken, hit, dy_hit = self.dx[:B], self.taken[:B], self.hit[:B], self.share[:B]
        apart = self.stride == self.kernel   # windows side by side: each element in one
        self.zero_outside(dx, y.shape[1:3]) if apart else dx.fill(0)
        views = zip(offsets(x_last, y.shape[1:3], self.kernel, self.stride),
                    offsets(dx, y.shape[1:3], self.kernel, self.stride))
        for k, (v, d) in enumerate(views):
            np.equal(v, y, out=hit)
            if k:
                np.greater(hit, taken, out=hit)   # not where an earlier one was largest
                np.logical_or(taken, hit, out=taken)
            else:
                np.copyto(taken, hit)
            if apart:
                np.multiply(channels_last(dy), hit, out=d)   # d's only writer
            else:
                d += np.multiply(channels_last(dy), hit, out=dy_hit)
        return images(dx[:, ph:Hp - ph, pw:Wp - pw])

    def zero_outside(self, dx, out_hw):
        """Zero the rows and columns of dx (B, H', W', C) that no window covers (floor
        mode leaves them out), where the windows lie side by side."""
        (Ho, Wo), (sh, sw) = out_hw, self.stride
        dx[:, Ho * sh:], dx[:, :, Wo * sw:] = 0, 0


class AvgPool2d(Pool):
    """The mean of each window, as torch.nn.AvgPool2d (zero padding counted in the mean:
    count_include_pad)."""
    name = "avgpool2d"
    output_free = True   # backward reads nothing of forward but the shapes

    def flops(self, in_shape):
        # per output value: kh kw adds and a division forward; as many backward
        C, Ho, Wo = self.declare(in_shape).out
        return 2 * (self.kernel[0] * self.kernel[1] + 1) * C * Ho * Wo

    def pool(self, x_last, out):
        # x_last (B, H', W', C) padded channels-last -> out (B, Ho, Wo, C), the means
        views = offsets(x_last, out.shape[1:3], self.kernel, self.stride)
        np.copyto(out, views[0])
        for v in views[1:]:
            out += v
        out /= self.kernel[0] * self.kernel[1]
        return images(out)

    def forward(self, x, ctx):
        # x (B, C, H, W) -> y (B, C, Ho, Wo), a view of channels-last memory
        B, (Ho, Wo) = len(x), self.out_hw(x.shape[1:], self.name)
        self.padded = self.padded_buffer(self.padded, x, 0)
        self.in_shape = x.shape[1:]
        self.y = rows_of(self.y, B, (Ho, Wo, x.shape[1]), x.dtype)
        return self.pool(self.pad(x, self.padded), self.y[:B])

    def infer(self, x):
        # x (B, C, H, W) -> y (B, C, Ho, Wo): forward's arithmetic, caching nothing
        Ho, Wo = self.out_hw(x.shape[1:], self.name)
        x_last = self.pad(x, self.padded_buffer(None, x, 0))
        return self.pool(x_last, np.empty((len(x), Ho, Wo, x.shape[1]), x.dtype))

    def backward(self, dy, grads, ctx):
        # dy (B, C, Ho, Wo) -> dx (B, C, H, W) channels-last: dy / (kh kw) to each
        # element of the window
        (C, H, W), (ph, pw), B = self.in_shape, self.padding, len(dy)
        self.dx = rows_of(self.dx, B, (H + 2 * ph, W + 2 * pw, C), dy.dtype)
        self.share = rows_of(self.share, B, channels_last(dy).shape[1:], dy.dtype)
        dx, share = self.dx[:B], self.share[:B]
        dx[...] = 0
        np.divide(channels_last(dy), self.kernel[0] * self.kernel[1], out=share)
        for d in offsets(dx, dy.shape[2:], self.kernel, self.stride):
            d += share
        return images(dx[:, ph:ph + H, pw:pw + W])


class Flatten(Layer):
    """x (B, C, H, W) -> (B, C H W), the features in torch's (C, H, W) order, as
    torch.nn.Flatten; rows of any shape."""
    output_free = True   # backward reads the input's shape and layout alone

    def __init__(self):
        self.y = self.dx = None   # own buffers

    def declare(self, in_shape):
        return Declared(out=(math.prod(in_shape),))

    def forward(self, x, ctx):
        # x (B, *F) -> y (B, prod F), copied (channels-last memory into torch's order)
        self.x = x
        B, D = len(x), math.prod(x.shape[1:])
        self.y = rows_of(self.y, B, (D,), x.dtype)
        np.copyto(self.y[:B].reshape(x.shape), x)
        return self.y[:B]

    def infer(self, x):
        # x (B, *F) -> y (B, prod F), caching nothing
        return np.ascontiguousarray(x).reshape(len(x), -1)

    def backward(self, dy, grads, ctx):
        # dy (B, prod F) -> dx (B, *F), laid out like forward's x: a view of dy where x
        # is in C order, else a copy (channels-last), so the layers below work in place
        # on memory laid out as their own
        B, dx = len(dy), dy.reshape(self.x.shape)
        if not is_channels_last(self.x):
            return dx
        self.dx = rows_of(self.dx, B, self.x.shape[1:], dy.dtype, like=self.x)
        np.copyto(self.dx[:B], dx)
        return self.dx[:B]
