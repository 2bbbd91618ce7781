"""Checkpoints: one .npz per epoch in RUN_DIR/checkpoints/epoch-EEEE.npz (EEEE = epochs done).

Entries (all plain arrays, readable with numpy.load(path, allow_pickle=False)):
    model.<i>.weight, model.<i>.bias   the torch.nn.Sequential state-dict layout
    optimizer.momentum_buffer          flat, in the layout of the parameter buffer (if any)
    epoch, step                        epochs completed, optimizer steps taken
    world_size                         ranks that wrote it (for the record; resume at any size)
    config                             the resolved config as TOML text
    format_version
Written by rank 0 alone, atomically: a temporary file in the same folder, fsynced, then
renamed over the final name, so a crash never leaves a half-written checkpoint behind.
"""

import os
import re
import tempfile
import zipfile

import numpy as np

from dpbp.errors import UserError

FORMAT_VERSION = 1
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


def write_atomic(path, write):
    """Call write(file) on a temporary file beside `path`, fsync it, rename it to `path`."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".partial")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)   # mkstemp's 0600 would hide the file from the group
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)   # make the rename itself durable
    finally:
        os.close(dir_fd)


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
    """All arrays of a checkpoint as a dict; UserError if it is not a readable checkpoint."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"checkpoint {path} is unreadable ({e}); it may be truncated") from None
    missing = [k for k in ("epoch", "step", "config", "format_version") if k not in arrays]
    if missing:
        raise UserError(f"checkpoint {path} lacks {', '.join(missing)}: not a dpbp checkpoint")
    if int(arrays["format_version"]) > FORMAT_VERSION:
        raise UserError(f"checkpoint {path} has format {int(arrays['format_version'])}; this "
                        f"dpbp reads up to {FORMAT_VERSION}: upgrade dpbp")
    return arrays
