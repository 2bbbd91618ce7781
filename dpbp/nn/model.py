"""The network: a list of layers whose parameters live in ONE flat buffer, gradients in another.

The factory is `Model(layers, input_shape, dtype)`: `layers` is a list of specs, each a
dict naming a layer as PyTorch's class in lower case and giving its arguments, e.g.

    [{"type": "linear", "out_features": 256}, {"type": "relu"},
     {"type": "dropout", "p": 0.5}, {"type": "linear", "out_features": 10}]

`LAYERS` below is the one table from those names to classes. The model walks the list
with the input's shape (one row's: (784,) for MNIST's pixels), each layer declaring its
output shape and its parameters (and non-trainable buffers) for the shape it receives.
Parameters are named as torch.nn.Sequential numbers its modules, so the state dict is
PyTorch's: model.0.weight (D_out, D_in), model.0.bias (D_out,), model.2.weight, ...

Layer i holds views into `params`, laid out layer after layer in declaration order;
gradients have the same layout in `grads`, so averaging gradients is one Allreduce of
`grads`, the optimizer is one vector update of `params`, and a checkpoint is these views
by name. Non-trainable buffers (running statistics, counters) live in `buffers`, one
flat array per dtype, which no optimizer and no gradient sum ever sees. Update in place
only: rebinding an array would silently detach it from its flat buffer.
"""

import math

import numpy as np

from dpbp.nn.conv import AvgPool2d, Conv2d, Flatten, MaxPool2d
from dpbp.nn.layers import ALONE, Dropout, Linear, ReLU, Sigmoid, Tanh
from dpbp.nn.norm import BatchNorm1d, BatchNorm2d

LAYERS = {"linear": Linear, "relu": ReLU, "tanh": Tanh, "sigmoid": Sigmoid,
          "dropout": Dropout, "conv2d": Conv2d, "maxpool2d": MaxPool2d,
          "avgpool2d": AvgPool2d, "flatten": Flatten, "batchnorm1d": BatchNorm1d,
          "batchnorm2d": BatchNorm2d}


def mlp_layers(hidden, activation, dropout, outputs):
    """The specs of a multilayer perceptron: linear, activation (dropout p), ..., linear,
    with hidden widths `hidden` and `outputs` outputs."""
    layers = []
    for width in hidden:
        layers += [{"type": "linear", "out_features": width}, {"type": activation}]
        if dropout:
            layers.append({"type": "dropout", "p": dropout})
    return layers + [{"type": "linear", "out_features": outputs}]


def make(spec, i):
    """Layer i of the network, from its spec; ValueError naming it if it is not one."""
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise ValueError(f"layer {i}: expected a table with a type, like "
                         f"{{type = \"linear\", out_features = 10}}, got {spec!r}")
    kind = spec["type"]
    if kind not in LAYERS:
        raise ValueError(f"layer {i}: unknown type {kind!r}; the types are "
                         f"{', '.join(sorted(LAYERS))}")
    arguments = {k: v for k, v in spec.items() if k != "type"}
    takes, needs = arguments_of(LAYERS[kind])
    unknown = [k for k in arguments if k not in takes]
    missing = [k for k in needs if k not in arguments]
    if unknown or missing:
        what = f"unknown key {unknown[0]!r}" if unknown else f"{missing[0]} is missing"
        raise ValueError(f"layer {i} ({kind}): {what}; {kind} takes "
                         f"{', '.join(takes) or 'no arguments'}"
                         + (f" ({', '.join(needs)} required)" if needs else ""))
    try:
        return LAYERS[kind](**arguments)
    except ValueError as e:
        raise ValueError(f"layer {i} ({kind}): {e}") from None


def arguments_of(cls):
    """(the keyword arguments a layer class takes, those of them without a default)."""
    code = getattr(cls.__init__, "__code__", None)   # None: object's, which takes none
    takes = code.co_varnames[1:code.co_argcount] if code else ()
    defaults = cls.__init__.__defaults__ or () if code else ()
    return takes, takes[:len(takes) - len(defaults)]


def describe(layers, input_shape):
    """'256 -> linear 256, relu, linear 10': the input's shape, then each layer's spec,
    its first argument bare and the others named ('conv2d 8 kernel_size=3 padding=1')."""
    words = []
    for spec in layers:
        arguments = [(k, v) for k, v in spec.items() if k != "type"]
        words.append(" ".join([spec["type"]] + [shown(v) if j == 0 else f"{k}={shown(v)}"
                                                for j, (k, v) in enumerate(arguments)]))
    return f"{'x'.join(map(str, input_shape))} -> {', '.join(words)}"


def shown(value):
    """An argument in a description: 0.5, 3, 2x3 (a pair)."""
    if isinstance(value, (list, tuple)):
        return "x".join(map(shown, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def walk(layers, input_shape):
    """[(layer, in_shape, Declared)] for each layer of the specs `layers` fed rows of
    `input_shape`, and the output shape; nothing is allocated. ValueError naming the
    first layer that does not fit."""
    walked, shape = [], tuple(int(d) for d in input_shape)
    if not layers:
        raise ValueError("the network has no layers")
    for i, spec in enumerate(layers):
        layer = make(spec, i)
        try:
            declared = layer.declare(shape)
        except ValueError as e:
            raise ValueError(f"layer {i} ({spec['type']}): {e}") from None
        walked.append((layer, shape, declared))
        shape = tuple(declared.out)
    return walked, shape


class Model:
    def __init__(self, layers, input_shape, dtype):
        """The network of the specs `layers` for rows of `input_shape`, in `dtype`."""
        self.specs = [dict(spec) for spec in layers]
        self.input_shape = tuple(int(d) for d in input_shape)
        walked, self.output_shape = walk(self.specs, self.input_shape)
        self.layers = [layer for layer, _, _ in walked]
        self.names, self.shapes, owned = [], [], []   # parameters, in the flat buffer's order
        for i, (_, _, declared) in enumerate(walked):
            owned.append(slice(len(self.shapes), len(self.shapes) + len(declared.params)))
            self.names += [f"model.{i}.{name}" for name, _ in declared.params]
            self.shapes += [tuple(shape) for _, shape in declared.params]
        self.sizes = [math.prod(s) for s in self.shapes]
        try:
            self.params = np.zeros(sum(self.sizes), dtype=dtype)
        except ValueError:   # beyond any array numpy can make: no memory holds it either
            raise MemoryError(f"{sum(self.sizes)} parameters") from None
        self.grads = np.zeros_like(self.params)
        self.owned = owned   # layer i's parameters: split(buffer)[owned[i]]
        buffer_views = self._buffers(walked)
        self.arrays = self.split(self.params)   # same order as names
        with_params = [i for i, s in enumerate(owned) if s.stop > s.start]
        self.first = with_params[0] if with_params else len(self.layers)   # backward stops there
        for i, layer in enumerate(self.layers):   # an input's gradient is needed above the
            layer.place(i, input_grad=i > self.first,   # first parameters, never the data
                        input_free=i > 0 and self.layers[i - 1].output_free)
            layer.bind(self.arrays[owned[i]], buffer_views[i])
        self.flops_per_sample = sum(layer.flops(shape) for layer, shape, _ in walked)
        self.draws = any(layer.draws for layer in self.layers)

    def _buffers(self, walked):
        """Allocate the layers' non-trainable buffers: one flat array of zeros per dtype
        (self.buffers), views named like parameters (self.buffer_names, buffer_arrays).
        Returns each layer's views, in its declaration's order."""
        totals, placed = {}, []
        for i, (_, _, declared) in enumerate(walked):
            for name, shape, dtype in declared.buffers:
                dtype = np.dtype(dtype or self.params.dtype)
                placed.append((i, f"model.{i}.{name}", dtype, totals.get(dtype, 0), tuple(shape)))
                totals[dtype] = totals.get(dtype, 0) + math.prod(shape)
        self.buffers = {dtype: np.zeros(total, dtype) for dtype, total in totals.items()}
        self.buffer_names = [name for _, name, _, _, _ in placed]
        self.buffer_arrays = [self.buffers[dtype][offset:offset + math.prod(shape)].reshape(shape)
                              for _, _, dtype, offset, shape in placed]
        per_layer = [[] for _ in walked]
        for (i, *_), view in zip(placed, self.buffer_arrays):
            per_layer[i].append(view)
        return per_layer

    def split(self, buf):
        """Views of a flat buffer laid out like params: one per parameter, in order."""
        out, offset = [], 0
        for shape, size in zip(self.shapes, self.sizes):
            out.append(buf[offset:offset + size].reshape(shape))
            offset += size
        return out

    def init_(self, rng):
        """Each layer's initial parameters, drawn from rng layer after layer."""
        for layer in self.layers:
            layer.init_(rng)

    def forward(self, x, ctx=ALONE):
        # x (B, *input_shape) -> outputs (B, *output_shape); ctx: each row's key for random
        # draws, the sum over the global batch (layers.Context)
        for layer in self.layers:
            x = layer.forward(x, ctx)
        return x

    def infer(self, x):
        # x (B, *input_shape) -> outputs (B, *output_shape): forward's arithmetic without
        # the layers' caches, so several threads may run it at once (evaluation, predict)
        for layer in self.layers:
            x = layer.infer(x)
        return x

    def backward(self, dout, grads=None, ctx=ALONE):
        # dout (B, *output_shape) -> nothing; overwrites every gradient in `grads`: one flat
        # buffer laid out like params per segment of ctx (default: [self.grads], the one
        # segment of an uncut pass), or one such buffer where the pass has one segment
        grads = [self.grads] if grads is None else [grads] if isinstance(grads, np.ndarray) \
            else grads
        views = [self.split(g) for g in grads]
        for i in range(len(self.layers) - 1, self.first - 1, -1):   # last to first
            dout = self.layers[i].backward(dout, [v[self.owned[i]] for v in views], ctx)

    def save_buffers(self):
        """A copy of the non-trainable buffers (running statistics), for restore_buffers."""
        return {dtype: b.copy() for dtype, b in self.buffers.items()}

    def restore_buffers(self, saved):
        """Put back the buffers save_buffers copied: a step that did not happen leaves them."""
        for dtype, b in self.buffers.items():
            np.copyto(b, saved[dtype])

    def describe(self):
        return describe(self.specs, self.input_shape)

    def state_dict(self):
        """{'model.0.weight': view, ...}: the torch.nn.Sequential state-dict layout, the
        parameters then the buffers."""
        return dict(zip(self.names + self.buffer_names, self.arrays + self.buffer_arrays))

    def load_state_dict(self, arrays, source):
        """Copy model.* arrays from a mapping (e.g. an open .npz) into the flat buffers.

        Returns None, or a one-line description of what does not fit.
        """
        own = self.state_dict()
        for name, view in own.items():
            if name not in arrays:
                return f"{source} has no {name} (the network {self.describe()} has " \
                       f"{', '.join(list(own)[:3])}, ..., numbered as in torch.nn.Sequential)"
            problem = unfit(arrays[name], view)
            if problem:
                return f"{source}: {name} {problem}"
        extra = sorted(k for k in arrays if k.startswith("model.") and k not in own)
        if extra:
            return f"{source} has {extra[0]}, which the network ({self.describe()}) " \
                   "does not have"
        for name, view in own.items():
            view[...] = arrays[name]
        return None


def unfit(a, view):
    """Why array `a` cannot be copied into `view`, or None."""
    if a.shape != view.shape:
        return f"has shape {a.shape}, the network needs {view.shape}"
    kind = "floats" if view.dtype.kind == "f" else "integers"
    if a.dtype.kind != view.dtype.kind and not (kind == "integers" and a.dtype.kind in "iu"):
        return f"has dtype {a.dtype}, expected {kind}"
    if kind == "floats" and not np.isfinite(a).all():
        return "holds NaN or Inf"
    return None
