"""The learning rate at every optimizer step: a pure function of the config, the step and,
for the plateau schedule, the history of the metric it watches.

    base      = lr, times batch_size / base_batch_size under lr_scaling = "linear"
    warmup    the first W = round(warmup_epochs * steps_per_epoch) steps ramp linearly,
              base * (s + 1) / W at step s (Goyal et al. 2017, "Accurate, Large Minibatch
              SGD": per step, not per epoch, so no step jumps)
    constant  base
    step      base * gamma ** (milestones reached), a milestone m reached from epoch m on
              (after m epochs)
    cosine    base * (1 + cos(pi * t / T)) / 2 over the T steps after warmup, t = 0..T-1:
              from base down towards 0 at the last step
    plateau   torch.optim.lr_scheduler.ReduceLROnPlateau (threshold_mode "rel"): the rate
              changes at epoch ends only, as plateau_lr computes it from the metric of
              the epochs so far
Steps count from 0 over the whole run, so a resumed run continues the same curve.
"""

import math

PLATEAU_EPS = 1e-8   # ReduceLROnPlateau's eps: a smaller reduction is not made


def base_lr(tc):
    """train.lr after the linear scaling rule, if asked for."""
    return tc.lr * (tc.batch_size / tc.base_batch_size if tc.lr_scaling == "linear" else 1)


def lr_at(tc, step, steps_per_epoch, plateau=None):
    """The learning rate of optimizer step `step` (from 0) under train config `tc`;
    `plateau`: under the plateau schedule, the rate plateau_lr gives for the step's epoch."""
    base = base_lr(tc)
    warmup = round(tc.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return base * (step + 1) / warmup
    if tc.schedule == "plateau":
        return plateau
    if tc.schedule == "step":
        return base * tc.gamma ** sum(step // steps_per_epoch >= m for m in tc.milestones)
    if tc.schedule == "cosine":
        total = tc.epochs * steps_per_epoch - warmup
        return base * (1 + math.cos(math.pi * (step - warmup) / total)) / 2
    return base


def plateau_lr(tc, scores, mode, steps_per_epoch):
    """Under the plateau schedule, the rate of the epoch that follows those whose watched
    metric is `scores` (epoch 1 first; None where an epoch has none, which counts as no
    improvement, as NaN does for PyTorch); None under another schedule. `mode` "min" or
    "max": whether lower or higher is better. The same state machine as PyTorch's
    ReduceLROnPlateau, replayed over the history, so there is no state to save: an
    epoch improves when its score beats the best by the relative plateau_threshold;
    after more than plateau_patience epochs without improvement the rate is multiplied
    by plateau_factor (down to min_lr), and the next plateau_cooldown epochs are not
    counted. Only epochs that began after warmup are watched: the plateau starts after it."""
    if tc.schedule != "plateau":
        return None
    lr, best = base_lr(tc), math.inf if mode == "min" else -math.inf
    bad = cooldown = 0
    warmup = round(tc.warmup_epochs * steps_per_epoch)
    for epoch, score in enumerate(scores):
        if epoch * steps_per_epoch < warmup:
            continue
        if score is not None and (score < best * (1.0 - tc.plateau_threshold) if mode == "min"
                                  else score > best * (tc.plateau_threshold + 1.0)):
            best, bad = score, 0
        else:
            bad += 1
        if cooldown > 0:
            cooldown, bad = cooldown - 1, 0
        if bad > tc.plateau_patience:
            reduced = max(lr * tc.plateau_factor, tc.min_lr)
            if lr - reduced > PLATEAU_EPS:
                lr = reduced
            cooldown, bad = tc.plateau_cooldown, 0
    return lr
