"""The run directory, directly: its lock (who holds it, filesystems without locks), one
run per checkpoint folder, a full disk, durable metrics, and the best checkpoint settled
on resume; and, through the commands, every file written atomically and durably."""

import errno
import fcntl
import os
import shutil

import numpy as np
import pytest

from dpbp.errors import UserError
from dpbp.nn.optim import SGD
from dpbp.service import checkpoint, config, resume, run_dir
from dpbp.service.checkpoint import Position
from tests import fsync_spy
from tests.conftest import ROOT, mlp, run_module, tiny_run


def test_lock_names_its_holder_and_refuses_a_second_taker(tmp_path):
    lock, notes = run_dir._lock(str(tmp_path))
    assert notes == [] and (tmp_path / ".lock").read_text() == ""   # signed once it starts
    run_dir.sign(lock)
    assert (tmp_path / ".lock").read_text().startswith("host ")
    with open(tmp_path / ".lock", "a+") as other:   # another process's open file
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with pytest.raises(UserError, match="is in use by another dpbp run"):
        run_dir._lock(str(tmp_path))                # another run, as it takes the lock
    lock.close()


def test_filesystem_without_locks_runs_with_a_note(tmp_path, monkeypatch):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_dir.fcntl, "flock", no_locks)
    lock, notes = run_dir._lock(str(tmp_path))
    assert len(notes) == 1 and "cannot lock it (No locks available)" in notes[0]
    lock.close()


def test_a_held_lock_is_refused_with_its_holder(tmp_path, monkeypatch):
    (tmp_path / ".lock").write_text("host h1, pid 7\n")

    def held(fd, op):
        raise BlockingIOError(errno.EWOULDBLOCK, "Resource temporarily unavailable")

    monkeypatch.setattr(run_dir.fcntl, "flock", held)
    with pytest.raises(UserError, match=r"in use by another dpbp run \(host h1, pid 7\)"):
        run_dir._lock(str(tmp_path))


# ----------------------------------------------------------------------------- prepare

def new_cfg(run_dir):
    return config.load(None, [f'run.dir="{run_dir}"'])


def started(cfg):
    """rank 0's hold on cfg's run directory, with a new run written there."""
    files = run_dir.RunFiles.claim(str(cfg.run.dir))
    files.prepare(resume.Plan("start", cfg, None), Position(), "", 1)
    return files


def test_a_full_disk_while_creating_the_run_directory_leaves_nothing(tmp_path, monkeypatch):
    real_open = open

    def no_space(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_space)
    with pytest.raises(UserError) as refused:
        started(new_cfg(tmp_path / "deep" / "run"))
    assert str(refused.value) == (f"run.dir {tmp_path / 'deep' / 'run'}: cannot create it (No "
                                  "space left on device)")
    assert list(tmp_path.iterdir()) == []   # no folder it made: run, its parent, checkpoints


def test_metrics_lines_are_durable_before_their_checkpoint(tmp_path, monkeypatch):
    cfg = new_cfg(tmp_path / "run")
    files = started(cfg)
    model = mlp([2, 2], "relu", "float32")
    synced = []
    real_fsync = run_dir.os.fsync
    monkeypatch.setattr(run_dir.os, "fsync", lambda fd: synced.append(
        os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    files.save(cfg, model, SGD(model.params, model.grads, 0.1), Position(1, 0, 3), 1,
               metrics={"epoch": 1})
    assert synced[0] == str(tmp_path / "run" / "metrics.jsonl")   # before the checkpoint's
    files.release()
    assert not (tmp_path / "run" / ".lock").exists()   # a finished run keeps no lock file


def test_a_checkpoints_folder_linked_into_another_run_is_refused(tmp_path):
    other = tmp_path / "other"
    started(new_cfg(other)).release()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "checkpoints").symlink_to(other / "checkpoints")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(UserError, match=f"its checkpoints folder links to {other}/checkpoints, "
                                        f"the run in {other}; one run per checkpoint folder"):
        run_dir.RunFiles.claim(str(mine))
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_a_checkpoints_folder_linked_elsewhere_is_locked_too(tmp_path):
    """A link to another disk is fine, but two runs linked to one folder are refused."""
    disk = tmp_path / "disk"
    disk.mkdir()
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "checkpoints").symlink_to(disk)
    files = started(new_cfg(tmp_path / "a"))
    assert (disk / ".lock").read_text().startswith("host ")
    with pytest.raises(UserError, match=f"the checkpoints folder {disk} is in use by another "
                                        r"dpbp run \(host "):
        run_dir.RunFiles.claim(str(tmp_path / "b"))
    assert (tmp_path / "b" / ".lock").exists() is False   # the refused one leaves nothing
    files.release()


def test_a_lock_file_removed_by_its_holder_is_taken_anew(tmp_path, monkeypatch):
    """The lock file goes with the run that held it; a process that opened the old one
    just before takes the new one, so two runs never both hold a lock."""
    first = run_dir.RunFiles.claim(str(tmp_path))
    real_open, swapped = open, []

    def opened_then_released(path, *args, **kwargs):
        f = real_open(path, *args, **kwargs)
        if str(path).endswith(".lock") and not swapped:
            swapped.append(path)
            first.release()          # the holder ends between our open and our flock
            second.append(run_dir.RunFiles.claim(str(tmp_path)))   # and a third takes it
        return f

    second = []
    monkeypatch.setattr("builtins.open", opened_then_released)
    with pytest.raises(UserError, match="in use by another dpbp run"):
        run_dir.RunFiles.claim(str(tmp_path))
    second[0].release()


def saved(run_dir_path, epoch, name=None):
    """A checkpoint of the end of `epoch` in run_dir_path (as best.npz if name says so)."""
    model = mlp([3, 2], "relu", np.float32)
    model.params[...] = epoch   # weights that tell the epochs apart
    path = checkpoint.best_path(run_dir_path) if name == "best" else \
        checkpoint.path_for(run_dir_path, epoch)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    checkpoint.save(path, model, SGD(model.params, model.grads, 0.1), Position(epoch, 0, epoch),
                    1, config.to_toml(config.Config()))
    return path


def best_epoch_on_disk(folder):
    path = checkpoint.best_path(folder)
    return checkpoint.load(path)["epoch"] if os.path.exists(path) else None


def test_resume_settles_the_best_checkpoint(tmp_path):
    """--resume with run.keep_best makes best.npz hold the best epoch of the history it
    continues: a crash between an epoch's checkpoint and its copy as best.npz, a best.npz
    of an epoch trained again, a branch that starts with its parent's best, and a best
    epoch whose checkpoint is gone."""
    here = str(tmp_path / "run")
    for epoch in (1, 2, 3):
        saved(here, epoch)
    saved(here, 1, "best")                    # crashed before copying epoch 3 as the best
    recorded = {"epoch": 1, "digest": checkpoint.load(checkpoint.best_path(here))["digest"]}
    best, notes = run_dir.settle_best(here, here, [0.5, 0.6, 0.4], recorded)
    assert notes == [] and best_epoch_on_disk(here) == 3 and best["epoch"] == 3
    assert run_dir.settle_best(here, here, [0.5, 0.6, 0.4], best) == (best, [])   # right
    saved(here, 4, "best")                    # epoch 4 is trained again after resuming at 3
    best, _ = run_dir.settle_best(here, here, [0.5, 0.6, 0.7], {
        "epoch": 4, "digest": checkpoint.load(checkpoint.best_path(here))["digest"]})
    assert best_epoch_on_disk(here) == 1 and best["epoch"] == 1
    branch = str(tmp_path / "branch")
    os.makedirs(os.path.join(branch, "checkpoints"))   # as claim makes it
    best, _ = run_dir.settle_best(branch, here, [0.5, 0.6, 0.7], None)   # the parent's
    assert best_epoch_on_disk(branch) == 1 and best["epoch"] == 1
    os.unlink(os.path.join(here, "checkpoints", "best.npz"))
    os.unlink(os.path.join(here, "checkpoints", "epoch-0002.npz"))
    best, notes = run_dir.settle_best(here, here, [0.9, 0.6, 0.7], None)   # pruned, none
    assert len(notes) == 1 and "no checkpoint of epoch 2 (val_loss 0.6" in notes[0]
    assert best_epoch_on_disk(here) is None and best is None
    assert run_dir.settle_best(here, here, [], None) == (None, [])


def test_a_best_checkpoint_that_is_not_the_runs_own_is_set_aside(tmp_path):
    """Another run's best.npz of the same epoch, copied in, is not this run's best: set
    aside as best.npz.foreign with a note, and rebuilt from this run's own checkpoint of
    that epoch; one that does not verify is set aside as .damaged."""
    here, there = str(tmp_path / "run"), str(tmp_path / "other")
    for epoch in (1, 2):
        saved(here, epoch)
    own = {"epoch": 1, "digest": checkpoint.load(checkpoint.path_for(here, 1))["digest"]}
    model = mlp([3, 2], "relu", np.float32)
    model.params[...] = 7   # another run's weights, at the same epoch
    foreign = checkpoint.best_path(there)
    os.makedirs(os.path.dirname(foreign))
    checkpoint.save(foreign, model, SGD(model.params, model.grads, 0.1), Position(1, 0, 1), 1,
                    config.to_toml(config.Config()))
    shutil.copy(foreign, checkpoint.best_path(here))
    best, notes = run_dir.settle_best(here, here, [0.5, 0.6], own)
    assert best == own and len(notes) == 1 and "is not this run's" in notes[0]
    assert os.path.exists(checkpoint.best_path(here) + ".foreign")
    assert checkpoint.load(checkpoint.best_path(here))["digest"] == own["digest"]
    with open(checkpoint.best_path(here), "r+b") as f:   # a flipped byte
        f.seek(200)
        f.write(b"\xff")
    best, notes = run_dir.settle_best(here, here, [0.5, 0.6], own)
    assert best == own and "does not verify" in notes[0]
    assert os.path.exists(checkpoint.best_path(here) + ".damaged")


def test_last_npz_is_a_copy_where_the_filesystem_has_no_links(tmp_path, monkeypatch):
    here = str(tmp_path / "run")
    first, second = saved(here, 1), saved(here, 2)
    last = checkpoint.last_path(here)

    def no_links(*args):
        raise OSError(errno.EPERM, "Operation not permitted")
    with monkeypatch.context() as m:
        m.setattr(os, "symlink", no_links)
        run_dir.link_last(here, first)
    assert not os.path.islink(last) and open(last, "rb").read() == open(first, "rb").read()
    assert checkpoint.resolved(last) == last
    run_dir.link_last(here, second)   # links again where it can, over the copy
    assert os.readlink(last) == "epoch-0002.npz" and checkpoint.resolved(last) == second
    run_dir.link_last(here, None)
    assert not os.path.lexists(last)
    assert sorted(os.listdir(os.path.dirname(last))) == ["epoch-0001.npz", "epoch-0002.npz"]




# ----------------------------------------------------------------------------- the run's data

SAVED = "x (10, 3) float64 crc 0000000a; y (10,) int64 crc 0000000b"


@pytest.mark.parametrize("now,first", [
    (SAVED.replace("0b", "0c"), "y: (10,) int64 crc 0000000c now, (10,) int64 crc 0000000b then"),
    (SAVED + "; x_val (2, 3) float64 crc 00000001",
     "x_val: (2, 3) float64 crc 00000001 now, absent then"),
])
def test_data_that_differ_from_the_checkpoints_are_named_and_refused(now, first):
    """The first array that differs (or the count), and the way on: name the data on the
    command line; then it is a note. The same data, or a checkpoint that recorded none
    (dpbp 0.1), pass."""
    assert run_dir.check_data(SAVED, SAVED, set(), "c.npz") == []
    assert run_dir.check_data(None, now, set(), "c.npz") == []
    for named in (set(), {"train.lr", "model.init"}):
        with pytest.raises(UserError) as refused:
            run_dir.check_data(SAVED, now, named, "c.npz")
        assert str(refused.value).startswith(f"the data differ from what c.npz was trained "
                                             f"on ({first}): the files at data.path were")
    for key in run_dir.SPLIT_KEYS:
        assert run_dir.check_data(SAVED, now, {key}, "c.npz") == [
            f"the data differ from what c.npz was trained on ({first}), as the command "
            "line asks"]


@pytest.mark.parametrize("line", ['{not json', '{"loss": 1.0}', '[1, 2]', '{"epoch": "one"}'])
def test_metrics_lines_that_are_not_an_epochs_record_are_refused(tmp_path, line):
    """A line that is not JSON, or not an object with an epoch, cannot be a record of an
    epoch: resuming over it would lose or mix epochs, so it is refused, naming the file."""
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "val_loss": 0.5}\n' + line + "\n")
    with pytest.raises(UserError, match="metrics.jsonl is malformed"):
        run_dir.read_metrics(str(tmp_path))


# ----------------------------------------------------------------------------- durability

# Every file the commands write atomically (files.write_atomic), relative to the run
# directory (predict's output apart): a new one goes on this list.
ATOMIC = ["run.json", "config.toml", "metrics.jsonl", "steps.jsonl", "checkpoints/epoch-0001.npz",
          "checkpoints/epoch-0002.npz", "checkpoints/epoch-0003.npz", "checkpoints/best.npz"]


def spied(tmp_path, module, args):
    """python -m MODULE ARGS with its fsyncs and renames recorded (tests/fsync_spy.py)."""
    env = {"DPBP_FSYNC_LOG": str(tmp_path / "fsync.log"), "PYTHONPATH": str(ROOT)}
    r = run_module("tests.fsync_spy", [module, *args], env=env)
    assert r.returncode == 0, r.stderr


def test_every_file_is_written_durably(tmp_path, tiny_npz):
    """A run of two epochs (the best checkpoint kept, every step logged), resumed for a
    third, and a prediction: each file was synced, renamed into place, its folder synced,
    every time it was written; each epoch's metrics line was synced before its
    checkpoint was renamed into place. A crash at any moment leaves the old file or the
    new one, and never a checkpoint whose metrics line is lost."""
    run = tmp_path / "run"
    args = tiny_run(tiny_npz, run, "--set", "run.keep_best=true", "--set", "run.log_every_steps=1")
    spied(tmp_path, "dpbp.train", args + ["--set", "train.epochs=2"])
    spied(tmp_path, "dpbp.train", args + ["--resume"])
    np.save(tmp_path / "x.npy", np.zeros((3, 5)))
    spied(tmp_path, "dpbp.predict", ["--checkpoint", str(run / "checkpoints" / "best.npz"),
                                     "--input", str(tmp_path / "x.npy"),
                                     "--output", str(tmp_path / "y.npy")])
    events = fsync_spy.read(tmp_path / "fsync.log")
    for name in ATOMIC:
        fsync_spy.check_durable(events, run / name)
    fsync_spy.check_durable(events, tmp_path / "y.npy")
    lines = (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    for epoch in (1, 2, 3):
        i = fsync_spy.check_durable(events, run / "checkpoints" / f"epoch-{epoch:04d}.npz")[0]
        assert fsync_spy.synced_before(events, run / "metrics.jsonl",
                                       len(b"".join(lines[:epoch])), i), epoch
