"""The fidelity harness, for files: ``icd.ingest`` against ``xr.open_mfdataset`` + ``to_zarr``.

The reference opens the same files with ``xr.open_mfdataset(files, combine="by_coords")``
(xarray's new combine defaults: variables without the concat dim are taken from the first
file rather than broadcast along it, see docs/ingest.md), chunks it as the ingest was asked
to, and stores it with ``to_zarr``; the two repositories must be identical: nodes, zarr
metadata, raw stored values, decoded datasets and encodings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask
import icechunk
import pytest
import xarray as xr

import icechunk_distributed as icd

from .cases import era5_like, packing
from .compare import assert_same_repos


def new_repo(path: Path) -> icechunk.Repository:
    return icechunk.Repository.create(icechunk.local_filesystem_storage(str(path)))


def daily_files(src: Path, *, days: int = 4, per_day: int = 6, kind: str = "nc") -> list[str]:
    """ERA5-like daily files: int16-packed t2m/u10/v10, time_bnds, a static lsm."""
    src.mkdir(parents=True, exist_ok=True)
    ds = era5_like(nt=days * per_day)
    ds["t2m"].encoding.update(packing()["t2m"])
    ds["u10"].encoding.update(packing()["u10"])
    ds["time"].encoding.update({"units": "hours since 2020-01-01", "dtype": "int64"})
    paths = []
    for d in range(days):
        part = ds.isel(time=slice(d * per_day, (d + 1) * per_day))
        if kind == "nc":
            path = src / f"day{d:02d}.nc"
            part.to_netcdf(path, engine="h5netcdf")
        else:
            path = src / f"day{d:02d}.zarr"
            part.to_zarr(path, zarr_format=3, consolidated=False)
        paths.append(str(path))
    return paths


def write_reference(
    repo: icechunk.Repository,
    paths: list[str],
    chunks: dict[str, int] | None,
    engine: str,
    **to_zarr: Any,
) -> None:
    with xr.set_options(use_new_combine_kwarg_defaults=True):
        extra = {"consolidated": False} if engine == "zarr" else {}
        ds = xr.open_mfdataset(paths, engine=engine, combine="by_coords", **extra)
    if chunks:
        ds = ds.chunk(chunks)
        for var in ds.variables.values():
            var.encoding.pop("chunks", None)
            var.encoding.pop("preferred_chunks", None)
    session = repo.writable_session("main")
    with dask.config.set(scheduler="synchronous"):
        ds.to_zarr(session.store, consolidated=False, **to_zarr)
    session.commit("reference")


CASES: dict[str, dict[str, Any]] = {
    "netcdf-file-chunks": {"kind": "nc", "chunks": None},
    "netcdf-one-file-per-chunk": {"kind": "nc", "chunks": {"time": 6}},
    "netcdf-straddling-chunks": {"kind": "nc", "chunks": {"time": 4, "lat": 10}},
    "netcdf-chunks-span-files": {"kind": "nc", "chunks": {"time": 12}},
    "zarr-sources": {"kind": "zarr", "chunks": {"time": 6}},
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("executor", ["threads", "processes"])
def test_ingest_matches_open_mfdataset_then_to_zarr(case, executor, tmp_path):
    kind, chunks = CASES[case]["kind"], CASES[case]["chunks"]
    engine = "h5netcdf" if kind == "nc" else "zarr"
    ref_repo, our_repo = new_repo(tmp_path / "reference"), new_repo(tmp_path / "ours")
    write_reference(ref_repo, daily_files(tmp_path / "src-ref", kind=kind), chunks, engine)
    ours = daily_files(tmp_path / "src-ours", kind=kind)[::-1]  # ordered by their times
    result = icd.ingest(
        ours,
        our_repo,
        concat_dim="time",
        chunks=chunks,
        executor=executor,
        workers=2,
        progress=False,
        task_size=1,
    )
    assert result.files == sorted(ours)
    assert result.write is not None and result.write.n_regions > 1
    assert_same_repos(our_repo, ref_repo)


def test_appended_days_match_to_zarr_appending_them(tmp_path):
    ref_repo, our_repo = new_repo(tmp_path / "reference"), new_repo(tmp_path / "ours")
    ref = daily_files(tmp_path / "src-ref", days=5)
    write_reference(ref_repo, ref[:3], {"time": 6}, "h5netcdf")
    write_reference(ref_repo, ref[3:], None, "h5netcdf", mode="a-", append_dim="time")
    ours = daily_files(tmp_path / "src-ours", days=5)
    icd.ingest(ours[:3], our_repo, concat_dim="time", chunks={"time": 6}, progress=False)
    # The daily cron lists the whole directory again: stored days are skipped.
    result = icd.ingest(ours, our_repo, concat_dim="time", mode="a", progress=False)
    assert result.skipped == ours[:3] and result.files == ours[3:]
    assert_same_repos(our_repo, ref_repo)
