"""Layers, each with its forward and backward side by side.

Shapes use one vocabulary throughout dpbp:
    B     rows in this rank's shard of the global batch (may be 0)
    D_in  input width of a layer, D_out its output width
Backward reuses what forward cached, and writes weight gradients in place into views of
the model's flat gradient buffer (`dW`, `db`), never rebinding them.
"""

import numpy as np


class Linear:
    """y = x W^T + b, with W of shape (D_out, D_in) as in torch.nn.Linear."""

    def __init__(self, W, b, dW, db):
        self.W, self.b, self.dW, self.db = W, b, dW, db   # views into flat buffers

    def forward(self, x):
        # x (B, D_in) -> y (B, D_out)
        self.x = x
        y = x @ self.W.T
        y += self.b
        return y

    def backward(self, dy, need_dx=True):
        # dy (B, D_out) -> dx (B, D_in); sets dW (D_out, D_in) and db (D_out,)
        np.matmul(dy.T, self.x, out=self.dW)
        np.sum(dy, axis=0, out=self.db)
        return dy @ self.W if need_dx else None


class ReLU:
    def forward(self, x):
        # x (B, D) -> y (B, D)
        self.mask = x > 0
        return np.multiply(x, self.mask, out=x)   # x is the fresh output of a Linear

    def backward(self, dy):
        # dy (B, D) -> dx (B, D)
        return np.multiply(dy, self.mask, out=dy)


class Tanh:
    def forward(self, x):
        # x (B, D) -> y (B, D)
        self.y = np.tanh(x, out=x)
        return self.y

    def backward(self, dy):
        # dy (B, D) -> dx (B, D): dtanh/dx = 1 - y^2
        return dy * (1 - self.y * self.y)


class Sigmoid:
    def forward(self, x):
        # x (B, D) -> y (B, D); 0.5 (1 + tanh(x/2)) never overflows, unlike 1/(1+exp(-x))
        y = np.multiply(x, 0.5, out=x)
        np.tanh(y, out=y)
        y += 1
        y *= 0.5
        self.y = y
        return y

    def backward(self, dy):
        # dy (B, D) -> dx (B, D): dsigmoid/dx = y (1 - y)
        return dy * self.y * (1 - self.y)

