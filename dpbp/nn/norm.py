"""Batch normalisation over the global batch, as torch.nn.BatchNorm1d and BatchNorm2d.

Shapes, beside layers.py's B and F:
    C    channels: a row is (C,) for batchnorm1d, an image (C, H, W) for batchnorm2d
    M    the values of one channel in the GLOBAL batch: N rows for batchnorm1d, N H W
         for batchnorm2d, every rank's rows counted

In training, each channel is normalised with the mean and the biased variance of its M
values over the global batch, every rank's rows (weighted by rows, never by rank):

    x_hat = (x - mean) / sqrt(var + eps),   y = weight * x_hat + bias

and running_mean, running_var (the unbiased variance, var M / (M - 1)) move towards
them by `momentum`, num_batches_tracked counts the steps ("cumulative": momentum 1 /
num_batches_tracked, torch's momentum=None). Evaluation (`infer`) normalises with the
running statistics. The per-channel sums come from ctx.batch_sum, one partial per
segment of the pass, so a layer never sees a communicator:
    forward   the count and sum of x, then the sum of (x - mean)^2
    backward  the sums of dy and of dy x_hat (the gradients of bias and weight too), for
              dx = weight / sqrt(var + eps) (dy - sum dy / M - x_hat sum(dy x_hat) / M)

The variance takes two passes over x, not one pass of sum x and sum x^2: in float32,
E[x^2] - E[x]^2 loses to cancellation every bit that the mean's magnitude has over the
spread (a channel of mean 1000 and spread 1 would keep about 4 bits of its variance),
while the sum of (x - mean)^2 adds only positive terms. Each partial sum is taken in
float64. The price is a second batch_sum in forward: its latency, not its 2 C values.
Under train.deterministic batch_sum adds every grain's partials with math.fsum, so the
statistics have the same bits at every world size.
"""

import math

import numpy as np

from dpbp.nn.layers import Declared, Layer, rows_of


class BatchNorm(Layer):
    """What batchnorm1d and batchnorm2d share: their arguments, as torch's, buffers and
    arithmetic; `axes` are the axes of a pass that a channel's statistics span."""
    output_free = True   # backward reads x_hat, its own buffer, never y

    def __init__(self, num_features=0, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True):
        if isinstance(num_features, bool) or not isinstance(num_features, int) \
                or num_features < 0:
            raise ValueError(f"num_features must be an integer >= 1 (or left out: the "
                             f"input's channels), got {num_features!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"eps must be a number > 0, got {eps!r}")
        if momentum != "cumulative" and (isinstance(momentum, bool) or not isinstance(
                momentum, (int, float)) or not 0 <= momentum <= 1):
            raise ValueError(f'momentum must be a number in [0, 1] or "cumulative" (torch\'s '
                             f"momentum=None), got {momentum!r}")
        if not isinstance(affine, bool):
            raise ValueError(f"affine must be true or false, got {affine!r}")
        if track_running_stats is not True:
            raise ValueError("track_running_stats = false is not supported: evaluation "
                             "normalises with the running statistics; leave it out")
        self.num_features, self.eps, self.momentum = num_features, float(eps), momentum
        self.affine = affine
        self.x_hat = self.scratch = None   # own row buffers

    def declare(self, in_shape):
        if len(in_shape) != self.row_dims:
            raise ValueError(f"{self.name} takes rows of shape {self.row_shape}, got rows "
                             f"of shape {tuple(in_shape)}")
        C, self.values_per_row = in_shape[0], math.prod(in_shape[1:])
        if self.num_features and self.num_features != C:
            raise ValueError(f"num_features = {self.num_features}, but its input has {C} "
                             "channels")
        params = (("weight", (C,)), ("bias", (C,))) if self.affine else ()
        return Declared(out=in_shape, params=params,
                        buffers=(("running_mean", (C,), None), ("running_var", (C,), None),
                                 ("num_batches_tracked", (), np.int64)))

    def bind(self, params, buffers):
        self.gamma, self.beta = params if self.affine else (None, None)   # views
        self.running_mean, self.running_var, self.tracked = buffers

    def init_(self, rng):
        """torch's: weight 1, bias 0, running_mean 0, running_var 1; nothing drawn."""
        if self.affine:
            self.gamma[...], self.beta[...] = 1, 0
        self.running_mean[...], self.running_var[...], self.tracked[...] = 0, 1, 0

    def flops(self, in_shape):
        # per value: forward two sums, a subtraction, a square, the scaling and shift;
        # backward two sums, a product and the four terms of dx
        return 15 * math.prod(in_shape)

    def channel(self, a):
        """A per-channel vector (C,) shaped to broadcast over a pass's values."""
        return a.reshape(-1, *[1] * (self.row_dims - 1))

    def sums(self, parts, segments, out):
        """out (S, C) = each segment's per-channel sums of `parts` (B, C, ...), float64."""
        for i, s in enumerate(segments):
            np.sum(parts[s], axis=self.axes, dtype=np.float64, out=out[i])
        return out

    def forward(self, x, ctx):
        # x (B, C, ...) -> y (B, C, ...), normalised with the GLOBAL batch's statistics
        B, C, segments = len(x), x.shape[1], ctx.segments_of(len(x))
        partials = np.empty((len(segments), 1 + C))
        partials[:, 0] = [(s.stop - s.start) * self.values_per_row for s in segments]
        self.sums(x, segments, partials[:, 1:])
        totals = ctx.batch_sum(partials)                    # DP: every rank's rows
        self.M, mean = totals[0], totals[1:] / totals[0]
        self.x_hat = rows_of(self.x_hat, B, x.shape[1:], x.dtype, like=x)
        x_hat = np.subtract(x, self.channel(mean.astype(x.dtype)), out=self.x_hat[:B])
        self.scratch = rows_of(self.scratch, B, x.shape[1:], x.dtype, like=x)
        squares = np.square(x_hat, out=self.scratch[:B])
        var = ctx.batch_sum(self.sums(squares, segments, partials[:, 1:])) / self.M   # DP
        self.update_running(mean, var)
        self.inv_std = 1 / np.sqrt(var + self.eps)
        x_hat *= self.channel(self.inv_std.astype(x.dtype))
        return self.affine_(x_hat, self.output(x))

    def update_running(self, mean, var):
        """running_* += momentum (batch statistic - running_*), torch's update, with the
        unbiased variance; num_batches_tracked += 1."""
        self.tracked += 1
        m = 1 / float(self.tracked) if self.momentum == "cumulative" else self.momentum
        unbiased = var * (self.M / (self.M - 1)) if self.M > 1 else np.full_like(var, np.nan)
        self.running_mean[...] = (1 - m) * self.running_mean + m * mean
        self.running_var[...] = (1 - m) * self.running_var + m * unbiased

    def affine_(self, x_hat, out):
        # x_hat (B, C, ...) -> out = weight x_hat + bias
        if not self.affine:
            np.copyto(out, x_hat)
            return out
        np.multiply(x_hat, self.channel(self.gamma), out=out)
        out += self.channel(self.beta)
        return out

    def infer(self, x):
        # x (B, C, ...) -> y (B, C, ...), normalised with the running statistics
        scale = 1 / np.sqrt(self.running_var.astype(np.float64) + self.eps)
        if self.affine:
            scale = scale * self.gamma
        shift = (self.beta if self.affine else 0) - self.running_mean * scale
        y = np.multiply(x, self.channel(scale.astype(x.dtype)))
        y += self.channel(np.asarray(shift, dtype=x.dtype))
        return y

    def backward(self, dy, grads, ctx):
        # dy (B, C, ...) -> dx (B, C, ...), in place; grads = [(dweight (C,), dbias (C,))
        # per segment], overwritten, or [()] without affine
        B, C, segments = len(dy), dy.shape[1], ctx.segments_of(len(dy))
        x_hat = self.x_hat[:B]
        partials = np.empty((len(segments), 2, C))
        self.sums(dy, segments, partials[:, 0])
        self.sums(np.multiply(dy, x_hat, out=self.scratch[:B]), segments, partials[:, 1])
        for (dweight, dbias), (sum_dy, sum_dy_x_hat) in zip(grads if self.affine else (),
                                                            partials):
            dweight[...], dbias[...] = sum_dy_x_hat, sum_dy   # this segment's
        if not self.input_grad:
            return None
        totals = ctx.batch_sum(partials) / self.M           # DP: every rank's rows
        dy -= self.channel(totals[0].astype(dy.dtype))
        dy -= np.multiply(x_hat, self.channel(totals[1].astype(dy.dtype)), out=self.scratch[:B])
        scale = self.inv_std * self.gamma if self.affine else self.inv_std
        dy *= self.channel(scale.astype(dy.dtype))
        return dy


class BatchNorm1d(BatchNorm):
    """torch.nn.BatchNorm1d on rows of features (C,)."""
    name, row_dims, row_shape, axes = "batchnorm1d", 1, "(C,)", (0,)


class BatchNorm2d(BatchNorm):
    """torch.nn.BatchNorm2d on rows of images (C, H, W)."""
    name, row_dims, row_shape, axes = "batchnorm2d", 3, "(C, H, W)", (0, 2, 3)
