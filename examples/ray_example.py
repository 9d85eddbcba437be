"""Write region-parallel on Ray: the cluster you already initialised, or a local one."""

import os
import tempfile

import icechunk
import ray
import xarray as xr

import icechunk_distributed as icd
from icechunk_distributed.demo import DemoSpec, synthetic_dataset

os.environ.setdefault("ICECHUNK_LOG", "error")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
SPEC = DemoSpec(n_time=96)


def load(region: dict[str, slice]) -> xr.Dataset:
    return synthetic_dataset(SPEC, region["time"].start, region["time"].stop)


if __name__ == "__main__":
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # or ray.init("auto")
    template = synthetic_dataset(SPEC).chunk({"time": 8})
    repo = icechunk.Repository.create(icechunk.local_filesystem_storage(tempfile.mkdtemp()))

    result = icd.run_region_writes(load, repo, template=template, executor="ray")

    written = xr.open_zarr(repo.readonly_session("main").store, consolidated=False).load()
    xr.testing.assert_identical(written, synthetic_dataset(SPEC))
    print(f"ray: {result.n_regions} regions, {result.seconds:.2f} s, {result.snapshot_id}")
    ray.shutdown()
