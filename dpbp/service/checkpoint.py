"""Checkpoints: RUN_DIR/checkpoints/epoch-EEEE.npz at the end of each epoch (EEEE = epochs
done), and epoch-EEEE-batch-BBBBBB.npz mid-epoch (BBBBBB more batches of the next one done);
with run.keep_best, best.npz is a copy of the best epoch's; last.npz names the newest (a
relative link to it). Neither is an epoch checkpoint: list_all never lists them.

Entries (all plain arrays, readable with numpy.load(path, allow_pickle=False)):
    model.<i>.<name>                   the torch.nn.Sequential state-dict layout: each
                                       layer's parameters (model.0.weight, model.0.bias,
                                       ...) and non-trainable buffers
    network, input_shape               the network: its layer specs as JSON text, and
                                       the shape of one input row (service/network.py)
    optimizer.<name>                   the optimizer's state (optimizer.state()): SGD's
                                       momentum_buffer (if any); AdamW's exp_avg, exp_avg_sq,
                                       max_exp_avg_sq (amsgrad) flat in the layout of the
                                       parameter buffer, and step (updates applied)
    epoch, batch                       epochs completed, batches done in the next epoch
    step                               optimizer steps taken (skipped steps included)
    loss_sums                          mid-epoch: each rank's sum of training losses so far
    skipped                            mid-epoch: steps of this epoch dropped as non-finite
    counted                            mid-epoch: samples of this epoch in loss_sums
    world_size                         ranks that wrote it (resume works at any size)
    config                             the resolved config as TOML text
    data                               what the run trained on: data.identity's text
    format_version
    digest                             SHA-256 of all the above, checked on every load
The position (epoch, batch) and the seed in the config fix the data order from there on:
the order of each epoch is a pure function of (seed, epoch), see sharding.py.
Written by rank 0 alone, atomically and durably (files.write_atomic), so a crash never
leaves a half-written checkpoint under a checkpoint's name.
"""

import dataclasses
import hashlib
import os
import re

import numpy as np

from dpbp.errors import UserError
from dpbp.nn.optim import SGD, AdamW
from dpbp.service import config, network
from dpbp.service.files import read_npz, write_atomic

FORMAT_VERSION = 3   # 3 records the network; 2 and 1 still load


@dataclasses.dataclass(frozen=True)
class Position:
    """Where a run is: with the seed in the config, the whole data-order state."""
    epoch: int = 0       # epochs completed
    batch: int = 0       # batches done in the next epoch
    step: int = 0        # optimizer steps taken (skipped steps included)
    skipped: int = 0     # steps of the unfinished epoch dropped as non-finite
    counted: int = 0     # samples of the unfinished epoch in the loss sums

    @classmethod
    def of(cls, state):
        """The position a loaded checkpoint holds."""
        return cls(*(state[f.name] for f in dataclasses.fields(cls)))


COUNTERS = ("epoch", "batch", "step", "skipped", "counted", "world_size", "format_version")
_NAME = re.compile(r"^epoch-(\d{4,})(?:-batch-(\d{6,}))?\.npz$")


def path_for(run_dir, epoch, batch=0):
    name = f"epoch-{epoch:04d}" + (f"-batch-{batch:06d}" if batch else "") + ".npz"
    return os.path.join(run_dir, "checkpoints", name)


def digest(arrays):
    """SHA-256 over every entry's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.view(np.uint8) if a.dtype.kind != "U" else a.tobytes())
    return h.hexdigest()


def save(path, model, optimizer, position, world_size, config_toml, loss_sums=None,
         data_id=""):
    """Write the checkpoint at `position` (a Position) atomically (rank 0 only);
    `loss_sums` = every rank's partial training-loss sum of the epoch (zeros by default,
    as at an epoch's end); `data_id` = what the run trains on (data.identity). Returns
    its digest."""
    if not np.isfinite(model.params).all():   # never write NaN or Inf weights
        raise UserError(f"refusing to write {path}: the weights are not finite")
    arrays = dict(model.state_dict(), **network.entries(model))
    arrays.update({f"optimizer.{name}": a for name, a in optimizer.state().items()})
    sums = np.zeros(world_size) if loss_sums is None else np.asarray(loss_sums, np.float64)
    arrays.update({k: np.int64(v) for k, v in dataclasses.asdict(position).items()})
    arrays.update(loss_sums=sums, world_size=np.int64(world_size), config=np.str_(config_toml),
                  data=np.str_(data_id), format_version=np.int64(FORMAT_VERSION))
    arrays["digest"] = np.str_(digest(arrays))
    write_atomic(path, lambda f: np.savez(f, **arrays))
    return str(arrays["digest"])


def best_path(run_dir):
    """run.keep_best: the copy of the best epoch's checkpoint (never an epoch checkpoint:
    list_all does not list it, keep_checkpoints never prunes it, --resume never takes it)."""
    return os.path.join(run_dir, "checkpoints", "best.npz")


def last_path(run_dir):
    """The newest checkpoint under a stable name: a link to it beside it (run_dir.link_last).
    Never pruned, and not listed by list_all; --resume PATH, evaluate and predict take it."""
    return os.path.join(run_dir, "checkpoints", "last.npz")


def resolved(path):
    """A run's last.npz as the checkpoint it names (its link's target, in the same folder);
    any other path as it is."""
    if os.path.basename(path) == "last.npz" and os.path.islink(path):
        target = os.readlink(path)
        if os.sep not in target:
            return os.path.join(os.path.dirname(path), target)
    return path


def position_of(path):
    """(epoch, batch) from a checkpoint's file name, or None for another file."""
    m = _NAME.match(os.path.basename(path))
    return None if m is None else (int(m.group(1)), int(m.group(2) or 0))


def list_all(run_dir):
    """[(epoch, batch), path] of the checkpoints in run_dir/checkpoints, oldest first."""
    folder = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    found = [(position_of(name), os.path.join(folder, name)) for name in os.listdir(folder)]
    return sorted((pos, path) for pos, path in found if pos is not None)


def load(path):
    """A checkpoint's arrays as a dict, its counters as ints, its config and data as text,
    its digest as a hex string (None for format 1) and its network as state["network"] =
    (layer specs, input shape); UserError if it is damaged (its
    digest does not match) or not a well-formed dpbp checkpoint."""
    state = read_npz(path, "checkpoint")
    if "format_version" in state and state["format_version"].shape == () \
            and state["format_version"].dtype.kind in "iu" and state["format_version"] == 1:
        state.update(batch=np.int64(0), skipped=np.int64(0), counted=np.int64(0),
                     digest=None)   # written by dpbp 0.1
    missing = [k for k in (*COUNTERS, "config", "digest") if k not in state]
    if missing:
        raise UserError(f"checkpoint {path} lacks {', '.join(missing)}: not a dpbp checkpoint")
    stored = state.pop("digest")
    if stored is not None and (stored.shape != () or str(stored) != digest(state)):
        raise UserError(f"checkpoint {path} is damaged: its content does not match its "
                        "SHA-256 digest")
    for key in COUNTERS:
        a = state[key]
        if a.shape != () or not np.issubdtype(a.dtype, np.integer) or a < 0:
            raise UserError(f"checkpoint {path}: {key} must be a non-negative integer, got "
                            f"{a.dtype} {a.shape}")
        state[key] = int(a)
    if state["config"].shape != () or state["config"].dtype.kind != "U":
        raise UserError(f"checkpoint {path}: config must be TOML text")
    state["config"] = str(state["config"])
    data = state.get("data")   # absent from checkpoints written before dpbp recorded it
    if data is not None and (data.shape != () or data.dtype.kind != "U"):
        raise UserError(f"checkpoint {path}: data must be text")
    state["data"] = None if data is None else str(data)
    if state["format_version"] > FORMAT_VERSION:
        raise UserError(f"checkpoint {path} has format {state['format_version']}; this dpbp "
                        f"reads up to {FORMAT_VERSION}: upgrade dpbp")
    state["digest"] = None if stored is None else str(stored)   # names it, e.g. in run.json
    sums = state.setdefault("loss_sums", np.zeros(state["world_size"]))   # format 1: none
    if sums.shape != (state["world_size"],) or sums.dtype != np.float64 \
            or not np.isfinite(sums).all():
        raise UserError(f"checkpoint {path}: loss_sums must be world_size finite float64 "
                        "values")
    state["network"] = network.of_checkpoint(state, path)
    return state


def restore(state, path, model, optimizer):
    """Copy a loaded checkpoint's weights and optimizer state into model and optimizer.
    State the optimizer has and the checkpoint lacks starts afresh, unless the run that
    wrote the checkpoint had it (then the file was altered: refused)."""
    problem = model.load_state_dict(state, f"checkpoint {path}")
    if problem:
        raise UserError(problem + "; the checkpoint's weights do not fit its network")
    names = optimizer.state()
    found = {name: state[f"optimizer.{name}"] for name in names if f"optimizer.{name}" in state}
    missing = [name for name in names if name not in found]
    if missing:
        had, setting = optimizer_state_names(saved_train_config(state))
        lost = [name for name in missing if name in had]
        if lost:
            raise UserError(f"checkpoint {path} has no optimizer.{lost[0]}, though it was "
                            f"written with {setting}: it was altered; resume from another "
                            "checkpoint")
    if "step" in found and found["step"].shape == () and found["step"] > state["step"]:
        raise UserError(f"checkpoint {path}: optimizer.step = {int(found['step'])} updates, "
                        f"more than its {state['step']} steps: it was altered; resume from "
                        "another checkpoint")
    problem = optimizer.load_state(found, f"checkpoint {path}")
    if problem:
        raise UserError(problem)


def optimizer_state_names(tc):
    """(names, setting): the optimizer.<name> entries that a run of train config `tc`
    saves, and the setting that makes it save them (for messages)."""
    if tc.optimizer == "adamw":
        return AdamW.state_names(tc.amsgrad), 'train.optimizer = "adamw"'
    return SGD.state_names(tc.momentum), f"train.momentum = {tc.momentum:g}"


def saved_train_config(state):
    """The train config of the run that wrote a loaded checkpoint."""
    return config.from_toml(state["config"], "checkpoint").train


def load_weights(model, path):
    """Start from the model.* weights in an .npz (`model.init`, e.g. saved from PyTorch)."""
    problem = model.load_state_dict(read_npz(path, "model.init"), f"model.init {path}")
    if problem:
        raise UserError(problem)
