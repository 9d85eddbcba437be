"""Write region-parallel on a dask cluster (a LocalCluster here; any distributed.Client works)."""

import os
import tempfile

import icechunk
import xarray as xr
from distributed import Client, LocalCluster

import icechunk_distributed as icd
from icechunk_distributed.demo import DemoSpec, synthetic_dataset

os.environ.setdefault("ICECHUNK_LOG", "error")

if __name__ == "__main__":
    cluster = LocalCluster(
        n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address="127.0.0.1:0"
    )
    with cluster, Client(cluster) as client:
        ds = synthetic_dataset(DemoSpec(n_time=96)).chunk({"time": 8})
        repo = icechunk.Repository.create(icechunk.local_filesystem_storage(tempfile.mkdtemp()))
        # dask pieces are computed inside each task, without a nested cluster
        result = icd.run_region_writes(ds, repo, executor=client)

    written = xr.open_zarr(repo.readonly_session("main").store, consolidated=False).load()
    xr.testing.assert_identical(written, ds.compute())
    print(f"dask: {result.n_regions} regions, {result.seconds:.2f} s, {result.snapshot_id}")
