"""How fast does dpbp train here? Times dpbp.train.train_step on synthetic data.

    python -m dpbp.bench                              # one process
    mpirun -n 2 python -m dpbp.bench --compare-torch  # two ranks, and PyTorch DDP alike
    python -m dpbp.bench --config configs/mnist.toml  # a training config's network and batch

Each rank trains on its shard of a global batch of random inputs and labels, with the
same train_step as `python -m dpbp.train` (no separate fast path). After warm-up steps,
every timed step is measured on every rank; a step's time is its slowest rank's. The
report: samples/s (global batch / median step time), the step split into compute and
communication wait (time inside the gradient Allreduce, including waiting for slower
ranks), achieved FLOP/s (the layers' count of the operations dpbp computes per sample,
forward and backward, x samples/s), the float32 GEMM peak of the same ranks and threads
(1024x1024 matmuls, all ranks at once, best of short windows before and after the
steps), their ratio (MFU), and peak resident memory per rank next to what the run
needs. `--config` times a training config's network and global batch instead of
`--layers`. `--compare-torch` runs the same network, batch and steps under
torch.nn.parallel.DistributedDataParallel (gloo) in the same processes, where PyTorch is
installed; dpbp never needs it. `--scaling-model` then measures what the model of
parallel/scaling.py needs (compute per sample and per step, timed alone; the Allreduce at
several sizes, fitted to MPICH's algorithm; the 16-bit sum's own work), checks its
prediction of this run's step, and predicts steps and efficiency on 1 to 1,024 nodes.
"""

import time

# Timed: hundreds of ranks import the training modules at once (all that dpbp.train
# imports: the step, evaluation, set-up and the guard, with numpy).
_t0 = time.perf_counter()
import dpbp.parallel.evaluation  # noqa: E402, F401
import dpbp.service.guard  # noqa: E402, F401
import dpbp.service.startup  # noqa: E402, F401

IMPORT_SECONDS = time.perf_counter() - _t0

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
from datetime import timedelta  # noqa: E402
from functools import partial  # noqa: E402

import numpy as np  # noqa: E402

from dpbp.errors import ArgumentParser, UserError, plural  # noqa: E402
from dpbp.nn import noise  # noqa: E402
from dpbp.nn.losses import cross_entropy  # noqa: E402
from dpbp.nn.model import mlp_layers, walk  # noqa: E402
from dpbp.nn.optim import SGD  # noqa: E402
from dpbp.parallel import comm as mpi  # noqa: E402
from dpbp.parallel import half, scaling, sharding  # noqa: E402
from dpbp.parallel.step import PlainSum, clip_grad_norm_, train_step  # noqa: E402
from dpbp.parallel.threads import blas_threads, cores_for, limit_blas_threads  # noqa: E402
from dpbp.service import config, network  # noqa: E402
from dpbp.service import data as datasets  # noqa: E402
from dpbp.service.config import TrainConfig  # noqa: E402
from dpbp.service.startup import gradient_sum, new_optimizer  # noqa: E402

GEMM_N = 1024
LR, MOMENTUM = 0.01, 0.9
MEMORY_SLACK = 1.5   # peak RSS may exceed what the run needs by this factor
DEFAULT_LAYERS, DEFAULT_BATCH = [784, 1024, 1024, 10], 512


class Net:
    """What is timed: the network (layer specs, one input row's shape) in a dtype."""

    def __init__(self, layers, input_shape, dtype):
        self.layers, self.input_shape, self.dtype = layers, tuple(input_shape), np.dtype(dtype)

    def build(self):
        """The model, its weights drawn as a training run draws them."""
        model = network.build(self.layers, self.input_shape, self.dtype)
        model.init_(np.random.default_rng([0, 0x1417]))
        return model

    def batch(self, model, B, seed):
        """B random input rows and labels for `model`."""
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((B, *self.input_shape), dtype=np.float64).astype(self.dtype)
        return x, rng.integers(0, model.output_shape[-1], size=B)


# ----------------------------------------------------------------------------- dpbp

def bench_dpbp(comm, net, N, warmup, steps, tc):
    """Collective. Per-rank arrays of step, communication-wait and optimizer-update
    seconds of the timed steps, the CPU seconds this rank used in them, the bytes of
    the model, optimizer state and activations of this rank, the bytes of the layers'
    scratch among them (bounded whatever the batch), the model, and the layers' batch
    sums: (calls per step, bytes each, this rank's seconds in them per step)."""
    model = net.build()
    optimizer = new_optimizer(tc, model)
    summed = gradient_sum(tc, comm, model)
    rows = summed.rows(N)
    B = rows.stop - rows.start
    x, y = net.batch(model, B, [1, comm.rank])
    summed.batch_sum = stats = TimedBatchSum(summed.batch_sum)   # the layers' sums, timed

    seconds, waits, sums = np.empty(steps), np.empty(steps), np.empty((steps, 2))
    for k in range(-warmup, steps):
        if k == 0:
            cpu = time.process_time()
        comm.wait_seconds, stats.calls, stats.seconds, stats.values = 0.0, 0, 0.0, 0
        t0 = time.perf_counter()
        keys = noise.row_keys(0, warmup + k, np.arange(rows.start, rows.stop)) \
            if model.draws else None   # as the loop makes them, every step
        train_step(model, optimizer, cross_entropy, x, y, N, summed, 0.0, keys)
        if k >= 0:
            seconds[k], waits[k] = time.perf_counter() - t0, comm.wait_seconds
            sums[k] = stats.calls, stats.seconds
    sums = int(sums[0, 0]), 8 * stats.values // max(stats.calls, 1), sums[:, 1].copy()
    cpu = time.process_time() - cpu
    updates = np.empty(steps)
    for k in range(steps):   # the update alone, on the last step's gradient
        t0 = time.perf_counter()
        optimizer.step()
        updates[k] = time.perf_counter() - t0
    state = (model.params.nbytes + model.grads.nbytes + summed.scratch_bytes()
             + optimizer.nbytes() + sum(a.nbytes for a in model.buffers.values()))
    loss = 3 * model.output_shape[-1] * model.params.itemsize * B   # outputs' gradient, softmax
    scratch = sum(layer.scratch_bytes() for layer in model.layers)   # bounded: blocks
    return seconds, waits, updates, cpu, state + x.nbytes + row_buffer_bytes(model, x) + loss, \
        scratch, model, sums


class TimedBatchSum:
    """A gradient sum's batch_sum (the layers' statistics over the global batch, as
    batchnorm's), counting its calls and their seconds, waits for other ranks included."""

    def __init__(self, batch_sum):
        self.batch_sum, self.calls, self.seconds, self.values = batch_sum, 0, 0.0, 0

    def __call__(self, partials):
        t0 = time.perf_counter()
        total = self.batch_sum(partials)
        self.calls, self.seconds = self.calls + 1, self.seconds + time.perf_counter() - t0
        self.values += np.size(total)
        return total


def row_buffer_bytes(model, x):
    """What the layers hold after a step: the memory of their row buffers (outputs, input
    gradients, masks, random bits, scratch space), each counted once however many views
    of it they hold (a channels-last buffer is a transposed view), but not the model's
    flat buffers nor the batch `x`."""
    def root(a):
        while a.base is not None:
            a = a.base
        return a
    held = {}
    for layer in model.layers:
        for value in vars(layer).values():
            for a in value if isinstance(value, tuple) else (value,):
                if isinstance(a, np.ndarray):
                    held[id(root(a))] = root(a)
    for a in (model.params, model.grads, *model.buffers.values(), x):
        held.pop(id(root(a)), None)
    return sum(a.nbytes for a in held.values())


def gemm_rates(comm, dtype, windows=3, window_seconds=0.2):
    """Collective. FLOP/s of this rank's GEMM_N x GEMM_N matmuls while every rank runs
    them, in short windows that start together on every rank."""
    rng = np.random.default_rng(comm.rank)
    a, b = (rng.standard_normal((GEMM_N, GEMM_N)).astype(dtype) for _ in range(2))
    c = np.empty_like(a)
    np.matmul(a, b, out=c)
    rates = np.empty(windows)
    for k in range(-1, windows):   # the first window warms up
        comm.barrier()
        t0, n = time.perf_counter(), 0
        while (elapsed := time.perf_counter() - t0) < window_seconds:
            np.matmul(a, b, out=c)
            n += 1
        if k >= 0:
            rates[k] = 2 * GEMM_N ** 3 * n / elapsed
    return rates


# ----------------------------------------------------------------------------- scaling model

SWEEP_BYTES = (4 << 10, 32 << 10, 256 << 10, 2 << 20, 8 << 20)   # the Allreduce sizes fitted
SCALING_REPS = 10
MAX_REPS = 300
DEFAULT_LATENCY_US = 10.0   # between nodes, where one rank has measured no Allreduce


def timed(comm, fn, reps=SCALING_REPS, window=0.3):
    """Collective. The median over calls of fn(), started together on every rank after
    one untimed call, of the slowest rank's seconds: `reps` calls, or more where they take
    less than `window` seconds in all (short calls: a busy moment hits fewer of them)."""
    comm.barrier()
    t0 = time.perf_counter()
    fn()
    first = np.array([time.perf_counter() - t0])
    first = comm.allreduce_max_(first)[0]
    reps = max(reps, min(MAX_REPS, math.ceil(window / max(first, 1e-9))))
    seconds = np.empty(reps)
    for k in range(reps):
        comm.barrier()
        t0 = time.perf_counter()
        fn()
        seconds[k] = time.perf_counter() - t0
    return float(np.median(gather(comm, seconds).max(axis=0)))


def measure_compute(comm, net, N):
    """Collective. Seconds of this host's step without the gradient sum, on a global batch
    of N rows (each rank, at once, runs train_step on its shard in a world of its own), and
    of the part that does not depend on the rows (the update and the gradient norm)."""
    model = net.build()
    optimizer = SGD(model.params, model.grads, LR, MOMENTUM)
    B = len(range(N)[sharding.shard(N, comm.rank, comm.size)])
    x, y = net.batch(model, B, [2, comm.rank])
    keys = noise.row_keys(0, 0, np.arange(B)) if model.draws else None
    alone = PlainSum(mpi.Comm(None), model.grads)   # the plain sum of a world of one

    def update():
        clip_grad_norm_(model.grads, 0.0)
        optimizer.step()
    return (timed(comm, lambda: train_step(model, optimizer, cross_entropy, x, y, max(B, 1),
                                           alone, 0.0, keys)),
            timed(comm, update))


def measure_sums(comm, weights):
    """Collective. [(ranks, bytes, seconds)] of the Allreduce of SWEEP_BYTES float32
    through comm.allreduce_ (none at one rank); the seconds per byte of adding two float32
    arrays (gamma), out of cache; and, by 16-bit kind, (fixed, per rank) seconds of what a rank computes
    in a 16-bit sum of `weights` values besides sending (its Python loop visits every
    rank's part: measured at 2 and 256 ranks, linear in between and beyond)."""
    points = []
    for n in SWEEP_BYTES if comm.size > 1 else ():
        buf = np.zeros(n // 4, np.float32)
        points.append((comm.size, n, timed(comm, lambda: comm.allreduce_(buf))))
    a, b = (np.ones(SWEEP_BYTES[-1] // 4, np.float32) for _ in range(2))   # out of cache
    gamma = timed(comm, lambda: np.add(a, b, out=a)) / a.nbytes
    b = np.ones(weights, np.float32)
    convert = {}
    for kind in ("float16", "bfloat16"):
        t2, t256 = (timed(comm, partial(half.allreduce_16_, Alone(p), b, kind,
                                        half.Buffers(weights, 0, p))) for p in (2, 256))
        per_rank = max(0.0, (t256 - t2) / 254)
        convert[kind] = (max(0.0, t2 - 2 * per_rank), per_rank)
    return points, gamma, convert


class Alone:
    """A world of `size` ranks in which nothing moves (the others' parts are zeros):
    half.allreduce_16_ on it does a rank's own work of a 16-bit sum, and no more."""

    rank = 0

    def __init__(self, size):
        self.size, self.wait_seconds = size, 0.0

    def allreduce_max_(self, buf, like=None):
        return buf

    def alltoallv_(self, send, send_counts, send_starts, recv, recv_counts, recv_starts):
        recv[...] = 0   # zeros: the sums of repeated calls stay put

    def allgatherv_in_place_(self, buf, counts, starts):
        pass


def measure_scaling(comm, args, net, weights, step, batch_sums=(0, 0)):
    """Collective. What the scaling model needs, measured here, its predictions, and its
    check against this run's own step (the figures --json adds)."""
    alone, update = measure_compute(comm, net, args.batch_size)
    points, gamma, convert = measure_sums(comm, weights)
    alpha, beta = scaling.fit_alpha_beta(points, gamma) if points else (None, None)
    kind, host_sum = args.comm_dtype, 0.0   # the sum among this host's ranks, as fitted
    if points and kind == "float32":
        host_sum = scaling.allreduce_seconds(comm.size, 4 * weights, alpha, beta, gamma)
    elif points:
        host_sum = scaling.half_sum_seconds(comm.size, weights, kind, alpha, beta,
                                            scaling.convert_at(convert[kind], comm.size))
    between = (args.latency_us * 1e-6 if args.latency_us is not None
               else alpha if alpha is not None else DEFAULT_LATENCY_US * 1e-6)
    node = scaling.Node(max(alone - update, 0.0) / args.batch_size, update, weights, between,
                        gamma, host_sum, convert, *batch_sums)
    predicted = scaling.compute_seconds(node, args.batch_size)
    return dict(
        scaling_model=scaling.records(node, args.batch_size),
        allreduce_latency_us=None if alpha is None else 1e6 * alpha,
        allreduce_gbps=None if not beta else 8 / beta / 1e9,
        scaling_inputs=dict(
            seconds_per_sample=node.seconds_per_sample, update_seconds=update,
            reduction_ns_per_byte=1e9 * gamma, convert_seconds=convert,
            host_sum_seconds=host_sum, allreduce_points=points,
            latency_us_between_nodes=1e6 * between,
            latency_source="--latency-us" if args.latency_us is not None
            else "fitted" if alpha is not None else "assumed (one rank measures none)"),
        scaling_check=dict(world_size=comm.size, predicted_step_ms=1e3 * predicted,
                           measured_step_ms=1e3 * step,
                           error_percent=100 * (predicted - step) / step),
        scaling_targets=targets(node, args.batch_size),
        batch_sums_dominate={link: scaling.batch_sums_dominate(node, link)
                             for link in scaling.LINKS_GBPS})


def targets(node, batch):
    """For 64 and 256 nodes, float32 sums: the per-node batch that keeps 90 % weak-scaling
    efficiency on each link, and the link that keeps it at `batch` rows per node."""
    return [dict(nodes=p, target=0.9,
                 per_node_batch={link: scaling.batch_for_efficiency(node, p, link)
                                 for link in scaling.LINKS_GBPS},
                 link_gbps_at_batch=finite(scaling.link_for_efficiency(node, p, batch)))
            for p in (64, 256)]


def finite(value):
    """value, or None for infinity (JSON has no infinity)."""
    return None if math.isinf(value) else value


# ----------------------------------------------------------------------------- PyTorch

# dpbp's layer types as torch.nn modules, for --compare-torch: (torch.nn, the shape of an
# input row, the spec's arguments) -> module
TORCH_LAYERS = {
    "linear": lambda nn, shape, out_features: nn.Linear(shape[-1], out_features),
    "relu": lambda nn, shape: nn.ReLU(),
    "tanh": lambda nn, shape: nn.Tanh(),
    "sigmoid": lambda nn, shape: nn.Sigmoid(),
    "dropout": lambda nn, shape, p: nn.Dropout(p),
    "conv2d": lambda nn, shape, out_channels, **kw: nn.Conv2d(shape[0], out_channels, **kw),
    "maxpool2d": lambda nn, shape, **kw: nn.MaxPool2d(**kw),
    "avgpool2d": lambda nn, shape, **kw: nn.AvgPool2d(**kw),
    "flatten": lambda nn, shape: nn.Flatten(),
    "batchnorm1d": lambda nn, shape, **kw: nn.BatchNorm1d(shape[0], **torch_norm(kw)),
    "batchnorm2d": lambda nn, shape, **kw: nn.BatchNorm2d(shape[0], **torch_norm(kw)),
}


def torch_norm(arguments):
    """A batchnorm spec's arguments as torch's: momentum "cumulative" is None there."""
    arguments = {k: v for k, v in arguments.items() if k != "num_features"}
    if arguments.get("momentum") == "cumulative":
        arguments["momentum"] = None
    return arguments


def torch_network(torch, net):
    """net's layers as a torch.nn.Sequential in net's dtype (torch's own initial weights)."""
    modules = []
    for spec, (_, shape, _) in zip(net.layers, walk(net.layers, net.input_shape)[0]):
        arguments = {k: v for k, v in spec.items() if k != "type"}
        modules.append(TORCH_LAYERS[spec["type"]](torch.nn, shape, **arguments))
    return torch.nn.Sequential(*modules).to(getattr(torch, net.dtype.name))


def bench_torch(torch, comm, net, N, warmup, steps, threads):
    """Collective. The same network, batch and steps under DistributedDataParallel (gloo)
    in these processes; per-rank step seconds, and the CPU seconds of the timed steps."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(threads)
    host = comm.bcast_obj(socket.gethostname())
    on_one_node = comm.allreduce_min(int(host == socket.gethostname())) == 1
    addr = "127.0.0.1" if on_one_node else host
    store = None
    if comm.rank == 0:
        store = dist.TCPStore(addr, 0, comm.size, is_master=True, wait_for_workers=False,
                              timeout=timedelta(seconds=60))
    port = comm.bcast_obj(store.port if store is not None else None)
    if comm.rank != 0:
        store = dist.TCPStore(addr, port, comm.size, is_master=False,
                              timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=comm.rank, world_size=comm.size)
    try:
        torch.manual_seed(0)
        model = DistributedDataParallel(torch_network(torch, net))
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        loss_fn = torch.nn.CrossEntropyLoss()
        B = sharding.shard_sizes(N, comm.size)[comm.rank]
        gen = torch.Generator().manual_seed(1 + comm.rank)
        x = torch.randn(B, *net.input_shape, generator=gen).to(getattr(torch, net.dtype.name))
        y = torch.randint(0, walk(net.layers, net.input_shape)[1][-1], (B,), generator=gen)
        seconds = np.empty(steps)
        for k in range(-warmup, steps):
            if k == 0:
                cpu = time.process_time()
            t0 = time.perf_counter()
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
            if k >= 0:
                seconds[k] = time.perf_counter() - t0
        return seconds, time.process_time() - cpu
    finally:
        dist.destroy_process_group()


def compare_torch(comm, args, net, flops_per_sample, threads, peak_gemm, step):
    """Collective. PyTorch DDP's figures on the same network, batch, steps and threads."""
    with mpi.agreement(comm):
        torch = import_torch()
        missing = sorted({s["type"] for s in net.layers} - set(TORCH_LAYERS))
        if missing:
            raise UserError(f"--compare-torch: no PyTorch module stands for {missing[0]} "
                            "layers here (bench.TORCH_LAYERS)")
    seconds, cpu = bench_torch(torch, comm, net, args.batch_size, args.warmup, args.steps,
                               threads)
    torch_step = np.median(gather(comm, seconds).max(axis=0))
    return dict(torch_version=torch.__version__,
                torch_samples_per_second=args.batch_size / torch_step,
                torch_mfu=flops_per_sample * args.batch_size / torch_step / peak_gemm,
                torch_cpu_seconds_per_sample=gather(comm, cpu).sum()
                / (args.steps * args.batch_size),
                speedup_vs_torch=torch_step / step)


NO_TORCH = ("--compare-torch needs PyTorch, which is not installed here (pip install torch; "
            "dpbp itself never needs it)")


def import_torch():
    """PyTorch, or a UserError saying that --compare-torch needs it. Imported only after
    dpbp's own figures are taken, so that it weighs on neither their time nor memory."""
    try:
        import torch
        import torch.distributed as dist
    except ImportError as e:
        raise UserError(f"{NO_TORCH}: {e}") from None
    if not dist.is_available() or not dist.is_gloo_available():
        raise UserError(f"--compare-torch needs PyTorch with the gloo backend; "
                        f"torch {torch.__version__} here has none")
    return torch


# ----------------------------------------------------------------------------- the report

def gather(comm, value):
    """Collective. Every rank's float, or every rank's equal-length array, in rank order."""
    mine = np.atleast_1d(np.asarray(value, dtype=np.float64))
    out = np.empty(comm.size * mine.size)
    comm.allgatherv_(mine, out, [mine.size] * comm.size)
    return out.reshape(comm.size, mine.size)


def rss_bytes():
    """This process's resident memory now (Linux), or its peak where /proc is absent."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def peak_rss_bytes():
    """This process's peak resident memory. On Linux from VmHWM: getrusage's ru_maxrss
    would also count what the parent held when it forked this process."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024   # bytes on macOS, else KiB


def run_bench(args, net, comm, say):
    dtype = net.dtype
    t0 = time.perf_counter()
    limit_blas_threads(comm.ranks_sharing_cores, args.deterministic, comm.counted)
    threads = blas_threads()
    rates = gemm_rates(comm, dtype)
    base_rss = gather(comm, rss_bytes()).max()   # interpreter, libraries, MPI, BLAS buffers

    tc = TrainConfig(batch_size=args.batch_size, comm_dtype=args.comm_dtype,
                     deterministic=args.deterministic, grains=args.grains,
                     optimizer=args.optimizer, lr=LR, momentum=MOMENTUM)
    seconds, waits, updates, cpu, need, scratch, model, sums = bench_dpbp(
        comm, net, args.batch_size, args.warmup, args.steps, tc)
    peak_rss = gather(comm, peak_rss_bytes()).max()
    # The peak: the best window, before or after the steps, of all ranks' rates summed
    # (others' work on a shared machine only ever lowers a window's rate).
    rates = np.concatenate([rates, gemm_rates(comm, dtype)])
    peak_gemm = gather(comm, rates).sum(axis=0).max()
    need = gather(comm, need).max()
    step = np.median(gather(comm, seconds).max(axis=0))
    comm_fraction = float(np.mean(gather(comm, waits.sum() / seconds.sum())))
    weights = model.params.size
    samples_per_second = args.batch_size / step
    flops = model.flops_per_sample * samples_per_second
    budget = MEMORY_SLACK * (base_rss + need)
    r = dict(world_size=comm.size, threads_per_rank=threads, cores=len(mpi.available_cores()),
             ranks_sharing_cores=comm.ranks_sharing_cores, ranks_on_host=comm.ranks_on_host,
             ranks_counted=comm.counted, mpi=comm.library,
             network=model.describe(), layers=net.layers, input_shape=net.input_shape,
             weights=weights, batch_size=args.batch_size, dtype=dtype.name,
             warmup=args.warmup, steps=args.steps, comm_dtype=args.comm_dtype,
             deterministic=args.deterministic,
             grains=args.grains if args.deterministic else None,
             optimizer=args.optimizer,
             update_seconds=float(np.median(gather(comm, updates).max(axis=0))),
             samples_per_second=samples_per_second,
             step_seconds=step, compute_seconds=step * (1 - comm_fraction),
             comm_seconds=step * comm_fraction, comm_fraction=comm_fraction,
             batch_sums_per_step=sums[0], batch_sum_bytes=sums[1],   # calls, bytes each
             batch_sum_seconds=float(np.median(gather(comm, sums[2]).max(axis=0))),
             cpu_seconds_per_sample=gather(comm, cpu).sum() / (args.steps * args.batch_size),
             flops_per_sample=model.flops_per_sample, flops=flops, peak_flops=peak_gemm,
             mfu=flops / peak_gemm,
             peak_rss_mb=peak_rss / 2**20, memory_budget_mb=budget / 2**20,
             base_rss_mb=base_rss / 2**20, model_and_activations_mb=need / 2**20,
             scratch_mb=gather(comm, scratch).max() / 2**20,
             import_seconds=float(gather(comm, IMPORT_SECONDS).max()))

    say(report(r))
    if args.compare_torch:
        r.update(compare_torch(comm, args, net, model.flops_per_sample, threads, peak_gemm,
                               step))
        say(report_torch(r))
    if args.scaling_model:
        r.update(measure_scaling(comm, args, net, weights, step, sums[:2]))
        say(report_scaling(r))
    r["bench_seconds"] = time.perf_counter() - t0
    if args.json:
        say(json.dumps(r))
    return 0


def report(r):
    mb = lambda v: f"{v:,.0f} MB"
    ms = lambda v: f"{1e3 * v:.2f} ms"
    N, size = r["batch_size"], r["world_size"]   # grains: None unless deterministic
    per_rank = sorted({len(range(N)[sharding.batch_shard(N, rank, size, r["grains"])])
                       for rank in range(size)})
    lines = [
        f"dpbp bench: {plural(r['world_size'], 'rank')} ({r['mpi']}), "
        f"{plural(r['threads_per_rank'], 'BLAS thread')} per rank "
        f"({cores_for(r['cores'], r['ranks_sharing_cores'], r['ranks_counted'])})",
        f"network {r['network']}; {r['dtype']}, {r['weights']:,} "
        f"weights; global batch {r['batch_size']} (per rank {'-'.join(map(str, per_rank))}); "
        f"{r['warmup']} warm-up + {r['steps']} timed steps; gradients summed "
        "after backpropagation"
        + ("" if r["comm_dtype"] == "float32" else f", sent as {r['comm_dtype']}")
        + (f", exactly in {r['grains']} grains (deterministic)" if r["deterministic"] else "")
        + f"; optimizer {r['optimizer']}",
        f"samples/s        {r['samples_per_second']:,.0f}",
        f"step (median)    {ms(r['step_seconds'])}: compute {ms(r['compute_seconds'])}, "
        f"communication wait {ms(r['comm_seconds'])} ({100 * r['comm_fraction']:.1f} %)",
        f"update (median)  {ms(r['update_seconds'])}, the optimizer's step alone "
        f"({100 * r['update_seconds'] / r['step_seconds']:.1f} % of a step)",
        f"CPU time         {1e6 * r['cpu_seconds_per_sample']:,.1f} us per sample (all ranks "
        "together; waiting ranks that spin count too)",
        f"achieved         {r['flops'] / 1e9:,.1f} GFLOP/s ({r['flops_per_sample']:,} FLOPs "
        "per sample, as dpbp computes them, x samples/s)",
        f"GEMM peak        {r['peak_flops'] / 1e9:,.1f} GFLOP/s ({r['dtype']} {GEMM_N}x{GEMM_N} "
        f"matmul, all ranks at once)",
        f"MFU              {r['mfu']:.3f}",
        f"peak memory      {mb(r['peak_rss_mb'])} per rank (largest); budget "
        f"{mb(r['memory_budget_mb'])} = {MEMORY_SLACK} x ({mb(r['base_rss_mb'])} interpreter "
        f"and libraries + {mb(r['model_and_activations_mb'])} parameters, gradients, "
        f"optimizer state and activations"
        + (f", of which {r['scratch_mb']:,.1f} MB the layers' scratch, a few blocks of rows "
           "whatever the batch" if r["scratch_mb"] else "") + ")",
        f"import           {r['import_seconds']:.3f} s, the training modules (slowest rank)",
    ]
    if r["batch_sums_per_step"]:
        lines.insert(4, f"batch sums       {r['batch_sums_per_step']} per step, "
                     f"{ms(r['batch_sum_seconds'])} (median, slowest rank, waits included; "
                     f"{100 * r['batch_sum_seconds'] / r['step_seconds']:.1f} % of a step): "
                     "the layers' statistics over the global batch (batchnorm)")
    return "\n".join(lines)


def report_scaling(r):
    """The scaling model's lines: what it measured, its check, its predictions."""
    inputs, check = r["scaling_inputs"], r["scaling_check"]
    points = inputs["allreduce_points"]
    gbps = r["allreduce_gbps"]
    sums = ("Allreduce not measured (one rank)" if not points else
            f"Allreduce over this transport: latency {r['allreduce_latency_us']:.1f} us, "
            + (f"{gbps:.1f} Gb/s" if gbps else "bandwidth too high to resolve")
            + f" (MPICH's algorithm fitted to {len(points)} sizes, "
            f"{points[0][1] // 1024:,} KB to {points[-1][1] // 2**20:,} MB, at "
            f"{plural(r['world_size'], 'rank')})")
    convert = ", ".join(f"{1e3 * (fixed + 2 * per_rank):.2f} ms + {1e6 * per_rank:.1f} us per "
                        f"rank beyond 2 ({kind})"
                        for kind, (fixed, per_rank) in inputs["convert_seconds"].items())
    lines = [
        f"scaling model    measured here: the step without the sum {1e6 * inputs['seconds_per_sample']:.2f} "
        f"us per sample + {1e3 * inputs['update_seconds']:.2f} ms per step (update, gradient "
        f"norm); {sums}; adding arrays {inputs['reduction_ns_per_byte']:.3f} ns/byte; 16-bit "
        f"conversions {convert} per step",
        f"check            {plural(r['world_size'], 'rank')} on this host: predicted "
        f"{check['predicted_step_ms']:.2f} ms per step, measured {check['measured_step_ms']:.2f}"
        f" ms: error {check['error_percent']:+.1f} %",
        f"weak scaling     {r['batch_size']:,} rows per node, {4e-6 * r['weights']:.1f} MB "
        f"float32 gradient, {inputs['latency_us_between_nodes']:.1f} us latency between "
        f"nodes ({inputs['latency_source']}); efficiency by nodes (docs/scaling.md):",
        "  link     sum     " + "".join(f"{p:>6}" for p in scaling.NODES)]
    weak = [m for m in r["scaling_model"] if m["scaling"] == "weak"]
    for link in scaling.LINKS_GBPS:
        for kind in scaling.COMM_DTYPES:
            row = [m["efficiency"] for m in weak if (m["link_gbps"], m["comm_dtype"]) == (link, kind)]
            lines.append(f"  {link:>3} Gb/s {kind:<8}" + "".join(f"{e:6.2f}" for e in row))
    for t in r["scaling_targets"]:
        link = t["link_gbps_at_batch"]
        lines.append(
            f"90 % at {t['nodes']} nodes: per-node batch >= " + ", ".join(
                f"{b:,} ({link_} Gb/s)" for link_, b in t["per_node_batch"].items())
            + f"; at {r['batch_size']:,} rows per node, a link of "
            + ("no speed (latency alone is too much)" if link is None else f">= {link:.1f} Gb/s"))
    if r["batch_sums_per_step"]:
        lines.append(
            f"batch sums       {r['batch_sums_per_step']} per step, {r['batch_sum_bytes']:,} "
            "bytes each (mean): PREDICTED to take longer than the gradient sum from " + ", ".join(
                f"{'beyond ' + str(scaling.NODES[-1]) if p is None else p} nodes ({link} Gb/s)"
                for link, p in r["batch_sums_dominate"].items()))
    return "\n".join(lines)


def report_torch(r):
    return "\n".join([
        f"PyTorch {r['torch_version']} DDP (gloo), same ranks and threads: "
        f"{r['torch_samples_per_second']:,.0f} samples/s, MFU {r['torch_mfu']:.3f}, CPU time "
        f"{1e6 * r['torch_cpu_seconds_per_sample']:,.1f} us per sample",
        f"dpbp / PyTorch   {r['speedup_vs_torch']:.2f} x samples/s"])


# ----------------------------------------------------------------------------- command line

def widths_arg(text):
    try:
        widths = [int(w) for w in text.split(",")]
    except ValueError:
        widths = []
    if len(widths) < 2 or min(widths) < 1:
        raise argparse.ArgumentTypeError(
            f"--layers takes at least two positive widths, input to output, like "
            f"784,1024,1024,10 (got {text!r})")
    return widths


def positive_int(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def probability(text):
    try:
        p = float(text)
    except ValueError:
        p = -1.0
    if not 0 <= p < 1:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1), got {text!r}")
    return p
def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def count(text):
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)


PARSER = ArgumentParser(prog="python -m dpbp.bench", add_help=False,
                 description="Time dpbp's training step on synthetic data. Run as one "
                             "process, or as N ranks\nwith: mpirun -n N python -m dpbp.bench "
                             "[options]",
                 formatter_class=argparse.RawDescriptionHelpFormatter)
PARSER.add_argument("-h", "--help", action="store_true", help="show this help and exit")
PARSER.add_argument("--config", metavar="FILE",
                    help="time the network and global batch of this training config, the "
                         "input shape and classes read from its data's headers (then "
                         "--layers, --batch-size, --dropout and --dtype are the config's)")
PARSER.add_argument("--set", metavar="SECTION.KEY=VALUE", action="append", default=[],
                    help="with --config: override one of its keys, as dpbp.train does "
                         "(repeatable)")
PARSER.add_argument("--layers", type=widths_arg, default=None, metavar="D_IN,...,D_OUT",
                    help="layer widths, input to output, of a multilayer perceptron with "
                         "ReLU (default 784,1024,1024,10)")
PARSER.add_argument("--batch-size", type=positive_int, default=None, metavar="N",
                    help=f"global batch, split across ranks (default {DEFAULT_BATCH})")
PARSER.add_argument("--steps", type=positive_int, default=30, metavar="K",
                    help="timed steps (default 30)")
PARSER.add_argument("--warmup", type=count, default=5, metavar="K",
                    help="untimed steps first (default 5)")
PARSER.add_argument("--dtype", choices=["float32", "float64"], default=None,
                    help="parameter and data type (default float32)")
PARSER.add_argument("--comm-dtype", choices=["float32", "float16", "bfloat16"],
                    default="float32", help="send the gradient sum in 16 bits, as "
                    "train.comm_dtype does (default float32)")
PARSER.add_argument("--deterministic", action="store_true",
                    help="train.deterministic: the gradient summed exactly, grain by grain, "
                         "with one BLAS thread per rank")
PARSER.add_argument("--grains", type=positive_int, default=TrainConfig.grains, metavar="G",
                    help=f"train.grains under --deterministic (default {TrainConfig.grains})")
PARSER.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd",
                    help="train.optimizer: sgd (momentum 0.9) or adamw (default sgd)")
PARSER.add_argument("--dropout", type=probability, default=None, metavar="P",
                    help="model.dropout: drop probability after each hidden activation "
                         "(default 0)")
PARSER.add_argument("--json", action="store_true",
                    help="also print the figures as one JSON object on the last line")
PARSER.add_argument("--scaling-model", action="store_true",
                    help="also measure what the scaling model needs (compute per sample, the "
                         "Allreduce's latency and bandwidth here) and predict step time and "
                         "efficiency on 1 to 1,024 nodes (docs/scaling.md)")
PARSER.add_argument("--latency-us", type=positive_float, default=None, metavar="US",
                    help="with --scaling-model: the latency between nodes to assume (default: "
                         f"the one fitted here; {DEFAULT_LATENCY_US:g} us at one rank)")
PARSER.add_argument("--compare-torch", action="store_true",
                    help="also time PyTorch DistributedDataParallel (gloo) on the same "
                         "network, batch and steps (needs PyTorch installed)")


def main(argv=None):
    comm = mpi.init()
    say = print if comm.rank == 0 else (lambda *a, **k: None)
    with mpi.agreement(comm):
        args = PARSER.parse_args(argv)
        if args.compare_torch and importlib.util.find_spec("torch") is None:
            raise UserError(NO_TORCH)
        if args.deterministic and args.comm_dtype != "float32":
            raise UserError("--deterministic sums the gradient exactly, in float32: it "
                            "excludes --comm-dtype")
        if args.scaling_model and args.deterministic:
            raise UserError("--scaling-model models the plain gradient sum: it excludes "
                            "--deterministic")
        if args.latency_us is not None and not args.scaling_model:
            raise UserError("--latency-us is an input of --scaling-model, which is not given")
    if PARSER.answered(args, say):
        return 0
    with mpi.agreement(comm):
        net = what_to_time(args)
        if args.deterministic and args.grains > min(args.batch_size, config.MAX_GRAINS):
            raise UserError(f"--grains must be at most --batch-size ({args.batch_size}) and "
                            f"{config.MAX_GRAINS}, got {args.grains}")
    return run_bench(args, net, comm, say)


def what_to_time(args):
    """The Net that the options name: --config's network, dtype and global batch (which
    also sets args.batch_size), or the multilayer perceptron of --layers."""
    if not args.config:
        if args.set:
            raise UserError("--set changes the keys of a --config FILE, which is not given")
        args.batch_size = args.batch_size or DEFAULT_BATCH
        widths = args.layers or DEFAULT_LAYERS
        return Net(mlp_layers(widths[1:-1], "relu", args.dropout or 0.0, widths[-1]),
                   (widths[0],), args.dtype or "float32")
    given = [option for option, value in (("--layers", args.layers), ("--batch-size",
             args.batch_size), ("--dropout", args.dropout), ("--dtype", args.dtype))
             if value is not None]
    if given:
        raise UserError(f"{given[0]} is the config's beside --config (its model and "
                        "train.batch_size): change them with --set")
    cfg = config.load(args.config, args.set)
    input_shape, outputs = datasets.peek(cfg.data, cfg.train.loss, cfg.model.classes,
                                         images=bool(cfg.model.layers))
    args.batch_size = cfg.train.batch_size
    return Net(network.from_config(cfg.model, outputs), input_shape, cfg.model.dtype)


def cli():
    mpi.run(main)


if __name__ == "__main__":
    cli()
