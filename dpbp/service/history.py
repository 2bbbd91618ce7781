"""The run's history of validation losses: which epoch is best, and when to stop early.

Both are functions of the val_loss of every epoch so far, which metrics.jsonl records,
so a resumed run (or a branch, which starts with its parent's history) decides exactly
as the uninterrupted run would have, whatever it was resumed from.

    best epoch          the lowest val_loss; ties go to the earlier epoch (run.keep_best)
    early stopping      as Keras's and Lightning's EarlyStopping (mode "min"): an epoch
                        improves when its val_loss is below the best so far by more than
                        min_delta, and only such an epoch becomes the new reference; the
                        run stops after `patience` epochs in a row that do not improve
"""

import json
import math


def val_losses(metric_lines, epochs):
    """[val_loss of epoch 1, ..., of epoch `epochs`] from run_dir.read_metrics' lines:
    None where an epoch has no line or no number."""
    found = {}
    for epoch, line in metric_lines:
        value = json.loads(line).get("val_loss")
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        found[epoch] = float(value) if ok and math.isfinite(value) else None
    return [found.get(epoch) for epoch in range(1, epochs + 1)]


def best_epoch(losses):
    """The epoch (from 1) of the lowest val_loss in `losses`, the earlier on ties; None
    when none has one."""
    best, at = math.inf, None
    for epoch, loss in enumerate(losses, start=1):
        if loss is not None and loss < best:
            best, at = loss, epoch
    return at


def epochs_without_improvement(losses, min_delta):
    """Epochs at the end of `losses` since the last one that improved on the best so far
    by more than min_delta (the first epoch with a loss always improves)."""
    best, waited = math.inf, 0
    for loss in losses:
        if loss is not None and loss < best - min_delta:
            best, waited = loss, 0
        else:
            waited += 1
    return waited


def stop_early(tc, losses):
    """Whether early stopping (train config `tc`) ends the run after these epochs."""
    patience = tc.early_stopping_patience
    return bool(patience) and epochs_without_improvement(losses, tc.early_stopping_min_delta) \
        >= patience


def why_stopped(tc):
    """The reason early stopping gives, for the epoch's line and the done line."""
    return (f"no val_loss improvement > {tc.early_stopping_min_delta:g} in "
            f"{tc.early_stopping_patience} epochs")
