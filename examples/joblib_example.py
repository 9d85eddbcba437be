"""Write region-parallel with joblib (loky), honouring joblib.parallel_config."""

import os
import tempfile

import icechunk
import joblib
import xarray as xr

import icechunk_distributed as icd
from icechunk_distributed.demo import DemoSpec, synthetic_dataset

os.environ.setdefault("ICECHUNK_LOG", "error")

if __name__ == "__main__":
    ds = synthetic_dataset(DemoSpec(n_time=96))  # numpy-backed: tasks get only their region
    repo = icechunk.Repository.create(icechunk.local_filesystem_storage(tempfile.mkdtemp()))

    with joblib.parallel_config(backend="loky", n_jobs=2):
        result = icd.run_region_writes(
            ds, repo, executor="joblib", encoding={"Tair": {"chunks": (8, 180, 360)}}
        )

    written = xr.open_zarr(repo.readonly_session("main").store, consolidated=False).load()
    xr.testing.assert_identical(written, ds)
    print(f"joblib: {result.n_regions} regions, {result.seconds:.2f} s, {result.snapshot_id}")
