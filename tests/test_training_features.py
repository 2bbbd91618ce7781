"""Gradient accumulation, clipping, 16-bit gradient sums, early stopping and the best
checkpoint, end to end under mpirun."""

import json

import numpy as np
import pytest

from tests.conftest import model_arrays, run_module, run_train, snapshot


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


ADAMW_DROPOUT = dict(train__optimizer='"adamw"', model__dropout=0.3)


@pytest.mark.parametrize("ranks,more", [(1, {}), (3, {}), (3, ADAMW_DROPOUT)],
                         ids=["1", "3", "3-adamw-dropout"])
def test_accumulation_equals_one_pass_to_rounding(tmp_path, tiny_npz, ranks, more):
    """k micro-batches then one Allreduce: the same update as the whole shard at once
    (uneven micro-batches, and empty ones on ranks with fewer rows than k), with SGD, and
    with AdamW and dropout (each micro-batch's rows keep their masks)."""
    f64 = dict(model__dtype='"float64"', **more)
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
    float32 sums, with other weights (the sums were rounded to 16 bits)."""
    accuracy, weights = {}, {}
    for kind in ("float32", "float16", "bfloat16"):
        run_dir = tmp_path / kind
        r = run_train(sets(run__dir=f'"{run_dir}"', data__samples=4000, train__epochs=6,
                           train__comm_dtype=f'"{kind}"', run__sync_check_steps=1), ranks=2)
        assert r.returncode == 0, r.stderr
        accuracy[kind] = [json.loads(line) for line in open(run_dir / "metrics.jsonl")][-1][
            "val_accuracy"]
        weights[kind] = model_arrays(run_dir / "checkpoints" / "epoch-0006.npz")
    assert accuracy["float32"] > 0.85
    for kind in ("float16", "bfloat16"):
        assert abs(accuracy[kind] - accuracy["float32"]) < 0.02, accuracy
        assert any(weights[kind][k].tobytes() != weights["float32"][k].tobytes()
                   for k in weights["float32"]), kind


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


def early_stopping_run(npz, run_dir, *more):
    """AdamW with dropout on the tiny dataset, whose labels are random: the validation
    loss soon stops improving, and patience 3 ends the run long before its 30 epochs."""
    return sets(data__source='"npz"', data__path=f'"{npz}"', model__hidden="[8]",
                model__dropout=0.2, train__optimizer='"adamw"', train__lr=0.01,
                train__batch_size=4, train__epochs=30, train__early_stopping_patience=3,
                run__keep_best="true", run__keep_checkpoints=1,
                run__dir=f'"{run_dir}"') + list(more)


def test_early_stopping_ends_the_run_and_keeps_the_best_checkpoint(tmp_path, tiny_npz):
    run_dir = tmp_path / "run"
    r = run_train(early_stopping_run(tiny_npz, run_dir), ranks=2)
    assert r.returncode == 0, r.stderr
    metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    E, losses = len(metrics), [m["val_loss"] for m in metrics]
    assert 4 <= E < 30 and min(losses[:-3]) <= min(losses[-3:])   # 3 epochs, no better
    assert [m.get("stopped") for m in metrics] == [None] * (E - 1) + ["early_stopping"]
    lines = r.stdout.strip().splitlines()
    assert lines[-2].startswith(f"epoch {E:>2}/30") and lines[-2].endswith(
        "stopped: no val_loss improvement > 0 in 3 epochs (early stopping)")
    assert lines[-1].startswith(f"done: {E} epochs of 30, stopped early (no val_loss "
                                f"improvement > 0 in 3 epochs), {5 * E} steps in ")
    assert "; weights sha256 " in lines[-1]
    best = losses.index(min(losses)) + 1   # the earlier of equal ones
    folder = run_dir / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["best.npz", f"epoch-{E:04d}.npz",
                                                        "last.npz"]
    assert best < E - 2   # so keep_checkpoints = 1 pruned its epoch checkpoint, not best.npz
    r = run_module("dpbp.evaluate", ["--checkpoint", str(folder / "best.npz"), "--json"])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["epoch"] == best and out["loss"] == metrics[best - 1]["val_loss"]   # exactly
    assert out["accuracy"] == metrics[best - 1]["val_accuracy"]
    np.save(tmp_path / "x.npy", np.ones((3, 5)))
    r = run_module("dpbp.predict", ["--checkpoint", str(folder / "best.npz"), "--input",
                                    str(tmp_path / "x.npy"), "--output", str(tmp_path / "p.npy")])
    assert r.returncode == 0 and np.load(tmp_path / "p.npy").shape == (3, 3), r.stderr
    before = snapshot(run_dir)   # --resume stops where the run stopped, and touches nothing
    r = run_train(["--resume", "--set", f'run.dir="{run_dir}"'], ranks=2)
    assert r.returncode == 0, r.stderr
    assert f"nothing to do: the run in {run_dir} stopped early after {E} epochs" in r.stdout
    assert snapshot(run_dir) == before
