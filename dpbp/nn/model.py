"""A multilayer perceptron whose parameters live in ONE flat buffer, gradients in another.

Layer i is Linear, activation, ..., Linear (with dropout: Linear, activation, Dropout,
..., Linear), as torch.nn.Sequential would number it, so parameter names and shapes
are those of its state dict: model.0.weight (D_out, D_in), model.0.bias (D_out,),
model.2.weight (with dropout model.3.weight), ... Each Linear holds views into `params` and
`grads`; averaging gradients is one Allreduce of `grads`, the optimizer is one vector
update of `params`, and a checkpoint is those views by name. Update in place only:
rebinding a parameter array would silently detach it from the flat buffer.
"""

import math

import numpy as np

from dpbp.nn.layers import Dropout, Linear, ReLU, Sigmoid, Tanh


def sequential_index(i, dropout):
    """The index of Linear i in the torch.nn.Sequential (0, 2, 4, ...; with dropout 0, 3,
    6, ...)."""
    return i * (3 if dropout else 2)


class MLP:
    def __init__(self, widths, activation, dtype, dropout=0.0):
        """widths = [D_in, hidden..., D_out]; dropout p after each hidden activation."""
        self.widths = list(widths)
        shapes = []
        for d_in, d_out in zip(widths[:-1], widths[1:]):
            shapes += [(d_out, d_in), (d_out,)]
        self.shapes = shapes
        self.sizes = [math.prod(s) for s in shapes]
        self.params = np.zeros(sum(self.sizes), dtype=dtype)
        self.grads = np.zeros_like(self.params)
        p, g = self.split(self.params), self.split(self.grads)
        self.linears = [Linear(p[2 * i], p[2 * i + 1], g[2 * i], g[2 * i + 1])
                        for i in range(len(widths) - 1)]
        Activation = {"relu": ReLU, "tanh": Tanh, "sigmoid": Sigmoid}[activation]
        self.layers, self.dropout = [], dropout
        for i, linear in enumerate(self.linears):
            self.layers.append(linear)
            if i < len(self.linears) - 1:
                self.layers.append(Activation())
                if dropout:
                    self.layers.append(Dropout(dropout, len(self.layers)))
        self.names = []
        for i, layer in enumerate(self.layers):
            if isinstance(layer, Linear):
                self.names += [f"model.{i}.weight", f"model.{i}.bias"]
        self.arrays = p   # same order as names

    def split(self, buf):
        """Views of a flat buffer laid out like params: [W_0, b_0, W_1, b_1, ...]."""
        out, offset = [], 0
        for shape, size in zip(self.shapes, self.sizes):
            out.append(buf[offset:offset + size].reshape(shape))
            offset += size
        return out

    def init_(self, rng):
        """torch.nn.Linear's default init: W and b uniform in +-1/sqrt(D_in)."""
        for linear in self.linears:
            bound = 1.0 / np.sqrt(linear.W.shape[1])
            linear.W[...] = rng.uniform(-bound, bound, size=linear.W.shape)
            linear.b[...] = rng.uniform(-bound, bound, size=linear.b.shape)

    def forward(self, x, keys=None):
        # x (B, D_in), keys (B,) -> outputs (B, D_out); keys: each row's key for dropout's
        # masks (noise.row_keys), needed only with dropout
        for layer in self.layers:
            x = layer.forward(x, keys) if isinstance(layer, Dropout) else layer.forward(x)
        return x

    def infer(self, x):
        # x (B, D_in) -> outputs (B, D_out): forward's arithmetic without the layers'
        # caches, so several threads may run it at once (evaluation and predict)
        for layer in self.layers:
            x = layer.infer(x)
        return x

    def backward(self, dout, grads=None):
        # dout (B, D_out) -> nothing; overwrites every gradient in `grads`, a flat buffer
        # laid out like params (default: self.grads)
        views = self.split(self.grads if grads is None else grads)
        j = len(self.linears)
        for layer in reversed(self.layers):   # from the last layer to the first
            if isinstance(layer, Linear):     # Linear j, whose W and b are views[2j], views[2j + 1]
                j -= 1
                dout = layer.backward(dout, need_dx=j > 0, into=views[2 * j:2 * j + 2])
            else:
                dout = layer.backward(dout)

    def state_dict(self):
        """{'model.0.weight': view, ...}: the torch.nn.Sequential state-dict layout."""
        return dict(zip(self.names, self.arrays))

    def load_state_dict(self, arrays, source):
        """Copy model.* arrays from a mapping (e.g. an open .npz) into the flat buffer.

        Returns None, or a one-line description of what does not fit.
        """
        for name, view in self.state_dict().items():
            if name not in arrays:
                return f"{source} has no {name} (expected the weights of " \
                       f"{'-'.join(map(str, self.widths))} as {', '.join(self.names[:3])}, " \
                       "..." + (", numbered as in torch.nn.Sequential with an nn.Dropout "
                                "after each activation)" if self.dropout else ")")
            a = arrays[name]
            if a.shape != view.shape:
                return f"{source}: {name} has shape {a.shape}, the network needs {view.shape}"
            if not np.issubdtype(a.dtype, np.floating):
                return f"{source}: {name} has dtype {a.dtype}, expected floats"
            if not np.isfinite(a).all():
                return f"{source}: {name} holds NaN or Inf"
        extra = sorted(k for k in arrays if k.startswith("model.") and k not in self.names)
        if extra:
            return f"{source} has {extra[0]}, which the {len(self.linears)}-layer network " \
                   f"({'-'.join(map(str, self.widths))}) does not have"
        for name, view in self.state_dict().items():
            view[...] = arrays[name]
        return None
