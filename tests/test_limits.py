"""Limits a hostile or careless user hits: data that change under a run, evaluate and
predict asked to run another network or given inputs that overflow it, config files and
values beyond bounds, optimizer states that cannot occur, a full disk. Each ends with one
line naming the real cause, and loses nothing.

The commands run in this process as a world of one (conftest.in_process); the
supervisor's side is in test_launch_supervisor.py."""

import json

import numpy as np
import pytest

import dpbp.train
from dpbp.service import checkpoint
from tests.conftest import assert_refused, run_train, tiny_run


def refused(result, message, code=2):
    """Ended with `code` and one dpbp line, which holds `message`; no traceback."""
    got, _, err = result
    lines = [line for line in err.splitlines() if line.startswith("dpbp")]
    assert got == code and len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    return lines[0]


def npy_folder(tmp_path, npz):
    """The tiny dataset (conftest.tiny_npz) as a data.source = "npy" folder."""
    folder = tmp_path / "npy"
    folder.mkdir()
    with np.load(npz) as f:
        for name in f.files:
            np.save(folder / f"{name}.npy", f[name])
    return folder


def npy_run(folder, run_dir, *extra):
    return tiny_run(folder, run_dir, "--set", 'data.source="npy"', *extra)


def after_steps(monkeypatch, steps, act):
    """Call act() once, after `steps` training steps of dpbp.train (as a user's script
    would, at some moment of the run)."""
    real, done = dpbp.train.train_step, []

    def step(*args, **kwargs):
        result = real(*args, **kwargs)
        done.append(1)
        if len(done) == steps:
            act()
        return result
    monkeypatch.setattr(dpbp.train, "train_step", step)


def rewrite_in_place(path):
    live = np.load(path, mmap_mode="r+")
    live[:] = 0
    live.flush()
    del live


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(200)


@pytest.mark.parametrize("change, words, policy", [
    (rewrite_in_place, "changed on disk", "stop"), (truncate, "was truncated", "skip")])
def test_data_changed_under_a_run_stops_it_before_anything_is_saved(
        tmp_path, tiny_npz, train, monkeypatch, change, words, policy):
    """npy inputs rewritten in place (or cut short) in epoch 2 of 3: exit 2 at the next
    read, one line naming the array, no checkpoint or metrics line after the change, the
    record `failed` with that cause, whatever train.on_nonfinite says (the unread rows
    are NaN for the step); --resume then sees the changed data and says so."""
    folder, run_dir = npy_folder(tmp_path, tiny_npz), tmp_path / "run"
    after_steps(monkeypatch, 7, lambda: change(folder / "x.npy"))   # 5 steps an epoch
    line = refused(train(npy_run(folder, run_dir, "--set", f"train.on_nonfinite={policy}")),
                   f"{folder / 'x.npy'} {words} while this command read it")
    assert [p for p, _ in checkpoint.list_all(run_dir)] == [(1, 0)]
    assert [json.loads(m)["epoch"] for m in open(run_dir / "metrics.jsonl")] == [1]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["state"] == "failed" and record["cause"] in line
    if change is rewrite_in_place:
        refused(train(npy_run(folder, run_dir, "--resume")), "the data differ from what")


def test_data_changed_under_two_ranks_stops_both_at_the_same_step(tmp_path, tiny_npz):
    """Under mpirun the ranks that find the change stop every rank together, before the
    step (an agreement): one line, exit 2, nothing saved after it, the record failed."""
    folder, run_dir = npy_folder(tmp_path, tiny_npz), tmp_path / "run"
    np.save(tmp_path / "other.npy", np.load(folder / "x.npy") * 2)
    r = run_train(npy_run(folder, run_dir), ranks=2, env={
        "DPBP_FAULT": "swap:1:7", "DPBP_FAULT_SWAP": f"{tmp_path / 'other.npy'}|{folder / 'x.npy'}"})
    assert_refused(r, f"{folder / 'x.npy'} ")   # changed, or truncated while it was copied
    assert [p for p, _ in checkpoint.list_all(run_dir)] == [(1, 0)]
    assert json.loads((run_dir / "run.json").read_text())["state"] == "failed"


def test_evaluate_and_predict_run_the_checkpoints_network(tmp_path, tiny_npz, train,
                                                         in_process):
    """Keys that would change the network (on the command line or in another
    experiment's config file) are refused; model.dtype is allowed and said; the JSON
    names the network; inputs that overflow it get one line, never NaN."""
    import dpbp.evaluate
    import dpbp.predict
    run_dir = tmp_path / "run"
    assert train(tiny_run(tiny_npz, run_dir))[0] == 0
    ck = str(run_dir / "checkpoints" / "epoch-0003.npz")
    logged = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    (tmp_path / "other.toml").write_text("[model]\nhidden = [4]\n")
    evaluate = lambda *args: in_process(dpbp.evaluate.main, ["--checkpoint", ck, *args])  # noqa
    for args, message in ((["--set", 'model.activation="tanh"'], 'model.activation = "tanh" '
                           f'would change the network of checkpoint {ck} (5 -> linear 8, '
                           'relu, linear 3; model.activation = "relu")'),
                          (["--config", tmp_path / "other.toml"], "model.hidden = [4] would"),
                          (["--set", 'train.loss="mse"'], 'train.loss = "mse" would'),
                          (["--set", "model.classes=5"], "model.classes = 5 would")):
        refused(evaluate(*args), message)
    code, out, err = evaluate("--json", "--set", "model.classes=3")   # its own width
    net = json.loads(out)["network"]
    assert code == 0 and json.loads(out)["loss"] == logged["val_loss"], err
    assert net == {"network": "5 -> linear 8, relu, linear 3",
                   "layers": [{"type": "linear", "out_features": 8}, {"type": "relu"},
                              {"type": "linear", "out_features": 3}],
                   "input_shape": [5], "dtype": "float32", "loss": "cross_entropy"}
    code, out, err = evaluate("--json", "--set", 'model.dtype="float64"')
    assert code == 0 and json.loads(out)["network"]["dtype"] == "float64", err
    assert err == f"dpbp: note: model.dtype: the float32 network of {ck} runs in float64, " \
                  "as the command line asks (its weights cast)\n"   # not "the data differ"
    assert json.loads(out)["loss"] == pytest.approx(logged["val_loss"], rel=1e-5)
    np.save(tmp_path / "x.npy", np.full((3, 5), 3e38, dtype=np.float32))   # finite float32
    refused(in_process(dpbp.predict.main, ["--checkpoint", ck, "--input", tmp_path / "x.npy",
                                           "--output", tmp_path / "p.npy"]),
            "x.npy: row 0 holds 3e+38: beyond 1.84e+19 a network's products of inputs "
            "overflow float32")
    assert not (tmp_path / "p.npy").exists()


def test_a_full_disk_after_a_checkpoint_was_saved_says_so(tmp_path, tiny_npz, train,
                                                         monkeypatch):
    """The disk fills while best.npz is copied: the line names the copy, not the
    checkpoint, which was saved and verifies."""
    import errno

    from dpbp.service import checkpoint, run_dir

    def full(source, target):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(run_dir, "copy_atomic", full)
    run = tmp_path / "run"
    saved = run / "checkpoints" / "epoch-0001.npz"
    refused(train(tiny_run(tiny_npz, run, "--set", "run.keep_best=true")),
            f"saved {saved}, but cannot copy it to {run / 'checkpoints' / 'best.npz'} (No "
            "space left on device); earlier checkpoints are intact")
    assert checkpoint.load(saved)["epoch"] == 1
