"""train.deterministic: the same bits at every world size.

The arithmetic first (dpbp/exact.py: rounded grains add up exactly, in any order), then
whole runs under a real mpirun at 1 to 4 ranks, whose final checkpoints must hash alike,
and do not without deterministic mode (so the comparison can fail).
"""

import hashlib
import json
import math
import random
import signal
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dpbp.nn.losses import cross_entropy, mse
from dpbp.nn.model import MLP
from dpbp.nn.optim import SGD
from dpbp.parallel import exact
from dpbp.parallel.comm import Comm
from dpbp.parallel.step import train_step
from dpbp.service.config import TrainConfig
from dpbp.service.startup import gradient_sum
from tests.conftest import mpirun, run_train, run_with_timeout

# ----------------------------------------------------------------------------- arithmetic


def rounded(grains_values, dtype):
    """Each grain rounded to the grid of their common largest magnitude, or None."""
    largest = max(exact.abs_max(g) for g in grains_values)
    k = exact.grid(largest, len(grains_values), dtype)
    if k is None:
        return None, None
    return [exact.round_to_grid_(g.copy(), k) for g in grains_values], k


def sums_in_many_orders(values, rng):
    """The elementwise sum of `values` (arrays), taken in several orders and groupings:
    left to right, right to left, a pairwise tree, and split among 'ranks' at random."""
    out = []
    forward = np.zeros_like(values[0])
    for v in values:
        forward = forward + v
    out.append(forward)
    backward = np.zeros_like(values[0])
    for v in reversed(values):
        backward = backward + v
    out.append(backward)
    level = list(values)
    while len(level) > 1:
        level = [level[i] + level[i + 1] if i + 1 < len(level) else level[i]
                 for i in range(0, len(level), 2)]
    out.append(level[0])
    for _ in range(3):
        shuffled = list(values)
        rng.shuffle(shuffled)
        cut = sorted(rng.sample(range(len(shuffled) + 1), 2))
        parts = [shuffled[:cut[0]], shuffled[cut[0]:cut[1]], shuffled[cut[1]:]]
        partial = [sum(p, np.zeros_like(values[0])) for p in parts]
        out.append(partial[2] + partial[0] + partial[1])
    return out


def check_exact(grains_values, dtype, seed=0):
    """Rounded grains: every order gives the same bits, and that is the exact sum (math.fsum
    of the rounded values, correctly rounded, equals it); each value moved by at most half
    the grid, a grid no coarser than largest * 2^(ceil(log2 grains) + 3 - p)."""
    values, k = rounded(grains_values, dtype)
    if values is None:
        return False
    for before, after in zip(grains_values, values):
        assert np.all(after % np.ldexp(dtype(1), k) == 0)
        assert np.all(np.abs(after.astype(np.float64) - before) <= math.ldexp(1, k - 1))
    largest = max(exact.abs_max(g) for g in grains_values)
    p = np.finfo(dtype).nmant + 1
    if largest >= np.finfo(dtype).tiny:   # above the subnormals, the promised precision
        assert math.ldexp(1, k) <= largest * 2.0 ** ((len(values) - 1).bit_length() + 3 - p)
    results = sums_in_many_orders(values, random.Random(seed))
    for r in results:
        assert r.dtype == dtype and r.tobytes() == results[0].tobytes()
    for i in range(values[0].size):
        assert float(results[0].flat[i]) == math.fsum(float(v.flat[i]) for v in values)
    return True


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("grains", [1, 2, 3, 8, 13, 1024])
def test_rounded_grains_add_up_exactly_in_any_order(dtype, grains):
    rng = np.random.default_rng(grains)
    # values over 30 binades, negatives, zeros, and the largest one a power of two
    values = [(rng.normal(size=64) * 2.0 ** rng.integers(-30, 0, size=64)).astype(dtype)
              for _ in range(grains)]
    values[0][0] = 0
    values[-1][1] = -1.0
    assert check_exact(values, dtype)


@settings(max_examples=60, deadline=None)
@given(st.data(), st.sampled_from([np.float32, np.float64]), st.integers(1, 9))
def test_rounded_grains_add_up_exactly_for_any_values(data, dtype, grains):
    """Any finite values, subnormals and the dtype's extremes included; the only refusal
    is a largest value so close to the dtype's maximum that no grid has room."""
    values = [data.draw(hnp.arrays(dtype, 6, elements=st.floats(
        allow_nan=False, allow_infinity=False, width=np.finfo(dtype).bits)))
        for _ in range(grains)]
    largest = max(exact.abs_max(v) for v in values)
    ok = check_exact(values, dtype)
    assert ok or largest > np.finfo(dtype).max / 2 ** 22


def test_adding_rounded_grains_chunk_by_chunk_is_rounding_then_adding():
    """add_rounded_, chunk by chunk in place, equals rounding every grain, then adding."""
    rng = np.random.default_rng(3)
    grains = [[rng.normal(size=(7, 5)).astype(np.float32), rng.normal(size=7).astype(np.float32)]
              for _ in range(3)]
    grids = [exact.grid(max(exact.abs_max(g[i]) for g in grains), 3, np.float32)
             for i in range(2)]
    want = [sum(exact.round_to_grid_(g[i].copy(), grids[i]) for g in grains) for i in range(2)]
    exact.add_rounded_(grains, grids, chunk=4)   # chunks that cut rows of W apart
    for i in range(2):
        assert grains[-1][i].tobytes() == want[i].tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_grid_limits(dtype):
    info = np.finfo(dtype)
    k_min = info.minexp - info.nmant
    assert exact.grid(0.0, 4, dtype) == k_min                      # zeros stay zeros
    assert exact.grid(float(info.smallest_subnormal), 4, dtype) == k_min
    assert exact.grid(math.inf, 4, dtype) is None
    assert exact.grid(float(info.max), 4, dtype) is None           # no room to add 4
    assert exact.grid(1.0, 1, dtype) == 1 + 0 + 2 - (info.nmant + 1)
    assert exact.grid(1.0, 8, dtype) == exact.grid(1.0, 5, dtype) == 1 + 3 + 2 - (info.nmant + 1)


def test_abs_max_sees_nan_anywhere_as_infinite():
    for i in range(5):
        a = np.arange(5, dtype=np.float32) - 2
        a[i] = np.nan
        assert exact.abs_max(a) == math.inf
    assert exact.abs_max(np.array([-3.0, 2.0])) == 3.0


# ----------------------------------------------------------------------------- one step

@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_deterministic_steps_follow_the_plain_gradient(dtype, tol):
    """The rounding of the grains only moves a step at the last bits: after ten steps the
    parameters agree with plain training to about the dtype's precision."""
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(64, 7)).astype(dtype), rng.integers(0, 4, size=64)

    def run(tc):
        model = MLP([7, 16, 4], "tanh", dtype)
        model.init_(np.random.default_rng(6))
        opt = SGD(model.params, model.grads, lr=0.1, momentum=0.9)
        summed = gradient_sum(tc, Comm(None), model)
        for _ in range(10):
            assert train_step(model, opt, cross_entropy, x, y, 64, summed)[1]
        return model.params

    plain = run(TrainConfig())
    for grains in (1, 3, 8):
        np.testing.assert_allclose(run(TrainConfig(deterministic=True, grains=grains)),
                                   plain, rtol=0, atol=tol)


def test_grain_losses_whose_sum_overflows_make_a_non_finite_step():
    """Two grains, each with a finite loss near the float64 maximum: their sum is not
    finite, which stops the step as a NaN would, instead of raising."""
    model = MLP([2, 1], "relu", np.float64)
    model.init_(np.random.default_rng(0))
    before = model.params.copy()
    opt = SGD(model.params, model.grads, lr=0.1)
    x, targets = np.zeros((2, 2)), np.full((2, 1), 1.3e154)   # each row's loss ~ 1.7e308
    tc = TrainConfig(deterministic=True, grains=2, loss="mse")
    loss, ok = train_step(model, opt, mse, x, targets, 2, gradient_sum(tc, Comm(None), model))
    assert not ok and loss == math.inf
    assert model.params.tobytes() == before.tobytes()


# ----------------------------------------------------------------------------- whole runs

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


def test_default_config_gives_the_same_bits_at_1_to_4_ranks(tmp_path):
    """The default config (synthetic data, 10 epochs): the final weights hash alike and
    every logged loss and accuracy is equal at 1, 2, 3 and 4 ranks; without
    deterministic mode 1 and 2 ranks end with other bits."""
    said = {}
    det = runs(tmp_path, [], "epoch-0010.npz", [1, 2, 3, 4], True, said)
    assert len({sha for sha, _ in det.values()}) == 1, det
    assert "1 BLAS thread per rank (train.deterministic)" in said[1]
    assert "in 4 grains of 32 rows, 1-2 grains per rank (deterministic)" in said[3]
    assert "note: 4 grains do not split evenly over 3 ranks" in said[3]
    assert "batch: global 128 in 4 grains of 32 rows, 1 grain per rank" in said[4]
    last = {n: out.strip().splitlines()[-1] for n, out in said.items()}
    weights = {line.split("weights sha256 ")[1][:16] for line in last.values()}
    assert len(weights) == 1 and all(line.startswith("done: 10 epochs") for line in last.values())
    assert all(metrics == det[1][1] for _, metrics in det.values())
    plain = runs(tmp_path, [], "epoch-0010.npz", [1, 2], False)
    assert plain[1][0] != plain[2][0]
    assert plain[1][0] != det[1][0]


def uneven_args(npz, *more):
    return sets('data.source="npz"', f'data.path="{npz}"', "model.hidden=[16, 8]",
                "train.batch_size=32", "train.epochs=3", "train.lr=0.1", *more)


def test_npz_with_an_uneven_last_batch_gives_the_same_bits_at_1_to_4_ranks(tmp_path,
                                                                           uneven_npz):
    det = runs(tmp_path, uneven_args(uneven_npz), "epoch-0003.npz", [1, 2, 3, 4], True)
    assert len({sha for sha, _ in det.values()}) == 1, det
    assert all(metrics == det[1][1] for _, metrics in det.values())
    plain = runs(tmp_path, uneven_args(uneven_npz), "epoch-0003.npz", [1, 3], False)
    assert plain[1][0] != plain[3][0]


def test_resume_at_other_world_sizes_stays_bitwise(tmp_path, uneven_npz):
    """Stopped mid-epoch at 2 ranks (SIGTERM), resumed at 3, stopped again at an epoch's
    end, resumed at 4: the weights, the momentum and every logged figure are bitwise those
    of one uninterrupted process."""
    args = uneven_args(uneven_npz, "train.deterministic=true", "run.keep_checkpoints=0")
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
