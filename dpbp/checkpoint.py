"""Checkpoints: one .npz per epoch in RUN_DIR/checkpoints/epoch-EEEE.npz (EEEE = epochs done).

Entries (all plain arrays, readable with numpy.load(path, allow_pickle=False)):
    model.<i>.weight, model.<i>.bias   the torch.nn.Sequential state-dict layout
    optimizer.momentum_buffer          flat, in the layout of the parameter buffer (if any)
    epoch, step                        epochs completed, optimizer steps taken
    world_size                         ranks that wrote it (for the record; resume at any size)
    config                             the resolved config as TOML text
    format_version
Written by rank 0 alone, atomically (files.write_atomic), so a crash never leaves a
half-written checkpoint under a checkpoint's name.
"""

import os
import re

import numpy as np

from dpbp.errors import UserError
from dpbp.files import read_npz, write_atomic

FORMAT_VERSION = 1
COUNTERS = ("epoch", "step", "world_size", "format_version")
_NAME = re.compile(r"^epoch-(\d{4,})\.npz$")


def path_for(run_dir, epoch):
    return os.path.join(run_dir, "checkpoints", f"epoch-{epoch:04d}.npz")


def save(path, model, optimizer, epoch, step, world_size, config_toml):
    """Write the checkpoint atomically (rank 0 only)."""
    arrays = dict(model.state_dict())
    if optimizer.momentum_buffer is not None:
        arrays["optimizer.momentum_buffer"] = optimizer.momentum_buffer
    arrays.update(epoch=np.int64(epoch), step=np.int64(step), world_size=np.int64(world_size),
                  config=np.str_(config_toml), format_version=np.int64(FORMAT_VERSION))
    write_atomic(path, lambda f: np.savez(f, **arrays))


def list_epochs(run_dir):
    """{epoch: path} of the checkpoints in run_dir/checkpoints."""
    folder = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(folder):
        return {}
    found = {}
    for name in os.listdir(folder):
        m = _NAME.match(name)
        if m:
            found[int(m.group(1))] = os.path.join(folder, name)
    return found


def load(path):
    """A checkpoint's arrays as a dict, its counters as ints; UserError if it is not a
    well-formed dpbp checkpoint."""
    state = read_npz(path, "checkpoint")
    missing = [k for k in (*COUNTERS, "config") if k not in state]
    if missing:
        raise UserError(f"checkpoint {path} lacks {', '.join(missing)}: not a dpbp checkpoint")
    for key in COUNTERS:
        a = state[key]
        if a.shape != () or not np.issubdtype(a.dtype, np.integer) or a < 0:
            raise UserError(f"checkpoint {path}: {key} must be a non-negative integer, got "
                            f"{a.dtype} {a.shape}")
        state[key] = int(a)
    if state["config"].shape != () or state["config"].dtype.kind != "U":
        raise UserError(f"checkpoint {path}: config must be TOML text")
    state["config"] = str(state["config"])
    if state["format_version"] > FORMAT_VERSION:
        raise UserError(f"checkpoint {path} has format {state['format_version']}; this dpbp "
                        f"reads up to {FORMAT_VERSION}: upgrade dpbp")
    return state


def restore(state, path, model, optimizer):
    """Copy a loaded checkpoint's weights and momentum into model and optimizer."""
    problem = model.load_state_dict(state, f"checkpoint {path}")
    if problem:
        raise UserError(problem + "; it does not fit the configured network")
    buf = state.get("optimizer.momentum_buffer")
    if optimizer.momentum_buffer is not None and buf is not None:
        if buf.shape != optimizer.momentum_buffer.shape or not np.isfinite(buf).all():
            raise UserError(f"checkpoint {path}: optimizer.momentum_buffer has shape "
                            f"{buf.shape} or non-finite values; the network needs finite "
                            f"{optimizer.momentum_buffer.shape}")
        optimizer.momentum_buffer[...] = buf


def load_weights(model, path):
    """Start from the model.* weights in an .npz (`model.init`, e.g. saved from PyTorch)."""
    problem = model.load_state_dict(read_npz(path, "model.init"), f"model.init {path}")
    if problem:
        raise UserError(problem)
