"""The overlap ledger's compact chunk owners answer exactly as a dict of coordinates would."""

from __future__ import annotations

import numpy as np
import pytest

from icechunk_distributed.owners import DENSE_MIN_CELLS, NOBODY, ChunkOwners, coords_array


def _replay(ndim: int, high: int, rounds: int, seed: int) -> tuple[ChunkOwners, dict]:
    rng = np.random.default_rng(seed)
    owners, reference = ChunkOwners(), {}
    for k in range(rounds):
        n = int(rng.integers(1, 50))
        coords = rng.integers(0, high, size=(n, ndim))
        probe = rng.integers(0, high, size=(20, ndim))
        forks, versions = owners.lookup(probe)
        for c, f, v in zip(map(tuple, probe.tolist()), forks, versions, strict=True):
            want = reference.get(c)
            assert (None if f == NOBODY else (int(f), int(v))) == want
        owners.record(coords, k % 7, k)
        for c in map(tuple, coords.tolist()):
            reference[c] = (k % 7, k)
    return owners, reference


@pytest.mark.parametrize(
    ("ndim", "high"),
    [(1, 100), (2, 40), (3, 12), (1, 10**9), (3, 10**5)],
    ids=["1d", "2d", "3d", "1d-sparse", "3d-sparse"],
)
def test_lookups_match_a_dict_of_coordinates(ndim, high):
    owners, reference = _replay(ndim, high, rounds=60, seed=ndim * 1000 + high % 997)
    everything = coords_array(list(reference), ndim)
    forks, versions = owners.lookup(everything)
    assert [(int(f), int(v)) for f, v in zip(forks, versions, strict=True)] == list(
        reference.values()
    )
    if high >= 10**5:
        assert owners.nbytes() == 0  # too sparse for a box: a dict
    else:
        assert owners.nbytes() > 0


def test_a_zero_dimensional_array_has_one_chunk():
    owners = ChunkOwners()
    assert owners.get(()) is None
    owners.record(coords_array([()], 0), 3, 5)
    assert owners.get(()) == (3, 5)


def test_a_sparse_start_turns_dense_once_enough_chunks_fill_the_box():
    owners = ChunkOwners()
    far = DENSE_MIN_CELLS * 4
    owners.record(coords_array([(far,)], 1), 0, 1)  # one chunk far out: a dict
    assert owners.nbytes() == 0
    owners.record(np.arange(far, dtype=np.int64).reshape(-1, 1), 1, 2)
    assert owners.nbytes() > 0  # now dense, with the first chunk carried over
    assert owners.get((far,)) == (0, 1)
    assert owners.get((7,)) == (1, 2)
    assert owners.get((far + 1,)) is None


def test_ten_million_chunks_cost_bytes_not_a_dict_entry_each():
    owners = ChunkOwners()
    for start in range(0, 10_000_000, 1_000_000):
        owners.record(np.arange(start, start + 1_000_000, dtype=np.int64).reshape(-1, 1), 1, 1)
    # 8 bytes per cell, with the box at most twice what it holds (a dict: 125-170 B each)
    assert owners.nbytes() <= 16 * 10_000_000


@pytest.mark.parametrize("dims", [(2, 3), (3, 2), (0, 2), (1, 0)])
def test_an_array_recreated_with_other_dims_at_the_same_path(dims):
    before, after = dims
    owners = ChunkOwners()
    owners.record(coords_array([(1,) * before], before), 0, 1)
    assert owners.get((1,) * after) is None  # another array's chunks never match
    owners.record(coords_array([(1,) * after, (2,) * after], after), 1, 2)
    assert owners.get((1,) * after) == (1, 2)
    assert owners.get((1,) * before) == (0, 1)
