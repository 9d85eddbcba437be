"""Task functions shipped to worker processes (importable by spawn children)."""

import numpy as np
import zarr

from conftest import small_dataset


def write_timestamp(*, itime: int, session):
    """The documented recipe's task: one time step through xarray, region='auto'."""
    ds = small_dataset()
    ds.isel(time=[itime]).to_zarr(session.store, region="auto", consolidated=False)
    return session


def write_functional(itime: int, shareable):
    """The functional recipe's task: positional arguments."""
    return write_timestamp(itime=itime, session=shareable)


def write_block(snapshot, path: str, index: tuple[slice, ...], values: np.ndarray):
    """Write ``values`` at ``index`` of array ``path`` through zarr."""
    array = zarr.open_array(snapshot.store, path=path, mode="r+")
    array[index] = values
    return snapshot


def touch_store(snapshot):
    """Use the snapshot's store (in a fork child this must fail fast, not hang)."""
    zarr.open_group(snapshot.store, mode="r")
    return snapshot
