"""The hand-written recipe from Icechunk's docs: allow_pickling + merge_sessions on any pool.

Use this shape when you need full control of the tasks; run_region_writes does all of it
(plus planning, checks, retries and one commit) in one call.
"""

import os
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context

import icechunk
import xarray as xr

from icechunk_distributed import merge_sessions, writable_session
from icechunk_distributed.demo import DemoSpec, synthetic_dataset

os.environ.setdefault("ICECHUNK_LOG", "error")
SPEC = DemoSpec(n_time=48)


def write_timestamp(*, itime: int, session):
    ds = synthetic_dataset(SPEC, itime, itime + 1)  # each task makes its own piece
    ds.drop_vars(["time", "lat", "lon"]).to_zarr(
        session.store, region={"time": slice(itime, itime + 1)}, consolidated=False
    )
    return session  # the snapshot carries this task's writes home


if __name__ == "__main__":
    ds = synthetic_dataset(SPEC)
    repo = icechunk.Repository.create(icechunk.local_filesystem_storage(tempfile.mkdtemp()))
    session = writable_session(repo, "main")
    # Metadata and coordinates once (Tair lazy, so compute=False writes none of its data);
    # chunks of one time step, so tasks never share a chunk.
    template = ds.assign(Tair=ds.Tair.chunk({"time": 1}))
    template.to_zarr(session.store, compute=False, consolidated=False)

    with ProcessPoolExecutor(2, mp_context=get_context("forkserver")) as executor:
        with session.allow_pickling():
            futures = [
                executor.submit(write_timestamp, itime=i, session=session)
                for i in range(ds.sizes["time"])
            ]
        for future in as_completed(futures):
            merge_sessions(session, future.result())  # checked: overlaps, foreign forks
    snapshot_id = session.commit("finished writes")

    written = xr.open_zarr(repo.readonly_session("main").store, consolidated=False).load()
    xr.testing.assert_identical(written, ds)
    print(f"custom executor: {ds.sizes['time']} tasks, {snapshot_id}")
