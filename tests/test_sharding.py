"""dpbp/parallel/sharding.py: which rows each rank takes, at any world size.

Shards, the epoch order, grains and batch shards under train.deterministic, and
evaluation's blocks at fixed offsets.
"""

import numpy as np
import pytest

from dpbp.parallel import sharding


@pytest.mark.parametrize("n", [0, 1, 2, 7, 8, 33])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 16])
def test_shards_cover_each_batch_exactly_once(n, size):
    parts = [range(n)[sharding.shard(n, r, size)] for r in range(size)]
    assert [i for p in parts for i in p] == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert sharding.shard_sizes(n, size) == [len(p) for p in parts]


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    order = sharding.epoch_order(17, seed=1, epoch=2, shuffle=True)
    assert np.array_equal(order, sharding.epoch_order(17, seed=1, epoch=2, shuffle=True))
    assert not np.array_equal(order, sharding.epoch_order(17, seed=1, epoch=3, shuffle=True))
    assert sorted(order) == list(range(17))
    assert [len(b) for b in sharding.global_batches(order, 8)] == [8, 8, 1]


def test_no_shuffle_is_file_order():
    batches = sharding.global_batches(sharding.epoch_order(10, 0, 5, shuffle=False), 4)
    assert [b.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def rows(s):
    return list(range(s.start, s.stop))


@pytest.mark.parametrize("n", [0, 1, 3, 4, 7, 32, 195])
@pytest.mark.parametrize("grains", [1, 2, 4, 5])
def test_grains_cover_the_batch_and_never_depend_on_the_world_size(n, grains):
    cut = sharding.grain_rows(n, grains)
    assert len(cut) == grains
    assert [i for g in cut for i in rows(g)] == list(range(n))   # contiguous, in order
    assert max(map(len, map(rows, cut))) - min(map(len, map(rows, cut))) <= 1
    for size in (1, 2, 3, 4, 7):   # every world takes the same grains, only shared out
        taken = [sharding.batch_shard(n, r, size, grains) for r in range(size)]
        bounds = {0, n} | {g.start for g in cut} | {g.stop for g in cut}
        assert [i for s in taken for i in rows(s)] == list(range(n))
        assert all(s.start in bounds and s.stop in bounds for s in taken)
    assert sharding.grain_rows(n, grains) == cut


@pytest.mark.parametrize("n", [0, 2, 9, 32, 33])
@pytest.mark.parametrize("grains", [1, 3, 4])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 6])
def test_batch_shards_are_whole_grains(n, grains, size):
    """Contiguous, disjoint, covering the batch; each the union of the grains that
    shard(grains, rank, size) gives the rank, so a rank has none when size > grains."""
    cut = sharding.grain_rows(n, grains)
    taken = [sharding.batch_shard(n, r, size, grains) for r in range(size)]
    assert [i for s in taken for i in rows(s)] == list(range(n))
    for r, s in enumerate(taken):
        assert s.start <= s.stop
        mine = cut[sharding.shard(grains, r, size)]
        assert rows(s) == [i for g in mine for i in rows(g)]
        if r + 1 < size:
            assert s.stop == taken[r + 1].start
        assert sharding.batch_shard(n, r, size) == sharding.shard(n, r, size)   # no grains
    owners = [len(range(grains)[sharding.shard(grains, r, size)]) for r in range(size)]
    assert sum(owners) == grains
    if size > grains:
        assert owners.count(0) == size - grains   # ranks without a grain take no rows
        assert all(rows(s) == [] for s, k in zip(taken, owners) if k == 0)


@pytest.mark.parametrize("n", [0, 1, 255, 256, 257, 600, 1000])
@pytest.mark.parametrize("block", [1, 7, 256])
def test_blocks_cover_every_row_once_at_fixed_offsets_in_any_world(n, block):
    alone = sharding.blocks(n, block, 0, 1)
    for size in (1, 2, 3, 4, 5, 16):
        every = [sharding.blocks(n, block, r, size) for r in range(size)]
        flat = [b for mine in every for b in mine]
        assert flat == alone   # the same blocks in every world, shared out in order
        assert [i for b in flat for i in rows(b)] == list(range(n))
        assert all(b.start % block == 0 and 0 < b.stop - b.start <= block for b in flat)
        assert all(b.stop - b.start == block for b in flat[:-1])   # only the last is short
        assert sharding.block_sizes(n, block, size) == [
            sum(b.stop - b.start for b in mine) for mine in every]
        counts = [len(mine) for mine in every]
        assert max(counts) - min(counts) <= 1
