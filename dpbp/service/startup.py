"""Setting a run up, shared by the commands: config, data, model, optimizer, the gradient
sum, the replicas made identical, the run directory.

`set_up` is collective. Bad input on any rank stops every rank with one message and
nothing written (comm.agreement). The ranks check that they read the same config and
data, and under train.deterministic that they compute with the same arithmetic; then the
parameters and optimizer state come from rank 0, so the replicas start identical.
"""

import dataclasses
import os
import zlib

import numpy as np

from dpbp import __version__
from dpbp.errors import UserError, plural
from dpbp.nn.losses import cross_entropy, mse
from dpbp.nn.model import MLP
from dpbp.nn.optim import SGD
from dpbp.nn.schedule import base_lr
from dpbp.parallel import comm as mpi
from dpbp.parallel import sharding
from dpbp.parallel.deterministic import GrainSum
from dpbp.parallel.step import PlainSum
from dpbp.parallel.threads import arithmetic, limit_blas_threads
from dpbp.service import checkpoint, config, run_dir
from dpbp.service import data as datasets
from dpbp.service.checkpoint import Position

LOSSES = {"cross_entropy": cross_entropy, "mse": mse}


@dataclasses.dataclass
class Run:
    """Everything the training loop needs, the same on every rank but `loss_sum`."""
    cfg: config.Config
    data: datasets.Dataset
    model: MLP
    optimizer: SGD
    summed: PlainSum | GrainSum     # the gradient sum over ranks, chosen from the config
    loss_fn: object                 # nn.losses.cross_entropy or mse
    start: Position                 # where the run starts (a checkpoint's position)
    loss_sum: float                 # this rank's partial loss sum of the starting epoch
    lock: object                    # the run directory's lock, held by rank 0 (else None)


def gradient_sum(tc, comm, model):
    """The gradient sum that train.deterministic, accumulation_steps and comm_dtype ask for."""
    if tc.deterministic:
        return GrainSum(comm, model, tc.grains)
    return PlainSum(comm, model.grads, tc.accumulation_steps, tc.comm_dtype)


def set_up(args, comm, say):
    """Collective. The Run that `args` (train's parsed command line) asks for: on
    --resume, the checkpoint's config with the command line's changes on top. None for a
    resumed run that is already complete, or after --print-config."""
    cfg, resumed, notes = resolve_config(args, comm)
    if args.print_config:
        say(run_dir.CONFIG_HEADER + config.to_toml(cfg), end="")
        return None
    with mpi.agreement(comm):
        data = load_data(cfg)
        model, optimizer = build(cfg, data, fresh=resumed is None)
        if comm.rank == 0 and resumed is not None:
            checkpoint.restore(resumed.state, resumed.path, model, optimizer)
    threads, why = limit_blas_threads(comm.ranks_sharing_cores, cfg.train.deterministic,
                                       comm.counted)
    check_same_inputs(comm, cfg, data)
    arith = check_arithmetic(comm) if cfg.train.deterministic else None
    comm.bcast_(model.params)                   # DP: the replicas start identical
    if optimizer.momentum_buffer is not None:
        comm.bcast_(optimizer.momentum_buffer)
    summed = gradient_sum(cfg.train, comm, model)
    start, saved_sums = starting_point(comm, resumed)
    if start.epoch >= cfg.train.epochs:   # before prepare: a finished run is left untouched
        say(f"nothing to do: the run in {cfg.run.dir} already completed "
            f"{plural(start.epoch, 'epoch')} of {cfg.train.epochs}")
        return None
    lock = None
    with mpi.agreement(comm):
        if comm.rank == 0:
            lock, more = run_dir.prepare(cfg, (start.epoch, start.batch),
                                         *((resumed.path, resumed.damaged) if resumed else ()))
            notes = notes + more
    say(describe_run(comm, threads, why, cfg, data, model, summed, arith))
    if resumed is not None:
        say(f"resume: from {resumed.path} (epoch {start.epoch}, batch {start.batch}, "
            f"step {start.step})")
    if cfg.train.lr_scaling == "linear":
        say(f"lr: {cfg.train.lr:g} x {cfg.train.batch_size} / {cfg.train.base_batch_size} = "
            f"{base_lr(cfg.train):g} (linear scaling)")
    for note in notes:
        say(note)
    loss_sum = summed.resumed_loss(*saved_sums)
    return Run(cfg, data, model, optimizer, summed, LOSSES[cfg.train.loss], start, loss_sum,
               lock)


@dataclasses.dataclass
class Resumed:
    """The checkpoint a run continues from, as rank 0 read it (state is None elsewhere)."""
    path: str
    state: dict
    damaged: list   # paths of newer checkpoints that did not verify (set aside)


def resolve_config(args, comm):
    """Collective. (cfg, Resumed or None, notes): the config from --config and --set, or
    on --resume the checkpoint's own with those on top."""
    path, state, damaged = None, None, []
    with mpi.agreement(comm):
        cfg = config.load(args.config, args.set)
        if args.resume is True and comm.rank == 0:
            path, state, damaged = run_dir.newest_checkpoint(cfg.run.dir)
        elif args.resume and comm.rank == 0:
            path, state = args.resume, run_dir.checked(args.resume)
    saved = comm.bcast_obj(None if state is None else (path, state["config"]))
    if saved is None:
        return cfg, None, []
    notes = [f"resume: {p} is damaged ({why}); set aside as {os.path.basename(p)}.damaged"
             for p, why in damaged]
    path, saved_toml = saved
    with mpi.agreement(comm):
        cfg, more = run_dir.resumed_config(saved_toml, path, args.config, args.set,
                                           cfg.run.dir if args.resume is True else None)
    return cfg, Resumed(path, state, [p for p, _ in damaged]), notes + more


def load_data(cfg):
    """The config's data (UserError if it cannot be read or does not fit in memory)."""
    try:
        return datasets.load(cfg.data, cfg.train.loss, cfg.model.dtype, cfg.run.seed)
    except MemoryError:
        raise UserError(f"the {cfg.data.source} data does not fit in memory") from None


def build(cfg, data, fresh=True):
    """(model, optimizer) for the config and data: torch.nn.Linear's initial weights
    from run.seed, or model.init's for a `fresh` run (a resumed one has its own)."""
    widths = [data.num_inputs, *cfg.model.hidden, data.num_outputs]
    model = new_model(widths, cfg)
    model.init_(np.random.default_rng([cfg.run.seed, 0x1417]))
    if cfg.model.init and fresh:
        checkpoint.load_weights(model, cfg.model.init)
    tc = cfg.train
    return model, SGD(model.params, model.grads, base_lr(tc), tc.momentum, tc.nesterov,
                      tc.weight_decay)


def new_model(widths, cfg):
    """An MLP of `widths` as the config says, or a UserError where it does not fit in memory."""
    try:
        return MLP(widths, cfg.model.activation, cfg.model.dtype)
    except MemoryError:
        raise UserError(f"the network {'-'.join(map(str, widths))} does not fit in "
                        "memory; check model.hidden and the number of classes") from None


def check_same_inputs(comm, cfg, data):
    """Collective. Stop every rank unless all read the same config and data."""
    same = comm.replicas_identical(fingerprint(cfg, data))
    with mpi.agreement(comm):
        if not same:
            raise UserError("the ranks loaded different configs or data; check that every "
                            "node sees the same files")


def fingerprint(cfg, data):
    """CRCs of the resolved config and of every data array, to compare across ranks."""
    arrays = [data.x, data.y] + ([data.x_val, data.y_val] if data.x_val is not None else [])
    crcs = [zlib.crc32(config.to_toml(cfg).encode())]
    crcs += [datasets.crc32(a) for a in arrays]   # block by block: data may stay on disk
    return np.array(crcs, dtype=np.int64)


def check_arithmetic(comm):
    """Collective. train.deterministic: the same bits need the same arithmetic on every
    rank (threads.arithmetic); stop every rank where one differs from rank 0. Returns it."""
    mine = arithmetic()
    first = comm.bcast_obj(mine)
    with mpi.agreement(comm):
        if mine != first:
            raise UserError(f"train.deterministic: rank {comm.rank} computes with {mine}, "
                            f"rank 0 with {first}; the same bits need the same CPU type, "
                            "numpy and BLAS on every node (or train.deterministic = false)")
    return mine


def starting_point(comm, resumed):
    """Collective. (Position, (loss sums, world size)): rank 0's checkpoint's, or the start."""
    state = None if resumed is None else resumed.state
    saved = comm.bcast_obj(None if state is None else (
        Position.of(state), [float(s) for s in state["loss_sums"]], state["world_size"]))
    if saved is None:
        return Position(), ([0.0], 1)
    position, sums, world_size = saved
    return position, (sums, world_size)


def describe_run(comm, threads, why, cfg, data, model, summed, arith):
    """The start-up lines: world, data, model, batch, and under deterministic the
    arithmetic every rank shares (threads.arithmetic)."""
    tc = cfg.train
    steps = sharding.num_batches(len(data.x), tc.batch_size)
    lines = [
        f"dpbp {__version__}: {plural(comm.size, 'rank')} ({comm.library}), "
        f"{plural(threads, 'BLAS thread')} per rank ({why})",
        f"data: {cfg.data.source}, {data.describe()}",
        f"model: {'-'.join(map(str, model.widths))} {cfg.model.activation} "
        f"{cfg.model.dtype}, {model.params.size:,} parameters; loss {tc.loss}",
        f"{summed.describe(tc.batch_size)}; {plural(steps, 'step')} per epoch; run dir "
        f"{cfg.run.dir}"]
    if arith is not None:
        lines.append(f"arithmetic: {arith}, the same on every rank")
    if tc.deterministic and tc.grains % comm.size:
        lines.append(f"note: {plural(tc.grains, 'grain')} do not split evenly over "
                     f"{plural(comm.size, 'rank')}; train.grains = a multiple of {comm.size} "
                     "balances the work (and gives other bits)")
    return "\n".join(lines)
