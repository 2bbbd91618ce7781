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
from dpbp.nn.model import Model
from dpbp.nn.optim import SGD, AdamW
from dpbp.nn.schedule import base_lr
from dpbp.parallel import comm as mpi
from dpbp.parallel import sharding
from dpbp.parallel.deterministic import GrainSum
from dpbp.parallel.step import PlainSum
from dpbp.parallel.threads import (
    arithmetic,
    available_cores,
    limit_blas_threads,
    set_by_user,
)
from dpbp.service import checkpoint, config, history, network, record, resume, run_dir
from dpbp.service import data as datasets
from dpbp.service.checkpoint import Position

LOSSES = {"cross_entropy": cross_entropy, "mse": mse}


@dataclasses.dataclass
class Run:
    """Everything the training loop needs, the same on every rank but `loss_sum` and
    `files`."""
    cfg: config.Config
    data: datasets.Dataset
    data_id: str                    # what the data are (datasets.identity), kept in checkpoints
    model: Model
    optimizer: SGD | AdamW          # as train.optimizer says
    summed: PlainSum | GrainSum     # the gradient sum over ranks, chosen from the config
    loss_fn: object                 # nn.losses.cross_entropy or mse
    start: Position                 # where the run starts (a checkpoint's position)
    loss_sum: float                 # this rank's partial loss sum of the starting epoch
    scores: list                    # run.best_metric of every epoch before the start (history.py)
    files: run_dir.RunFiles | None  # rank 0's hold on the run directory (else None)


def gradient_sum(tc, comm, model):
    """The gradient sum that train.deterministic, accumulation_steps and comm_dtype ask for."""
    if tc.deterministic:
        return GrainSum(comm, model, tc.grains)
    return PlainSum(comm, model.grads, tc.accumulation_steps, tc.comm_dtype)


def set_up(args, comm, say, watchdog):
    """Collective. The Run that `args` (train's parsed command line) asks for, in its run
    directory as the resume contract (service/resume.py) decides. None after
    --print-config, or for a run that has nothing left to do. Rank 0 locks the run
    directory before it reads any of the run's files, and keeps the lock (Run.files)
    until the command ends; a set-up that fails leaves the directory as it found it.
    The `watchdog` takes the config's run.watchdog_seconds as soon as it is known."""
    restart = resume.is_restart(args)
    with mpi.agreement(comm):
        cmd = config.load(args.config, args.set, check=args.resume is None and not restart)
    check_same_inputs(comm, cmd)
    with mpi.agreement(comm):
        if args.print_config:
            cfg = printed_config(args, cmd, restart) if comm.rank == 0 else None
    if args.print_config:
        say(run_dir.CONFIG_HEADER + config.to_toml(cfg), end="")
        return None
    files = plan = None
    with mpi.agreement(comm):
        if comm.rank == 0:
            target = resume.target_dir(args, cmd)
            files = run_dir.RunFiles.claim(target)
    try:
        with mpi.agreement(comm):
            if comm.rank == 0:
                plan = resume.plan(args, cmd, target, restart)
        run = _set_up_in(args, comm, say, watchdog, files, plan, restart)
    except BaseException:
        if files is not None and files.record is None:   # nothing written: as it was
            files.release(undo=True)
        raise
    if run is None and files is not None:
        files.release()
    return run


def _set_up_in(args, comm, say, watchdog, files, plan, restart):
    """set_up, once rank 0 holds the run directory and made its `plan` (None elsewhere)."""
    how, cfg, layers, source = comm.bcast_obj(None if plan is None else (
        plan.how, plan.cfg, plan.state["network"] if plan.state else None, plan.checkpoint))
    watchdog.set_seconds(cfg.run.watchdog_seconds)
    notes = list(plan.notes) if plan else []
    with mpi.agreement(comm):
        data = load_data(cfg, network.output_width(*layers) if layers else 0)
        check_validation_needed(cfg, data)
        data_id = datasets.identity(data)
        model, optimizer = build(cfg, data, layers, source)
        network.check_batch_statistics(model, cfg.train, len(data.x))
        change = None
        if comm.rank == 0:
            change = resume.check_data(plan, data_id, args.allow_data_change, restart)
            if change is not None:
                notes.append(f"resume: training on other data (--allow-data-change): "
                             f"{data_id}; recorded in {record.path(cfg.run.dir)}")
            if how == "resume":
                checkpoint.restore(plan.state, plan.checkpoint, model, optimizer)
    threads, why = limit_blas_threads(comm.ranks_sharing_cores, cfg.train.deterministic,
                                       comm.counted)
    check_same_inputs(comm, cfg, data_id)
    arith = check_arithmetic(comm) if cfg.train.deterministic else None
    for array in (model.params, *model.buffers.values()):
        comm.bcast_(array)                      # DP: the replicas start identical
    for array in optimizer.state().values():    # DP: and so do the optimizers
        comm.bcast_(array)
    summed = gradient_sum(cfg.train, comm, model)
    start, saved_sums, scores = starting_point(comm, plan)
    ended = finished(cfg, start, scores, say)
    if ended:   # left untouched, but for its record
        if comm.rank == 0:
            files.settle_finished(plan.found, ended, cfg)
        for note in notes:
            say(note)
        return None
    steps = sharding.num_batches(len(data.x), cfg.train.batch_size)
    with mpi.agreement(comm):
        if comm.rank == 0:
            more = files.prepare(plan, start, data_id, comm.size, change, steps)
            notes += files.notes + more
    say(describe_run(comm, threads, why, cfg, data, model, summed, arith))
    if how == "resume":
        say(f"resume: from {plan.checkpoint if plan else ''} (epoch {start.epoch}, batch "
            f"{start.batch}, step {start.step})")
        if saved_sums[1] != comm.size:
            say(f"resume: written by {plural(saved_sums[1], 'rank')}, continued by "
                f"{comm.size}: the same global batches in the same order; "
                + ("bit for bit (train.deterministic)" if cfg.train.deterministic else
                   "the sums round differently, so the weights agree to rounding"))
    if cfg.train.lr_scaling == "linear":
        say(f"lr: {cfg.train.lr:g} x {cfg.train.batch_size} / {cfg.train.base_batch_size} = "
            f"{base_lr(cfg.train):g} (linear scaling)")
    for note in notes:
        say(note)
    loss_sum = summed.resumed_loss(*saved_sums)
    return Run(cfg, data, data_id, model, optimizer, summed, LOSSES[cfg.train.loss], start,
               loss_sum, scores, files)


def printed_config(args, cmd, restart):
    """--print-config: the config the command would train with (read-only: no lock, no
    file written). Without --resume, the command line's."""
    if args.resume is None and not restart:
        return cmd
    target = resume.target_dir(args, cmd)
    return resume.plan(args, cmd, target, restart).cfg


def load_data(cfg, classes=0):
    """The config's data (UserError if it cannot be read or does not fit in memory), its
    labels checked against model.classes, or else `classes` (a checkpoint's network's)."""
    try:
        return datasets.load(cfg.data, cfg.train.loss, cfg.model.dtype, cfg.run.seed,
                             cfg.model.classes or classes, images=bool(cfg.model.layers))
    except MemoryError:
        raise UserError(f"the {cfg.data.source} data does not fit in memory") from None


def build(cfg, data, layers=None, source=None):
    """(model, optimizer): for a new run, the network the config describes for the
    data, with the layers' initial weights from run.seed (torch.nn's defaults), or
    model.init's; for a resumed one, the network `layers` ((specs, input shape)) of its
    checkpoint `source`, which must fit the data (its weights come from the checkpoint)."""
    if layers is None:
        model = network.for_data(cfg, data)
    else:
        where = f"checkpoint {source}"
        model = network.build(*layers, cfg.model.dtype, where)
        network.check_fits(model, data, where)
    model.init_(np.random.default_rng([cfg.run.seed, 0x1417]))
    if cfg.model.init and layers is None:
        checkpoint.load_weights(model, cfg.model.init)
    return model, new_optimizer(cfg.train, model)


def new_optimizer(tc, model):
    """The optimizer that train.optimizer names, on the model's flat buffers."""
    if tc.optimizer == "adamw":
        return AdamW(model.params, model.grads, base_lr(tc), tc.betas, tc.eps,
                     tc.weight_decay, tc.amsgrad)
    return SGD(model.params, model.grads, base_lr(tc), tc.momentum, tc.nesterov,
               tc.weight_decay)


def check_same_inputs(comm, cfg, data_id=""):
    """Collective. Stop every rank unless all read the same config and data (`data_id`,
    datasets.identity: every array's shape, dtype and CRC)."""
    crcs = [zlib.crc32(config.to_toml(cfg).encode()), zlib.crc32(data_id.encode())]
    same = comm.replicas_identical(np.array(crcs, dtype=np.int64))
    with mpi.agreement(comm):
        if not same:
            raise UserError("the ranks loaded different configs or data; check that every "
                            "node sees the same files")


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


def starting_point(comm, plan):
    """Collective. (Position, (loss sums, world size), scores): those of rank 0's plan's
    checkpoint and its run's history of run.best_metric (metrics.jsonl of the run
    directory holding it), or the start."""
    saved = None
    with mpi.agreement(comm):
        if plan is not None and plan.how == "resume":
            state, home = plan.state, run_dir.home_of(plan.checkpoint)
            position = Position.of(state)
            lines = run_dir.read_metrics(home) if home else []
            saved = (position, [float(s) for s in state["loss_sums"]], state["world_size"],
                     history.scores_of(lines, position.epoch, plan.cfg.run.best_metric))
    saved = comm.bcast_obj(saved)
    if saved is None:
        return Position(), ([0.0], 1), []
    position, sums, world_size, scores = saved
    return position, (sums, world_size), scores


def finished(cfg, start, scores, say):
    """How a resumed run that has nothing left to do ended: "completed" (all its epochs)
    or "early_stopped" (and would again, with this config's early stopping), said in a
    line; None while it has epochs to train."""
    tc = cfg.train
    if start.epoch >= tc.epochs:
        say(f"nothing to do: the run in {cfg.run.dir} already completed "
            f"{plural(start.epoch, 'epoch')} of {tc.epochs}")
        return "completed"
    if start.batch == 0 and history.stop_early(cfg, scores):
        say(f"nothing to do: the run in {cfg.run.dir} stopped early after "
            f"{plural(start.epoch, 'epoch')} ({history.why_stopped(cfg)}); to train on, "
            "raise train.early_stopping_patience or set it to 0")
        return "early_stopped"
    return None


def check_validation_needed(cfg, data):
    """run.keep_best, early stopping and the plateau schedule go by a validation metric
    (run.best_metric): a UserError without validation data."""
    for key, on in (("run.keep_best", cfg.run.keep_best),
                    ("train.early_stopping_patience", cfg.train.early_stopping_patience),
                    ('train.schedule = "plateau"', cfg.train.schedule == "plateau")):
        if on and data.x_val is None:
            raise UserError(f"{key} needs validation data, and the {cfg.data.source} data "
                            "has none (data.val_fraction = 0 and no x_val); set "
                            "data.val_fraction > 0, or give x_val and y_val")


def describe_run(comm, threads, why, cfg, data, model, summed, arith):
    """The start-up lines: world, data, model, batch, and under deterministic the
    arithmetic every rank shares (threads.arithmetic)."""
    tc = cfg.train
    steps = sharding.num_batches(len(data.x), tc.batch_size)
    lines = [
        f"dpbp {__version__}: {plural(comm.size, 'rank')} ({comm.library}), "
        f"{plural(threads, 'BLAS thread')} per rank ({why})",
        f"data: {cfg.data.source}, {data.describe()}",
        f"model: {model.describe()}; {cfg.model.dtype}, {model.params.size:,} parameters; "
        f"loss {tc.loss}",
        f"{summed.describe(tc.batch_size)}; {plural(steps, 'step')} per epoch; run dir "
        f"{cfg.run.dir}"]
    if arith is not None:
        lines.append(f"arithmetic: {arith}, the same on every rank")
    lines.insert(4, f"optimizer: {describe_optimizer(tc, cfg.run.best_metric)}")
    if tc.deterministic and tc.grains % comm.size:
        lines.append(f"note: {plural(tc.grains, 'grain')} do not split evenly over "
                     f"{plural(comm.size, 'rank')}; train.grains = a multiple of {comm.size} "
                     "balances the work (and gives other bits)")
    parts = tc.grains if tc.deterministic else tc.batch_size   # what the ranks share
    if parts < comm.size:
        idle = comm.size - parts
        lines.append(f"note: {idle} of the {comm.size} ranks {'gets' if idle == 1 else 'get'} "
                     f"no rows in any step ({plural(parts, 'grain' if tc.deterministic else 'row')}"
                     " per global batch); they still take part in every sum")
    cores = len(available_cores())
    if set_by_user() and threads * comm.ranks_sharing_cores > cores:
        lines.append(f"note: {plural(threads, 'BLAS thread')} x {comm.ranks_sharing_cores} "
                     f"ranks on this node's {plural(cores, 'core')}: they will take turns and "
                     "run slower; unset OMP_NUM_THREADS and dpbp gives each rank its share")
    return "\n".join(lines)


def describe_optimizer(tc, metric="val_loss"):
    """The optimizer's settings in a few words, e.g. 'SGD, lr 0.1 (cosine to 0, after a
    1-epoch warmup), momentum 0.9 (Nesterov), weight decay 0.0005'; `metric` is the one
    the plateau schedule watches."""
    schedule = {"constant": "constant", "cosine": "cosine to 0",
                "step": f"x {tc.gamma:g} after epochs {list(tc.milestones)}",
                "plateau": f"x {tc.plateau_factor:g} on a {metric} plateau: patience "
                           f"{tc.plateau_patience}, threshold {tc.plateau_threshold:g}, "
                           f"cooldown {tc.plateau_cooldown}, min_lr {tc.min_lr:g}"}[tc.schedule]
    if tc.warmup_epochs:
        schedule += f", after a {tc.warmup_epochs:g}-epoch warmup"
    if tc.optimizer == "adamw":
        words = [f"AdamW, lr {base_lr(tc):g} ({schedule})",
                 f"betas ({tc.betas[0]:g}, {tc.betas[1]:g}), eps {tc.eps:g}"
                 + (", amsgrad" if tc.amsgrad else ""),
                 f"decoupled weight decay {tc.weight_decay:g}" if tc.weight_decay
                 else "no weight decay"]
    else:
        words = [f"SGD, lr {base_lr(tc):g} ({schedule})",
                 f"momentum {tc.momentum:g}" + (" (Nesterov)" if tc.nesterov else "")
                 if tc.momentum else "no momentum",
                 f"weight decay {tc.weight_decay:g}" if tc.weight_decay else "no weight decay"]
    if tc.clip_grad_norm:
        words.append(f"gradient norm clipped at {tc.clip_grad_norm:g}")
    if tc.accumulation_steps > 1:
        words.append(f"{tc.accumulation_steps} micro-batches per step")
    return ", ".join(words)
