"""Learning-rate schedules against their closed forms, step by step."""

import math

import pytest

from dpbp.nn.schedule import base_lr, lr_at
from dpbp.service import config


def train(**keys):
    return config.from_dict({"train": keys}).train


def test_constant_and_linear_scaling():
    assert [lr_at(train(lr=0.1), s, 10) for s in (0, 5, 99)] == [0.1, 0.1, 0.1]
    tc = train(lr=0.1, batch_size=1024, base_batch_size=256, lr_scaling="linear")
    assert base_lr(tc) == pytest.approx(0.4) and lr_at(tc, 7, 10) == pytest.approx(0.4)


def test_warmup_ramps_every_step_then_hands_over():
    tc = train(lr=0.4, warmup_epochs=2, epochs=10)   # 5 steps per epoch: 10 warmup steps
    assert [lr_at(tc, s, 5) for s in range(12)] == pytest.approx(
        [0.04, 0.08, 0.12, 0.16, 0.2, 0.24, 0.28, 0.32, 0.36, 0.4, 0.4, 0.4])
    half = train(lr=1.0, warmup_epochs=0.5, epochs=4)   # a fraction of an epoch: 2 steps
    assert [lr_at(half, s, 4) for s in range(3)] == [0.5, 1.0, 1.0]


def test_step_schedule_multiplies_at_each_milestone():
    tc = train(lr=1.0, schedule="step", milestones=[2, 3], gamma=0.5, epochs=5)
    per_epoch = [lr_at(tc, e * 4 + k, 4) for e in range(5) for k in (0, 3)]
    assert per_epoch == [1, 1, 1, 1, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25]


def test_cosine_falls_to_zero_at_the_last_epoch_after_warmup():
    tc = train(lr=0.2, schedule="cosine", warmup_epochs=1, epochs=5)
    steps, T = 10, 40   # 10 steps per epoch; 40 after warmup
    for s in range(10, 50):
        assert lr_at(tc, s, steps) == pytest.approx(0.1 * (1 + math.cos(math.pi * (s - 10) / T)))
    assert lr_at(tc, 10, steps) == pytest.approx(0.2)
    assert lr_at(tc, 49, steps) < 0.2 * 1e-2   # the last step's lr is nearly 0
    assert lr_at(tc, 9, steps) == pytest.approx(0.2)   # end of warmup meets the cosine
