"""The resume contract: from what a run directory holds and how the command was started,
which config the run trains with, where it starts, and what its data must be.

    what run.dir holds          no flag      --resume     --resume auto   --resume PATH
    nothing                     start        refused (2)  start           branch from PATH
    a record, no checkpoint     start afresh continue (*) continue (*)    (the same branch)
    checkpoints                 refused (2)  resume       resume          resume from PATH
    a finished run              refused (2)  nothing to do, exit 0 (unless overrides extend it)

(*) a run that ended before its first checkpoint starts again from its beginning (a
branch: from its parent checkpoint), with its recorded config. docs/operations.md has
the whole table, with the supervisor's starts and Slurm's requeues as columns.

A *restart* (`--restart`, which dpbp.launch passes, or a Slurm requeue,
SLURM_RESTART_COUNT > 0) continues as --resume auto does, with the recorded config: the
command line's config changes nothing then, and a line says so where it differs. A first
start or a new submission applies the command line. Which config governs: a resumed
checkpoint's own config (the base for --set), or for a restart the run record's.

Everything here runs on rank 0, under the run directory's lock (run_dir.claim), and
only reads files.
"""

import dataclasses
import os

from dpbp.errors import UserError
from dpbp.service import checkpoint, config, record, run_dir
from dpbp.service import data as datasets

AUTO = "auto"
# Keys a resumed run may not change: they define the network, the global batch or the
# optimizer (whose state the checkpoint holds), or the metric that its best checkpoint,
# early stopping and plateau schedule have watched from its first epoch.
FIXED_ON_RESUME = ("model.hidden", "model.activation", "model.classes", "model.dropout",
                   "model.layers", "train.loss", "train.batch_size", "train.optimizer",
                   "run.best_metric")


@dataclasses.dataclass
class Plan:
    """What a training command does in its run directory (rank 0's decision)."""
    how: str                      # "start": from the first step; "resume": from `checkpoint`
    cfg: config.Config            # the config it trains with
    found: record.Record | None   # the run's record as found (built once for an older run)
    checkpoint: str | None = None  # resume: the checkpoint it continues from
    state: dict | None = None     # resume: that checkpoint, loaded
    damaged: tuple = ()           # [(path, why)]: newer checkpoints that do not verify
    parent: dict | None = None    # a branch: {"checkpoint", "digest"} it branches from
    data: str | None = None       # the data identity it must find (None: any)
    notes: list = dataclasses.field(default_factory=list)

    @property
    def branch(self):
        """Resuming from a checkpoint of another run directory."""
        return self.parent is not None


def is_restart(args, environ=os.environ):
    """Whether this start is a restart of the same run: dpbp.launch's --restart, or a
    Slurm job requeued (SLURM_RESTART_COUNT > 0)."""
    count = environ.get("SLURM_RESTART_COUNT", "")
    return bool(args.restart) or (count.isdigit() and int(count) > 0)


def target_dir(args, cmd):
    """The run directory the command works in: run.dir, but for --resume PATH without a
    run.dir on the command line, the run directory holding PATH. `cmd` is the command
    line's config."""
    target = cmd.run.dir
    if args.resume not in (None, True, AUTO) and \
            "run.dir" not in config.named_keys(args.config, args.set):
        target = run_dir.home_of(args.resume) or target
    if os.path.realpath(target) == os.path.realpath(os.sep):
        raise UserError(f"run.dir {target} is the root folder; choose a folder of its own "
                        "for the run, e.g. --set 'run.dir=\"runs/x\"'")
    return target


def plan(args, cmd, target, restart):
    """The Plan for train's parsed command line `args` in `target` (target_dir), `cmd`
    being the command line's config (ranges not checked yet), under the lock."""
    found, ckpts = record.read(target), checkpoint.list_all(target)
    if args.resume not in (None, True, AUTO):
        return _from_path(args, cmd, target, found, ckpts)
    if ckpts:
        if args.resume is None and not restart:
            newest = ckpts[-1][1]
            raise UserError(f"run.dir {target} already holds a run (checkpoint {newest}); "
                            "continue it with --resume (or --resume auto), or start a new "
                            f"one with --set 'run.dir=\"{target}-2\"'")
        path, state, damaged = run_dir.newest_checkpoint(target)
        found = found or legacy_record(target, state)
        cfg, notes = continued_config(args, found, state, path, target, restart)
        notes = [f"resume: {p} is damaged ({why}); set aside as "
                 f"{os.path.basename(p)}.damaged" for p, why in damaged] + notes
        return Plan("resume", cfg, found, path, state, tuple(damaged), found.parent,
                    datasets.identity_text(found.data) or None, notes)
    if found is None:
        if args.resume is True:
            raise UserError(f"--resume: no run in {target} to resume (no checkpoint and no "
                            "run.json); start it without --resume, or with --resume auto, "
                            "which starts or resumes")
        check_no_stray_files(target, restart)
        return Plan("start", checked(cmd), None)
    return _before_first_checkpoint(args, cmd, target, found, restart)


def _before_first_checkpoint(args, cmd, target, found, restart):
    """The Plan for a run directory whose record has no checkpoint beside it: the run
    ended before its first one."""
    how = "ended before its first checkpoint"
    state = parent_checkpoint(found.parent) if found.parent else None
    check_nothing_lost(target, found, state)
    if args.resume is None and not restart:   # the same command as a new run: afresh
        return Plan("start", checked(cmd), found,
                    notes=[f"run.dir {target}: an earlier run there {how}; starting afresh "
                           "in its place"])
    cfg, notes = continued_config(args, found, None, None, target, restart)
    if found.parent is None:
        return Plan("start", cfg, found, data=datasets.identity_text(found.data) or None,
                    notes=[f"run.dir {target}: the run {how}; starting it again"] + notes)
    parent_path = found.parent["checkpoint"]
    return Plan("resume", cfg, found, parent_path, state, parent=found.parent,
                data=datasets.identity_text(found.data) or None,
                notes=[f"run.dir {target}: the branch {how}; starting it again from "
                       f"{parent_path}"] + notes)


def _from_path(args, cmd, target, found, ckpts):
    """--resume PATH: continue this run from PATH (its newest checkpoint), or branch off
    from it into `target`, another run directory."""
    path = checkpoint.resolved(args.resume)   # last.npz: the checkpoint it names
    state = run_dir.checked(path)
    home = run_dir.home_of(path)
    if home is not None and os.path.realpath(home) == os.path.realpath(target):
        path = own_checkpoint(path, state, home)
        newer = [p for pos, p in ckpts if pos > (state["epoch"], state["batch"])]
        if newer:
            raise UserError(
                f"{target} holds a newer checkpoint than {path}: {newer[-1]}; continue from "
                "the newest with --resume, or branch off from this one into a new run "
                f"directory with --resume {path} --set 'run.dir=\"...\"'")
        found = found or legacy_record(target, state)
        cfg, notes = continued_config(args, found, state, path, target, restart=False)
        return Plan("resume", cfg, found, path, state, (), found.parent,
                    datasets.identity_text(found.data) or None, notes)
    parent = {"checkpoint": os.path.abspath(path), "digest": state["digest"]}
    if ckpts:
        raise UserError(f"run.dir {target} already holds a run (checkpoint {ckpts[-1][1]}); "
                        "continue it with --resume, or branch into another run.dir")
    notes = []
    if found is not None:
        check_nothing_lost(target, found, state if found.parent == parent else None)
    if found is not None and found.parent != parent:
        notes.append(f"run.dir {target}: an earlier run there ended before its first "
                     "checkpoint; branching afresh in its place")
    elif found is not None:
        notes.append(f"run.dir {target}: the branch ended before its first checkpoint; "
                     f"starting it again from {path}")
    else:
        check_no_stray_files(target, restart=False)
    cfg, more = resumed_config(state["config"], path, args.config, args.set, target)
    return Plan("resume", cfg, found, path, state, (), parent, state["data"], notes + more)


def own_checkpoint(path, state, home):
    """PATH, a loaded checkpoint `state` in the checkpoints folder of the run in `home`,
    as that run's checkpoint of its position: best.npz or a copied last.npz stands for it
    only where it is a copy of it (the same digest), never another run's copied in."""
    if checkpoint.position_of(path) is not None:
        return path
    named = checkpoint.path_for(home, state["epoch"], state["batch"])
    same = run_dir.verified(named)
    if same is None or same["digest"] != state["digest"]:
        raise UserError(f"--resume {path}: it is not a copy of this run's checkpoint of its "
                        f"position ({named} is missing or differs); continue the run with "
                        "--resume, or branch from it into another run.dir")
    return named


def continued_config(args, found, state, path, target, restart):
    """(cfg, notes) of a run that continues: for a restart the recorded config (the
    command line changes nothing, and a note says so where it differs); else the config
    of the checkpoint `state` (the recorded one before the first checkpoint) with the
    command line's --config and --set on top."""
    saved_toml = state["config"] if state is not None else found.config
    if not restart:
        return resumed_config(saved_toml, path or record.path(target), args.config,
                              args.set, target)
    cfg = with_dir(config.from_toml(found.config, f"run record {record.path(target)}"),
                   target)
    try:
        asked = with_dir(config.load(args.config, args.set, base=cfg), target)
    except UserError:
        asked = None
    differ = None if asked is None else [k for k, v in config.flat(asked).items()
                                         if v != config.flat(cfg)[k]]
    if differ is None or differ:
        what = "are not valid for it" if differ is None else \
            "set " + ", ".join(f"{k} = {config.toml_value(config.flat(asked)[k])}"
                               for k in differ[:3]) + (", ..." if len(differ) > 3 else "")
        return cfg, [f"restart: the run continues with its recorded config; the command "
                     f"line's config changes ({what}) are not applied on a restart"]
    return cfg, []


def with_dir(cfg, target):
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=target))


def checked(cfg):
    """The command line's config with its ranges checked (a run that starts afresh)."""
    config.validate(cfg)
    return cfg


def resumed_config(saved_toml, path, config_file, overrides, target):
    """The config of a resumed run: the checkpoint's own (`saved_toml`, from `path`), with
    the command line's --config and --set applied on top and checked against it, in the
    run directory `target`. Returns (cfg, notes); changes to the network, the global
    batch or the optimizer are refused."""
    saved = config.from_toml(saved_toml, f"checkpoint {path}")
    cfg = with_dir(config.load(config_file, overrides, base=saved), target)
    old, new = config.flat(saved), config.flat(cfg)
    changed = [k for k in old if old[k] != new[k] and k != "run.dir"]
    for key in changed:
        if key in FIXED_ON_RESUME:
            what = ("the metric its best checkpoint, early stopping and plateau schedule "
                    "watch (start a new run to change it)" if key == "run.best_metric" else
                    "network, global batch and optimizer (start a new run to change it, "
                    "with model.init for the weights)")
            raise UserError(f"--resume: {key} was {config.toml_value(old[key])} in {path}, "
                            f"now {config.toml_value(new[key])}; a resumed run keeps its "
                            + what)
    notes = []
    for k in changed:
        why = {"model.init": " (ignored: the checkpoint has the weights)"}.get(
            k, " (the data order and validation split change with it)" if k in run_dir.SPLIT_KEYS
            else "")
        notes.append(f"resume: {k} changed from {config.toml_value(old[k])} to "
                     f"{config.toml_value(new[k])}{why}")
    return cfg, notes


def legacy_record(target, state):
    """The record of a run made before dpbp kept one, built once from its newest
    checkpoint `state` (and its best.npz, where that verifies)."""
    built = record.Record.new(state["config"], datasets.identity_arrays(state["data"] or ""))
    best = run_dir.verified(checkpoint.best_path(target))
    if best is not None and best["batch"] == 0:
        built = dataclasses.replace(built, best={"epoch": best["epoch"],
                                                 "digest": best["digest"]})
    return built.with_world_size(state["world_size"])


def check_nothing_lost(target, found, parent_state):
    """A run with a record and no checkpoint is started again only where that loses
    nothing: its metrics reach no further than its first epoch (a crash can come between
    an epoch's metrics line and its checkpoint), beyond the epochs of the parent
    checkpoint a branch starts from, and it has not finished."""
    epochs = [epoch for epoch, _ in run_dir.read_metrics(target)]
    first = 1 + (parent_state["epoch"] if parent_state else 0)
    if any(epoch > first for epoch in epochs) or found.state in record.FINISHED:
        raise UserError(f"run.dir {target} holds a run ({record.describe_state(found)}) with "
                        f"metrics of {max(epochs, default=0)} epochs but no checkpoint: "
                        "nothing to continue from, and starting afresh would lose them; "
                        "choose another run.dir, or move its files away")


def parent_checkpoint(parent):
    """The loaded checkpoint a branch branched from, refused where it changed since."""
    state = run_dir.checked(parent["checkpoint"])
    if state["digest"] != parent["digest"]:
        raise UserError(f"the checkpoint this branch branched from, {parent['checkpoint']}, "
                        "changed since (another SHA-256 digest); branch anew from a "
                        "checkpoint with --resume PATH")
    return state


def check_no_stray_files(target, restart):
    """A new run may start in `target`: none of the files dpbp writes is there without a
    run record (a file of the user's, or of a run from before records, is never
    overwritten). The supervisor's restarts.jsonl is the run's own on a restart."""
    allowed = ("restarts.jsonl",) if restart else ()
    stray = [p for p in run_dir.written_files(target) if os.path.basename(p) not in allowed]
    if stray:
        raise UserError(f"run.dir {target} holds {stray[0]}, a file that dpbp writes, but no "
                        "run record (run.json): it is not a dpbp run that can be continued. "
                        "Choose another run.dir, or move those files away")


def check_data(plan, data_id, allow_change, restart):
    """The data a run found (`data_id`, datasets.identity) against what it must be
    (plan.data). Returns the record's data change ({"step", "from", "to"} for the
    caller to fill in the step) where --allow-data-change allows one, else None; a
    UserError naming the first array that differs, with both checksums."""
    if plan.data is None or plan.data == data_id:
        return None
    what = datasets.identity_difference(plan.data, data_id)
    where = plan.checkpoint or record.path(plan.cfg.run.dir)
    if restart:
        raise UserError(f"the data differ from what the run recorded ({what}): the files "
                        "at data.path changed under the run; a restart continues only "
                        "with the data the run trains on")
    if not allow_change:
        raise UserError(f"the data differ from what {where} was trained on ({what}). To "
                        "train on with these data, add --allow-data-change (recorded in "
                        "run.json and in the next epoch's metrics)")
    return {"from": plan.data, "to": data_id}

