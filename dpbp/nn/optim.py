"""SGD on the flat parameter buffer, exactly as torch.optim.SGD defines it (dampening 0):

    g   = grad + weight_decay * p
    buf = momentum * buf + g                (buf starts at 0, so the first buf is g)
    g   = g + momentum * buf  if nesterov  else  buf
    p   = p - lr * g

Every rank applies the same update to the same averaged gradient, so replicas stay
identical without communicating parameters.

The update is elementwise, so it runs over the flat buffers in chunks of CHUNK values:
its few passes then read and write the cache rather than main memory, and its only
scratch space is one chunk.
"""

import numpy as np

CHUNK = 32768


class SGD:
    def __init__(self, params, grads, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
        self.params, self.grads = params, grads
        self.lr, self.momentum, self.nesterov = lr, momentum, nesterov
        self.weight_decay = weight_decay
        self.momentum_buffer = np.zeros_like(params) if momentum else None
        self._scratch = np.empty(min(CHUNK, params.size), dtype=params.dtype)

    def nbytes(self):
        """Memory held by the optimizer's state and scratch space."""
        state = 0 if self.momentum_buffer is None else self.momentum_buffer.nbytes
        return state + self._scratch.nbytes

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
