"""What the training loop calls after a step and after an epoch: the run's reliability.

    with Guard(comm, run, say, signals, watchdog) as guard:   # run: a startup.Run
        ... each step:  code = guard.after_step(ok, position, loss_sum, ...)
        ... each epoch: code = guard.after_epoch(record, position, loss_total, line)
        a code that is not None is the run's exit code: stop there (0: early stopping).

Behind these two calls: the watchdog (fed by both), stop requests from signals and the
ranks' vote on them, rows that could not be read (data changed under the run), the
policy for non-finite steps, the periodic check that replicas
are still identical, mid-epoch checkpoints, the epoch's checkpoint with its line of
metrics, the best checkpoint (run.keep_best) and early stopping, both decided from the
history of validation losses (history.py). Every check is agreed by all ranks (the
validation loss is the same bits on every rank), so all of them stop together.
"""

import math
import time

import numpy as np

from dpbp.errors import EXIT_DIVERGED, EXIT_HUNG, UserError, plural
from dpbp.parallel import comm as mpi
from dpbp.parallel import sharding
from dpbp.service import checkpoint, history, run_dir
from dpbp.service.supervise import StopVote, signal_name


class Guard:
    """`signals` and `watchdog` come from the command's start (watching set-up too);
    from here on a signal is a request that the loop answers with a checkpoint."""

    def __init__(self, comm, run, say, signals, watchdog):
        self.comm, self.cfg, self.model, self.optimizer = comm, run.cfg, run.model, run.optimizer
        self.summed, self.data_id, self.say, self.files = run.summed, run.data_id, say, run.files
        self.signals, self.watchdog = signals, watchdog
        self.batches = sharding.num_batches(len(run.data.x), run.cfg.train.batch_size)
        self.stop = 0   # a signal the ranks agreed to stop for, at the last step
        self.scores = list(run.scores)   # run.best_metric of every epoch so far, from the first

    def __enter__(self):
        self.signals.defer()
        self.watchdog.training()
        self.vote = StopVote(self.comm, self.signals).__enter__()
        return self

    def __exit__(self, *exc):
        self.vote.__exit__(*exc)
        self.watchdog.stop()

    def after_step(self, ok, position, loss_sum, epoch_done, step_loss, N, unread=None):
        """Collective, after every step. `position` is where the run now is, `loss_sum`
        this rank's partial loss sum of the epoch; `epoch_done` when the step ended it;
        `step_loss` this rank's loss sum of the step's global batch of N rows; `unread`
        why this rank's rows could not be read (they were NaN: data.read_rows)."""
        self.watchdog.feed()
        comm, cfg, step = self.comm, self.cfg, position.step
        if cfg.run.log_every_steps and step % cfg.run.log_every_steps == 0:
            self.log_step(ok, position, step_loss, N)
        if not ok:
            stop_unread(comm, unread)
            stop_on_nonfinite(comm, cfg.train.on_nonfinite, position)
        if cfg.run.sync_check_steps and step % cfg.run.sync_check_steps == 0:
            check_replicas(comm, self.model, f"by step {step}")
        self.stop = self.vote.poll()   # DP: the ranks agree to stop, one step behind
        every = cfg.train.checkpoint_every_steps
        if not epoch_done and (self.stop or (every and step % every == 0)):
            path = self.save(position, loss_sum)
            if self.stop:
                return stopped_by(self.stop, path, position, self.say)
        return None

    def after_epoch(self, record, position, loss_total, line):
        """Collective, after an epoch's validation: check, save the checkpoint with the
        epoch's `record` of metrics (and as the best one, if it is), print its `line`.
        Early stopping marks both and returns 0."""
        self.watchdog.feed()
        stop_unless_finite(self.comm, position.epoch, loss_total, record["val_loss"])
        check_replicas(self.comm, self.model, f"in epoch {position.epoch}")
        cfg, last = self.cfg, position.epoch == self.cfg.train.epochs
        self.scores.append(record[cfg.run.best_metric])
        best = cfg.run.keep_best and history.best_epoch(
            self.scores, history.MODES[cfg.run.best_metric]) == position.epoch
        early = not last and history.stop_early(cfg, self.scores)
        if early:
            record["stopped"] = "early_stopping"
            line += f"  stopped: {history.why_stopped(cfg)} (early stopping)"
        path = self.save(position, 0.0, record, best)
        self.say(line)
        self.watchdog.feed()
        if self.stop and not last:   # agreed in its last step
            return stopped_by(self.stop, path, position, self.say)
        return 0 if early else None

    def log_step(self, ok, position, step_loss, N):
        """Collective. One line of RUN_DIR/steps.jsonl: the step's mean loss over its
        global batch (None for a skipped step), its lr and the time."""
        total = self.summed.epoch_loss(step_loss if ok else 0.0)   # DP: over ranks
        if self.comm.rank == 0:
            run_dir.log_step(self.cfg, dict(
                step=position.step, epoch=position.epoch + position.batch / self.batches,
                loss=total / N if ok else None, lr=self.optimizer.lr, time=round(time.time(), 3)))

    def save(self, position, loss_sum, record=None, best=False):
        """Collective. Rank 0 writes the checkpoint at `position` with every rank's
        partial loss sum (so that a resumed epoch adds up its loss exactly as an
        uninterrupted one), and `record`'s metrics at an epoch's end; a copy as the best
        checkpoint if `best`. A failure to write (a full disk) stops every rank. Returns
        the path."""
        comm = self.comm
        mine = np.array([self.summed.saved_loss(loss_sum)])
        sums = comm.allgatherv_(mine, np.empty(comm.size), [1] * comm.size)
        with mpi.agreement(comm):
            if comm.rank == 0:
                self.files.save(self.cfg, self.model, self.optimizer, position, comm.size,
                                sums, record, self.data_id, best)
        return checkpoint.path_for(self.cfg.run.dir, position.epoch, position.batch)


def end_hung_job():
    """The watchdog's last act, on the first rank whose watchdog fires."""
    time.sleep(2)   # the other ranks' watchdogs fire too: let them print their stacks
    mpi.abort(EXIT_HUNG)


def stopped_by(signum, path, position, say):
    run = run_dir.home_of(path)
    say(f"dpbp: stopped by {signal_name(signum)} after {plural(position.epoch, 'epoch')} "
        f"and {plural(position.batch, 'batch', 'batches')}; saved {path}; continue with "
        f"the same command and --resume (or --resume auto), in run.dir {run}")
    return 128 + signum


def stop_unread(comm, problem):
    """Collective, after a step that was not finite. Where a rank's rows could not be
    read (their file changed or was cut short, so it trained on NaN rows), every rank
    stops with that `problem` (exit 2), before anything more is saved."""
    with mpi.agreement(comm):
        if problem is not None:
            raise problem


def stop_on_nonfinite(comm, policy, position):
    """Collective. After a step whose loss or summed gradient was not finite (the same
    step on every rank): stop every rank under "stop"; under "skip" the step was dropped."""
    with mpi.agreement(comm, code=EXIT_DIVERGED):
        if policy == "stop":
            raise UserError(f"non-finite loss or gradient in epoch {position.epoch + 1}, "
                            f"batch {position.batch} (step {position.step}); nothing after "
                            "the last checkpoint was saved. Lower train.lr, set "
                            'train.clip_grad_norm, or skip such steps with '
                            'train.on_nonfinite = "skip"')


def check_replicas(comm, model, when):
    """Collective. Stop every rank, before anything more is saved, if the ranks'
    parameters (or the layers' buffers) differ; `when` says where in the run (for the
    message)."""
    identical = all([comm.replicas_identical(a) for a in (model.params,
                                                          *model.buffers.values())])
    with mpi.agreement(comm, code=EXIT_DIVERGED):
        if not identical:
            raise UserError(f"replicas diverged {when}: the ranks' parameters differ (a "
                            "fault in a node or in MPI); nothing more was saved")


def stop_unless_finite(comm, epoch, loss_total, val_loss):
    """Collective. Stop every rank, before anything more is saved, if the epoch's losses
    are not finite."""
    with mpi.agreement(comm, code=EXIT_DIVERGED):
        if not math.isfinite(loss_total) or (val_loss is not None
                                             and not math.isfinite(val_loss)):
            raise UserError(f"training diverged in epoch {epoch}: train loss sum "
                            f"{loss_total}, val loss {val_loss}; nothing after the last "
                            "checkpoint was saved. Lower train.lr, or start from an earlier "
                            "checkpoint")
