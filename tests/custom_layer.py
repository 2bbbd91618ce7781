"""A layer that dpbp does not ship, put into it from the test side: non-trainable buffers
and the sum over the global batch, end to end, before any shipped layer needs them.

    python -m tests.custom_layer MODULE [ARGS...]     # e.g. dpbp.train, dpbp.evaluate

runs `python -m MODULE ARGS` with RowCounter in the factory's table (nn.model.LAYERS) as
"rowcounter", and placed after the first layer of every network that a config describes
(service.network.from_config), as BatchNorm will stand after a Linear. dpbp knows
nothing of it: the table and the function are replaced from outside.
"""

import importlib
import sys

import numpy as np

from dpbp.nn.layers import Declared, Layer


class RowCounter(Layer):
    """Passes its input through and counts the rows of every global batch it sees, in
    an int64 buffer `seen` and in `rows`, a buffer of the parameters' dtype: each forward
    pass adds ctx.batch_sum of its own rows (the whole global batch's, over all ranks)."""

    def declare(self, in_shape):
        return Declared(out=tuple(in_shape), buffers=(("seen", (), np.int64), ("rows", (1,), None)))

    def bind(self, params, buffers):
        self.seen, self.rows = buffers

    def forward(self, x, ctx):
        # x (B, *F) -> x; seen += the rows of all ranks' parts
        total = ctx.batch_sum(np.array([[s.stop - s.start] for s in ctx.segments_of(len(x))],
                                       dtype=np.int64))
        self.seen[...] += total[0]
        self.rows += total
        return x

    def infer(self, x):
        return x

    def backward(self, dy, grads, ctx):
        return dy


def install():
    from dpbp.nn import model
    from dpbp.service import network
    model.LAYERS["rowcounter"] = RowCounter
    real = network.from_config

    def from_config(model_cfg, outputs):
        layers = real(model_cfg, outputs)
        return layers[:1] + [{"type": "rowcounter"}] + layers[1:]
    network.from_config = from_config


if __name__ == "__main__":
    install()
    module, sys.argv = sys.argv[1], sys.argv[1:]
    importlib.import_module(module).cli()
