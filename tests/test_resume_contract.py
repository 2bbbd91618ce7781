"""The run record and the resume contract (docs/operations.md#the-resume-contract), cell by
cell where one machine reaches them: how each start (no flag, --resume, --resume auto,
--resume PATH, a restart) meets each state of the run directory (no run, a record but no
checkpoint, checkpoints, finished), and the files that are not the run's.

Most runs here go through dpbp.train's own main() in this process, as a world of one
(mpi.init stubbed to no MPI, which is what a process without a launcher gets): the same
code as `python -m dpbp.train`, in a twentieth of the time. Runs that must be killed go
through a subprocess (tests/faults.py)."""

import fcntl
import json
import os
import shutil

import numpy as np
import pytest

from dpbp.service import checkpoint, record
from tests.conftest import ROOT, metrics, run_module, run_train, snapshot, tiny_run


def state(run_dir):
    return json.loads((run_dir / "run.json").read_text())


def refused(result, message):
    code, _, err = result
    lines = [line for line in err.splitlines() if line.startswith("dpbp")]
    assert code == 2 and len(lines) == 1 and message in lines[0], err


def test_the_record_is_written_and_checked(tmp_path, tiny_npz, train):
    run_dir = tmp_path / "run"
    code, out, _ = train(tiny_run(tiny_npz, run_dir, "--set", "run.keep_best=true"))
    assert code == 0 and not (run_dir / ".lock").exists()   # a finished run keeps no lock
    rec = state(run_dir)
    assert rec["schema"] == record.SCHEMA and rec["state"] == "completed"
    assert rec["world_sizes"] == [1] and rec["parent"] is None
    assert rec["data"]["x"] == {"shape": [17, 5], "dtype": "float32",
                                "crc32": rec["data"]["x"]["crc32"]}
    best = checkpoint.load(checkpoint.best_path(run_dir))
    assert rec["best"] == {"epoch": best["epoch"], "digest": best["digest"]}
    text = (run_dir / "run.json").read_text()
    (run_dir / "run.json").write_text(text.replace('"completed"', '"running"'))
    refused(train(tiny_run(tiny_npz, run_dir, "--resume")), "run.json is damaged: its content "
                                                            "does not match its SHA-256 digest")
    (run_dir / "run.json").unlink()   # as a run of a dpbp from before the record left it
    code, out, _ = train(tiny_run(tiny_npz, run_dir, "--set", "run.keep_best=true", "--set",
                                  "train.epochs=4", "--resume"))
    assert code == 0 and "epoch 4/4" in out
    rebuilt = state(run_dir)
    assert rebuilt["state"] == "completed" and rebuilt["data"] == rec["data"]
    assert rebuilt["run_id"] != rec["run_id"] and rebuilt["best"]["epoch"] >= 1


def test_resume_auto_starts_continues_and_finishes(tmp_path, tiny_npz, train):
    """#8: one command for a first start and every later one; finished means exit 0."""
    run_dir = tmp_path / "run"
    before = set(os.listdir(tmp_path))
    refused(train(tiny_run(tiny_npz, run_dir, "--resume")), f"--resume: no run in {run_dir} "
                                                            "to resume")
    assert set(os.listdir(tmp_path)) == before   # nothing made
    code, out, _ = train(tiny_run(tiny_npz, run_dir, "--set", "train.epochs=2", "--resume",
                                  "auto"))
    assert code == 0 and "epoch 2/2" in out and "resume: from" not in out
    code, out, _ = train(tiny_run(tiny_npz, run_dir, "--resume", "auto"))   # epochs=3
    assert code == 0 and "resume: from" in out and "epoch 3/3" in out
    assert [m["epoch"] for m in metrics(run_dir)] == [1, 2, 3]
    code, out, _ = train(tiny_run(tiny_npz, run_dir, "--resume", "auto"))
    assert code == 0 and "nothing to do" in out and state(run_dir)["state"] == "completed"
    kept = snapshot(run_dir)
    refused(train(tiny_run(tiny_npz, run_dir)), f"run.dir {run_dir} already holds a run")
    assert snapshot(run_dir) == kept


def test_a_restart_continues_with_the_recorded_config(tmp_path, tiny_npz, train):
    """A restart (--restart, as dpbp.launch passes it, or a Slurm requeue) continues with
    the recorded config: the re-passed command line changes nothing, and says so; a
    manual --resume applies it. Changed data stop a restart even with
    --allow-data-change."""
    run_dir = tmp_path / "run"
    assert train(tiny_run(tiny_npz, run_dir, "--set", "train.epochs=2"))[0] == 0
    code, out, _ = train(tiny_run(tiny_npz, run_dir, "--set", "train.lr=0.5", "--resume",
                                  "auto", "--restart"))   # epochs=3 and lr=0.5: not applied
    assert code == 0 and "nothing to do" in out
    assert "config changes (set train.epochs = 3, train.lr = 0.5) are not applied" in out
    code, out, _ = train(tiny_run(tiny_npz, run_dir, "--set", "train.lr=0.5", "--resume"))
    assert code == 0 and [m["lr"] for m in metrics(run_dir)] == [0.05, 0.05, 0.5]
    monkey = tmp_path / "other.npz"
    with np.load(tiny_npz) as f:
        np.savez(monkey, **dict({k: f[k] for k in f.files}, y=(f["y"] + 1) % 3))
    shutil.copy(monkey, tiny_npz)   # relabelled under the run
    kept = snapshot(run_dir)
    refused(train(tiny_run(tiny_npz, run_dir, "--set", "train.epochs=4", "--resume", "auto",
                           "--restart", "--allow-data-change")),
            "the data differ from what the run recorded (y: (17,) int64 crc ")
    assert snapshot(run_dir) == kept


def test_a_run_killed_before_its_first_checkpoint_is_continued(tmp_path, tiny_npz, train):
    """#4: a run, or a branch, killed before its first checkpoint is continued by the same
    command or by --resume, with nothing left over."""
    run_dir, branch = tmp_path / "run", tmp_path / "branch"
    assert train(tiny_run(tiny_npz, run_dir))[0] == 0
    parent = run_dir / "checkpoints" / "epoch-0001.npz"
    for target, args, step in ((run_dir / "new", [], 2), (branch, ["--resume", parent], 7)):
        r = run_train(tiny_run(tiny_npz, target, *args), env={"DPBP_FAULT": f"kill:0:{step}"})
        assert r.returncode == -9 and state(target)["state"] == "running", r.stderr
        assert checkpoint.list_all(target) == []
    code, out, _ = train(tiny_run(tiny_npz, run_dir / "new", "--resume"))
    assert code == 0 and "the run ended before its first checkpoint; starting it again" in out
    assert [m["epoch"] for m in metrics(run_dir / "new")] == [1, 2, 3]
    code, out, _ = train(tiny_run(tiny_npz, branch, "--resume", parent))   # the same command
    assert code == 0 and f"the branch ended before its first checkpoint; starting it again " \
        f"from {parent}" in out, out
    assert [m["epoch"] for m in metrics(branch)] == [1, 2, 3]
    rec = state(branch)
    assert rec["parent"] == {"checkpoint": str(parent),
                             "digest": checkpoint.load(parent)["digest"]}
    refused(train(tiny_run(tiny_npz, branch, "--resume", parent)),   # now it has its own
            f"run.dir {branch} already holds a run")
    for name in ("model.0.weight", "model.2.bias"):   # the same weights as its parent's run
        assert checkpoint.load(branch / "checkpoints" / "epoch-0003.npz")[name].tobytes() == \
            checkpoint.load(run_dir / "checkpoints" / "epoch-0003.npz")[name].tobytes()


def test_a_run_extended_past_early_stopping_marks_only_its_last_stop(tmp_path, tiny_npz, train):
    """#9: the stop mark moves to the epoch where the extended run finally stops."""
    run_dir = tmp_path / "run"
    code, out, _ = train(tiny_run(tiny_npz, run_dir, "--set", "train.epochs=9", "--set",
                                  "train.early_stopping_patience=1"))
    assert code == 0 and state(run_dir)["state"] == "early_stopped"
    stopped = [m["epoch"] for m in metrics(run_dir) if "stopped" in m]
    code, out, _ = train(tiny_run(tiny_npz, run_dir, "--set", "train.epochs=9", "--set",
                                  "train.early_stopping_patience=3", "--resume"))
    assert code == 0 and state(run_dir)["state"] == "early_stopped"
    later = [m["epoch"] for m in metrics(run_dir) if "stopped" in m]
    assert len(stopped) == len(later) == 1 and later[0] > stopped[0]


def test_files_that_are_not_the_runs_are_never_touched(tmp_path, tiny_npz, train):
    """#5: a file dpbp writes, found without a record, is refused and kept; other files
    are left alone; #6: a checkpoints folder linked to a finished run is refused; and the
    root folder is no run directory."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "steps.jsonl").write_text("my own log\n")
    (mine / "train.log").write_text("mine too\n")
    refused(train(tiny_run(tiny_npz, mine, "--set", "run.log_every_steps=0")),
            f"run.dir {mine} holds {mine / 'steps.jsonl'}, a file that dpbp writes, but no "
            "run record")
    assert (mine / "steps.jsonl").read_text() == "my own log\n"
    (mine / "steps.jsonl").unlink()
    assert train(tiny_run(tiny_npz, mine))[0] == 0
    assert (mine / "train.log").read_text() == "mine too\n"
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "checkpoints").symlink_to(mine / "checkpoints")
    for args in ([], ["--resume"], ["--resume", "auto"]):
        refused(train(tiny_run(tiny_npz, linked, *args)),
                f"its checkpoints folder links to {mine / 'checkpoints'}, the run in {mine}")
    assert sorted(os.listdir(linked)) == ["checkpoints"]
    refused(train(tiny_run(tiny_npz, "/")), "run.dir / is the root folder")


def test_a_second_copy_of_a_running_command_is_told_it_runs(tmp_path, tiny_npz, train):
    """#7: the lock comes before any look at the run's files."""
    run_dir = tmp_path / "run"
    assert train(tiny_run(tiny_npz, run_dir))[0] == 0
    with open(run_dir / ".lock", "a+") as held:   # as the first command holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for args in ([], ["--resume"], ["--resume", "auto"]):
            refused(train(tiny_run(tiny_npz, run_dir, *args)),
                    f"run.dir {run_dir} is in use by another dpbp run")


def test_a_foreign_best_checkpoint_is_set_aside_on_resume(tmp_path, tiny_npz, train):
    """#3: another run's best.npz of the same epoch, copied in, is set aside and rebuilt
    from the run's own checkpoint of that epoch."""
    a, b = tmp_path / "a", tmp_path / "b"
    for run_dir, seed in ((a, 0), (b, 1)):
        assert train(tiny_run(tiny_npz, run_dir, "--set", "run.keep_best=true", "--set",
                              f"run.seed={seed}", "--set", "train.epochs=1"))[0] == 0
    shutil.copy(checkpoint.best_path(b), checkpoint.best_path(a))
    code, out, _ = train(tiny_run(tiny_npz, a, "--set", "run.keep_best=true", "--set",
                                  "train.epochs=2", "--resume"))
    assert code == 0 and "is not this run's (the run record names another); set aside " \
        "as best.npz.foreign" in out
    assert os.path.exists(checkpoint.best_path(a) + ".foreign")
    best = checkpoint.load(checkpoint.best_path(a))
    assert state(a)["best"] == {"epoch": best["epoch"], "digest": best["digest"]}
    assert best["digest"] != checkpoint.load(checkpoint.best_path(b))["digest"]


@pytest.mark.parametrize("n", [2])
def test_a_supervised_restart_never_trains_on_other_data(tmp_path, tiny_npz, n):
    """#1 under dpbp.launch: the data are replaced and a rank killed; the restart (which
    re-passes the user's --set data.path) stops with exit 2, naming the array, and is not
    retried."""
    live, other = tmp_path / "live.npz", tmp_path / "other.npz"
    shutil.copy(tiny_npz, live)
    with np.load(tiny_npz) as f:
        np.savez(other, **dict({k: f[k] for k in f.files}, y=(f["y"] + 1) % 3))
    run_dir = tmp_path / "run"
    env = {"DPBP_FAULT": "swapkill:1:7", "DPBP_FAULT_SWAP": f"{other}|{live}",
           "DPBP_FAULT_ONCE": str(tmp_path), "PYTHONPATH": str(ROOT)}
    r = run_module("dpbp.launch", ["-n", str(n), "--module", "tests.faults", "--",
                                   *tiny_run(live, run_dir, "--set",
                                             "train.checkpoint_every_steps=2")], env=env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stdout.count("dpbp.launch: restart") == 1
    assert "the data differ from what the run recorded (y: (17,) int64 crc " in r.stderr
    assert "not restarting" in r.stderr
    assert state(run_dir)["state"] == "failed"
    assert "the job ended with exit 9" in state(run_dir)["cause"]


def test_last_npz_names_the_newest_checkpoint(tmp_path, tiny_npz, train, in_process,
                                              monkeypatch):
    """checkpoints/last.npz: a relative link to the newest checkpoint, never pruned and
    never listed as an epoch checkpoint; --resume PATH with it continues its own run (a
    branch from it names the checkpoint itself as its parent); evaluate and predict take
    it; a start makes it the run's own again."""
    import dpbp.evaluate
    import dpbp.predict
    run_dir, branch = tmp_path / "run", tmp_path / "branch"
    last = run_dir / "checkpoints" / "last.npz"
    assert train(tiny_run(tiny_npz, run_dir, "--set", "train.epochs=2", "--set",
                          "run.keep_checkpoints=1"))[0] == 0
    assert os.readlink(last) == "epoch-0002.npz"
    assert [p for _, p in checkpoint.list_all(run_dir)] == [str(last.with_name("epoch-0002.npz"))]
    run_id = state(run_dir)["run_id"]
    code, out, _ = train(tiny_run(tiny_npz, run_dir, "--resume", last))   # epochs = 3
    assert code == 0 and f"resume: from {last.with_name('epoch-0002.npz')}" in out, out
    assert state(run_dir)["run_id"] == run_id
    assert [m["epoch"] for m in metrics(run_dir)] == [1, 2, 3]
    assert os.readlink(last) == "epoch-0003.npz"
    code, out, _ = in_process(dpbp.evaluate.main, ["--checkpoint", last, "--json"])
    assert code == 0 and json.loads(out)["loss"] == metrics(run_dir)[-1]["val_loss"]
    np.save(tmp_path / "x.npy", np.ones((2, 5)))
    assert in_process(dpbp.predict.main, ["--checkpoint", last, "--input", tmp_path / "x.npy",
                                     "--output", tmp_path / "p.npy"])[0] == 0
    assert np.load(tmp_path / "p.npy").shape == (2, 3)
    assert train(tiny_run(tiny_npz, branch, "--resume", last, "--set", "train.epochs=4"))[0] == 0
    assert state(branch)["parent"]["checkpoint"] == str(last.with_name("epoch-0003.npz"))
    os.unlink(last)   # another run's checkpoint copied in as last.npz: not this run's
    shutil.copy(branch / "checkpoints" / "epoch-0004.npz", last)
    refused(train(tiny_run(tiny_npz, run_dir, "--set", "train.epochs=5", "--resume", last)),
            f"--resume {last}: it is not a copy of this run's checkpoint of its position")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint, "save", full_disk)   # the resumed run saves nothing
    code, _, err = train(tiny_run(tiny_npz, run_dir, "--set", "train.epochs=4", "--resume"))
    assert code == 2 and "No space left on device" in err
    assert os.readlink(last) == "epoch-0003.npz"   # the checkpoint it continued from
