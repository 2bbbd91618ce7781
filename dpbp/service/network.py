"""The network: what a config describes, what a checkpoint holds, and the model built from it.

A network is a list of layer specs and the shape of one input row (nn/model.py). A
config gives it as model.layers, or as the multilayer perceptron of model.hidden,
model.activation and model.dropout. Every command builds its model here: train from
the config and the data's shape (a fresh run)
or from the checkpoint (a resumed one), evaluate and predict from the checkpoint alone,
bench from its options or a config. The checkpoint records the network (`network`: the
specs as JSON text; `input_shape`); checkpoints of format 1 and 2, which predate that,
give it from their config and the shapes of their weights.
"""

import json
import math

import numpy as np

from dpbp.errors import UserError
from dpbp.nn.model import Model, describe, mlp_layers, walk
from dpbp.service import config


def from_config(model_cfg, outputs):
    """The layer specs a config's [model] describes: model.layers, or the multilayer
    perceptron of its other keys with `outputs` outputs per row."""
    if model_cfg.layers:
        return [dict(spec) for spec in model_cfg.layers]
    return mlp_layers(model_cfg.hidden, model_cfg.activation, model_cfg.dropout, outputs)


def for_data(cfg, data):
    """The Model a fresh run's config describes for its data (a Dataset), checked: a
    network of model.layers takes the data's rows and ends in one row of its outputs;
    else a UserError at start-up naming the layer and the shapes."""
    layers = from_config(cfg.model, data.num_outputs)
    if not cfg.model.layers:
        return build(layers, data.row_shape, cfg.model.dtype)
    check_images(layers, data.row_shape, cfg.data.source)
    model = build(layers, data.row_shape, cfg.model.dtype, "model.layers")
    i, kind = len(layers) - 1, layers[-1]["type"]
    wanted = f"{data.num_classes} classes" if data.num_classes else \
        f"targets of width {data.num_outputs}"
    if len(model.output_shape) != 1:
        raise UserError(f"model.layers: the last layer (layer {i}, {kind}) gives rows of "
                        f"shape {model.output_shape}; a network ends in one row of outputs "
                        f"per sample, one per class ({wanted}): end it with flatten, linear")
    if model.output_shape[0] != data.num_outputs:
        raise UserError(f"model.layers: the last layer (layer {i}, {kind}) gives "
                        f"{model.output_shape[0]} outputs per row, but the data have "
                        f"{wanted}; the last linear needs out_features = {data.num_outputs}")
    return model


IMAGE_LAYERS = ("conv2d", "maxpool2d", "avgpool2d")


def check_images(layers, row_shape, source):
    """A network whose first layer takes images refuses data of rows of features, with
    the shape it needs."""
    first = layers[0].get("type")
    if first not in IMAGE_LAYERS or len(row_shape) != 1:
        return
    D = row_shape[0]
    side = math.isqrt(D)
    hint = f", e.g. x.reshape(n, 1, {side}, {side}) for one channel of {side}x{side}" \
        if side * side == D else ""
    raise UserError(f"model.layers: layer 0 ({first}) takes images, x of shape (n, C, H, W), "
                    f"but the {source} data's x has rows of {D} features, (n, {D}): save x "
                    f"as (n, C, H, W){hint}")


def build(layers, input_shape, dtype, where="model"):
    """The Model of these specs for rows of `input_shape`; a UserError (naming `where`)
    for specs that do not make a network, or one too large for memory."""
    try:
        return Model(layers, input_shape, dtype)
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None
    except MemoryError:
        raise UserError(f"the network {describe(layers, input_shape)} does not fit in "
                        "memory; check model.hidden (or model.layers) and the number of "
                        "classes") from None


def output_width(layers, input_shape):
    """The outputs per row of a checked network (a classifier's classes)."""
    return walk(layers, input_shape)[1][-1]


def entries(model):
    """The checkpoint entries that record the model's network."""
    return {"network": np.str_(json.dumps(model.specs)),
            "input_shape": np.array(model.input_shape, dtype=np.int64)}


def of_checkpoint(state, path):
    """(specs, input shape) of the network whose weights a loaded checkpoint holds,
    checked; a UserError naming the checkpoint where they do not make a network of
    one output row, as every checkpoint's must."""
    if state["format_version"] >= 3:
        layers, input_shape = recorded(state, path)
    else:
        layers, input_shape = from_weights(state, path)
    try:
        _, out = walk(layers, input_shape)
    except ValueError as e:
        raise UserError(f"checkpoint {path}: its network does not build ({e})") from None
    if len(out) != 1:
        raise UserError(f"checkpoint {path}: its network gives rows of shape {out}, not "
                        "one row of outputs")
    return layers, input_shape


def recorded(state, path):
    """The network a checkpoint of format 3 or later records."""
    missing = [k for k in ("network", "input_shape") if k not in state]
    if missing:
        raise UserError(f"checkpoint {path} lacks {', '.join(missing)}: not a dpbp checkpoint")
    text, shape = state["network"], state["input_shape"]
    try:
        layers = json.loads(str(text)) if text.shape == () and text.dtype.kind == "U" else None
    except ValueError:
        layers = None
    if not isinstance(layers, list) or not all(isinstance(s, dict) for s in layers):
        raise UserError(f"checkpoint {path}: network must be JSON text of a list of layers")
    if shape.ndim != 1 or shape.dtype.kind not in "iu" or not (shape >= 1).all():
        raise UserError(f"checkpoint {path}: input_shape must be positive integers")
    return layers, tuple(int(d) for d in shape)


def from_weights(state, path):
    """The network of a checkpoint of format 1 or 2: the multilayer perceptron that its
    config describes, with the input width and outputs of its first and last weights."""
    cfg = config.from_toml(state["config"], f"checkpoint {path}").model
    layers = from_config(cfg, 1)
    last = f"model.{len(layers) - 1}.weight"
    for key in ("model.0.weight", last):
        if key not in state or state[key].ndim != 2:
            raise UserError(f"checkpoint {path} has no 2-D {key}, which its config "
                            f"(model.hidden = {list(cfg.hidden)}, model.dropout = "
                            f"{cfg.dropout:g}) needs: it is damaged")
    outputs = int(state[last].shape[0])
    return from_config(cfg, outputs), (int(state["model.0.weight"].shape[1]),)


# The keys that define a network and how its outputs are read: evaluate and predict run
# the checkpoint's own (model.dtype aside: the weights are cast).
KEYS = ("model.hidden", "model.activation", "model.dropout", "model.layers", "model.classes",
        "train.loss")


def check_unchanged(saved, cfg, layers, path):
    """A command that applies checkpoint `path` (saved config `saved`) runs the network
    it records (`layers`: specs, input shape): a config `cfg` that would change it (a key
    of KEYS; model.classes may name the network's own output width) is refused with one
    line, rather than ignored. Returns notes: model.dtype may change, the weights cast."""
    old, new = config.flat(saved), config.flat(cfg)
    width = output_width(*layers)
    for key in KEYS:
        if old[key] != new[key] and not (key == "model.classes" and new[key] == width):
            raise UserError(f"{key} = {config.toml_value(new[key])} would change the network "
                            f"of checkpoint {path} ({describe(*layers)}; {key} = "
                            f"{config.toml_value(old[key])}): it runs its own network; leave "
                            f"{key} out of --config and --set")
    if old["model.dtype"] == new["model.dtype"]:
        return []
    return [f"model.dtype: the {old['model.dtype']} network of {path} runs in "
            f"{new['model.dtype']}, as the command line asks (its weights cast)"]


def summary(layers, cfg):
    """The network that runs, for evaluate's JSON: its specs, its input shape, the dtype
    it runs in and the loss its outputs are read with."""
    specs, input_shape = layers
    return {"network": describe(specs, input_shape), "layers": specs,
            "input_shape": list(input_shape), "dtype": cfg.model.dtype,
            "loss": cfg.train.loss}


def check_fits(model, data, where):
    """The data's rows fit the model's input and its outputs the data's targets; else a
    UserError naming `where` (the network's origin: a checkpoint)."""
    if tuple(data.x.shape[1:]) != model.input_shape:
        raise UserError(f"the data's rows have shape {tuple(data.x.shape[1:])}, but the "
                        f"network of {where} ({model.describe()}) takes "
                        f"{model.input_shape}")
    if model.output_shape != (data.num_outputs,):
        raise UserError(f"the data have {data.num_outputs} targets per row, but the network "
                        f"of {where} ({model.describe()}) gives {model.output_shape[-1]}")


def check_batch_statistics(model, tc, n):
    """A layer that normalises with the global batch's statistics (batchnorm) needs the
    whole batch in one pass, and 2 values or more per channel in every global batch of
    the n training samples, the last partial one too: else a UserError at start-up."""
    for i, layer in enumerate(model.layers):
        if not layer.values_per_row:
            continue
        kind = model.specs[i]["type"]
        if tc.accumulation_steps > 1:
            raise UserError(f"model.layers: layer {i} ({kind}) normalises with the statistics "
                            "of the whole global batch, which train.accumulation_steps = "
                            f"{tc.accumulation_steps} would cut into micro-batches; set "
                            "train.accumulation_steps = 1")
        sizes = {min(tc.batch_size, n), n % tc.batch_size or tc.batch_size}
        if min(sizes) * layer.values_per_row < 2:
            which = f"train.batch_size = {tc.batch_size}" if min(sizes) == tc.batch_size \
                else f"the last batch of the {n} training samples at train.batch_size = " \
                     f"{tc.batch_size}"
            fix = next((b for b in range(tc.batch_size + 1, n + 3) if n % b != 1), None)
            raise UserError(f"model.layers: layer {i} ({kind}) would see 1 value per channel "
                            f"in a global batch of 1 row ({which}), which has no variance "
                            "(torch refuses it too); " + (
                                f"set train.batch_size = {fix}, say" if fix else
                                "it needs 2 training samples or more"))
