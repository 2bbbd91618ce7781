"""BLAS threads and bits: every bitwise claim holds at 1 and 2 threads per rank and at the
thread count dpbp chooses at 1, 2, 3 and 4 ranks, on any CPU.

On CPUs with AVX-512, OpenBLAS's kernels give the same bits at any thread count, and a
test that only compares runs would pass there even where the code depends on the
thread count. So these tests run dpbp with tests/thread_sensitive.py, a matrix product
whose bits change with the thread count, as OpenBLAS's Haswell kernels' do.
"""

import json
import signal

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from dpbp.nn.losses import cross_entropy
from dpbp.nn.model import MLP
from dpbp.parallel import threads
from dpbp.parallel.comm import Comm
from dpbp.parallel.evaluation import evaluate, outputs
from tests import thread_sensitive
from tests.conftest import run_module, run_train
from tests.test_cli import tiny_run
from tests.test_deterministic import logged, model_sha256, sets, uneven_args
from tests.test_evaluate import ckpt

# (ranks, OMP_NUM_THREADS): 1 and 2 threads per rank chosen by the user, and dpbp's own
# choice (cores / ranks on this machine) at 1, 2, 3 and 4 ranks; None is no launcher.
WORLDS = [(None, "1"), (None, "2"), (2, "2"), (None, None), (2, None), (3, None), (4, None)]


def world_env(omp):
    return {"OMP_NUM_THREADS": omp} if omp else {}


def run_sensitive(module, args, ranks, omp):
    """python -m MODULE ARGS with a thread-sensitive matrix product, under mpirun -n ranks."""
    return run_module(module, args, ranks, env=world_env(omp), thread_sensitive=True)


@pytest.fixture
def sensitive():
    thread_sensitive.install()
    yield
    thread_sensitive.uninstall()


def small_model(widths=(12, 16, 8, 3), dtype=np.float32):
    model = MLP(list(widths), "relu", dtype)
    model.init_(np.random.default_rng(5))
    return model


# ----------------------------------------------------------------------------- in one process

def test_the_stand_in_really_depends_on_the_thread_count(sensitive):
    """Without this, the tests below could not fail."""
    model, x = small_model(), np.random.default_rng(1).normal(size=(40, 12)).astype(np.float32)
    with threadpool_limits(1, user_api="blas"):
        one = model.forward(x).copy()
    with threadpool_limits(2, user_api="blas"):
        two = model.forward(x).copy()
    assert one.tobytes() != two.tobytes()


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_blockwise_computes_every_block_on_one_blas_thread(workers):
    seen = []

    def fn(b):
        seen.append(threads.blas_threads())
        return b * b

    with threadpool_limits(2, user_api="blas"):
        assert threads.blockwise(fn, list(range(7)), workers) == [b * b for b in range(7)]
        assert threads.blas_threads() == 2   # restored afterwards
    assert seen == [1] * 7


def test_infer_is_forward_without_caches(sensitive):
    model = small_model(dtype=np.float64)
    x = np.random.default_rng(2).normal(size=(9, 12))
    with threadpool_limits(1, user_api="blas"):
        assert model.infer(x).tobytes() == model.forward(x).tobytes()


@pytest.mark.parametrize("blas", [1, 2])
def test_evaluate_and_predict_do_not_depend_on_the_thread_count(sensitive, blas):
    """600 rows, 3 blocks: at 1 or 2 BLAS threads (2 workers), the bits of 1 thread."""
    model = small_model()
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(600, 12)).astype(np.float32), rng.integers(0, 3, size=600)
    with threadpool_limits(1, user_api="blas"):
        want = [model.forward(x[i:i + 256]).copy() for i in range(0, 600, 256)]
    with threadpool_limits(blas, user_api="blas"):
        loss, accuracy = evaluate(model, cross_entropy, x, y, 3, Comm(None))
        out = outputs(model, x, np.float32, False, Comm(None))
    assert out.tobytes() == np.concatenate(want).astype(np.float64).tobytes()
    losses = np.concatenate([cross_entropy(o, y[i * 256:(i + 1) * 256], 1, False)[0]
                             for i, o in enumerate(want)])
    assert loss == pytest.approx(losses.mean(), rel=1e-15)
    assert accuracy == np.mean(np.concatenate(want).argmax(axis=1) == y)


# ----------------------------------------------------------------------------- whole commands

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
    """An uneven last batch (an empty grain, and a rank with no sample at 4 ranks)."""
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
