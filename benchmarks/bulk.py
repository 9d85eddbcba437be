"""S2's data and its plain-zarr tasks, in a module that imports only numpy and zarr.

Lithops localhost starts a fresh interpreter for every job, where a task imports its module
again: the plain-zarr baseline should not pay for xarray and icechunk-distributed, which it
does not use.
"""

from __future__ import annotations

import pickle

import numpy as np
import zarr

BY, BX = 2048, 2048  # 16 MiB float32 per time step


def bulk(start: int, stop: int) -> np.ndarray:
    t = np.arange(start, stop, dtype="f4")[:, None, None]
    row = np.linspace(0, 1, BX, dtype="f4")
    col = np.linspace(0, 1, BY, dtype="f4")[:, None]
    return np.ascontiguousarray((np.sin(t / 7) + row * col).astype("f4"))


def cubed_block(block: np.ndarray, block_id: tuple[int, ...] | None = None) -> np.ndarray:
    """One (1, BY, BX) block of the S2 data, computed in a cubed task."""
    assert block_id is not None
    return bulk(block_id[0], block_id[0] + 1)


def plain_zarr_task(arg: tuple[str, int]) -> int:
    path, i = arg
    array = zarr.open_array(zarr.storage.LocalStore(path), path="Tair", mode="r+")
    array[i : i + 1] = bulk(i, i + 1)
    return i


def plain_zarr_batch(arg: bytes) -> int:
    """Plain zarr on Lithops: several regions per call (as ours and S3's hand-batched do)."""
    path, indices = pickle.loads(arg)
    array = zarr.open_array(zarr.storage.LocalStore(path), path="Tair", mode="r+")
    for i in indices:
        array[i : i + 1] = bulk(i, i + 1)
    return len(indices)


def noop(x: int) -> int:
    """A trivial task (Lithops takes functions, not builtins such as ``abs``)."""
    return x
