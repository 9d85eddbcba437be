"""Tasks for test_session_upstream.py: module level, so spawn children, dask workers and Ray
workers can import them (conftest puts tests/ on PYTHONPATH)."""

import os

import numpy as np
import zarr

from conftest import small_dataset


def write_values(snapshot, path: str, start: int, values):
    """Write ``values`` into the 1-D array ``path`` from ``start`` on; return the snapshot."""
    array = zarr.open_array(snapshot.store, path=path, mode="r+")
    values = np.asarray(values, dtype=array.dtype)
    array[start : start + len(values)] = values
    return snapshot


def read_then_write(snapshot, path: str, start: int, values):
    """Read all of ``path`` as this task sees it, then write; return (seen, snapshot)."""
    seen = zarr.open_array(snapshot.store, path=path, mode="r")[...].tolist()
    return seen, write_values(snapshot, path, start, values)


def write_time_step(ds, session, itime: int) -> None:
    """The thread recipe's task: one time step through xarray into a shared session."""
    ds.isel(time=[itime]).to_zarr(session.store, region="auto", consolidated=False)


def write_cell(session, path: str, x: int, y: int) -> None:
    """Write x * y at (x, y) of a 2-D array of one-element chunks; return nothing."""
    zarr.open_array(session.store, path=path, mode="r+")[x, y] = x * y


def tile(i: int, j: int, size: int, seed: int) -> np.ndarray:
    """The deterministic content of tile (i, j)."""
    return np.random.default_rng([seed, i, j]).random((size, size))


def write_tile(snapshot, path: str, i: int, j: int, size: int, seed: int):
    """Write tile (i, j) (``size`` x ``size``) of a 2-D array; return the snapshot."""
    array = zarr.open_array(snapshot.store, path=path, mode="r+")
    array[i * size : (i + 1) * size, j * size : (j + 1) * size] = tile(i, j, size, seed)
    return snapshot


def _mark(directory: str, name: str) -> None:
    with open(os.path.join(directory, name), "w"):
        pass


def mark_and_write(directory: str, snapshot, i: int):
    """Leave a trace that the task ran, then write element ``i`` of array ``a``."""
    _mark(directory, f"task-{i}")
    return write_values(snapshot, "a", i, [float(i)])


class MarkingLoader:
    """A loader for run_region_writes that leaves a trace of every call in ``directory``."""

    def __init__(self, directory: str):
        self.directory = str(directory)

    def __call__(self, region):
        _mark(self.directory, f"load-{os.getpid()}-{region['time'].start}")
        return small_dataset().isel(region)
