"""A checkpoint back into a network, for the commands that apply one (evaluate, predict).

Rank 0 reads the checkpoint; its config reaches every rank, and its weights are
broadcast, so every rank holds the same network.
"""

import os
import sys

from dpbp.errors import UserError
from dpbp.nn.model import sequential_index
from dpbp.parallel import comm as mpi
from dpbp.service import checkpoint, config, run_dir
from dpbp.service.startup import new_model


def load_checkpoint(comm, path):
    """Collective. Rank 0 reads the checkpoint at `path`, or a run directory's newest
    valid one; returns (state, saved_toml, width, path): the state dict on rank 0 (None
    elsewhere), and on every rank its config as TOML text, its network's output width (a
    classifier's classes) and its path. A missing or malformed checkpoint stops every
    rank with one line."""
    state = None
    with mpi.agreement(comm):
        if comm.rank == 0 and os.path.isdir(path):   # a run directory: its newest
            path, state, damaged = run_dir.newest_checkpoint(path, "--checkpoint")
            for damaged_path, why in damaged:
                print(f"dpbp: note: passed over {damaged_path}: {why}", file=sys.stderr)
        elif comm.rank == 0:
            state = checkpoint.load(path)
    saved = comm.bcast_obj(None if state is None else (state["config"],
                                                       checkpoint.output_width(state), path))
    return (state, *saved)


def restore_model(comm, state, path, widths, cfg):
    """Collective. The network `widths` of `cfg`, holding the checkpoint's weights (read on
    rank 0, broadcast to all). Weights that do not fit stop every rank with one line."""
    with mpi.agreement(comm):
        model = new_model(widths, cfg)
        if comm.rank == 0:
            problem = model.load_state_dict(state, f"checkpoint {path}")
            if problem:
                raise UserError(f"{problem}; the checkpoint does not fit this config and data")
    comm.bcast_(model.params)            # DP: every rank evaluates rank 0's weights
    return model


def widths_of(state, path, model_cfg):
    """[D_in, *hidden, D_out] of the network whose weights `state` holds."""
    hidden = model_cfg.hidden
    first = "model.0.weight"
    last = f"model.{sequential_index(len(hidden), model_cfg.dropout)}.weight"
    for key in (first, last):
        if key not in state or state[key].ndim != 2:
            raise UserError(f"checkpoint {path} has no 2-D {key}, which its config "
                            f"(model.hidden = {list(hidden)}, model.dropout = "
                            f"{model_cfg.dropout:g}) needs: it is damaged")
    return [state[first].shape[1], *hidden, state[last].shape[0]]


# The keys that define a network and how its outputs are read: evaluate and predict run
# the checkpoint's own (model.dtype aside: the weights are cast).
NETWORK_KEYS = ("model.hidden", "model.activation", "model.dropout", "model.classes",
                "train.loss")


def same_network(saved, cfg, path, width):
    """Notes, once `cfg` (the checkpoint's config `saved` with the command line's --config
    and --set on top) is found to run the checkpoint's own network: a UserError names
    the first of NETWORK_KEYS that would change it (model.classes may name the
    checkpoint's output `width`). model.dtype may change: a note says so."""
    old, new = config.flat(saved), config.flat(cfg)
    for key in NETWORK_KEYS:
        if old[key] != new[key] and not (key == "model.classes" and new[key] == width):
            raise UserError(f"{key} = {config.toml_value(new[key])} would change the network "
                            f"of {path} ({key} = {config.toml_value(old[key])}): it runs its "
                            f"own network; leave {key} out of --config and --set")
    if old["model.dtype"] == new["model.dtype"]:
        return []
    return [f"model.dtype: the {old['model.dtype']} network of {path} runs in "
            f"{new['model.dtype']}, as the command line asks (its weights cast)"]


def network(cfg, widths):
    """The network that `cfg` and `widths` define, as config keys (for JSON output)."""
    keys = config.flat(cfg)
    return {"widths": list(widths), **{k: keys[k] for k in ("model.hidden",
            "model.activation", "model.dropout", "model.dtype", "train.loss")}}
