"""The learning rate at every optimizer step: a pure function of the config and the step.

    base      = lr, times batch_size / base_batch_size under lr_scaling = "linear"
    warmup    the first W = round(warmup_epochs * steps_per_epoch) steps ramp linearly,
              base * (s + 1) / W at step s (Goyal et al. 2017, "Accurate, Large Minibatch
              SGD": per step, not per epoch, so no step jumps)
    constant  base
    step      base * gamma ** (milestones reached), a milestone m reached from epoch m on
              (after m epochs)
    cosine    base * (1 + cos(pi * t / T)) / 2 over the T steps after warmup, t = 0..T-1:
              from base down towards 0 at the last step
Steps count from 0 over the whole run, so a resumed run continues the same curve.
"""

import math


def base_lr(tc):
    """train.lr after the linear scaling rule, if asked for."""
    return tc.lr * (tc.batch_size / tc.base_batch_size if tc.lr_scaling == "linear" else 1)


def lr_at(tc, step, steps_per_epoch):
    """The learning rate of optimizer step `step` (from 0) under train config `tc`."""
    base = base_lr(tc)
    warmup = round(tc.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return base * (step + 1) / warmup
    if tc.schedule == "step":
        return base * tc.gamma ** sum(step // steps_per_epoch >= m for m in tc.milestones)
    if tc.schedule == "cosine":
        total = tc.epochs * steps_per_epoch - warmup
        return base * (1 + math.cos(math.pi * (step - warmup) / total)) / 2
    return base
