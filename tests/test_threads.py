"""BLAS threads and bits in one process: the kernel-sensitive stand-in, blockwise, infer.

On CPUs with AVX-512, OpenBLAS's kernels give the same bits at any thread count and for
any grouping of rows into products, and a test that only compares runs would pass there
even where the code depends on them. So the bitwise tests (test_evaluation.py,
test_reproducibility.py) run dpbp with tests/sensitive.py, matrix products whose bits
change with the thread count and with their rows, as OpenBLAS's Haswell kernels' do;
here it is checked that they really do, that blockwise computes every block on one BLAS
thread, and that infer is forward's arithmetic.
"""

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from dpbp.parallel import threads
from tests.conftest import small_model


def test_the_stand_in_really_depends_on_the_thread_count(sensitive):
    """Without this, the thread tests (test_evaluation.py, test_reproducibility.py)
    could not fail."""
    model, x = small_model(), np.random.default_rng(1).normal(size=(40, 12)).astype(np.float32)
    with threadpool_limits(1, user_api="blas"):
        one = model.forward(x).copy()
    with threadpool_limits(2, user_api="blas"):
        two = model.forward(x).copy()
    assert one.tobytes() != two.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_stand_in_really_depends_on_the_rows(sensitive, dtype):
    """The same rows computed in products of other row counts (in one block, in blocks
    of 256, in a world size's share) get other bits: without this, the tests of
    evaluation's fixed blocks could not fail on a CPU whose kernels do not care."""
    model = small_model(dtype=dtype)
    x = np.random.default_rng(1).normal(size=(1000, 12)).astype(dtype)
    with threadpool_limits(1, user_api="blas"):
        whole = model.forward(x)[:250].copy()
        for rows in (256, 500, 334, 251):
            assert model.forward(x[:rows])[:250].tobytes() != whole.tobytes(), rows
        assert model.forward(x[:256])[:250].tobytes() == model.forward(x[:256])[:250].tobytes()


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


def test_the_arithmetic_names_numpy_its_cpu_code_and_the_blas_kernels():
    """What train.deterministic compares across ranks: numpy's version and the CPU code
    it dispatches to, and each BLAS with its version and kernels, as threadpoolctl and
    numpy report them here; two CPUs that differ in any of these compute other bits."""
    from threadpoolctl import threadpool_info
    said = threads.arithmetic()
    umath = np._core._multiarray_umath
    code = [t for t in umath.__cpu_dispatch__ if umath.__cpu_features__.get(t)]
    assert said.startswith(f"numpy {np.__version__} ({' '.join(code) or 'baseline'} code), ")
    for lib in threadpool_info():
        if lib["user_api"] == "blas":
            assert f"{lib['internal_api']} {lib['version']} ({lib['architecture']} kernels)" in said


def test_the_threads_the_user_chose_and_the_cores_line(monkeypatch):
    """A count in OMP_NUM_THREADS or its friends is the user's choice (a non-number is
    not); the start-up line names the cores and the ranks that share them."""
    for var in threads.USER_VARS:
        monkeypatch.delenv(var, raising=False)
    assert threads.set_by_user() is None
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "auto")
    assert threads.set_by_user() is None
    monkeypatch.setenv("MKL_NUM_THREADS", "3")
    assert threads.set_by_user() == "MKL_NUM_THREADS"
    assert threads.cores_for(2, 4, "on this host, counted by host name") == \
        "2 cores for 4 ranks on this host, counted by host name"
    assert threads.cores_for(8, 1) == "8 cores for 1 rank"
