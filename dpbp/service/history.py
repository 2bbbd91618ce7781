"""The run's history of the metric it watches (run.best_metric): which epoch is best,
when to stop early, and the plateau schedule's learning rate.

All three are functions of that metric in every epoch so far, which metrics.jsonl
records, so a resumed run (or a branch, which starts with its parent's history) decides
exactly as the uninterrupted run would have, whatever it was resumed from; and as the
validation metrics are the same bits at any world size, so are the decisions.

    run.best_metric     "val_loss" (lower is better) or "val_accuracy" (higher is better)
    best epoch          the best score; ties go to the earlier epoch (run.keep_best)
    early stopping      as Keras's and Lightning's EarlyStopping: an epoch improves when
                        its score beats the best so far by more than min_delta (in the
                        metric's unit), and only such an epoch becomes the new reference;
                        the run stops after `patience` epochs in a row that do not improve
    plateau             PyTorch's ReduceLROnPlateau, replayed (nn/schedule.plateau_lr)
"""

import json
import math

from dpbp.nn import schedule

MODES = {"val_loss": "min", "val_accuracy": "max"}   # run.best_metric: which way is better


def scores_of(metric_lines, epochs, metric):
    """[`metric` of epoch 1, ..., of epoch `epochs`] from run_dir.read_metrics' lines:
    None where an epoch has no line or no number."""
    found = {}
    for epoch, line in metric_lines:
        value = json.loads(line).get(metric)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        found[epoch] = float(value) if ok and math.isfinite(value) else None
    return [found.get(epoch) for epoch in range(1, epochs + 1)]


def improves(score, best, mode, min_delta=0.0):
    """Whether `score` beats `best` by more than min_delta; a missing score never does."""
    if score is None:
        return False
    return score < best - min_delta if mode == "min" else score > best + min_delta


def worst(mode):
    """The best score before any epoch: every score improves on it."""
    return math.inf if mode == "min" else -math.inf


def best_epoch(scores, mode):
    """The epoch (from 1) of the best score, the earlier on ties; None when none has one."""
    best, at = worst(mode), None
    for epoch, score in enumerate(scores, start=1):
        if improves(score, best, mode):
            best, at = score, epoch
    return at


def epochs_without_improvement(scores, min_delta, mode):
    """Epochs at the end of `scores` since the last one that improved on the best so far
    by more than min_delta (the first epoch with a score always improves)."""
    best, waited = worst(mode), 0
    for score in scores:
        if improves(score, best, mode, min_delta):
            best, waited = score, 0
        else:
            waited += 1
    return waited


def stop_early(cfg, scores):
    """Whether early stopping (config `cfg`) ends the run after these epochs."""
    tc = cfg.train
    patience = tc.early_stopping_patience
    return bool(patience) and epochs_without_improvement(
        scores, tc.early_stopping_min_delta, MODES[cfg.run.best_metric]) >= patience


def why_stopped(cfg):
    """The reason early stopping gives, for the epoch's line and the done line."""
    tc = cfg.train
    return (f"no {cfg.run.best_metric} improvement > {tc.early_stopping_min_delta:g} in "
            f"{tc.early_stopping_patience} epochs")


def plateau_lr(cfg, scores, steps_per_epoch):
    """The plateau schedule's rate for the epoch after these; None under another."""
    return schedule.plateau_lr(cfg.train, scores, MODES[cfg.run.best_metric],
                               steps_per_epoch)
