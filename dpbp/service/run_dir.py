"""The run directory: what a run leaves on disk, and rank 0's hold on it while it runs.

    RUN_DIR/run.json                    the run record (record.py): identity, config,
                                        data, state, best epoch, world sizes
    RUN_DIR/config.toml                 the resolved config of the run
    RUN_DIR/metrics.jsonl               one JSON object per epoch
    RUN_DIR/steps.jsonl                 run.log_every_steps: one per K steps
    RUN_DIR/restarts.jsonl              dpbp.launch: one per restart
    RUN_DIR/.lock                       held by rank 0 while the run runs
    RUN_DIR/checkpoints/epoch-EEEE.npz  a checkpoint per epoch, the newest run.keep_checkpoints
    RUN_DIR/checkpoints/epoch-EEEE-batch-BBBBBB.npz   mid-epoch ones (see checkpoint.py)
    RUN_DIR/checkpoints/best.npz        run.keep_best: a copy of the best epoch's checkpoint
    RUN_DIR/checkpoints/last.npz        the newest checkpoint: a relative link to it

`RunFiles.claim` locks the directory before any of its files is read (resume.py then
decides what the command does there); `prepare` writes the run's start, `save` its
checkpoints and metrics, `finish` its end state. Every function here runs on rank 0
alone; train.py broadcasts what the others need. Nothing is written until every check
has passed, and a run never overwrites a file that is not its own.
"""

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import shutil
import socket
import sys

from dpbp.errors import UserError
from dpbp.service import checkpoint, config, history, record
from dpbp.service.data import identity_arrays, identity_difference
from dpbp.service.files import (
    TEMP_PREFIX,
    TEMP_SUFFIX,
    remove_stale_temporaries,
    write_atomic,
)

# Keys whose change on resume changes which samples train and which validate.
SPLIT_KEYS = ("run.seed", "data.source", "data.path", "data.val_fraction", "data.samples",
              "data.shuffle", "data.mnist_t10k")
CONFIG_HEADER = "# dpbp: the resolved config of this run\n"
# The files dpbp writes in a run directory (besides .lock and checkpoints/): a new run
# never starts where one of them is without a record.
WRITTEN = ("run.json", "config.toml", "metrics.jsonl", "steps.jsonl", "restarts.jsonl")


def metrics_path(run_dir):
    return os.path.join(run_dir, "metrics.jsonl")


def steps_path(run_dir):
    return os.path.join(run_dir, "steps.jsonl")


def log_step(cfg, record):
    """Append one step's record to RUN_DIR/steps.jsonl (run.log_every_steps)."""
    try:
        with open(steps_path(cfg.run.dir), "a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
    except (OSError, ValueError) as e:   # a full disk, a loss beyond JSON: the run goes on
        print(f"dpbp: note: {steps_path(cfg.run.dir)}: a step was not logged ({e})",
              file=sys.stderr, flush=True)


def read_steps(run_dir):
    """The records of RUN_DIR/steps.jsonl, a torn last line left out; [] without it."""
    try:
        with open(steps_path(run_dir), encoding="utf-8") as f:
            lines = f.readlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:   # torn by a crash while appending
            break
    return out


def config_path(run_dir):
    return os.path.join(run_dir, "config.toml")


def read_metrics(run_dir):
    """[(epoch, line), ...] of RUN_DIR/metrics.jsonl; [] where there is none."""
    path = metrics_path(run_dir)
    if not os.path.exists(path):
        return []
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
        if lines and not lines[-1].endswith("\n"):
            lines.pop()   # torn by a crash or a full disk while appending: never finished
        return [(int(json.loads(line)["epoch"]), line) for line in lines]
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror})") from None
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path} is malformed (each line must be a JSON object with an "
                        "epoch); repair or remove it") from None


def newest_checkpoint(run_dir, what="--resume"):
    """(path, state, damaged) for --resume (or `what` asked for a run directory): the
    newest checkpoint in run_dir that loads and verifies, and [(path, why)] of newer ones
    that do not (named in notes by the caller). The run's metrics are checked too,
    before anything is written."""
    read_metrics(run_dir)
    found = checkpoint.list_all(run_dir)
    if not found:
        hint = "; start the run without --resume" if what == "--resume" else ""
        raise UserError(f"{what}: no checkpoint in {os.path.join(run_dir, 'checkpoints')}"
                        + hint)
    damaged = []
    for position, path in reversed(found):
        try:
            return path, checked(path, position), damaged
        except UserError as e:
            damaged.append((path, str(e)))
    raise UserError(f"{what}: none of the {len(found)} checkpoints in "
                    f"{os.path.join(run_dir, 'checkpoints')} is valid ({damaged[0][1]})"
                    + ("; start the run afresh in another run.dir" if what == "--resume" else ""))


def checked(path, position=None):
    """A loaded checkpoint whose content agrees with its name."""
    state = checkpoint.load(path)
    position = position or checkpoint.position_of(path)
    if position is not None and (state["epoch"], state["batch"]) != position:
        raise UserError(f"checkpoint {path} holds epoch {state['epoch']} batch "
                        f"{state['batch']}, not the position in its name; it was renamed "
                        "or copied from another run")
    return state


def check_data(saved_id, data_id, named, path):
    """An evaluated checkpoint meets its own data, unless the command line asks for other
    data: `named` = the keys its --config and --set name. Returns notes; a UserError
    where the data differ and the command line did not ask for that. (A resume has its
    own rule: resume.check_data.)"""
    if saved_id is None or saved_id == data_id:   # None: a checkpoint from before dpbp 0.1.1
        return []
    first = identity_difference(saved_id, data_id)
    if named & set(SPLIT_KEYS):
        return [f"the data differ from what {path} was trained on ({first}), as the "
                "command line asks"]
    raise UserError(f"the data differ from what {path} was trained on ({first}): the "
                    "files at data.path were changed or replaced. To evaluate on these "
                    "data, name them on the command line (--set 'data.path=\"...\"')")


def home_of(path):
    """The run directory holding checkpoint `path` (RUN_DIR/checkpoints/NAME), or None."""
    folder = os.path.dirname(os.path.abspath(path))
    return os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else None


def unnamed_best(path, state):
    """Notes where `path`, a loaded checkpoint `state`, is a run's best.npz that its run
    record does not name (another run's, copied in; or one the next resume settles)."""
    home = home_of(path)
    if os.path.basename(path) != "best.npz" or home is None:
        return []
    try:
        found = record.read(home)
    except UserError:
        return []
    if found is None or (found.best or {}).get("digest") == state["digest"]:
        return []
    return [f"{path} is not the best checkpoint that {record.path(home)} names "
            f"({'none' if found.best is None else 'epoch ' + str(found.best['epoch'])})"]


def os_error(e):
    """'No space left on device', with the file where the OS names one."""
    return e.strerror + (f": {e.filename}" if e.filename else "")


def written_files(run_dir):
    """The files of those dpbp writes that `run_dir` holds: WRITTEN, and anything in its
    checkpoints folder but the lock."""
    found = [os.path.join(run_dir, name) for name in WRITTEN
             if os.path.lexists(os.path.join(run_dir, name))]
    folder = os.path.join(run_dir, "checkpoints")
    if os.path.isdir(folder):
        found += sorted(os.path.join(folder, name) for name in os.listdir(folder)
                        if name != ".lock")
    return found


def is_run_dir(folder):
    """Whether `folder` holds (or held) a dpbp run."""
    return any(os.path.exists(os.path.join(folder, name))
               for name in ("run.json", "config.toml", "metrics.jsonl", ".lock"))


def check_own_folder(run_dir):
    """The checkpoints folder of run_dir may be a link (to a larger disk, say), but not
    into another run's directory, whatever that run's state: two runs would mix their
    checkpoints, and one's pruning would delete the other's."""
    folder = os.path.join(run_dir, "checkpoints")
    real = os.path.realpath(folder)
    if os.path.exists(folder) and real != os.path.join(os.path.realpath(run_dir), "checkpoints"):
        owner = os.path.dirname(real)
        if is_run_dir(owner):
            raise UserError(f"run.dir {run_dir}: its checkpoints folder links to {real}, "
                            f"the run in {owner}; one run per checkpoint folder: remove the "
                            "link, or choose another run.dir")


def verified(path):
    """The checkpoint at `path` loaded and verified, or None where it is missing or
    does not verify."""
    if not os.path.exists(path):
        return None
    try:
        return checkpoint.load(path)
    except UserError:
        return None


def copy_atomic(source, target):
    """Copy the file `source` to `target`, atomically and durably."""
    with open(source, "rb") as f:
        write_atomic(target, lambda out: shutil.copyfileobj(f, out))


def link_last(run_dir, path):
    """Make RUN_DIR/checkpoints/last.npz name the checkpoint `path`, a file beside it: a
    relative link, put in place atomically (a copy where the filesystem has no links).
    With `path` None, remove it: the run has no checkpoint of its own yet."""
    last = checkpoint.last_path(run_dir)
    folder = os.path.dirname(last)
    if path is None:
        if os.path.lexists(last):
            os.unlink(last)
        return
    tmp = os.path.join(folder, f"{TEMP_PREFIX}last{TEMP_SUFFIX}")
    if os.path.lexists(tmp):
        os.unlink(tmp)
    try:
        os.symlink(os.path.basename(path), tmp)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        copy_atomic(path, last)
        return
    # Not fsynced (6 ms a checkpoint, measured): the next checkpoint's write fsyncs the
    # folder, a journaling filesystem commits this rename before the pruning that
    # follows it, and every start points last.npz at the run's checkpoint again.
    os.replace(tmp, last)


def _without_stop(line):
    """A metrics line without the "stopped" mark: the run goes on past that epoch."""
    if '"stopped"' not in line:
        return line
    entry = json.loads(line)
    entry.pop("stopped", None)
    return json.dumps(entry) + "\n"


# ----------------------------------------------------------------------------- the lock

class RunFiles:
    """Rank 0's hold on the run directory, from before any of its files is read to the
    end of the command: its locks, the folders this process made, the run record.

    claim -> (resume.plan decides) -> prepare -> save ... -> finish -> release
    """

    def __init__(self, run_dir):
        self.dir, self.locks, self.created, self.notes = run_dir, [], [], []
        self.record = None          # the run record as last written (prepare on)
        self.steps_per_epoch = 1    # for the first epoch trained on other data

    @classmethod
    def claim(cls, run_dir):
        """Lock RUN_DIR/.lock and, where the checkpoints folder is a link elsewhere, that
        folder's .lock too. A checkpoints folder linked into another run is refused
        first. A run directory that does not exist yet holds no file to read: it is made
        and locked by `prepare`. A failure (a lock held by a live run, a full disk)
        leaves nothing behind."""
        parent = os.path.abspath(run_dir)
        while not os.path.lexists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
            raise UserError(f"run.dir {run_dir}: cannot create it ({parent} is not a writable "
                            "folder); choose another with --set 'run.dir=\"...\"'")
        check_own_folder(run_dir)
        files = cls(run_dir)
        if os.path.lexists(run_dir):
            files._take()
        return files

    def _take(self):
        """Make the run directory and its checkpoints folder where missing (remembered in
        `created`, outermost first), and take the locks; undone on failure."""
        folder = os.path.join(self.dir, "checkpoints")
        made = os.path.abspath(folder)
        while not os.path.lexists(made):
            self.created.insert(0, made)
            made = os.path.dirname(made)
        try:
            os.makedirs(folder, exist_ok=True)
            real = os.path.realpath(folder)
            own = os.path.join(os.path.realpath(self.dir), "checkpoints")
            for place in [self.dir] + ([real] if real != own else []):
                lock, more = _lock(place, self.dir)
                self.locks.append(lock)
                sign(lock)
                self.notes += more
        except (OSError, UserError) as e:
            self.release(undo=True)
            if isinstance(e, UserError):
                raise
            raise UserError(f"run.dir {self.dir}: cannot create it ({os_error(e)})") from None

    def release(self, undo=False):
        """Unlock and remove the lock files; with `undo` (the command stopped before it
        wrote anything), also the folders it made and lock files it found there."""
        for lock in self.locks:
            if lock.made or not undo:
                with contextlib.suppress(OSError):
                    os.unlink(lock.name)
            lock.close()
        self.locks = []
        if undo:
            for folder in reversed(self.created):
                with contextlib.suppress(OSError):
                    os.rmdir(folder)
            self.created = []

    # ------------------------------------------------------------------------- writing

    def prepare(self, plan, start, data_id, world_size, change=None, steps_per_epoch=1):
        """Write the run's start, once every check passed: set aside `plan.damaged`
        checkpoints (NAME.damaged), remove temporary files a killed writer left, drop
        metrics and step lines after the starting position `start` (they will be trained
        again; a branch takes its parent's), settle best.npz, and write config.toml and
        the record (state running, this world size, the data `data_id`, a data `change`
        allowed from start.step on). Returns notes."""
        cfg, run_dir = plan.cfg, self.dir
        self.steps_per_epoch = steps_per_epoch
        if not self.locks:   # the folder did not exist when the command started
            self._take()
            if written_files(run_dir):
                raise UserError(f"run.dir {run_dir} was made by another run while this one "
                                "set up; choose another run.dir")
        source = home_of(plan.checkpoint) if plan.how == "resume" else None
        earlier = read_metrics(source) if source else []
        kept = [_without_stop(line) for epoch, line in earlier if epoch <= start.epoch]
        steps = [json.dumps(r) + "\n" for r in (read_steps(source) if source else [])
                 if isinstance(r, dict) and r.get("step", 0) <= start.step]
        notes = []
        try:   # the record first: from then on, whatever follows belongs to the run
            best, notes = (None, []) if not cfg.run.keep_best else settle_best(
                run_dir, source, history.scores_of(earlier, start.epoch, cfg.run.best_metric),
                plan.found.best if plan.found else None, cfg.run.best_metric)
            self.record = record.write(run_dir, self._started(plan, start, data_id,
                                                              world_size, change, best))
            for path, _ in plan.damaged:
                os.replace(path, path + ".damaged")
            remove_stale_temporaries(os.path.join(run_dir, "checkpoints"))
            own = source is not None and os.path.realpath(source) == os.path.realpath(run_dir)
            link_last(run_dir, checkpoint.path_for(run_dir, start.epoch, start.batch)
                      if own else None)   # the checkpoint it continues, or none of its own
            write_atomic(config_path(run_dir),
                         lambda f: f.write((CONFIG_HEADER + config.to_toml(cfg)).encode()))
            write_atomic(metrics_path(run_dir), lambda f: f.write("".join(kept).encode()))
            if steps or os.path.exists(steps_path(run_dir)):
                write_atomic(steps_path(run_dir), lambda f: f.write("".join(steps).encode()))
        except OSError as e:
            raise UserError(f"run.dir {run_dir}: cannot write ({os_error(e)})") from None
        return notes

    def _started(self, plan, start, data_id, world_size, change, best):
        """The record of the run as it starts (see prepare)."""
        toml, data = config.to_toml(plan.cfg), identity_arrays(data_id)
        found = plan.found
        if found is None or found.parent != plan.parent:   # a new run
            started = record.Record.new(toml, data, plan.parent)
        else:
            changes = () if plan.how == "start" else tuple(
                c for c in found.data_changes if c["step"] <= start.step)
            started = dataclasses.replace(found, config=toml, data=data, parent=plan.parent,
                                          data_changes=changes)
        if change is not None:
            started = dataclasses.replace(started, data_changes=started.data_changes + (
                dict(change, step=start.step),))
        return dataclasses.replace(started.with_state("running").with_world_size(world_size),
                                   best=best)

    def save(self, cfg, model, optimizer, position, world_size, loss_sums=None, metrics=None,
             data_id="", best=False):
        """Checkpoint at `position` (a checkpoint.Position); at the end of an epoch (batch
        0) first append its line of `metrics`. (In this order, a crash between the two
        leaves a metrics line that `prepare` drops on resume, never a missing one.) With
        `best`, copy it to checkpoints/best.npz and name it in the record (a crash between
        the two is settled on resume: settle_best). Point checkpoints/last.npz at it. Then
        delete checkpoints beyond the newest run.keep_checkpoints, this one being durable
        by now. Returns the path."""
        path = checkpoint.path_for(cfg.run.dir, position.epoch, position.batch)
        doing = f"cannot append to {metrics_path(cfg.run.dir)}"   # for a message
        try:
            if metrics is not None:
                if self._first_on_other_data(position.step):
                    metrics = dict(metrics, data_changed=True)
                with open(metrics_path(cfg.run.dir), "a", encoding="utf-8") as f:
                    f.write(json.dumps(metrics, allow_nan=False) + "\n")
                    f.flush()
                    os.fsync(f.fileno())   # durable before the checkpoint that follows it
            doing = f"cannot save {path}"
            digest = checkpoint.save(path, model, optimizer, position, world_size,
                                     config.to_toml(cfg), loss_sums, data_id)
            if best:
                doing = f"saved {path}, but cannot copy it to {checkpoint.best_path(self.dir)}"
                copy_atomic(path, checkpoint.best_path(cfg.run.dir))
                doing = f"saved {path}, but cannot name it the best in {record.path(self.dir)}"
                self.record = record.write(self.dir, dataclasses.replace(
                    self.record, best={"epoch": position.epoch, "digest": digest}))
            link_last(cfg.run.dir, path)
            keep = cfg.run.keep_checkpoints
            if keep:
                for _, old in checkpoint.list_all(cfg.run.dir)[:-keep]:
                    doing = f"saved {path}, but cannot delete the older {old}"
                    os.unlink(old)
        except OSError as e:
            hint = ("earlier checkpoints are intact, --resume continues from the newest"
                    if checkpoint.list_all(cfg.run.dir) else "rerun the same command to "
                    "start afresh")
            raise UserError(f"{doing} ({e.strerror}); {hint}") from None
        return path

    def _first_on_other_data(self, end_step):
        """Whether the epoch that ends at optimizer step `end_step` trained the first
        steps on data that --allow-data-change let in."""
        begin = end_step - self.steps_per_epoch
        return self.record is not None and any(begin <= c["step"] < end_step
                                               for c in self.record.data_changes)

    def settle_finished(self, found, state, cfg):
        """A run with nothing left to do, as `state` says: its record says so too
        (written where it said otherwise: its last process died before it could, or the
        record is new, built from a run of before records)."""
        if found.state != state or not os.path.exists(record.path(self.dir)):
            self.record = found
            self.finish(state, history.why_stopped(cfg) if state == "early_stopped" else None)

    def finish(self, state, cause=None):
        """Record how the run ended (record.STATES); a failure to write is only said:
        a record left `running` reads as failed once nobody holds the lock."""
        if self.record is None:
            return
        try:
            self.record = record.write(self.dir, self.record.with_state(state, cause))
        except OSError as e:
            print(f"dpbp: note: {record.path(self.dir)}: the run's end ({state}) was not "
                  f"recorded ({os_error(e)})", file=sys.stderr, flush=True)


def record_failure(run_dir, cause):
    """After a job ended without recording its end (its rank 0 was killed, say): record
    it as failed, with `cause`, where the record still says running and nobody holds
    the run directory. For dpbp.launch, which sees how the job ended."""
    if not os.path.exists(record.path(run_dir)):
        return
    try:
        files = RunFiles.claim(run_dir)
    except UserError:
        return   # held: a run is in there again (or the folder is not ours to lock)
    try:
        found = record.read(run_dir)
        if found is not None and found.state == "running":
            files.record = found
            files.finish("failed", cause)
    except UserError:
        pass   # a damaged record: the next start says so
    finally:
        files.release()


def _lock(place, run_dir=None):
    """Take PLACE/.lock (the run directory's, or its checkpoints folder's where that is
    a link elsewhere) for the life of the run. Returns (the open lock file, notes); the
    file's `made` says whether this process created it. A lock file that its holder
    removed while this process waited for it is taken anew."""
    run_dir = run_dir or place
    path = os.path.join(place, ".lock")
    what = f"run.dir {run_dir}" if place == run_dir else f"the checkpoints folder {place}"
    for _ in range(100):
        made = not os.path.lexists(path)
        lock = open(path, "a+")
        lock.made = made
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:   # held by a live process
            lock.seek(0)
            holder = lock.read().strip() or "a process that did not say who it is"
            lock.close()
            raise UserError(f"{what} is in use by another dpbp run ({holder}); wait for it, "
                            f"or if that process is gone, remove {path}") from None
        except OSError as e:      # a filesystem without locks: run, but say what is missing
            return lock, [f"{what}: cannot lock it ({e.strerror}); a second run started into "
                          "it at the same time would not be stopped"]
        try:
            same = os.path.samestat(os.fstat(lock.fileno()), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return lock, []
        lock.close()   # its last holder removed it as we took it: take the new one
    raise UserError(f"{what}: cannot take {path} (it keeps being replaced)")


def sign(lock):
    """Write who holds a lock in it."""
    try:
        lock.truncate(0)
        lock.write(f"host {socket.gethostname()}, pid {os.getpid()}\n")
        lock.flush()
    except OSError:   # a full disk: the lock holds all the same; only the name is missing
        pass


# ----------------------------------------------------------------------------- best.npz

def settle_best(run_dir, source, scores, recorded, metric="val_loss"):
    """run.keep_best at a (re)start: make RUN_DIR/checkpoints/best.npz hold the best epoch
    of the history the run continues (`scores`: `metric`, run.best_metric, of every
    epoch so far), taken from `source`, the run directory resumed from (this one, or the
    one a branch leaves): its own best.npz or that epoch's checkpoint. A best.npz that is not the
    run's own (`recorded`: the record's best; or a copy of its own checkpoint) is set
    aside as best.npz.foreign (.damaged where it does not verify). Returns (the record's
    best, notes)."""
    target, notes = checkpoint.best_path(run_dir), []
    current = _own_best(run_dir, recorded, notes)
    best = history.best_epoch(scores, history.MODES[metric])
    if best is None or source is None:
        if current is not None:
            os.unlink(target)
        return None, notes
    if current is not None and (current["epoch"], current["batch"]) == (best, 0):
        return {"epoch": best, "digest": current["digest"]}, notes
    theirs = None
    if os.path.realpath(source) != os.path.realpath(run_dir):
        with contextlib.suppress(UserError):
            theirs = record.read(source)
        theirs = _own_best(source, theirs.best if theirs else None, [], set_aside=False)
    for state, path in ((theirs, checkpoint.best_path(source)),
                        (verified(checkpoint.path_for(source, best)),
                         checkpoint.path_for(source, best))):
        if state is not None and (state["epoch"], state["batch"]) == (best, 0):
            copy_atomic(path, target)
            return {"epoch": best, "digest": state["digest"]}, notes
    if os.path.exists(target):
        os.unlink(target)
    notes.append(f"run.keep_best: no checkpoint of epoch {best} ({metric} "
                 f"{scores[best - 1]:.6g}, the best so far) is left; checkpoints/best.npz "
                 f"will be the first later epoch with a better {metric}")
    return None, notes


def _own_best(run_dir, recorded, notes, set_aside=True):
    """RUN_DIR/checkpoints/best.npz loaded, where it is the run's own: the one its record
    names (`recorded`), or a copy of its own checkpoint of that epoch (a crash came
    between the copy and the record). Another one is set aside (`set_aside`), with a
    note; None then, and where there is none."""
    path = checkpoint.best_path(run_dir)
    if not os.path.exists(path):
        return None
    state = verified(path)
    if state is not None:
        if recorded is not None and state["digest"] == recorded["digest"]:
            return state
        own = verified(checkpoint.path_for(run_dir, state["epoch"], state["batch"]))
        if own is not None and own["digest"] == state["digest"]:
            return state
    if set_aside:
        kind = "foreign" if state is not None else "damaged"
        os.replace(path, f"{path}.{kind}")
        notes.append(f"run.keep_best: {path} " + (
            "is not this run's (the run record names another)" if state is not None
            else "does not verify") + f"; set aside as best.npz.{kind}")
    return None
