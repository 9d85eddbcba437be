"""Write a dataset region-parallel on threads, then read it back and check it."""

import os
import tempfile

import icechunk
import xarray as xr

import icechunk_distributed as icd
from icechunk_distributed.demo import DemoSpec, synthetic_dataset

os.environ.setdefault("ICECHUNK_LOG", "error")

if __name__ == "__main__":
    ds = synthetic_dataset(DemoSpec(n_time=96)).chunk({"time": 8})  # dask-backed, 25 MB
    repo = icechunk.Repository.create(icechunk.local_filesystem_storage(tempfile.mkdtemp()))

    result = icd.run_region_writes(ds, repo, executor="threads", message="threads example")

    written = xr.open_zarr(repo.readonly_session("main").store, consolidated=False).load()
    xr.testing.assert_identical(written, ds.compute())
    print(f"threads: {result.n_regions} regions, {result.seconds:.2f} s, {result.snapshot_id}")
