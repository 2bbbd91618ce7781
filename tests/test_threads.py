"""BLAS threads and bits in one process: the thread-sensitive stand-in, blockwise, infer.

On CPUs with AVX-512, OpenBLAS's kernels give the same bits at any thread count, and a
test that only compares runs would pass there even where the code depends on the
thread count. So the bitwise tests (test_evaluation.py, test_reproducibility.py) run
dpbp with tests/thread_sensitive.py, a matrix product whose bits change with the
thread count, as OpenBLAS's Haswell kernels' do; here it is checked that it really
does, that blockwise computes every block on one BLAS thread, and that infer is
forward's arithmetic.
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
