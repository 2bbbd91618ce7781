"""A world of ranks in one process, one thread each: a stand-in for dpbp's Comm.

    results = run_ranks(3, lambda comm: ...)   # fn(comm) on ranks 0, 1, 2 at once

`ThreadComm` has Comm's verbs (parallel/comm.py) and meaning, so the data-parallel code
runs on it unchanged: each collective waits for every rank of the world, then computes
what MPI would, summing in rank order. It also records what goes over the wire,
`world.sent`: (verb, rank, dtype, number of values) for every array a rank hands to a
collective. Tests use it where a real mpirun would hide what they check from an
in-process tool (a mutation tester), or costs more than the claim needs: N ranks against
one process in the step and in evaluation, the layout of grains, the dtype of 16-bit sums.

A rank that raises breaks the world: the others stop waiting at once, and run_ranks
raises the first error. A collective that some rank never reaches fails after `timeout`
seconds instead of hanging.

Test code only: dpbp never imports it.
"""

import threading
import zlib

import numpy as np


class World:
    def __init__(self, size, timeout=60.0):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=timeout)
        self.slots = [None] * size
        self.sent = []   # (verb, rank, dtype, values) of every array handed to a collective
        self.lock = threading.Lock()


class _Done:
    def Wait(self):
        pass


class ThreadComm:
    """Rank `rank` of `world`: Comm's verbs between threads."""

    library = "threads (tests/thread_ranks.py)"

    def __init__(self, world, rank):
        self.world, self.rank, self.size = world, rank, world.size
        self.ranks_sharing_cores, self.ranks_on_host, self.counted = 1, 1, ""
        self.oversubscribed = False
        self.wait_seconds = 0.0

    def _all(self, verb, value):
        """Collective. Every rank's `value`, in rank order: an array (copied as sent), a
        list of arrays, or a small Python object."""
        world = self.world
        arrays = value if isinstance(value, list) else [value]
        if all(isinstance(a, np.ndarray) for a in arrays):
            value = [a.copy() for a in arrays] if isinstance(value, list) else value.copy()
            with world.lock:
                world.sent.append((verb, self.rank, arrays[0].dtype if arrays else None,
                                   sum(a.size for a in arrays)))
        world.slots[self.rank] = value
        world.barrier.wait()
        values = list(world.slots)
        world.barrier.wait()   # nobody writes its next value before every rank has read
        return values

    def allreduce_(self, buf):
        values = self._all("allreduce_", buf)
        total = values[0].copy()
        for v in values[1:]:
            total += v
        buf[...] = total
        return buf

    def allreduce_max_(self, buf, like=None):
        buf[...] = np.max(self._all("allreduce_max_", buf), axis=0)
        return buf

    def start_allreduce_max_(self, buf):
        self.allreduce_max_(buf)
        return _Done()

    def allreduce_min(self, value):
        return int(min(self._all("allreduce_min", np.array([value], np.int64)))[0])

    def allreduce_max(self, value):
        return -self.allreduce_min(-value)

    def allgatherv_(self, mine, out, counts):
        values = self._all("allgatherv_", np.ascontiguousarray(mine).reshape(-1))
        assert [v.size for v in values] == list(counts), "counts do not match what was sent"
        out.reshape(-1)[...] = np.concatenate(values)
        return out

    def alltoallv_(self, send, send_counts, send_starts, recv, recv_counts, recv_starts):
        parts = [send[s:s + c] for s, c in zip(send_starts, send_counts)]   # one per rank
        values = self._all("alltoallv_", parts)
        for q, theirs in enumerate(values):
            mine = theirs[self.rank]
            assert mine.size == recv_counts[q], "counts do not match what was sent"
            recv[recv_starts[q]:recv_starts[q] + recv_counts[q]] = mine
        return recv

    def allgatherv_in_place_(self, buf, counts, starts):
        me = slice(starts[self.rank], starts[self.rank] + counts[self.rank])
        values = self._all("allgatherv_in_place_", buf[me])
        for q, v in enumerate(values):
            buf[starts[q]:starts[q] + counts[q]] = v
        return buf

    def bcast_(self, buf, root=0):
        buf[...] = self._all("bcast_", buf)[root]
        return buf

    def bcast_obj(self, obj, root=0):
        return self._all("bcast_obj", obj)[root]

    def barrier(self):
        self._all("barrier", None)

    def replicas_identical(self, array):
        crc = zlib.crc32(np.ascontiguousarray(array).view(np.uint8))
        return len(set(self._all("replicas_identical", crc))) == 1


def run_ranks(size, fn, timeout=60.0):
    """[fn(comm) for each rank], the ranks run at once, one thread each. Returns the
    world too: (results, world)."""
    world = World(size, timeout)
    results, errors = [None] * size, []

    def rank(r):
        try:
            results[r] = fn(ThreadComm(world, r))
        except BaseException as e:  # noqa: BLE001 -- handed to the caller
            errors.append(e)
            world.barrier.abort()   # the others stop waiting for this rank

    threads = [threading.Thread(target=rank, args=(r,), daemon=True) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout * 4)
    if errors:
        first = next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)),
                     errors[0])
        raise first
    if any(t.is_alive() for t in threads):
        raise TimeoutError(f"ranks still running after {timeout * 4:g} s")
    return results, world
