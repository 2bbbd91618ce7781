"""The scaling model (dpbp/parallel/scaling.py) against hand-computed costs, its fit, and
`python -m dpbp.bench --scaling-model` end to end on a tiny network. No test asserts a
speed or a measured figure: only that the figures are there and hang together."""

import json
import math
import sys

import numpy as np
import pytest

from dpbp.parallel import scaling
from tests.conftest import ROOT, mpirun, run_forked, run_with_timeout

MB = 1 << 20
TINY = ["--layers", "20,16,4", "--batch-size", "24", "--steps", "3", "--warmup", "1"]
RECORD_KEYS = {"nodes", "link_gbps", "comm_dtype", "step_ms", "efficiency", "scaling",
               "per_node_batch", "global_batch", "algorithm", "compute_ms", "comm_ms",
               "samples_per_second"}


def node(**kw):
    """The benchmark network's node, with round figures."""
    base = dict(seconds_per_sample=60e-6, update_seconds=2.5e-3, weights=1863690,
                alpha=10e-6, gamma=0.1e-9,
                convert={"float16": (20e-3, 5e-6), "bfloat16": (12e-3, 5e-6)})
    return scaling.Node(**{**base, **kw})


# ----------------------------------------------------------------------------- costs

@pytest.mark.parametrize("algorithm,p,expected", [
    # (a, b, c) of a alpha + b beta + c gamma, for n = 1 byte, by hand
    (scaling.recursive_doubling, 2, (1, 1, 1)),
    (scaling.recursive_doubling, 4, (2, 2, 2)),
    (scaling.recursive_doubling, 3, (3, 3, 2)),      # p' = 2: one step, plus 2 extra
    (scaling.reduce_scatter_allgather, 2, (2, 1, 0.5)),
    (scaling.reduce_scatter_allgather, 4, (4, 1.5, 0.75)),
    (scaling.reduce_scatter_allgather, 8, (6, 1.75, 0.875)),
    (scaling.reduce_scatter_allgather, 6, (6, 3.5, 1.75)),   # p' = 4, plus 2 extra
    (scaling.ring, 2, (2, 1, 0.5)),
    (scaling.ring, 4, (6, 1.5, 0.75)),
    (scaling.ring, 5, (8, 1.6, 0.8)),
])
def test_costs_by_hand(algorithm, p, expected):
    assert algorithm(p, 1) == pytest.approx(expected)
    a, b, c = algorithm(p, 1000)
    assert (a, b, c) == pytest.approx((expected[0], 1000 * expected[1], 1000 * expected[2]))


def test_allreduce_seconds_by_hand():
    alpha, beta, gamma = 10e-6, 1e-9, 0.5e-9
    n = 8 * MB
    # 2 ranks, long message: reduce-scatter + allgather, 2 alpha + n beta + n/2 gamma
    assert scaling.allreduce_seconds(2, n, alpha, beta, gamma) == pytest.approx(
        2 * alpha + n * beta + n / 2 * gamma)
    # 1,024 ranks: 20 alpha + 2 (1023/1024) n beta + (1023/1024) n gamma
    assert scaling.allreduce_seconds(1024, n, alpha, beta, gamma) == pytest.approx(
        20 * alpha + 2 * 1023 / 1024 * n * beta + 1023 / 1024 * n * gamma)
    assert scaling.allreduce_seconds(1024, n, alpha, beta, gamma, "ring") == pytest.approx(
        2 * 1023 * alpha + 2 * 1023 / 1024 * n * beta + 1023 / 1024 * n * gamma)
    assert scaling.allreduce_seconds(1, n, alpha, beta, gamma) == 0


def test_a_link_of_g_gbits_sends_a_byte_in_8_over_g_nanoseconds():
    assert scaling.beta_of(100) == pytest.approx(8 / 100e9, rel=1e-15, abs=0)
    assert scaling.beta_of(10) == pytest.approx(0.8e-9, rel=1e-15, abs=0)


def test_mpich_chooses_by_size_and_ranks():
    assert scaling.mpich_algorithm(2, 8) == "recursive doubling"       # <= 8 bytes
    assert scaling.mpich_algorithm(2, 12) == "reduce-scatter + allgather"
    assert scaling.mpich_algorithm(64, 4 * 63) == "recursive doubling"    # fewer values than p'
    assert scaling.mpich_algorithm(100, 4 * 64) == "reduce-scatter + allgather"
    assert scaling.mpich_algorithm(1024, 4 * 1863690) == "reduce-scatter + allgather"


def test_sixteen_bit_sum_by_hand():
    alpha, beta, values = 10e-6, 1e-9, 1000   # 2,000 bytes: Allgatherv by recursive doubling
    n = 2 * values
    expected = (3 * alpha + 0.75 * n * beta      # Alltoallv: 3 parts of n/4 from each rank
                + 2 * alpha + 0.75 * n * beta    # Allgatherv, recursive doubling
                + 0.007)                         # the conversions
    assert scaling.half_sum_seconds(4, values, "bfloat16", alpha, beta, 0.007) == \
        pytest.approx(expected)
    scale = 2 * (alpha + 8 * beta)               # float16's scale: an 8-byte Allreduce
    assert scaling.half_sum_seconds(4, values, "float16", alpha, beta, 0.007) == \
        pytest.approx(expected + scale)
    assert scaling.allgatherv_coefficients(3, 2000) == (2, pytest.approx(2 / 3 * 2000))  # Bruck
    assert scaling.allgatherv_coefficients(3, MB) == (2, pytest.approx(2 / 3 * MB))      # ring
    assert scaling.allgatherv_coefficients(8, MB) == (7, pytest.approx(7 / 8 * MB))      # ring


@pytest.mark.parametrize("p", [2, 4, 64, 1024])
def test_sixteen_bit_sums_halve_the_bandwidth_term(p):
    """With no latency, arithmetic or conversion, the 16-bit sum sends half the bytes of
    the float32 Allreduce (MPICH's reduce-scatter + allgather); float16 also agrees on
    its scale (an 8-byte Allreduce)."""
    free = node(alpha=0.0, gamma=0.0, convert={})
    for link in scaling.LINKS_GBPS:
        full = scaling.comm_seconds(free, p, link, "float32")
        scale = scaling.allreduce_seconds(p, 8, 0.0, scaling.beta_of(link), itemsize=8)
        assert scaling.comm_seconds(free, p, link, "bfloat16") == pytest.approx(full / 2)
        assert scaling.comm_seconds(free, p, link, "float16") == pytest.approx(full / 2 + scale)


# ----------------------------------------------------------------------------- fit

@pytest.mark.parametrize("p", [2, 3, 4])
def test_the_fit_recovers_alpha_and_beta(p):
    alpha, beta, gamma = 7e-6, 8 / 20e9, 0.08e-9
    sizes = [4 << 10, 32 << 10, 256 << 10, 2 * MB, 8 * MB]
    exact = [(p, n, scaling.allreduce_seconds(p, n, alpha, beta, gamma)) for n in sizes]
    assert scaling.fit_alpha_beta(exact, gamma) == pytest.approx((alpha, beta), rel=1e-9)
    rng = np.random.default_rng(0)   # 3 % noise
    noisy = [(q, n, t * (1 + 0.03 * rng.standard_normal())) for q, n, t in exact]
    fitted = scaling.fit_alpha_beta(noisy, gamma)
    assert fitted == pytest.approx((alpha, beta), rel=0.25)


def relative_error(points, alpha, beta):
    """The sum of squared relative errors that the fit minimises (gamma = 0)."""
    total = 0.0
    for p, n, seconds in points:
        a, b, _ = scaling.ALGORITHMS[scaling.mpich_algorithm(p, n)](p, n)
        total += (1 - (alpha * a + beta * b) / seconds) ** 2
    return total


@pytest.mark.parametrize("points,fitted", [
    ([(2, 4096, 1e-6), (2, 2 * MB, 1e-3), (2, 8 * MB, 2e-3)], "beta"),   # alpha < 0, free
    ([(2, 4096, 50e-6), (2, 8 * MB, 40e-6)], "alpha"),                   # beta < 0, free
])
def test_the_fit_keeps_alpha_and_beta_non_negative(points, fitted):
    """Timings that grow slower than the bytes (cache effects, noise) would fit a negative
    latency, or faster bytes than no bytes a negative bandwidth term; the fit keeps that
    one at 0 and fits the other alone: the best it can be, with the first at 0."""
    alpha, beta = scaling.fit_alpha_beta(points)
    found = {"alpha": alpha, "beta": beta}
    assert found[fitted] > 0 and found[{"alpha": "beta", "beta": "alpha"}[fitted]] == 0.0
    best = relative_error(points, alpha, beta)
    for f in (0.99, 1.01):
        other = dict(found, **{fitted: found[fitted] * f})
        assert relative_error(points, other["alpha"], other["beta"]) > best


# ----------------------------------------------------------------------------- the step

def test_efficiency_is_one_at_one_node_and_falls_with_nodes():
    n = node()
    for scaling_kind in ("weak", "strong"):
        for kind in scaling.COMM_DTYPES:
            for link in scaling.LINKS_GBPS:
                e = [scaling.efficiency(n, p, 512, link, kind, scaling_kind)
                     for p in scaling.NODES]
                assert e[0] == pytest.approx(1.0)
                assert all(b < a for a, b in zip(e, e[1:])), (scaling_kind, kind, link, e)
                assert 0 < e[-1] < 1


def test_faster_links_and_larger_batches_scale_better():
    n = node()
    assert scaling.efficiency(n, 64, 512, 10) < scaling.efficiency(n, 64, 512, 100)
    assert scaling.efficiency(n, 64, 128, 25) < scaling.efficiency(n, 64, 1024, 25)


def test_records():
    records = scaling.records(node(), 512)
    assert len(records) == 2 * len(scaling.COMM_DTYPES) * len(scaling.LINKS_GBPS) * 11
    assert all(RECORD_KEYS <= set(r) for r in records)
    weak = [r for r in records if r["scaling"] == "weak"]
    assert {r["nodes"] for r in weak} == set(scaling.NODES) and max(scaling.NODES) >= 1024
    assert all(r["per_node_batch"] == 512 and r["global_batch"] == 512 * r["nodes"]
               for r in weak)
    strong = [r for r in records if r["scaling"] == "strong"]
    assert all(r["global_batch"] == pytest.approx(512) for r in strong)
    assert {(r["link_gbps"], r["comm_dtype"]) for r in records} == {
        (link, kind) for link in scaling.LINKS_GBPS for kind in scaling.COMM_DTYPES}
    for r in records:
        assert r["step_ms"] == pytest.approx(r["compute_ms"] + r["comm_ms"])
        assert r["samples_per_second"] == pytest.approx(1e3 * r["global_batch"] / r["step_ms"])
        assert (r["algorithm"] == "none") == (r["nodes"] == 1)
        assert r["efficiency"] == scaling.efficiency(node(), r["nodes"], 512, r["link_gbps"],
                                                     r["comm_dtype"], r["scaling"])
        if r["nodes"] > 1:
            assert (r["algorithm"] == "alltoallv + allgatherv of 16-bit values") == (
                r["comm_dtype"] != "float32")


@pytest.mark.parametrize("nodes", [64, 256])
def test_batch_and_link_for_ninety_percent(nodes):
    n = node()
    for link in scaling.LINKS_GBPS:
        b = scaling.batch_for_efficiency(n, nodes, link)
        assert scaling.efficiency(n, nodes, b, link) >= 0.9
        assert b == 1 or scaling.efficiency(n, nodes, b - 1, link) < 0.9
    link = scaling.link_for_efficiency(n, nodes, 512)
    assert scaling.efficiency(n, nodes, 512, link) == pytest.approx(0.9)
    assert scaling.link_for_efficiency(n, 1, 512) == 0.0   # one node sends nothing
    for kind in ("float16", "bfloat16"):   # the 16-bit sums' own costs
        b = scaling.batch_for_efficiency(n, nodes, 25, comm_dtype=kind)
        assert scaling.efficiency(n, nodes, b, 25, kind) >= 0.9
        assert b == 1 or scaling.efficiency(n, nodes, b - 1, 25, kind) < 0.9
    # the default network's 128 rows: latency alone breaks 90 % at 10 us
    small = node(seconds_per_sample=8e-6, update_seconds=0.3e-3, weights=99978)
    assert scaling.link_for_efficiency(small, nodes, 128) == math.inf


# ----------------------------------------------------------------------------- the command

def bench(args, ranks=None):
    cmd = [sys.executable, "-m", "dpbp.bench", *args]
    r = run_with_timeout(cmd if ranks is None else mpirun(ranks) + cmd, 180)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout, json.loads(r.stdout.strip().splitlines()[-1])


def check_scaling_model(out, f, size):
    """The output `out` and figures `f` of `dpbp.bench --scaling-model --json` at `size`
    ranks: the records, the self-check line, the Allreduce fit (none at one rank)."""
    records = f["scaling_model"]
    assert records and all(RECORD_KEYS <= set(r) for r in records)
    assert {r["link_gbps"] for r in records} >= {10, 25, 100, 200}
    assert {r["comm_dtype"] for r in records} == {"float32", "float16", "bfloat16"}
    assert max(r["nodes"] for r in records) >= 1024
    assert all(r["efficiency"] == pytest.approx(1) for r in records if r["nodes"] == 1)
    check = f["scaling_check"]
    assert check["world_size"] == size and check["measured_step_ms"] > 0
    assert f"check            {size} rank{'s' * (size > 1)} on this host: predicted" in out
    assert f"measured {check['measured_step_ms']:.2f} ms: error " in out
    assert "weak scaling" in out and "90 % at 64 nodes" in out and "90 % at 256 nodes" in out
    if size == 1:   # one rank sends nothing: no fit, an assumed latency between nodes
        assert f["allreduce_latency_us"] is None and f["allreduce_gbps"] is None
        assert "Allreduce not measured (one rank)" in out
    else:
        assert f["allreduce_latency_us"] >= 0
        assert f["allreduce_gbps"] is None or f["allreduce_gbps"] > 0   # None: unresolved
        assert len(f["scaling_inputs"]["allreduce_points"]) == 5
        assert "Allreduce over this transport: latency" in out


def test_bench_latency_option():
    _, f = bench(TINY + ["--scaling-model", "--json", "--latency-us", "2.5"])
    assert f["scaling_inputs"]["latency_us_between_nodes"] == 2.5
    assert f["scaling_inputs"]["latency_source"] == "--latency-us"


@pytest.mark.parametrize("args,words", [
    (["--latency-us", "3"], "--latency-us is an input of --scaling-model"),
    (["--scaling-model", "--latency-us", "0"], "expected a positive number"),
    (["--scaling-model", "--deterministic"], "it excludes --deterministic"),
])
def test_bench_scaling_options_refused(forks, args, words):
    r = run_forked(forks, "dpbp.bench", args, cwd=ROOT)
    assert r.returncode == 2 and words in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stdout == ""


def test_the_check_script_and_the_scaling_model_at_1_2_and_4_ranks(tmp_path):
    """launch/scaling_check.py runs `dpbp.bench --scaling-model` at 1, 2 and 4 ranks and
    tabulates the model's predictions next to the measured steps; each run's output
    (kept with --keep) has the records, the self-check line and the fit."""
    r = run_with_timeout([sys.executable, "launch/scaling_check.py", "--repeats", "1",
                          "--keep", str(tmp_path), *TINY], 600)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and "ms" in line]
    assert [row.split("|")[1].strip() for row in rows] == ["1", "2", "4"]
    assert all(row.count(" %") == 2 for row in rows)
    for size in (1, 2, 4):
        out = (tmp_path / f"bench-{size}-ranks-1.txt").read_text()
        check_scaling_model(out, json.loads(out.strip().splitlines()[-1]), size)
