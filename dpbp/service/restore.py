"""A checkpoint back into a network, for the commands that apply one (evaluate, predict).

Rank 0 reads the checkpoint; its config reaches every rank, and its weights are
broadcast, so every rank holds the same network.
"""

from dpbp.errors import UserError
from dpbp.nn.model import sequential_index
from dpbp.parallel import comm as mpi
from dpbp.service import checkpoint
from dpbp.service.startup import new_model


def load_checkpoint(comm, path):
    """Collective. Rank 0 reads the checkpoint at `path`; returns (state, saved_toml):
    the state dict on rank 0 (None elsewhere) and its config as TOML text on every rank.
    A missing or malformed checkpoint stops every rank with one line."""
    state = None
    with mpi.agreement(comm):
        if comm.rank == 0:
            state = checkpoint.load(path)
    return state, comm.bcast_obj(None if state is None else state["config"])


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
