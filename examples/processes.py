"""Write region-parallel on worker processes; each task loads its own piece (a loader)."""

import os
import tempfile

import icechunk
import xarray as xr

import icechunk_distributed as icd
from icechunk_distributed.demo import DemoSpec, synthetic_dataset

os.environ.setdefault("ICECHUNK_LOG", "error")
SPEC = DemoSpec(n_time=96)


def load(region: dict[str, slice]) -> xr.Dataset:
    """Runs in the worker: build (or open) just this region's data."""
    return synthetic_dataset(SPEC, region["time"].start, region["time"].stop)


if __name__ == "__main__":  # needed: worker processes start with forkserver/spawn
    template = synthetic_dataset(SPEC).chunk({"time": 8})  # shapes, dtypes, coords, attrs
    repo = icechunk.Repository.create(icechunk.local_filesystem_storage(tempfile.mkdtemp()))

    result = icd.run_region_writes(load, repo, template=template, executor="processes")

    written = xr.open_zarr(repo.readonly_session("main").store, consolidated=False).load()
    xr.testing.assert_identical(written, synthetic_dataset(SPEC))
    print(f"processes: {result.n_regions} regions, {result.seconds:.2f} s, {result.snapshot_id}")
