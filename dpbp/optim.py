"""SGD on the flat parameter buffer, exactly as torch.optim.SGD defines it (dampening 0):

    g   = grad + weight_decay * p
    buf = momentum * buf + g                (buf starts at 0, so the first buf is g)
    g   = g + momentum * buf  if nesterov  else  buf
    p   = p - lr * g

Every rank applies the same update to the same averaged gradient, so replicas stay
identical without communicating parameters.
"""

import numpy as np


class SGD:
    def __init__(self, params, grads, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
        self.params, self.grads = params, grads
        self.lr, self.momentum, self.nesterov = lr, momentum, nesterov
        self.weight_decay = weight_decay
        self.momentum_buffer = np.zeros_like(params) if momentum else None
        self._scratch = np.empty_like(params)

    def step(self):
        """One in-place update of `params`; clobbers `grads`."""
        g, tmp = self.grads, self._scratch
        if self.weight_decay:
            g += np.multiply(self.params, self.weight_decay, out=tmp)
        if self.momentum:
            buf = self.momentum_buffer
            buf *= self.momentum
            buf += g
            if self.nesterov:
                g += np.multiply(buf, self.momentum, out=tmp)
            else:
                g = buf
        self.params -= np.multiply(g, self.lr, out=tmp)
