"""The same bits from whole runs and commands at any world size and BLAS thread count.

train.deterministic at 1 to 4 ranks (and not without it, so the comparison can fail),
also resumed at other world sizes; evaluate, predict and resume at 1 and 2 BLAS threads
per rank and at dpbp's own thread count at 1, 2, 3 and 4 ranks; ranks that would
compute other bits are refused. Final checkpoints are compared by the SHA-256 of their
model arrays.

On CPUs with AVX-512, OpenBLAS's kernels give the same bits at any thread count, and a
test that only compares runs would pass there even where the code depends on the
thread count. So the tests across worlds run dpbp with tests/sensitive.py, a
matrix product whose bits change with the thread count, as OpenBLAS's Haswell kernels'
do.
"""

import hashlib
import json
import signal
import sys

import numpy as np
import pytest

from tests.conftest import (
    ckpt,
    mpirun,
    run_module,
    run_train,
    run_with_timeout,
    tiny_run,
)


def sets(*pairs):
    out = []
    for pair in pairs:
        out += ["--set", pair]
    return out


def model_sha256(run_dir, name):
    """SHA-256 over the final checkpoint's model arrays, in name order."""
    h = hashlib.sha256()
    with np.load(run_dir / "checkpoints" / name, allow_pickle=False) as f:
        for key in sorted(k for k in f.files if k.startswith("model.")):
            h.update(key.encode() + f[key].tobytes())
    return h.hexdigest()


def logged(run_dir):
    """Every epoch's losses and accuracy, as logged."""
    keys = ("train_loss", "val_loss", "val_accuracy", "lr", "skipped_steps")
    return [[json.loads(line)[k] for k in keys] for line in open(run_dir / "metrics.jsonl")]


def runs(tmp_path, args, name, world_sizes, deterministic, said=None):
    """{world size: (model SHA-256, logged metrics)}; world size 1 is one process
    without mpirun. `said`, if given, collects each run's output by world size."""
    out = {}
    for n in world_sizes:
        run_dir = tmp_path / f"{'det' if deterministic else 'plain'}-{n}"
        r = run_train(args + sets(f"train.deterministic={str(deterministic).lower()}",
                                  f'run.dir="{run_dir}"', "run.keep_checkpoints=0"),
                      ranks=None if n == 1 else n, timeout=180)
        assert r.returncode == 0, r.stdout + r.stderr
        out[n] = (model_sha256(run_dir, name), logged(run_dir))
        if said is not None:
            said[n] = r.stdout
    return out


def uneven_args(npz, *more):
    return sets('data.source="npz"', f'data.path="{npz}"', "model.hidden=[16, 8]",
                "train.batch_size=32", "train.epochs=3", "train.lr=0.1", *more)


# ----------------------------------------------------------------------------- deterministic runs

def test_default_config_gives_the_same_bits_at_1_to_4_ranks(tmp_path):
    """The default config (synthetic data, its network and batch; 3 of its 10 epochs):
    the final weights hash alike and every logged loss and accuracy is equal at 1, 2, 3
    and 4 ranks; without deterministic mode 1 and 2 ranks end with other bits."""
    said = {}
    det = runs(tmp_path, sets("train.epochs=3"), "epoch-0003.npz", [1, 2, 3, 4], True, said)
    assert len({sha for sha, _ in det.values()}) == 1, det
    assert "1 BLAS thread per rank (train.deterministic)" in said[1]
    assert "in 4 grains of 32 rows, 1-2 grains per rank (deterministic)" in said[3]
    assert "note: 4 grains do not split evenly over 3 ranks" in said[3]
    assert "batch: global 128 in 4 grains of 32 rows, 1 grain per rank" in said[4]
    last = {n: out.strip().splitlines()[-1] for n, out in said.items()}
    weights = {line.split("weights sha256 ")[1][:16] for line in last.values()}
    assert len(weights) == 1 and all(line.startswith("done: 3 epochs") for line in last.values())
    assert all(metrics == det[1][1] for _, metrics in det.values())
    plain = runs(tmp_path, sets("train.epochs=3"), "epoch-0003.npz", [1, 2], False)
    assert plain[1][0] != plain[2][0]
    assert plain[1][0] != det[1][0]


ADAMW_DROPOUT = ('train.optimizer="adamw"', "train.lr=0.01", "train.weight_decay=0.01",
                 "model.dropout=0.25")


def test_adamw_with_dropout_gives_the_same_bits_at_1_to_4_ranks(tmp_path, uneven_npz):
    """Dropout's masks follow each sample, whichever rank holds it, and AdamW's update is
    elementwise: deterministic mode stays bitwise at every world size; plain does not."""
    args = uneven_args(uneven_npz, *ADAMW_DROPOUT)
    det = runs(tmp_path, args, "epoch-0003.npz", [1, 2, 3, 4], True)
    assert len({sha for sha, _ in det.values()}) == 1, det
    assert all(metrics == det[1][1] for _, metrics in det.values())
    plain = runs(tmp_path, args, "epoch-0003.npz", [1, 3], False)
    assert plain[1][0] != plain[3][0]


@pytest.mark.parametrize("more", [(), ADAMW_DROPOUT], ids=["sgd", "adamw-dropout"])
def test_resume_at_other_world_sizes_stays_bitwise(tmp_path, uneven_npz, more):
    """Stopped mid-epoch at 2 ranks (SIGTERM), resumed at 3, stopped again at an epoch's
    end, resumed at 4: the weights, the optimizer's state and every logged figure are
    bitwise those of one uninterrupted process."""
    args = uneven_args(uneven_npz, "train.deterministic=true", "run.keep_checkpoints=0", *more)
    full, run_dir = tmp_path / "full", tmp_path / "run"
    assert run_train(args + sets(f'run.dir="{full}"'), timeout=120).returncode == 0
    here = args + sets(f'run.dir="{run_dir}"')
    r = run_train(here, ranks=2, env={"DPBP_FAULT": "sigterm:1:9"}, timeout=120)  # epoch 2
    assert r.returncode == 128 + signal.SIGTERM, r.stderr
    assert "epoch-0001-batch-000004.npz" in r.stdout
    r = run_train(here + ["--resume"], ranks=3, env={"DPBP_FAULT": "sigterm:2:12"},
                  timeout=120)
    assert r.returncode == 128 + signal.SIGTERM, r.stderr
    assert "resume: from" in r.stdout and "epoch-0002.npz" in r.stdout   # stopped at its end
    r = run_train(here + ["--resume"], ranks=4, timeout=120)
    assert r.returncode == 0, r.stderr
    with np.load(full / "checkpoints" / "epoch-0003.npz") as f, \
            np.load(run_dir / "checkpoints" / "epoch-0003.npz") as g:
        for name in f.files:
            if name.startswith(("model.", "optimizer.")):
                assert f[name].tobytes() == g[name].tobytes(), name
    assert logged(full) == logged(run_dir)


def test_ranks_with_another_blas_are_refused(tmp_path):
    """A rank whose numpy or BLAS (kernels) differ from rank 0's, as on a node of another
    CPU type, would compute other bits: the run stops before anything is written."""
    run_dir = tmp_path / "run"
    r = run_train(sets("train.deterministic=true", f'run.dir="{run_dir}"'), ranks=2,
                  env={"DPBP_FAULT": "othercpu:1:0"})
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert "train.deterministic: rank 1 computes with numpy" in lines[0]
    assert "the same bits need the same CPU type, numpy and BLAS on every node" in lines[0]
    assert not run_dir.exists()


def test_ranks_that_disagree_on_deterministic_mode_stop_cleanly(tmp_path):
    """One rank deterministic, the other not (two programs under one mpirun): the config
    check across ranks stops both with one line, before any collective could mismatch."""
    run_dir = tmp_path / "run"
    train = [sys.executable, "-m", "dpbp.train", "--set", f'run.dir="{run_dir}"']
    cmd = mpirun(1) + train + ["--set", "train.deterministic=true", ":", "-n", "1"] + train
    r = run_with_timeout(cmd, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "the ranks loaded different configs or data" in r.stderr
    assert "Traceback" not in r.stderr and not run_dir.exists()


# ----------------------------------------------------------------------------- threads

WORLDS = [(None, "1"), (None, "2"), (2, "2"), (None, None), (2, None), (3, None), (4, None)]


def world_env(omp):
    return {"OMP_NUM_THREADS": omp} if omp else {}


def run_sensitive(module, args, ranks, omp):
    """python -m MODULE ARGS with a thread-sensitive matrix product, under mpirun -n ranks."""
    return run_module(module, args, ranks, env=world_env(omp), thread_sensitive=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-epoch plain run in one process at 2 BLAS threads: its logged validation
    metrics, computed by evaluate during training, are what every world gets."""
    tmp = tmp_path_factory.mktemp("threads")
    run_dir = tmp / "run"
    r = run_sensitive("dpbp.train", sets("data.samples=700", "train.epochs=2",
                                         "model.hidden=[16]", "train.batch_size=32",
                                         f'run.dir="{run_dir}"'), None, "2")
    assert r.returncode == 0, r.stderr
    rng = np.random.default_rng(0)
    np.save(tmp / "x.npy", rng.normal(size=(600, 256)).astype(np.float32))
    return run_dir, [json.loads(line) for line in open(run_dir / "metrics.jsonl")], tmp


def test_evaluate_gives_the_logged_metrics_in_every_world(trained):
    run_dir, metrics, _ = trained
    for ranks, omp in WORLDS:
        r = run_sensitive("dpbp.evaluate", ["--checkpoint", ckpt(run_dir, 2), "--json"],
                          ranks, omp)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert (out["loss"], out["accuracy"]) == (metrics[1]["val_loss"],
                                                  metrics[1]["val_accuracy"]), (ranks, omp)


def test_predict_gives_the_same_bits_in_every_world(trained):
    run_dir, _, tmp = trained
    outputs = {}
    for ranks, omp in WORLDS:
        out = tmp / f"p-{ranks}-{omp}.npy"
        r = run_sensitive("dpbp.predict", ["--checkpoint", ckpt(run_dir, 2), "--input",
                                           str(tmp / "x.npy"), "--output", str(out)], ranks, omp)
        assert r.returncode == 0, r.stderr
        outputs[ranks, omp] = np.load(out).tobytes()
    assert len(set(outputs.values())) == 1


def test_deterministic_training_gives_the_same_bits_in_every_world(tmp_path, uneven_npz):
    """An npz with an uneven last batch (an empty grain, and a rank with no sample at 4
    ranks): the same weights and logged figures at 1 to 4 ranks, at dpbp's thread count
    and at 1 and 2 BLAS threads per rank."""
    args = uneven_args(uneven_npz, "train.deterministic=true", "train.epochs=2")
    results = {}
    for ranks, omp in WORLDS:
        run_dir = tmp_path / f"{ranks}-{omp}"
        r = run_sensitive("dpbp.train", args + sets(f'run.dir="{run_dir}"'), ranks, omp)
        assert r.returncode == 0, r.stderr
        assert "1 BLAS thread per rank (train.deterministic)" in r.stdout
        results[ranks, omp] = (model_sha256(run_dir, "epoch-0002.npz"), logged(run_dir))
    assert len({sha for sha, _ in results.values()}) == 1, results
    assert all(m == results[None, None][1] for _, m in results.values())


def test_deterministic_resume_in_other_worlds_stays_bitwise(tmp_path, uneven_npz):
    """Stopped mid-epoch at 2 ranks of 2 threads each, resumed in one process at 2
    threads: the weights and every logged figure of one uninterrupted process."""
    args = uneven_args(uneven_npz, "train.deterministic=true", "train.epochs=2")
    full, run_dir = tmp_path / "full", tmp_path / "run"
    assert run_sensitive("dpbp.train", args + sets(f'run.dir="{full}"'), None, "1"
                         ).returncode == 0
    here = args + sets(f'run.dir="{run_dir}"')
    r = run_train(here, ranks=2, env={"DPBP_FAULT": "sigterm:1:3", "OMP_NUM_THREADS": "2"},
                  thread_sensitive=True)
    assert r.returncode == 128 + signal.SIGTERM, r.stderr
    r = run_sensitive("dpbp.train", here + ["--resume"], None, "2")
    assert r.returncode == 0, r.stderr
    assert model_sha256(full, "epoch-0002.npz") == model_sha256(run_dir, "epoch-0002.npz")
    assert logged(full) == logged(run_dir)


@pytest.mark.parametrize("ranks,omp", [(None, "1"), (None, "2"), (2, "2"), (2, None)])
def test_plain_resume_at_the_same_world_and_threads_is_bitwise(tmp_path, tiny_npz, ranks, omp):
    full, run_dir = tmp_path / "full", tmp_path / "run"
    env = world_env(omp)
    assert run_train(tiny_run(tiny_npz, full), ranks, env=env, thread_sensitive=True
                     ).returncode == 0
    r = run_train(tiny_run(tiny_npz, run_dir), ranks, env=dict(env, DPBP_FAULT="sigterm:0:7"),
                  thread_sensitive=True)
    assert r.returncode == 128 + signal.SIGTERM, r.stderr
    r = run_train(tiny_run(tiny_npz, run_dir, "--resume"), ranks, env=env,
                  thread_sensitive=True)
    assert r.returncode == 0, r.stderr
    assert model_sha256(full, "epoch-0003.npz") == model_sha256(run_dir, "epoch-0003.npz")
    assert logged(full) == logged(run_dir)
