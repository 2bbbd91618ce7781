"""A checkpoint back into a network, for the commands that apply one (evaluate, predict).

Rank 0 reads the checkpoint; its config and network reach every rank, and its weights
are broadcast, so every rank holds the same network: the one the checkpoint records.
"""

import os
import sys

from dpbp.errors import UserError
from dpbp.parallel import comm as mpi
from dpbp.service import checkpoint, network, run_dir


def load_checkpoint(comm, path):
    """Collective. Rank 0 reads the checkpoint at `path`, or a run directory's newest
    valid one; returns (state, saved_toml, layers, path): the state dict on rank 0 (None
    elsewhere), and on every rank its config as TOML text, its network (layer specs,
    input shape) and its path. A missing or malformed checkpoint stops every rank with
    one line."""
    state = None
    with mpi.agreement(comm):
        if comm.rank == 0 and os.path.isdir(path):   # a run directory: its newest
            path, state, damaged = run_dir.newest_checkpoint(path, "--checkpoint")
            for damaged_path, why in damaged:
                print(f"dpbp: note: passed over {damaged_path}: {why}", file=sys.stderr)
        elif comm.rank == 0:
            state = checkpoint.load(path)
    saved = comm.bcast_obj(None if state is None else (state["config"], state["network"],
                                                       path))
    return (state, *saved)


def restore_model(comm, state, path, layers, dtype):
    """Collective. The checkpoint's network `layers` (specs, input shape) in `dtype`,
    holding its weights and buffers (read on rank 0, broadcast to all). Weights that do
    not fit stop every rank with one line."""
    with mpi.agreement(comm):
        model = network.build(*layers, dtype, f"checkpoint {path}")
        if comm.rank == 0:
            problem = model.load_state_dict(state, f"checkpoint {path}")
            if problem:
                raise UserError(f"{problem}; the checkpoint's weights do not fit its network")
    for array in (model.params, *model.buffers.values()):
        comm.bcast_(array)               # DP: every rank evaluates rank 0's weights
    return model
