"""python -m dpbp.bench end to end, on a tiny network: the figures it reports are there
and consistent. Nothing here asserts a speed; the machine may be busy."""

import importlib.util
import json
import sys

import numpy as np
import pytest

from tests.conftest import ROOT, fake_mnist, mpirun, run_forked, run_with_timeout

TINY = ["--layers", "20,16,4", "--batch-size", "24", "--steps", "3", "--warmup", "1"]
SHORT = ["--steps", "3", "--warmup", "1"]
# what dpbp computes per sample of TINY: x W^T + b, then ReLU, then the second Linear,
# and backward dW, db (and dx but for the first Linear): 2 per multiply-add
TINY_FLOPS = (4 * 20 * 16 + 2 * 16) + 2 * 16 + (6 * 16 * 4 + 2 * 4)
HAS_TORCH = importlib.util.find_spec("torch") is not None


def bench(args, ranks=None, env=None, timeout=120):
    cmd = [sys.executable, "-m", "dpbp.bench", *args]
    if ranks is not None:
        cmd = mpirun(ranks) + cmd
    return run_with_timeout(cmd, timeout, env=env)


def figures(r):
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def check_sane(f, world_size):
    assert f["world_size"] == world_size
    assert f["threads_per_rank"] >= 1
    assert f["samples_per_second"] > 0 and f["step_seconds"] > 0
    assert f["samples_per_second"] == pytest.approx(f["batch_size"] / f["step_seconds"])
    assert f["flops"] == pytest.approx(f["flops_per_sample"] * f["samples_per_second"])
    assert 0 < f["mfu"] and f["mfu"] == pytest.approx(f["flops"] / f["peak_flops"])
    assert 0 <= f["comm_fraction"] <= 1
    assert f["compute_seconds"] + f["comm_seconds"] == pytest.approx(f["step_seconds"])
    assert 0 < f["base_rss_mb"] <= f["peak_rss_mb"] <= f["memory_budget_mb"]
    assert 0 < f["import_seconds"] < 60
    assert f["cpu_seconds_per_sample"] > 0


def test_deterministic_option_under_mpirun():
    r = bench(TINY + ["--json", "--deterministic", "--grains", "3", "--dtype", "float64"],
              ranks=2)
    f = figures(r)
    check_sane(f, 2)
    assert f["deterministic"] is True and f["grains"] == 3 and f["threads_per_rank"] == 1
    assert f["dtype"] == "float64"
    assert "(per rank 8-16)" in r.stdout and "exactly in 3 grains" in r.stdout


@pytest.mark.parametrize("args,words", [
    (["--deterministic", "--comm-dtype", "bfloat16"], "excludes --comm-dtype"),
    (["--deterministic", "--batch-size", "8", "--grains", "9"],
     "--grains must be at most --batch-size (8)"),
    (["--layers", "784"], "--layers takes at least two positive widths"),
    (["--layers", "784,x,10"], "--layers takes at least two positive widths"),
    (["--batch-size", "0"], "expected a positive integer"),
    (["--dtype", "float16"], "invalid choice"),
    (["--optimizer", "adam"], "invalid choice"),
    (["--dropout", "1"], "expected a probability in [0, 1), got '1'"),
    (["--frobnicate"], "unrecognized arguments"),
])
def test_bad_options_one_line(forks, args, words):
    r = run_forked(forks, "dpbp.bench", args, cwd=ROOT)
    assert r.returncode == 2
    assert r.stderr.startswith("dpbp: error: ") and words in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stdout == ""


def test_help():
    r = bench(["--help"])
    assert r.returncode == 0 and "--compare-torch" in r.stdout and "--deterministic" in r.stdout


@pytest.mark.skipif(HAS_TORCH, reason="PyTorch is installed here")
def test_compare_torch_without_torch_says_so():
    r = bench(TINY + ["--compare-torch"], ranks=2)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "--compare-torch needs PyTorch, which is not installed" in r.stderr
    assert r.stderr.count("dpbp: error") == 1 and r.stdout == ""


@pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is not installed (never a dependency)")
@pytest.mark.parametrize("what", ["layers", "config"])
def test_compare_torch(tmp_path, what):
    args = TINY if what == "layers" else ["--config", tiny_config(tmp_path), *SHORT]
    r = bench(args + ["--json", "--compare-torch"], ranks=2, timeout=300)
    f = figures(r)
    check_sane(f, 2)
    assert f["torch_samples_per_second"] > 0 and f["torch_mfu"] > 0
    assert f["torch_cpu_seconds_per_sample"] > 0
    assert f["speedup_vs_torch"] == pytest.approx(
        f["samples_per_second"] / f["torch_samples_per_second"])
    assert "PyTorch" in r.stdout and "DDP" in r.stdout


def test_importing_the_bench_module_starts_nothing():
    code = ("import sys, dpbp.bench; print(sorted(m for m in ('mpi4py.MPI', 'torch') "
            "if m in sys.modules))")
    r = run_with_timeout([sys.executable, "-c", code], 60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


def test_the_readme_table_script_and_the_bench_at_1_2_and_4_ranks(tmp_path):
    """launch/bench_table.py, which makes the performance table of docs/performance.md,
    runs every row; each run's output (kept with --keep) is sane: one process at the
    threads the user chose (OMP_NUM_THREADS=1) and at its own, with every figure and
    nothing to wait for, and 2 and 4 ranks sharing the cores."""
    r = run_with_timeout([sys.executable, "launch/bench_table.py", "--repeats", "1",
                          "--keep", str(tmp_path), *TINY], 600)
    assert r.returncode == 0, r.stdout + r.stderr
    table = r.stdout
    for row in ("`OMP_NUM_THREADS=1 mpirun -n 1`", "`mpirun -n 2", "`mpirun -n 4`"):
        assert row in table
    assert table.count("\n| `") == 4 and "Strong scaling" in table
    assert ("--compare-torch" in table) == HAS_TORCH   # the DDP columns, where PyTorch is
    out = {row: (tmp_path / f"row-{row}-1.txt").read_text() for row in (1, 2, 3, 4)}
    f = {row: json.loads(text.strip().splitlines()[-1]) for row, text in out.items()}
    for row, size in ((1, 1), (2, 1), (3, 2), (4, 4)):
        check_sane(f[row], size)
    assert f[1]["threads_per_rank"] == 1   # as the user chose
    for row in (2, 3, 4):   # dpbp's own choice: the cores shared by the ranks on them
        assert f[row]["threads_per_rank"] == max(1, f[row]["cores"] //
                                                 f[row]["ranks_sharing_cores"])
    assert f[2]["comm_fraction"] == 0   # one process: nothing to wait for
    assert f[2]["network"] == "20 -> linear 16, relu, linear 4" and f[2]["input_shape"] == [20]
    assert f[2]["layers"] == [{"type": "linear", "out_features": 16}, {"type": "relu"},
                              {"type": "linear", "out_features": 4}]
    assert f[2]["weights"] == 20 * 16 + 16 + 16 * 4 + 4
    assert f[2]["flops_per_sample"] == TINY_FLOPS
    for label in ("samples/s", "communication wait", "GEMM peak", "MFU", "peak memory",
                  "budget", "the training modules (slowest rank)"):
        assert label in out[2]


def test_adamw_and_dropout():
    r = bench(TINY + ["--json", "--optimizer", "adamw", "--dropout", "0.3"])
    f = figures(r)
    check_sane(f, 1)
    assert f["optimizer"] == "adamw" and f["network"] == "20 -> linear 16, relu, dropout " \
        "0.3, linear 4" and f["flops_per_sample"] == TINY_FLOPS + 3 * 16
    assert f["update_seconds"] > 0
    assert "dropout 0.3, linear 4; float32" in r.stdout and "; optimizer adamw" in r.stdout


def tiny_config(tmp_path, source="npz"):
    """A training config of 5 features (or MNIST-format 4x4 images) and 3 classes (10)."""
    if source == "npz":
        rng = np.random.default_rng(0)
        np.savez(tmp_path / "d.npz", x=rng.normal(size=(30, 5)), y=np.arange(30) % 3)
        path = tmp_path / "d.npz"
    else:
        path = fake_mnist(tmp_path / "mnist", gz=True)
    (tmp_path / "c.toml").write_text(
        f'[data]\nsource = "{source}"\npath = "{path}"\n[model]\nhidden = [8, 6]\n'
        'activation = "tanh"\ndropout = 0.25\n[train]\nbatch_size = 12\n')
    return str(tmp_path / "c.toml")


@pytest.mark.parametrize("source,ranks,network", [
    ("npz", 2, "5 -> linear 8, tanh, dropout 0.25, linear 4, tanh, dropout 0.25, linear 3"),
    ("mnist", None, "16 -> linear 8, tanh, dropout 0.25, linear 4, tanh, dropout 0.25, "
                    "linear 10"),
])
def test_a_training_configs_network_and_batch(tmp_path, source, ranks, network):
    """--config: the config's network, dtype and global batch, the data's input shape and
    classes from their headers; --set changes the config."""
    f = figures(bench(["--config", tiny_config(tmp_path, source), "--set",
                       "model.hidden=[8, 4]", "--set", 'model.dtype="float64"', "--json",
                       *SHORT], ranks=ranks))
    check_sane(f, ranks or 1)
    assert f["network"] == network and f["batch_size"] == 12 and f["dtype"] == "float64"


def test_config_options_are_refused_one_line(tmp_path):
    config = tiny_config(tmp_path)
    for args, words in [
            (["--config", config, "--layers", "5,3"], "--layers is the config's beside "
                                                      "--config (its model and "
                                                      "train.batch_size): change them with --set"),
            (["--set", "train.batch_size=8"], "--set changes the keys of a --config FILE"),
            (["--config", config, "--set", f'data.path="{tmp_path / "gone.npz"}"'],
             "data.path: no such file")]:
        r = bench(args)
        assert r.returncode == 2 and r.stdout == "", r.stderr
        assert r.stderr.startswith("dpbp: error: ") and words in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
