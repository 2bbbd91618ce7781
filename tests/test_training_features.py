"""Gradient accumulation, clipping and 16-bit gradient sums, end to end under mpirun."""

import json

import numpy as np
import pytest

from tests.conftest import model_arrays, run_train


def sets(**keys):
    return [a for k, v in keys.items() for a in ("--set", f"{k.replace('__', '.')}={v}")]


def train(tmp_path, name, npz, ranks, **extra):
    run_dir = tmp_path / name
    args = sets(data__source='"npz"', data__path=f'"{npz}"', model__hidden="[6, 4]",
                train__batch_size=8, train__epochs=4, train__lr=0.1,
                run__dir=f'"{run_dir}"', run__sync_check_steps=1, **extra)
    r = run_train(args, ranks=ranks)
    assert r.returncode == 0, r.stderr
    metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return model_arrays(run_dir / "checkpoints" / "epoch-0004.npz"), metrics, r


@pytest.mark.parametrize("ranks", [1, 3])
def test_accumulation_equals_one_pass_to_rounding(tmp_path, tiny_npz, ranks):
    """k micro-batches then one Allreduce: the same update as the whole shard at once
    (uneven micro-batches, and empty ones on ranks with fewer rows than k)."""
    f64 = dict(model__dtype='"float64"')
    one, m1, _ = train(tmp_path, "k1", tiny_npz, ranks, **f64)
    four, m4, _ = train(tmp_path, "k4", tiny_npz, ranks, train__accumulation_steps=4, **f64)
    for name in one:
        np.testing.assert_allclose(one[name], four[name], rtol=0, atol=1e-12)
    assert [m["train_loss"] for m in m1] == pytest.approx([m["train_loss"] for m in m4],
                                                          rel=1e-12)


def test_clipping_limits_the_update_identically_on_every_rank(tmp_path, tiny_npz):
    """A tiny clip_grad_norm slows training down (the update is smaller); replicas stay
    identical (checked every step), and 1 process equals 2 ranks to rounding."""
    f64 = dict(model__dtype='"float64"', train__clip_grad_norm=0.01)
    free, m_free, _ = train(tmp_path, "free", tiny_npz, 2, model__dtype='"float64"')
    two, m2, _ = train(tmp_path, "two", tiny_npz, 2, **f64)
    one, m1, _ = train(tmp_path, "one", tiny_npz, 1, **f64)
    for name in one:
        np.testing.assert_allclose(one[name], two[name], rtol=0, atol=1e-12)
    assert m2[-1]["train_loss"] > m_free[-1]["train_loss"]


def test_16_bit_gradient_sums_still_converge(tmp_path):
    """Training with float16 or bfloat16 gradient sums ends within a point or two of
    float32 sums."""
    accuracy = {}
    for kind in ("float32", "float16", "bfloat16"):
        run_dir = tmp_path / kind
        r = run_train(sets(run__dir=f'"{run_dir}"', data__samples=4000, train__epochs=6,
                           train__comm_dtype=f'"{kind}"', run__sync_check_steps=1), ranks=2)
        assert r.returncode == 0, r.stderr
        accuracy[kind] = [json.loads(line) for line in open(run_dir / "metrics.jsonl")][-1][
            "val_accuracy"]
    assert accuracy["float32"] > 0.85
    for kind in ("float16", "bfloat16"):
        assert abs(accuracy[kind] - accuracy["float32"]) < 0.02, accuracy


def test_logged_lr_is_the_schedule_at_each_epochs_last_step(tmp_path, tiny_npz):
    from dpbp.nn import schedule
    from dpbp.service import config
    keys = dict(train__schedule='"cosine"', train__warmup_epochs=1.5,
                train__lr_scaling='"linear"', train__base_batch_size=4)
    _, metrics, r = train(tmp_path, "cos", tiny_npz, 2, **keys)
    assert "lr: 0.1 x 8 / 4 = 0.2 (linear scaling)" in r.stdout
    tc = config.from_dict({"train": dict(schedule="cosine", warmup_epochs=1.5, lr=0.1,
                                         lr_scaling="linear", base_batch_size=4,
                                         batch_size=8, epochs=4)}).train
    steps = 3   # 17 samples in batches of 8
    assert [m["lr"] for m in metrics] == [schedule.lr_at(tc, (e + 1) * steps - 1, steps)
                                          for e in range(4)]
