"""The history of the watched metric (run.best_metric): the best epoch, early stopping as
Keras and Lightning define it, and the plateau schedule as PyTorch's ReduceLROnPlateau,
each against a reference written out here (and the plateau against torch itself where it
is installed)."""

import itertools
import json
import math

import pytest

from dpbp.nn import schedule
from dpbp.service import config, history


def keras_early_stopping(scores, patience, min_delta, mode="min"):
    """The epoch (from 1) after which keras.callbacks.EarlyStopping(monitor, mode,
    patience, min_delta) stops training, or None. Keras negates min_delta in mode "min"
    and improves when monitor_op(score - min_delta, best), monitor_op = less (min) or
    greater (max); only an improvement becomes the reference."""
    sign = -1 if mode == "min" else 1
    better = (lambda a, b: a < b) if mode == "min" else (lambda a, b: a > b)
    min_delta *= sign
    best, wait = sign * -float("inf"), 0
    for epoch, score in enumerate(scores, start=1):
        if better(score - min_delta, best):
            best, wait = score, 0
        else:
            wait += 1
            if wait >= patience:
                return epoch
    return None


LOSSES = [1.0, 0.9, 0.95, 0.89, 0.9, 0.9, 0.85, 0.86, 0.87, 0.88, 0.84]
ACCURACIES = [0.5, 0.6, 0.6, 0.65, 0.62, 0.66, 0.66, 0.7, 0.69, 0.69, 0.75]


def cfg_of(metric="val_loss", **train):
    return config.from_dict({"run": {"best_metric": metric}, "train": train})


@pytest.mark.parametrize("patience", [1, 2, 3, 4])
@pytest.mark.parametrize("min_delta", [0.0, 0.005, 0.02, 0.5])
@pytest.mark.parametrize("metric,scores", [("val_loss", LOSSES), ("val_accuracy", ACCURACIES)])
def test_early_stopping_stops_where_keras_does(patience, min_delta, metric, scores):
    cfg = cfg_of(metric, early_stopping_patience=patience, early_stopping_min_delta=min_delta)
    stops = [history.stop_early(cfg, scores[:n]) for n in range(1, len(scores) + 1)]
    first = stops.index(True) + 1 if True in stops else None
    mode = history.MODES[metric]
    assert first == keras_early_stopping(scores, patience, min_delta, mode)


def test_off_never_stops():
    assert not history.stop_early(config.Config(), [1.0] * 50)


def test_best_epoch_is_the_best_and_the_earlier_on_ties():
    assert history.best_epoch([], "min") is None and history.best_epoch([None], "max") is None
    assert history.best_epoch([3.0, 2.0, 2.5], "min") == 2
    assert history.best_epoch([3.0, 2.0, 2.0, None, 2.0], "min") == 2
    assert history.best_epoch([None, 5.0], "min") == 2
    assert history.best_epoch([0.5, 0.7, 0.6, 0.7], "max") == 2   # the higher, the earlier


def test_scores_from_metrics_lines():
    lines = [(1, json.dumps({"epoch": 1, "val_loss": 0.5, "val_accuracy": 0.25})),
             (2, json.dumps({"epoch": 2, "val_loss": None})),
             (4, json.dumps({"epoch": 4, "val_loss": 0.25, "val_accuracy": 0.75}))]
    assert history.scores_of(lines, 4, "val_loss") == [0.5, None, None, 0.25]
    assert history.scores_of(lines, 4, "val_accuracy") == [0.25, None, None, 0.75]
    assert history.scores_of(lines, 1, "val_loss") == [0.5]
    assert history.epochs_without_improvement([0.5, None, None], 0.0, "min") == 2


# ----------------------------------------------------------------------------- plateau

class PlateauReference:
    """ReduceLROnPlateau (threshold_mode "rel") as its documentation states it: the lr
    is cut by `factor` (not below min_lr, and not by less than eps) once the metric has
    not improved for more than `patience` epochs; an improvement beats the best by the
    relative threshold; `cooldown` epochs after a cut are not counted; NaN never improves."""

    def __init__(self, lr, mode, factor, patience, threshold, cooldown, min_lr):
        self.lr, self.mode, self.factor, self.patience = lr, mode, factor, patience
        self.threshold, self.cooldown, self.min_lr = threshold, cooldown, min_lr
        self.best = math.inf if mode == "min" else -math.inf
        self.waited = self.resting = 0

    def step(self, score):
        if self.mode == "min":
            improved = score < self.best * (1.0 - self.threshold)
        else:
            improved = score > self.best * (1.0 + self.threshold)
        self.best, self.waited = (score, 0) if improved else (self.best, self.waited + 1)
        if self.resting:
            self.resting -= 1
            self.waited = 0
        if self.waited > self.patience:
            cut = max(self.lr * self.factor, self.min_lr)
            self.lr = cut if self.lr - cut > 1e-8 else self.lr
            self.resting, self.waited = self.cooldown, 0
        return self.lr


SCORES = {"min": [1.0, 0.9, 0.95, 0.9, 0.9, 0.91, 0.899, 0.9, 0.9, 0.9, None, 0.8, 0.81, 0.8,
                  0.8, 0.8, 0.8, 0.8, 0.79999, 0.8, 0.8, 0.8],
          "max": ACCURACIES + [0.75, 0.75, 0.74, None, 0.75, 0.76, 0.76, 0.76, 0.76, 0.76]}
SETTINGS = list(itertools.product([0.5, 0.1], [0, 1, 2], [0.0, 1e-4, 0.02], [0, 2], [0.0, 0.02]))


def plateau_config(mode, factor, patience, threshold, cooldown, min_lr, **more):
    return config.from_dict({"train": dict(
        schedule="plateau", lr=0.1, plateau_factor=factor, plateau_patience=patience,
        plateau_threshold=threshold, plateau_cooldown=cooldown, min_lr=min_lr, **more)}).train


@pytest.mark.parametrize("mode", ["min", "max"])
def test_plateau_cuts_the_lr_where_the_reference_does(mode):
    cuts = 0
    for setting in SETTINGS:
        tc = plateau_config(mode, *setting)
        reference = PlateauReference(0.1, mode, *setting)
        scores = SCORES[mode]
        expected = [0.1] + [reference.step(math.nan if s is None else s) for s in scores]
        got = [schedule.plateau_lr(tc, scores[:n], mode, 4) for n in range(len(scores) + 1)]
        assert got == expected, setting   # the same floats, not merely close
        cuts += len(set(got)) > 1
    assert cuts > len(SETTINGS) // 2   # the sequences do reach plateaus


@pytest.mark.parametrize("mode", ["min", "max"])
def test_plateau_gives_torchs_lr_epoch_by_epoch(mode):
    torch = pytest.importorskip("torch")
    for setting in SETTINGS:
        factor, patience, threshold, cooldown, min_lr = setting
        tc = plateau_config(mode, *setting)
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        theirs = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode=mode, factor=factor, patience=patience, threshold=threshold,
            threshold_mode="rel", cooldown=cooldown, min_lr=min_lr)
        scores = SCORES[mode]
        for n, score in enumerate(scores, start=1):
            theirs.step(math.nan if score is None else score)
            assert schedule.plateau_lr(tc, scores[:n], mode, 4) == opt.param_groups[0]["lr"]


def test_plateau_starts_after_warmup_and_lr_changes_at_epoch_ends_only():
    """Epochs that began in warmup are not watched; the rate is the one of the epoch."""
    tc = plateau_config("min", 0.5, 0, 0.0, 0, 0.0, warmup_epochs=1.5)   # 4 steps an epoch
    scores = [1.0, 2.0, 3.0, 4.0]   # epochs 1 and 2 began in warmup: not watched
    reference = PlateauReference(0.1, "min", 0.5, 0, 0.0, 0, 0.0)
    assert schedule.plateau_lr(tc, scores, "min", 4) == [reference.step(s) for s in
                                                          scores[2:]][-1] == 0.05
    lrs = [schedule.lr_at(tc, s, 4, schedule.plateau_lr(tc, scores[:s // 4], "min", 4))
           for s in range(20)]
    assert lrs[:6] == pytest.approx([0.1 * (s + 1) / 6 for s in range(6)])   # warmup
    assert lrs[6:16] == [0.1] * 10 and lrs[16:] == [0.05] * 4   # cut after epoch 4 only
    assert schedule.plateau_lr(config.TrainConfig(), scores, "min", 4) is None   # not plateau
