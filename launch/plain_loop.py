"""The reference for dpbp's speed: the data-parallel MLP step as a plain loop in numpy and
mpi4py, with nothing around it. One blocking Allreduce of the flat gradient per step,
OpenBLAS's own thread count, no checks, no stop vote, no watchdog.

    mpirun -n 4 python launch/plain_loop.py [--layers 784,1024,1024,10] [--batch-size 512]

Prints the median samples/s of the timed steps, as `python -m dpbp.bench` does for the
same network and global batch (docs/performance.md compares the two side by side).
"""

import argparse
import time

import numpy as np
from mpi4py import MPI

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--layers", default="784,1024,1024,10")
p.add_argument("--batch-size", type=int, default=512)
p.add_argument("--steps", type=int, default=30)
p.add_argument("--warmup", type=int, default=5)
args = p.parse_args()
comm, widths = MPI.COMM_WORLD, [int(w) for w in args.layers.split(",")]
rank, size = comm.Get_rank(), comm.Get_size()
rng = np.random.default_rng(0)
shapes = [s for a, b in zip(widths, widths[1:]) for s in ((b, a), (b,))]
params = np.concatenate([rng.uniform(-a ** -0.5, a ** -0.5, b * a + b)
                         for a, b in zip(widths, widths[1:])]).astype(np.float32)
grads, velocity = np.zeros_like(params), np.zeros_like(params)
views = lambda flat: [v.reshape(s) for v, s in zip(np.split(flat, np.cumsum(  # noqa: E731
    [np.prod(s) for s in shapes])[:-1]), shapes)]
W, G = views(params), views(grads)
B = args.batch_size * (rank + 1) // size - args.batch_size * rank // size   # this shard
x = np.random.default_rng([1, rank]).standard_normal((B, widths[0]), dtype=np.float32)
y = np.random.default_rng([2, rank]).integers(0, widths[-1], B)
times = []
for step in range(args.warmup + args.steps):
    t0 = time.perf_counter()
    acts = [x]
    for i in range(0, len(W), 2):   # forward: linear, relu, ..., linear
        z = acts[-1] @ W[i].T + W[i + 1]
        acts.append(np.maximum(z, 0) if i + 2 < len(W) else z)
    e = np.exp(acts[-1] - acts[-1].max(axis=1, keepdims=True))
    d = e / e.sum(axis=1, keepdims=True)
    d[np.arange(B), y] -= 1
    d /= args.batch_size   # the gradient of the global batch's mean loss
    for i in range(len(W) - 2, -1, -2):   # backward
        np.matmul(d.T, acts[i // 2], out=G[i])
        np.sum(d, axis=0, out=G[i + 1])
        if i:
            d = (d @ W[i]) * (acts[i // 2] > 0)
    comm.Allreduce(MPI.IN_PLACE, grads, op=MPI.SUM)   # blocking, busy-waiting
    velocity *= 0.9
    velocity += grads
    params -= 0.01 * velocity
    times.append(time.perf_counter() - t0)
# as dpbp.bench counts: each step's time is its slowest rank's, and the median over steps
steps = comm.gather(times[args.warmup:])
if rank == 0:
    slowest = np.median(np.max(steps, axis=0))
    print(f"plain loop: {size} ranks, {args.layers}, global batch {args.batch_size}: "
          f"{args.batch_size / slowest:,.0f} samples/s")
