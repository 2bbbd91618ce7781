"""The history of validation losses: the best epoch, and early stopping as Keras and
Lightning define it, against a reference written out here."""

import json

import pytest

from dpbp.service import config, history


def keras_early_stopping(losses, patience, min_delta):
    """The epoch (from 1) after which keras.callbacks.EarlyStopping(monitor="val_loss",
    mode="min", patience, min_delta) stops training, or None. Keras negates min_delta in
    mode "min" and improves when monitor_op(loss - min_delta, best), monitor_op = less:
    loss + |min_delta| < best; only an improvement becomes the reference."""
    min_delta *= -1
    best, wait = float("inf"), 0
    for epoch, loss in enumerate(losses, start=1):
        if loss - min_delta < best:
            best, wait = loss, 0
        else:
            wait += 1
            if wait >= patience:
                return epoch
    return None


LOSSES = [1.0, 0.9, 0.95, 0.89, 0.9, 0.9, 0.85, 0.86, 0.87, 0.88, 0.84]


@pytest.mark.parametrize("patience", [1, 2, 3, 4])
@pytest.mark.parametrize("min_delta", [0.0, 0.005, 0.02, 0.5])
def test_early_stopping_stops_where_keras_does(patience, min_delta):
    tc = config.from_dict({"train": {"early_stopping_patience": patience,
                                     "early_stopping_min_delta": min_delta}}).train
    stops = [history.stop_early(tc, LOSSES[:n]) for n in range(1, len(LOSSES) + 1)]
    first = stops.index(True) + 1 if True in stops else None
    assert first == keras_early_stopping(LOSSES, patience, min_delta)


def test_off_never_stops():
    assert not history.stop_early(config.TrainConfig(), [1.0] * 50)


def test_best_epoch_is_the_lowest_and_the_earlier_on_ties():
    assert history.best_epoch([]) is None and history.best_epoch([None, None]) is None
    assert history.best_epoch([3.0, 2.0, 2.5]) == 2
    assert history.best_epoch([3.0, 2.0, 2.0, None, 2.0]) == 2
    assert history.best_epoch([None, 5.0]) == 2


def test_val_losses_from_metrics_lines():
    lines = [(1, json.dumps({"epoch": 1, "val_loss": 0.5})),
             (2, json.dumps({"epoch": 2, "val_loss": None})),
             (4, json.dumps({"epoch": 4, "val_loss": 0.25}))]
    assert history.val_losses(lines, 4) == [0.5, None, None, 0.25]
    assert history.val_losses(lines, 1) == [0.5]
    assert history.epochs_without_improvement([0.5, None, None], 0.0) == 2
