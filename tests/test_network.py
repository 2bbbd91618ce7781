"""The network as the commands build it: a layer dpbp does not ship (tests/custom_layer.py),
with non-trainable buffers and the sum over the global batch, end to end under mpirun;
checkpoints of format 2, which do not record their network, evaluated and predicted."""

import json

import numpy as np
import pytest

from dpbp.nn import model as factory
from dpbp.parallel.comm import AgreedExit
from dpbp.service import checkpoint, guard
from tests.conftest import ROOT, ckpt, metrics, model_arrays, run_module, tiny_run
from tests.custom_layer import RowCounter


def with_counter(module, args, ranks=None):
    """python -m MODULE ARGS with RowCounter after the first layer of the network."""
    return run_module("tests.custom_layer", [module, *args], ranks,
                      env={"PYTHONPATH": str(ROOT)})


def test_a_layer_with_buffers_end_to_end(tmp_path, tiny_npz):
    """RowCounter's buffers count the rows of every global batch through ctx.batch_sum:
    51 after 3 epochs of 17 rows, at 2 ranks, exact (GrainSum) or plain (PlainSum).
    They are in the checkpoint; a run resumed at 2 ranks gets them on rank 1 by the
    start-up broadcast (or the replica check, every step, stops it); evaluate rebuilds
    the network, counter and all, from the checkpoint alone."""
    exact = tiny_run(tiny_npz, tmp_path / "exact", "--set", "train.deterministic=true",
                     "--set", "run.sync_check_steps=1")
    r = with_counter("dpbp.train", exact + ["--set", "train.epochs=2"], ranks=2)
    assert r.returncode == 0, r.stderr
    r = with_counter("dpbp.train", exact + ["--resume"], ranks=2)
    assert r.returncode == 0, r.stderr
    plain = with_counter("dpbp.train", tiny_run(tiny_npz, tmp_path / "plain"), ranks=2)
    assert plain.returncode == 0, plain.stderr
    a, b = (model_arrays(tmp_path / run / "checkpoints" / "epoch-0003.npz")
            for run in ("exact", "plain"))
    for arrays in (a, b):
        assert arrays["model.1.seen"].dtype == np.int64 and arrays["model.1.seen"] == 51
        assert arrays["model.1.rows"].dtype == np.float32 and arrays["model.1.rows"] == [51]
        assert "model.3.weight" in arrays and "model.1.weight" not in arrays
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-6, err_msg=name)
    with np.load(tmp_path / "exact" / "checkpoints" / "epoch-0003.npz") as f:
        assert json.loads(str(f["network"]))[1] == {"type": "rowcounter"}
    r = with_counter("dpbp.evaluate", ["--checkpoint", str(tmp_path / "exact"), "--json"],
                     ranks=2)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["loss"] == metrics(tmp_path / "exact")[-1]["val_loss"]


def test_the_replica_check_covers_the_buffers(monkeypatch, capsys):
    monkeypatch.setitem(factory.LAYERS, "rowcounter", RowCounter)
    model = factory.Model([{"type": "linear", "out_features": 3}, {"type": "rowcounter"}],
                          (2,), np.float32)

    class Ranks:   # two ranks whose int64 buffers differ, nothing else
        rank, size = 0, 2

        def replicas_identical(self, a):
            return not np.shares_memory(a, model.buffers[np.dtype(np.int64)])

        def allreduce_min(self, value):
            return value

        def bcast_obj(self, obj, root=0):
            return obj
    with pytest.raises(AgreedExit):
        guard.check_replicas(Ranks(), model, "by step 7")
    assert "replicas diverged by step 7" in capsys.readouterr().err


def as_format_2(path, to):
    """The checkpoint at `path` as dpbp wrote it before recording the network, at `to`."""
    with np.load(path) as f:
        arrays = dict({k: f[k] for k in f.files if k not in ("network", "input_shape",
                                                              "digest")},
                      format_version=np.int64(2))
    np.savez(to, **arrays, digest=np.str_(checkpoint.digest(arrays)))
    return str(to)


def test_a_format_2_checkpoint_is_evaluated_and_applied(run, tmp_path):
    """Its network comes from its config and the shapes of its weights: the same
    figures and predictions as the format-3 file it was made from."""
    run_dir, _ = run
    old = as_format_2(ckpt(run_dir, 2), tmp_path / "epoch-0002.npz")
    figures = []
    for path in (ckpt(run_dir, 2), old):
        r = run_module("dpbp.evaluate", ["--checkpoint", path, "--json"])
        assert r.returncode == 0, r.stderr
        figures.append(dict(json.loads(r.stdout), checkpoint=None))
    assert figures[0] == figures[1] and figures[0]["accuracy"] > 0
    x = np.random.default_rng(0).normal(size=(5, 256)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = []
    for path, name in ((ckpt(run_dir, 2), "new.npy"), (old, "old.npy")):
        r = run_module("dpbp.predict", ["--checkpoint", path, "--input", str(tmp_path / "x.npy"),
                                        "--output", str(tmp_path / name)], ranks=2)
        assert r.returncode == 0, r.stderr
        out.append(np.load(tmp_path / name))
    assert out[0].tobytes() == out[1].tobytes()
