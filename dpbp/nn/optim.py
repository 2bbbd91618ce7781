"""The optimizers, each one vector update of the flat parameter buffer.

SGD, exactly as torch.optim.SGD defines it (dampening 0):

    g   = grad + weight_decay * p
    buf = momentum * buf + g                (buf starts at 0, so the first buf is g)
    g   = g + momentum * buf  if nesterov  else  buf
    p   = p - lr * g

AdamW, exactly as torch.optim.AdamW defines it (decoupled weight decay), at update t
(counted from 1; updates actually applied, a skipped non-finite step is not one):

    p   = p * (1 - lr * weight_decay)
    m   = m + (1 - beta1) * (g - m)         (torch's lerp: beta1 m + (1 - beta1) g)
    v   = beta2 * v + (1 - beta2) * g * g
    v   = max(v_max, v)   if amsgrad        (v_max kept across updates)
    p   = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

Both hold the same small interface, which the loop, checkpoints and start-up use:
    params, grads    the flat buffers (views of the model's); the update is in place
    lr               set by the loop before every step, from the schedule
    step()           one update of params from grads (clobbers grads)
    nbytes()         memory held by the state and scratch space
    state()          {name: array}: the state, as the arrays themselves (a checkpoint
                     saves them as optimizer.<name>; start-up broadcasts them in place)
    load_state(arrays, source)   copy such arrays in; a one-line problem, or None

Every rank applies the same update to the same averaged gradient, so replicas stay
identical without communicating parameters. The updates are elementwise, so they run
over the flat buffers in chunks of CHUNK values: their few passes then read and write
the cache rather than main memory, and their only scratch space is a chunk.
"""

import numpy as np

CHUNK = 32768


def load_arrays(state, arrays, source, impossible=None):
    """Copy `arrays` ({name: array}, a subset of `state`'s names) into the optimizer's
    `state` arrays after checking them, with impossible(arrays) too where given: what
    the optimizer's update never produces there, in words, or None. Returns None, or a
    one-line problem."""
    for name, a in arrays.items():
        want = state[name]
        if a.shape != want.shape or a.dtype.kind != want.dtype.kind:
            kind = "an integer" if want.dtype.kind in "iu" else "floats"
            return (f"{source}: optimizer.{name} has shape {a.shape} and dtype {a.dtype}; "
                    f"the optimizer needs {kind} of shape {want.shape}")
        if not np.isfinite(a).all() or (a.dtype.kind in "iu" and (a < 0).any()):
            return f"{source}: optimizer.{name} holds NaN, Inf or negative counts"
    why = impossible(arrays) if impossible else None
    if why:
        return (f"{source}: {why}, which the optimizer never writes: the file was altered; "
                "resume from another checkpoint")
    for name, a in arrays.items():
        state[name][...] = a
    return None


class SGD:
    def __init__(self, params, grads, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
        self.params, self.grads = params, grads
        self.lr, self.momentum, self.nesterov = lr, momentum, nesterov
        self.weight_decay = weight_decay
        self.momentum_buffer = np.zeros_like(params) if momentum else None
        self._scratch = np.empty(min(CHUNK, params.size), dtype=params.dtype)

    @staticmethod
    def state_names(momentum):
        """The names state() has with this momentum."""
        return ("momentum_buffer",) if momentum else ()

    def state(self):
        return {} if self.momentum_buffer is None else {"momentum_buffer": self.momentum_buffer}

    def load_state(self, arrays, source):
        return load_arrays(self.state(), arrays, source)

    def nbytes(self):
        """Memory held by the optimizer's state and scratch space."""
        return sum(a.nbytes for a in self.state().values()) + self._scratch.nbytes

    def step(self):
        """One in-place update of `params`; clobbers `grads`."""
        for start in range(0, self.params.size, CHUNK):
            chunk = slice(start, start + CHUNK)
            buf = None if self.momentum_buffer is None else self.momentum_buffer[chunk]
            self._update(self.params[chunk], self.grads[chunk], buf)

    def _update(self, p, g, buf):
        # p, g, buf: matching chunks of params, grads and momentum_buffer
        tmp = self._scratch[:len(p)]
        if self.weight_decay:
            g += np.multiply(p, self.weight_decay, out=tmp)
        if self.momentum:
            buf *= self.momentum
            buf += g
            if self.nesterov:
                g += np.multiply(buf, self.momentum, out=tmp)
            else:
                g = buf
        p -= np.multiply(g, self.lr, out=tmp)


class AdamW:
    def __init__(self, params, grads, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False):
        self.params, self.grads = params, grads
        self.lr, (self.beta1, self.beta2), self.eps = lr, betas, eps
        self.weight_decay, self.amsgrad = weight_decay, amsgrad
        self.exp_avg, self.exp_avg_sq = np.zeros_like(params), np.zeros_like(params)
        self.max_exp_avg_sq = np.zeros_like(params) if amsgrad else None
        self.t = np.zeros((), dtype=np.int64)   # updates applied; an array, to broadcast
        self._scratch = np.empty(min(CHUNK, params.size), dtype=params.dtype)

    @staticmethod
    def state_names(amsgrad):
        """The names state() has with or without amsgrad."""
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()) + ("step",)

    def state(self):
        out = {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}
        if self.amsgrad:
            out["max_exp_avg_sq"] = self.max_exp_avg_sq
        out["step"] = self.t
        return out

    def load_state(self, arrays, source):
        return load_arrays(self.state(), arrays, source, self.impossible)

    @staticmethod
    def impossible(arrays):
        """What no update writes in a state to load: a negative exp_avg_sq (a running
        mean of squares), a max_exp_avg_sq below it (their running maximum). None if
        nothing."""
        v, v_max = arrays.get("exp_avg_sq"), arrays.get("max_exp_avg_sq")
        if v is not None and (v < 0).any():
            return "optimizer.exp_avg_sq holds negative values (a mean of squares)"
        if v is not None and v_max is not None and (v_max < v).any():
            return "optimizer.max_exp_avg_sq is below optimizer.exp_avg_sq (its maximum)"
        return None

    def nbytes(self):
        """Memory held by the optimizer's state and scratch space."""
        return sum(a.nbytes for a in self.state().values()) + self._scratch.nbytes

    def step(self):
        """One in-place update of `params`; clobbers `grads`."""
        self.t += 1
        t = int(self.t)
        # the scalars as torch computes them, in Python floats
        step_size = self.lr / (1 - self.beta1 ** t)
        bias_correction2_sqrt = (1 - self.beta2 ** t) ** 0.5
        decay = 1 - self.lr * self.weight_decay
        for start in range(0, self.params.size, CHUNK):
            chunk = slice(start, start + CHUNK)
            v_max = None if self.max_exp_avg_sq is None else self.max_exp_avg_sq[chunk]
            self._update(self.params[chunk], self.grads[chunk], self.exp_avg[chunk],
                         self.exp_avg_sq[chunk], v_max, decay, step_size,
                         bias_correction2_sqrt)

    def _update(self, p, g, m, v, v_max, decay, step_size, bias_correction2_sqrt):
        # p, g, m, v, v_max: matching chunks of params, grads, exp_avg, exp_avg_sq and
        # max_exp_avg_sq; torch's order of operations, but its lerp's fused multiply-add
        tmp = self._scratch[:len(p)]
        if self.weight_decay:
            p *= decay
        m += np.multiply(np.subtract(g, m, out=tmp), 1 - self.beta1, out=tmp)
        np.multiply(g, 1 - self.beta2, out=tmp)
        tmp *= g
        v *= self.beta2
        v += tmp
        if v_max is not None:
            v = np.maximum(v_max, v, out=v_max)
        denom = np.sqrt(v, out=tmp)
        denom /= bias_correction2_sqrt
        denom += self.eps
        update = np.multiply(m, -step_size, out=g)   # g is no longer needed
        update /= denom
        p += update

