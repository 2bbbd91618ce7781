"""The run directory: what a run leaves on disk, and how a run starts or resumes there.

    RUN_DIR/config.toml                 the resolved config of the run
    RUN_DIR/metrics.jsonl               one JSON object per epoch
    RUN_DIR/checkpoints/epoch-EEEE.npz  a checkpoint per epoch, the newest run.keep_checkpoints
    RUN_DIR/checkpoints/epoch-EEEE-batch-BBBBBB.npz   mid-epoch ones (see checkpoint.py)
    RUN_DIR/checkpoints/best.npz        run.keep_best: a copy of the best epoch's checkpoint

Every function here runs on rank 0 alone; train.py broadcasts what the others need.
Nothing is written until every check has passed, and a new run never overwrites an
earlier run's files.
"""

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import socket
import sys

from dpbp.errors import UserError
from dpbp.service import checkpoint, config, history
from dpbp.service.files import remove_stale_temporaries, write_atomic

# Keys a resumed run may not change: they define the network, the global batch or the
# optimizer (whose state the checkpoint holds).
FIXED_ON_RESUME = ("model.hidden", "model.activation", "model.classes", "model.dropout",
                   "train.loss", "train.batch_size", "train.optimizer")
# Keys whose change on resume changes which samples train and which validate.
SPLIT_KEYS = ("run.seed", "data.source", "data.path", "data.val_fraction", "data.samples",
              "data.shuffle", "data.mnist_t10k")
CONFIG_HEADER = "# dpbp: the resolved config of this run\n"


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


def check_new(cfg):
    """A new run may start in cfg.run.dir: it holds no checkpoint, no metrics beyond a
    first epoch that was never checkpointed, no config.toml that dpbp did not write,
    and can be created. Returns notes for the log."""
    run_dir = cfg.run.dir
    found = checkpoint.list_all(run_dir) + [
        (None, p) for p in [checkpoint.best_path(run_dir)] if os.path.exists(p)]
    if found:
        raise UserError(
            f"run.dir {run_dir} already holds a run (checkpoint {found[-1][1]}); "
            f"continue it with --resume, or start a new one with --set "
            f"'run.dir=\"{run_dir}-2\"'")
    recorded = [epoch for epoch, _ in read_metrics(run_dir)]
    if any(epoch != 1 for epoch in recorded):
        raise UserError(f"run.dir {run_dir} holds metrics of {max(recorded)} epochs but no "
                        "checkpoint; choose another run.dir, or remove its metrics.jsonl")
    if os.path.exists(config_path(run_dir)):
        try:
            with open(config_path(run_dir), encoding="utf-8", errors="replace") as f:
                ours = f.read().startswith(CONFIG_HEADER)
        except OSError as e:
            raise UserError(f"{config_path(run_dir)}: cannot read it ({e.strerror})") from None
        if not ours:
            raise UserError(f"run.dir {run_dir} has a config.toml that dpbp did not "
                            "write; choose another run.dir, or remove it")
    notes = []
    if recorded or os.path.exists(config_path(run_dir)):
        notes.append(f"run.dir {run_dir}: an earlier run there ended before its first "
                     "checkpoint; starting afresh in its place")
    parent = os.path.abspath(run_dir)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"run.dir {run_dir}: cannot create it ({parent} is not a writable "
                        "folder); choose another with --set 'run.dir=\"...\"'")
    return notes


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


def resumed_config(saved_toml, path, config_file, overrides, run_dir=None):
    """The config of a resumed run: the checkpoint's own, with the command line's
    --config and --set applied on top. It runs in `run_dir` (plain --resume: where the
    checkpoint was found); for --resume PATH, in the run.dir the command line names, else
    in the run directory holding PATH. Returns (cfg, notes); changes to the network or
    the global batch are refused."""
    saved = config.from_toml(saved_toml, f"checkpoint {path}")
    cfg = config.load(config_file, overrides, base=saved)
    if run_dir is None:   # --resume PATH
        explicit = cfg.run.dir != saved.run.dir
        run_dir = cfg.run.dir if explicit else (home_of(path) or cfg.run.dir)
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=run_dir))
    old, new = config.flat(saved), config.flat(cfg)
    changed = [k for k in old if old[k] != new[k] and k != "run.dir"]
    for key in changed:
        if key in FIXED_ON_RESUME:
            raise UserError(f"--resume: {key} was {config.toml_value(old[key])} in {path}, "
                            f"now {config.toml_value(new[key])}; a resumed run keeps its "
                            "network, global batch and optimizer (start a new run to change "
                            "it, with model.init for the weights)")
    notes = []
    for k in changed:
        why = {"model.init": " (ignored: the checkpoint has the weights)"}.get(
            k, " (the data order and validation split change with it)" if k in SPLIT_KEYS
            else "")
        notes.append(f"resume: {k} changed from {config.toml_value(old[k])} to "
                     f"{config.toml_value(new[k])}{why}")
    return cfg, notes


def check_data(saved_id, data_id, named, path):
    """A resumed or evaluated checkpoint meets its own data, unless the command line asks
    for other data: `named` = the keys its --config and --set name. Returns notes; a
    UserError where the data differ and the command line did not ask for that."""
    if saved_id is None or saved_id == data_id:   # None: a checkpoint from before dpbp 0.1.1
        return []
    theirs, ours = saved_id.split("; "), data_id.split("; ")
    first = next((f"{a} now, {b} then" for a, b in zip(ours, theirs) if a != b),
                 f"{len(ours)} arrays now, {len(theirs)} then")
    if named & set(SPLIT_KEYS):
        return [f"the data differ from what {path} was trained on ({first}), as the "
                "command line asks"]
    raise UserError(f"the data differ from what {path} was trained on ({first}): the "
                    "files at data.path were changed or replaced. To go on with these data, "
                    "name them on the command line (--set 'data.path=\"...\"'); the data "
                    "order and validation split change with them")


def home_of(path):
    """The run directory holding checkpoint `path` (RUN_DIR/checkpoints/NAME), or None."""
    folder = os.path.dirname(os.path.abspath(path))
    return os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else None


def prepare(cfg, start, resumed_from=None, damaged=(), start_step=0):
    """Create and lock the run directory, save the resolved config, set aside `damaged`
    checkpoints (renamed to NAME.damaged), remove temporary files a killed writer left,
    and drop metrics of epochs after the starting one (they will be trained again).
    `start` = (epoch, batch) of the checkpoint `resumed_from`, (0, 0) for a new run. A
    run resumed from another directory's checkpoint (a branch) must start in a new one.
    Returns (locks, notes): the locks are held while the run lives, so a second run
    started into the same directory, or into the same checkpoints folder through a
    link, is refused instead of writing over it."""
    run_dir = cfg.run.dir
    home = home_of(resumed_from) if resumed_from else None
    new = home is None or os.path.realpath(home) != os.path.realpath(run_dir)

    def check():
        if new:
            return check_new(cfg)
        newer = [p for pos, p in checkpoint.list_all(run_dir)
                 if pos > tuple(start) and p not in damaged]
        if newer:
            raise UserError(
                f"{run_dir} holds a newer checkpoint than {resumed_from}: {newer[-1]}; "
                "continue from the newest with --resume, or branch off from this one into "
                f"a new run directory with --resume {resumed_from} --set 'run.dir=\"...\"'")
        return []

    if new:
        check()   # before anything is written
    check_own_folder(run_dir)
    locks, lock_notes = claim(run_dir)
    notes = check() + lock_notes   # under the locks: nobody started or advanced a run here
    for lock in locks:
        sign(lock)
    # the metrics of the epochs resumed from: a branch takes them from the run it leaves
    source = (None if resumed_from is None else home if new else run_dir)
    earlier = read_metrics(source) if source else []
    kept = [line for epoch, line in earlier if epoch <= start[0]]
    steps = [json.dumps(r) + "\n" for r in (read_steps(source) if source else [])
             if isinstance(r, dict) and r.get("step", 0) <= start_step]
    try:
        for path in damaged:
            os.replace(path, path + ".damaged")
        remove_stale_temporaries(os.path.join(run_dir, "checkpoints"))
        write_atomic(config_path(run_dir),
                     lambda f: f.write((CONFIG_HEADER + config.to_toml(cfg)).encode()))
        write_atomic(metrics_path(run_dir), lambda f: f.write("".join(kept).encode()))
        if steps or os.path.exists(steps_path(run_dir)):
            write_atomic(steps_path(run_dir), lambda f: f.write("".join(steps).encode()))
        if cfg.run.keep_best and source:
            notes += settle_best(run_dir, source, history.val_losses(earlier, start[0]))
    except OSError as e:
        raise UserError(f"run.dir {run_dir}: cannot write ({os_error(e)})") from None
    return locks, notes


def os_error(e):
    """'No space left on device', with the file where the OS names one."""
    return e.strerror + (f": {e.filename}" if e.filename else "")


def is_run_dir(folder):
    """Whether `folder` holds (or held) a dpbp run."""
    return any(os.path.exists(os.path.join(folder, name))
               for name in ("config.toml", "metrics.jsonl", ".lock"))


def check_own_folder(run_dir):
    """The checkpoints folder of run_dir may be a link (to a larger disk, say), but not
    into another run's directory: two runs would mix their checkpoints, and one's
    pruning would delete the other's."""
    folder = os.path.join(run_dir, "checkpoints")
    real = os.path.realpath(folder)
    if os.path.exists(folder) and real != os.path.join(os.path.realpath(run_dir), "checkpoints"):
        owner = os.path.dirname(real)
        if is_run_dir(owner):
            raise UserError(f"run.dir {run_dir}: its checkpoints folder links to {real}, "
                            f"the run in {owner}; one run per checkpoint folder: remove the "
                            "link, or choose another run.dir")


def claim(run_dir):
    """Create run_dir and its checkpoints folder where missing, and lock RUN_DIR/.lock
    and, where the checkpoints folder is a link elsewhere, that folder's .lock too.
    Returns (locks, notes). A failure (a full disk) removes what it created."""
    folder = os.path.join(run_dir, "checkpoints")
    created = [p for p in (run_dir, folder) if not os.path.isdir(p)]
    real = os.path.realpath(folder)
    places = [run_dir] + ([real] if real != os.path.join(os.path.realpath(run_dir),
                                                          "checkpoints") else [])
    locks, notes = [], []
    try:
        os.makedirs(folder, exist_ok=True)
        for place in places:
            lock, more = _lock(place, run_dir)
            locks.append(lock)
            notes += more
    except OSError as e:
        for lock in locks:
            lock.close()
        for place in places if created else []:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(place, ".lock"))
        for path in reversed(created):
            with contextlib.suppress(OSError):
                os.rmdir(path)
        raise UserError(f"run.dir {run_dir}: cannot create it ({os_error(e)})") from None
    return locks, notes


def _lock(place, run_dir=None):
    """Take PLACE/.lock (the run directory's, or its checkpoints folder's where that is
    a link elsewhere) for the life of this process and write who holds it in it.
    Returns (the open lock file, notes)."""
    run_dir = run_dir or place
    path = os.path.join(place, ".lock")
    lock = open(path, "a+")
    what = f"run.dir {run_dir}" if place == run_dir else f"the checkpoints folder {place}"
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:   # held by a live process
        lock.seek(0)
        holder = lock.read().strip() or "a process that did not say who it is"
        lock.close()
        raise UserError(f"{what} is in use by another dpbp run ({holder}); wait for it, or "
                        f"if that process is gone, remove {path}") from None
    except OSError as e:      # a filesystem without locks: run, but say what is missing
        return lock, [f"{what}: cannot lock it ({e.strerror}); a second run started into "
                      "it at the same time would not be stopped"]
    return lock, []


def sign(lock):
    """Write who holds a lock in it, once the run is sure to start."""
    try:
        lock.truncate(0)
        lock.write(f"host {socket.gethostname()}, pid {os.getpid()}\n")
        lock.flush()
    except OSError:   # a full disk: the lock holds all the same; only the name is missing
        pass


def save(cfg, model, optimizer, position, world_size, loss_sums=None, record=None,
         data_id="", best=False):
    """Checkpoint at `position` (a checkpoint.Position); at the end of an epoch (batch 0)
    first append its line of metrics, `record`. (In this order, a crash between
    the two leaves a metrics line that `prepare` drops on resume, never a missing one.)
    With `best`, copy it to checkpoints/best.npz (a crash before that is repaired on
    resume: settle_best). Then delete checkpoints beyond the newest
    run.keep_checkpoints, this one being durable by now. Returns the checkpoint's path."""
    path = checkpoint.path_for(cfg.run.dir, position.epoch, position.batch)
    try:
        if record is not None:
            with open(metrics_path(cfg.run.dir), "a", encoding="utf-8") as f:
                f.write(json.dumps(record, allow_nan=False) + "\n")
                f.flush()
                os.fsync(f.fileno())   # durable before the checkpoint that follows it
        checkpoint.save(path, model, optimizer, position, world_size, config.to_toml(cfg),
                        loss_sums, data_id)
        if best:
            copy_atomic(path, checkpoint.best_path(cfg.run.dir))
        keep = cfg.run.keep_checkpoints
        if keep:
            for _, old in checkpoint.list_all(cfg.run.dir)[:-keep]:
                os.unlink(old)
    except OSError as e:
        hint = ("earlier checkpoints are intact, --resume continues from the newest"
                if checkpoint.list_all(cfg.run.dir) else "rerun the same command to start "
                "afresh")
        raise UserError(f"cannot save {path} ({e.strerror}); {hint}") from None
    return path


def copy_atomic(source, target):
    """Copy the file `source` to `target`, atomically and durably."""
    with open(source, "rb") as f:
        write_atomic(target, lambda out: shutil.copyfileobj(f, out))


def settle_best(run_dir, source, losses):
    """run.keep_best on resume: make RUN_DIR/checkpoints/best.npz hold the best epoch of
    the history it continues (`losses`: val_loss of every epoch so far), taken from
    `source`, the run directory resumed from (this one, or the one a branch leaves): its
    best.npz or that epoch's checkpoint. A best.npz of an epoch that is not in the history
    (trained again after the checkpoint resumed from) is removed. Returns notes."""
    best, target = history.best_epoch(losses), checkpoint.best_path(run_dir)
    if best is None:
        candidates = []
    else:
        candidates = [checkpoint.best_path(source), checkpoint.path_for(source, best)]
    for path in candidates:
        if holds_epoch(path, best):
            if os.path.realpath(path) != os.path.realpath(target):
                copy_atomic(path, target)
            return []
    if os.path.exists(target):
        os.unlink(target)
    if best is None:
        return []
    return [f"run.keep_best: no checkpoint of epoch {best} (val_loss {losses[best - 1]:.6g}, "
            "the lowest so far) is left; checkpoints/best.npz will be the first later epoch "
            "with a lower val_loss"]


def holds_epoch(path, epoch):
    """Whether `path` is a checkpoint that verifies and holds the end of `epoch`."""
    try:
        state = checkpoint.load(path)
    except UserError:
        return False
    return (state["epoch"], state["batch"]) == (epoch, 0)
