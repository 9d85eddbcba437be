"""The same 240-region write on every executor: wall time per engine, Lithops calls.

240 regions of one 205x275 float32 time step (225 KB, 54 MB in all), each task building its
own piece (a loader), one commit. Engines are started before timing; each run is verified.

    python -m benchmarks.engines [--repeat 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("ICECHUNK_LOG", "error")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import icechunk
import numpy as np
import xarray as xr

import icechunk_distributed as icd

N_TIME, NY, NX = 240, 205, 275


def piece(start: int, stop: int) -> xr.Dataset:
    t = np.arange(start, stop, dtype="f4")[:, None, None]
    data = np.broadcast_to(np.sin(t / 10), (stop - start, NY, NX)) + np.arange(NX, dtype="f4")
    return xr.Dataset({"Tair": (("time", "y", "x"), data.astype("f4"))})


def load(region: dict[str, slice]) -> xr.Dataset:
    return piece(region["time"].start, region["time"].stop)


def template() -> xr.Dataset:
    import dask.array as da

    lazy = da.zeros((N_TIME, NY, NX), chunks=(1, NY, NX), dtype="f4")
    return xr.Dataset({"Tair": (("time", "y", "x"), lazy)})


def one_run(executor: object) -> tuple[float, int]:
    repo = icechunk.Repository.create(icechunk.local_filesystem_storage(tempfile.mkdtemp()))
    t0 = time.perf_counter()
    result = icd.run_region_writes(
        load, repo, template=template(), executor=executor, task_size=1, progress=False
    )
    seconds = time.perf_counter() - t0
    got = xr.open_zarr(repo.readonly_session("main").store, consolidated=False)["Tair"]
    np.testing.assert_array_equal(got.values, piece(0, N_TIME)["Tair"].values)
    return seconds, result.n_regions


def _close_all(*things: object) -> None:
    for thing in things:
        thing.close()  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default=None)
    parser.add_argument("--engines", default="serial,threads,processes,joblib,ray,dask,lithops")
    args = parser.parse_args(argv)
    rows = []
    for name in args.engines.split(","):
        executor: object = name
        cleanup = None
        lithops_adapter = None
        if name == "ray":
            import ray

            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            executor, cleanup = ray, ray.shutdown
        elif name == "dask":
            from distributed import Client, LocalCluster

            cluster = LocalCluster(
                n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address="127.0.0.1:0"
            )
            client = Client(cluster)
            executor = client
            cleanup = functools.partial(_close_all, client, cluster)
        elif name == "lithops":
            from icechunk_distributed.adapters.lithops import LithopsAdapter

            lithops_adapter = LithopsAdapter(workers=2)
            executor, cleanup = lithops_adapter, lithops_adapter.close
        elif name == "processes":
            executor = icd.adapters.local.FuturesAdapter.processes(2)
            cleanup = executor.close  # type: ignore[attr-defined]
        try:
            one_run(executor)  # warm-up: worker imports, pools
            calls_before = lithops_adapter.n_calls if lithops_adapter else 0
            times = [one_run(executor)[0] for _ in range(args.repeat)]
        finally:
            if cleanup is not None:
                cleanup()
        row = {"engine": name, "median_s": statistics.median(times), "runs": times}
        if lithops_adapter is not None:
            row["lithops_calls_per_run"] = (lithops_adapter.n_calls - calls_before) / args.repeat
        rows.append(row)
        extra = (
            f"  ({row['lithops_calls_per_run']:.0f} Lithops calls per run)"
            if "lithops_calls_per_run" in row
            else ""
        )
        print(f"{name:>10}: {row['median_s']:6.2f} s median of {args.repeat}{extra}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"regions": N_TIME, "mb": N_TIME * NY * NX * 4 / 1e6, "rows": rows}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
