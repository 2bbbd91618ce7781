"""A model of data-parallel scaling: the step time on N nodes, from what one node measures.

A step on every node is: compute (forward, loss and backward of the node's rows, then the
update, whose cost does not depend on the rows), and the gradient sum over the nodes. The
sum is costed with the alpha-beta-gamma model of Thakur, Rabenseifner and Gropp,
"Optimization of Collective Communication Operations in MPICH" (IJHPCA 19(1), 2005):

    alpha   seconds per message (latency)
    beta    seconds per byte on the link (8 / link speed in bit/s)
    gamma   seconds per byte of the reduction arithmetic (adding two arrays)

for p nodes and an n-byte gradient, with p' the largest power of two <= p, k = log2 p',
and e = 1 where p is not a power of two (its p - p' extra ranks first hand their
vectors to a partner and get the result back at the end: 2 alpha + 2 n beta + n gamma):

    recursive doubling            k (alpha + n beta + n gamma)
    reduce-scatter + allgather    2 k alpha + 2 (p'-1)/p' n beta + (p'-1)/p' n gamma
      (Rabenseifner: recursive halving, then recursive doubling)
    ring                          2 (p-1) alpha + 2 (p-1)/p n beta + (p-1)/p n gamma

MPICH 5.0.2 chooses (its compiled-in selection, src/mpi/coll/coll_selection.json):
recursive doubling for messages of at most SHORT_MSG_BYTES or fewer values than p',
reduce-scatter + allgather otherwise. It never picks the ring by default; Open MPI,
NCCL, Gloo and Horovod use rings for large messages, which the model can cost too.

The 16-bit sum of train.comm_dtype (parallel/half.py) is not MPI's Allreduce but an
Alltoallv of the 16-bit values (p-1 messages of n/p bytes from each rank), a local sum,
and an Allgatherv (MPICH: recursive doubling below 512 KiB for p a power of two, Bruck
below 80 KiB otherwise, a ring beyond), plus, for float16, a maximum over ranks (one
8-byte Allreduce), and the conversions, which the benchmark measures.

Layers that normalise with the global batch's statistics (batchnorm) add small sums
inside forward and backward: `batch_sums` Allreduces per step of `batch_sum_bytes` each
(a few float64 values per channel), recursive doubling, so k alpha each: latency, which
no overlap hides, since the next layer waits for them. They grow with log2 p while the
gradient sum's bandwidth term does not, so beyond some node count they cost more than
the gradient sum: batch_sums_dominate predicts it (a prediction of this model, not a
measurement). Under train.deterministic they are Allgathervs, not costed here.

Names follow the math; a time is in seconds, a size in bytes. No MPI here: the
benchmark (dpbp/bench.py) measures, this module computes.
"""

import math
from dataclasses import dataclass, field

import numpy as np

SHORT_MSG_BYTES = 8            # MPICH 5.0.2: avg_msg_size <= 8 -> recursive doubling
ALLGATHER_POF2_BYTES = 524288   # MPICH's Allgatherv: recursive doubling below, ring above
ALLGATHER_BRUCK_BYTES = 81920   # for p not a power of two: Bruck below, ring above
NODES = tuple(2 ** i for i in range(11))           # 1 to 1,024
LINKS_GBPS = (10, 25, 100, 200)
COMM_DTYPES = ("float32", "float16", "bfloat16")
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def pof2(p):
    """The largest power of two <= p."""
    return 1 << (p.bit_length() - 1)


# ----------------------------------------------------------------------------- costs

def recursive_doubling(p, n):
    """(a, b, c): the cost is a alpha + b beta + c gamma."""
    k, e = math.log2(pof2(p)), int(p != pof2(p))
    return k + 2 * e, (k + 2 * e) * n, (k + e) * n


def reduce_scatter_allgather(p, n):
    """Rabenseifner's algorithm, MPICH's for all but the shortest messages."""
    p2 = pof2(p)
    k, e, f = math.log2(p2), int(p != p2), (p2 - 1) / p2
    return 2 * k + 2 * e, (2 * f + 2 * e) * n, (f + e) * n


def ring(p, n):
    """Reduce-scatter then allgather around a ring."""
    f = (p - 1) / p
    return 2 * (p - 1), 2 * f * n, f * n


ALGORITHMS = {"recursive doubling": recursive_doubling,
              "reduce-scatter + allgather": reduce_scatter_allgather, "ring": ring}


def mpich_algorithm(p, n, itemsize=4):
    """The Allreduce algorithm that MPICH 5.0.2 picks for p ranks and n bytes of a
    built-in type and operation."""
    if n <= SHORT_MSG_BYTES or n // itemsize < pof2(p):
        return "recursive doubling"
    return "reduce-scatter + allgather"


def allreduce_seconds(p, n, alpha, beta, gamma=0.0, algorithm=None, itemsize=4):
    """Seconds of an Allreduce of n bytes over p ranks (0 for one rank)."""
    if p == 1:
        return 0.0
    a, b, c = ALGORITHMS[algorithm or mpich_algorithm(p, n, itemsize)](p, n)
    return a * alpha + b * beta + c * gamma


def allgatherv_coefficients(p, n):
    """(a, b) of MPICH's Allgatherv of n bytes in all, by its choice of algorithm."""
    f = (p - 1) / p
    if p == pof2(p) and n < ALLGATHER_POF2_BYTES:
        return math.log2(p), f * n            # recursive doubling
    if p != pof2(p) and n < ALLGATHER_BRUCK_BYTES:
        return math.ceil(math.log2(p)), f * n  # Bruck
    return p - 1, f * n                       # ring


def half_sum_seconds(p, values, kind, alpha, beta, convert_seconds=0.0):
    """Seconds of dpbp's 16-bit sum of `values` float32 values over p ranks: Alltoallv
    (each rank sends p-1 parts of n/p bytes), Allgatherv, float16's agreed scale (an
    8-byte Allreduce), and the conversions (measured: convert_seconds)."""
    if p == 1:
        return 0.0
    n = 2 * values
    a_gather, b_gather = allgatherv_coefficients(p, n)
    t = (p - 1) * alpha + (p - 1) / p * n * beta + a_gather * alpha + b_gather * beta
    if kind == "float16":
        t += allreduce_seconds(p, 8, alpha, beta, itemsize=8)
    return t + convert_seconds


# ----------------------------------------------------------------------------- fit

def fit_alpha_beta(points, gamma=0.0):
    """(alpha, beta) from measured Allreduce times [(p, n bytes, seconds), ...], each
    costed as MPICH's algorithm for its (p, n): least squares of the relative error,
    alpha and beta kept >= 0 (where the free fit makes one negative, it is 0 and the
    other is fitted alone)."""
    rows, y = [], []
    for p, n, seconds in points:
        a, b, c = ALGORITHMS[mpich_algorithm(p, n)](p, n)
        rows.append([a / seconds, b / seconds])
        y.append(1 - c * gamma / seconds)
    rows, y = np.array(rows), np.array(y)
    alpha, beta = np.linalg.lstsq(rows, y, rcond=None)[0]
    if alpha < 0:
        alpha, beta = 0.0, float(np.linalg.lstsq(rows[:, 1:], y, rcond=None)[0][0])
    elif beta < 0:
        alpha, beta = float(np.linalg.lstsq(rows[:, :1], y, rcond=None)[0][0]), 0.0
    return max(float(alpha), 0.0), max(float(beta), 0.0)


# ----------------------------------------------------------------------------- the step

@dataclass(frozen=True)
class Node:
    """What one node (this machine, with the ranks of the run that measured it) does."""
    seconds_per_sample: float   # the step without the sum, but the update, per row
    update_seconds: float       # per step whatever the rows: the update, the gradient norm
    weights: int                # values in the gradient
    alpha: float                # seconds per message between nodes
    gamma: float = 0.0          # seconds per byte of adding two float32 arrays
    host_sum_seconds: float = 0.0   # the gradient sum among this node's own ranks
    convert: dict = field(default_factory=dict)   # 16-bit kind -> (fixed, per rank) seconds
    batch_sums: int = 0         # the layers' sums over the global batch per step (batchnorm)
    batch_sum_bytes: int = 0    # bytes of each


def convert_at(convert, ranks):
    """Seconds of a rank's own work in a 16-bit sum over `ranks` ranks, from its (fixed,
    per rank) cost: converting the values, and a Python loop over every rank's part."""
    fixed, per_rank = convert
    return fixed + per_rank * ranks


def beta_of(link_gbps):
    """Seconds per byte on a link of link_gbps Gbit/s."""
    return 8 / (link_gbps * 1e9)


def comm_seconds(node, nodes, link_gbps, comm_dtype="float32", algorithm=None):
    """The gradient sum between `nodes` nodes on links of link_gbps."""
    beta = beta_of(link_gbps)
    if comm_dtype == "float32":
        return allreduce_seconds(nodes, 4 * node.weights, node.alpha, beta, node.gamma,
                                 algorithm)
    return half_sum_seconds(nodes, node.weights, comm_dtype, node.alpha, beta,
                            convert_at(node.convert.get(comm_dtype, (0.0, 0.0)), nodes))


def batch_sum_seconds(node, nodes, link_gbps):
    """The layers' batch sums between `nodes` nodes in one step (latency, mostly)."""
    return node.batch_sums * allreduce_seconds(nodes, node.batch_sum_bytes, node.alpha,
                                               beta_of(link_gbps), node.gamma, itemsize=8)


def batch_sums_dominate(node, link_gbps, comm_dtype="float32"):
    """A PREDICTION: the fewest nodes (of NODES) at which the batch sums take longer than
    the gradient sum, on links of link_gbps; None where they do not within NODES."""
    return next((p for p in NODES[1:] if batch_sum_seconds(node, p, link_gbps)
                 > comm_seconds(node, p, link_gbps, comm_dtype)), None)


def compute_seconds(node, rows):
    """One node's step without the sum between nodes, for `rows` rows."""
    return rows * node.seconds_per_sample + node.update_seconds + node.host_sum_seconds


def step_seconds(node, nodes, rows, link_gbps, comm_dtype="float32", algorithm=None):
    """A step on `nodes` nodes with `rows` rows each."""
    return compute_seconds(node, rows) + comm_seconds(node, nodes, link_gbps, comm_dtype,
                                                      algorithm) \
        + batch_sum_seconds(node, nodes, link_gbps)


def efficiency(node, nodes, batch, link_gbps, comm_dtype="float32", scaling="weak"):
    """Samples/s on `nodes` nodes over `nodes` x samples/s of one node. Weak scaling: each
    node keeps `batch` rows (the global batch grows with the nodes); strong: the global
    batch stays `batch`, split over the nodes."""
    rows = batch if scaling == "weak" else batch / nodes
    one = compute_seconds(node, batch)
    return (one * rows / batch) / step_seconds(node, nodes, rows, link_gbps, comm_dtype)


def records(node, batch, nodes=NODES, links=LINKS_GBPS, comm_dtypes=COMM_DTYPES):
    """The model's predictions, one dict per (scaling, comm_dtype, link, nodes)."""
    out = []
    for scaling in ("weak", "strong"):
        for comm_dtype in comm_dtypes:
            for link in links:
                for p in nodes:
                    rows = batch if scaling == "weak" else batch / p
                    t = step_seconds(node, p, rows, link, comm_dtype)
                    out.append(dict(
                        nodes=p, link_gbps=link, comm_dtype=comm_dtype, scaling=scaling,
                        per_node_batch=rows, global_batch=rows * p,
                        algorithm=algorithm_name(node, p, comm_dtype),
                        compute_ms=1e3 * compute_seconds(node, rows),
                        comm_ms=1e3 * comm_seconds(node, p, link, comm_dtype),
                        batch_sum_ms=1e3 * batch_sum_seconds(node, p, link),
                        step_ms=1e3 * t, samples_per_second=rows * p / t,
                        efficiency=efficiency(node, p, batch, link, comm_dtype, scaling)))
    return out


def algorithm_name(node, nodes, comm_dtype):
    """How the gradient is summed between `nodes` nodes."""
    if nodes == 1:
        return "none"
    if comm_dtype != "float32":
        return "alltoallv + allgatherv of 16-bit values"
    return mpich_algorithm(nodes, 4 * node.weights)


def batch_for_efficiency(node, nodes, link_gbps, target=0.9, comm_dtype="float32"):
    """The smallest per-node batch that keeps weak-scaling efficiency >= target: the
    compute must outweigh target / (1 - target) times the sum between nodes."""
    need = target / (1 - target) * comm_seconds(node, nodes, link_gbps, comm_dtype)
    rows = (need - node.update_seconds - node.host_sum_seconds) / node.seconds_per_sample
    return max(1, math.ceil(rows))


def link_for_efficiency(node, nodes, batch, target=0.9, comm_dtype="float32"):
    """The slowest link (Gbit/s) that keeps weak-scaling efficiency >= target at `batch`
    rows per node; math.inf where latency alone breaks the target."""
    budget = (1 - target) / target * compute_seconds(node, batch)
    latency = comm_seconds(node, nodes, math.inf, comm_dtype)   # beta = 0
    per_byte = comm_seconds(node, nodes, 8e-9, comm_dtype) - latency   # beta = 1 s/byte
    if nodes == 1:
        return 0.0
    if budget <= latency:
        return math.inf
    return 8 / ((budget - latency) / per_byte) / 1e9
