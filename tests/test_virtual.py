"""``icd.ingest(virtual=True)``: references instead of bytes, on several engines.

What is committed is read back from a fresh repository (allowed to read the files) and
compared with ``xr.open_mfdataset`` of the files; the arrays and their references are compared
with what VirtualiZarr's own ``open_virtual_mfdataset`` + ``vds.vz.to_icechunk`` commit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import pickle

import icechunk
import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr

import icechunk_distributed as icd
import s3
from icechunk_distributed.errors import (
    OverlappingWritesError,
    RegionWriteError,
    TemplateMismatchError,
)
from icechunk_distributed.virtual import VirtualLoader
from ingest_files import day, days
from virtual_files import (
    FailingParser,
    chunked,
    ingest_virtual,
    prefix_of,
    read_virtual,
    virtual_repo,
)

pytest.importorskip("virtualizarr")

s3_location = s3.s3_location  # the fixtures (see tests/s3.py)
moto_endpoint = s3.moto_endpoint


def mfdataset(paths: list[str]) -> xr.Dataset:
    with (
        xr.set_options(use_new_combine_kwarg_defaults=True),
        xr.open_mfdataset(paths, engine="h5netcdf", combine="by_coords") as ds,
    ):
        return ds.load()


def history(repo, branch="main") -> list[str]:
    return [s.id for s in repo.ancestry(branch=branch)]


def chunk_types(repo, name: str) -> set[str]:
    """The kinds of the array's chunks ("virtual", "native", ...)."""
    session = repo.readonly_session("main")
    array = zarr.open_array(session.store, path=name, mode="r")
    grid = [range(-(-n // c)) for n, c in zip(array.shape, array.chunks, strict=True)]
    kinds = [session.chunk_type(f"/{name}", list(c)) for c in np.ndindex(*map(len, grid))]
    return {str(k).rsplit(".", 1)[-1].lower() for k in kinds}


async def _refs(store, name: str) -> dict[tuple[int, ...], tuple[str, int, int]]:
    out = {}
    async for coords, _, paths, offsets, lengths, _ in store.array_chunk_iterator(name):
        for i, path in enumerate(paths):
            out[tuple(int(c) for c in coords[i])] = (path, int(offsets[i]), int(lengths[i]))
    return out


def references(repo, name: str) -> dict[tuple[int, ...], tuple[str, int, int]]:
    """Every chunk reference of array ``name`` on main: coords -> (file, offset, length)."""
    return asyncio.run(_refs(repo.readonly_session("main").store, name))


def array_metadata(repo, name: str) -> dict:
    raw = asyncio.run(
        repo.readonly_session("main").store.get(
            f"{name}/zarr.json", prototype=zarr.buffer.default_buffer_prototype()
        )
    )
    return json.loads(raw.to_bytes())


@pytest.fixture(params=["threads", "processes", "dask"])
def engine(request):
    if request.param == "dask":
        return request.getfixturevalue("dask_client")
    return request.param


def test_virtual_ingest_on_every_engine(tmp_path, engine):
    src = tmp_path / "src"
    src.mkdir()
    paths = chunked(src, [3, 0, 2, 1, 4, 5])
    repo = virtual_repo(tmp_path / "repo", src)
    result = ingest_virtual(str(src / "d*.nc"), repo, executor=engine)
    assert result.files == sorted(paths) and result.snapshot_id == history(repo)[0]
    xr.testing.assert_identical(read_virtual(tmp_path / "repo", src), mfdataset(sorted(paths)))
    # References, not bytes: every chunk of both variables points into the files.
    assert chunk_types(repo, "t2m") == chunk_types(repo, "rain") == {"virtual"}
    refs = references(repo, "t2m")
    assert len(refs) == 12 and {p for p, _, _ in refs.values()} == {
        prefix_of(src) + os.path.basename(p) for p in paths
    }


def test_same_arrays_and_references_as_virtualizarr(tmp_path):
    from obspec_utils.registry import ObjectStoreRegistry
    from obstore.store import LocalStore
    from virtualizarr import open_virtual_mfdataset
    from virtualizarr.parsers import HDFParser

    src = tmp_path / "src"
    src.mkdir()
    paths = chunked(src, range(4), shuffle=True, compression="gzip")
    ours = virtual_repo(tmp_path / "ours", src)
    ingest_virtual(paths, ours)
    theirs = virtual_repo(tmp_path / "theirs", src)
    vds = open_virtual_mfdataset(
        [prefix_of(src) + os.path.basename(p) for p in paths],
        registry=ObjectStoreRegistry({"file://": LocalStore()}),
        parser=HDFParser(),
        combine="nested",
        concat_dim="time",
        coords="minimal",
        compat="override",
        data_vars="minimal",
        join="override",
    )
    session = theirs.writable_session("main")
    vds.vz.to_icechunk(session.store)
    session.commit("virtualizarr")
    for name in ("t2m", "rain"):
        assert array_metadata(ours, name) == array_metadata(theirs, name)
        assert references(ours, name) == references(theirs, name)
    xr.testing.assert_identical(
        read_virtual(tmp_path / "ours", src), read_virtual(tmp_path / "theirs", src)
    )


def test_the_dry_run_plans_whole_files_and_writes_nothing(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    paths = chunked(src, range(6))
    repo = virtual_repo(tmp_path / "repo", src)
    before = history(repo)
    plan = icd.plan_ingest(paths, repo, concat_dim="time", virtual=True, workers=1)
    assert history(repo) == before
    assert "referenced" in plan.summary()
    # Tasks hold whole files, each file exactly once.
    files = [f for r in plan.regions for f in plan.files_of(r)]
    assert sorted(files) == sorted(prefix_of(src) + os.path.basename(p) for p in paths)
    assert all(r["time"].start % 4 == 0 and r["time"].stop % 4 == 0 for r in plan.regions)


# -- refusals, before anything is written


@pytest.mark.parametrize(
    ("odd", "match"),
    [
        ({"compression": "gzip"}, r"'t2m' with another layout.*filters"),
        ({"chunks": 4}, r"'rain' with another layout.*chunks: \[4, 3\] instead of \[2, 3\]"),
        ({"dtype": "f8"}, r"'t2m' with another layout.*dtype: <f8 instead of <f4"),
    ],
)
def test_files_with_another_layout_are_refused_naming_them(tmp_path, odd, match):
    src = tmp_path / "src"
    src.mkdir()
    paths = chunked(src, range(3))
    kwargs = dict(odd)
    chunks = kwargs.pop("chunks", 2)
    dtype = kwargs.pop("dtype", None)
    if dtype:
        from ingest_files import day

        ds = day(3)
        ds["t2m"] = ds["t2m"].astype(dtype)
        ds.to_netcdf(
            src / "d03.nc",
            engine="h5netcdf",
            encoding={v: {"chunksizes": (2, 3)} for v in ("t2m", "rain")},
        )
    else:
        chunked(src, [3], chunks=chunks, **kwargs)
    repo = virtual_repo(tmp_path / "repo", src)
    before = history(repo)
    with pytest.raises(TemplateMismatchError, match=match) as info:
        ingest_virtual(str(src / "*.nc"), repo)
    assert "d03.nc" in str(info.value)
    assert history(repo) == before and paths


def test_a_file_that_ends_inside_a_chunk_is_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    chunked(src, [0], n=3, chunks=2)  # 3 steps in chunks of 2: the next file is off the grid
    chunked(src, [1], n=4, chunks=2)
    repo = virtual_repo(tmp_path / "repo", src)
    with pytest.raises(TemplateMismatchError, match=r"d00.nc.*one chunk grid.*virtual=False"):
        ingest_virtual(str(src / "*.nc"), repo)
    # The last file may end inside a chunk.
    paths = chunked(src, [0], n=4) + chunked(src, [1], n=3)
    ingest_virtual(paths, repo)
    xr.testing.assert_identical(read_virtual(tmp_path / "repo", src), mfdataset(paths))


def test_a_repository_without_a_container_for_the_files_is_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    paths = chunked(src, range(2))
    other = tmp_path / "elsewhere"
    other.mkdir()
    repo = virtual_repo(tmp_path / "repo", other)
    before = history(repo)
    with pytest.raises(
        ValueError, match=r"(?s)no virtual chunk container.*d00.nc.*set_virtual_chunk_container"
    ):
        ingest_virtual(paths, repo)
    assert history(repo) == before


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"chunks": {"time": 4}}, "chunks= cannot be used with virtual=True"),
        ({"engine": "h5netcdf"}, "engine= is for byte ingests"),
    ],
)
def test_options_that_do_not_apply_are_refused(tmp_path, kwargs, match):
    src = tmp_path / "src"
    src.mkdir()
    repo = virtual_repo(tmp_path / "repo", src)
    with pytest.raises(ValueError, match=match):
        ingest_virtual(chunked(src, [0]), repo, **kwargs)
    with pytest.raises(ValueError, match="need virtual=True"):
        icd.ingest(chunked(src, [1]), repo, concat_dim="time", parser=object())


# -- merges of references


def _ref_fork(snap, location: str, offset: int):
    fork = pickle.loads(pickle.dumps(snap))
    fork.store.set_virtual_ref("a/c/0", location, offset=offset, length=8, validate_container=False)
    return pickle.loads(pickle.dumps(fork))


def test_two_tasks_referencing_one_chunk_differently_collide(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "blob").write_bytes(bytes(range(64)) * 2)
    repo = virtual_repo(tmp_path / "repo", src)
    session = icd.writable_session(repo)
    zarr.create_array(session.store, name="a", shape=(4,), chunks=(2,), dtype="f4")
    session.commit("array")
    location = prefix_of(src) + "blob"
    session = icd.writable_session(repo)
    with session.allow_pickling() as snap:
        same = [_ref_fork(snap, location, 0), _ref_fork(snap, location, 0)]
    icd.merge_sessions(session, *same)  # identical references are one write
    assert session.has_uncommitted_changes
    session = icd.writable_session(repo)
    with session.allow_pickling() as snap:
        # Bytes 0..8 and 64..72 are equal: the references still differ.
        odd = [_ref_fork(snap, location, 0), _ref_fork(snap, location, 64)]
    with pytest.raises(
        OverlappingWritesError, match=r"/a chunk \[0\]: .*blob@64\+8\).*blob@0\+8\)"
    ):
        icd.merge_sessions(session, *odd)
    assert not session.has_uncommitted_changes


# -- append and resume


def test_the_daily_cron_appends_references_of_new_files_only(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    repo = virtual_repo(tmp_path / "repo", src)
    first = chunked(src, range(3))
    ingest_virtual(str(src / "*.nc"), repo, mode="a")  # creates
    later = chunked(src, range(3, 5))
    result = ingest_virtual(str(src / "*.nc"), repo, mode="a")
    assert result.skipped == first and result.files == later
    xr.testing.assert_identical(read_virtual(tmp_path / "repo", src), mfdataset(first + later))
    assert chunk_types(repo, "t2m") == {"virtual"}
    again = ingest_virtual(str(src / "*.nc"), repo, mode="a")
    assert again.write is None and len(again.skipped) == 5


def test_an_append_of_files_with_another_layout_is_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    repo = virtual_repo(tmp_path / "repo", src)
    ingest_virtual(chunked(src, range(2)), repo)
    before = history(repo)
    odd = chunked(src, [2], compression="gzip")
    with pytest.raises(TemplateMismatchError, match=r"another layout.*codecs"):
        ingest_virtual(odd, repo, mode="a")
    assert history(repo) == before


def test_bytes_appended_to_a_virtual_dataset_read_back_alike(tmp_path):
    """Mixed arrays: virtual chunks from the first files, native chunks from a byte append."""
    src = tmp_path / "src"
    src.mkdir()
    repo = virtual_repo(tmp_path / "repo", src)
    first = chunked(src, range(2))
    ingest_virtual(first, repo)
    later = chunked(src, [2, 3])
    icd.ingest(later, repo, concat_dim="time", mode="a", progress=False)
    xr.testing.assert_identical(read_virtual(tmp_path / "repo", src), mfdataset(first + later))
    # Small chunks are inlined in the manifest rather than stored as objects.
    kinds = chunk_types(repo, "t2m")
    assert "virtual" in kinds and kinds - {"virtual"} in ({"native"}, {"inline"})


def test_a_failed_virtual_ingest_resumes_with_its_run_id(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    paths = chunked(src, range(8))
    repo = virtual_repo(tmp_path / "repo", src)
    before = history(repo)
    marker = tmp_path / "fail"
    marker.write_text("d05.nc")
    parser = FailingParser(str(marker))
    with pytest.raises(RegionWriteError, match=r"d05\.nc"):
        ingest_virtual(paths, repo, parser=parser, run_id="v", workers=2, retries=0)
    assert history(repo) == before
    (run,) = icd.list_runs(repo)
    assert run.n_done >= 1
    marker.unlink()
    result = ingest_virtual(paths, repo, parser=parser, run_id="v", workers=2)
    assert result.write is not None and result.write.n_resumed == run.n_done
    xr.testing.assert_identical(read_virtual(tmp_path / "repo", src), mfdataset(paths))
    assert sorted(repo.list_branches()) == ["main"]


def test_packed_static_and_attributes_read_back_as_to_zarr_stores_them(tmp_path):
    """An int16-packed variable, a static variable referenced once, global attributes."""
    src = tmp_path / "src"
    src.mkdir()
    paths = []
    for i in range(3):
        d = day(i)  # its "rain" is int16-packed with a float32 scale_factor
        d["mask"] = (("y",), np.arange(3, dtype="f4") + i, {"long_name": "land mask"})
        d.attrs = {"title": f"day {i}", "Conventions": "CF-1.8"}
        path = src / f"d{i:02d}.nc"
        d.to_netcdf(path, engine="h5netcdf")
        paths.append(str(path))
    repo = virtual_repo(tmp_path / "repo", src)
    ingest_virtual(paths, repo)
    got = read_virtual(tmp_path / "repo", src)
    # What open_mfdataset + to_zarr store, read back the same way (a float32 scale_factor
    # comes back from Zarr's JSON as float64, so "rain" decodes to float64 from both).
    store = zarr.storage.MemoryStore()
    mfdataset(paths).to_zarr(store, consolidated=False)
    want = xr.open_zarr(store, consolidated=False, chunks=None).load()
    xr.testing.assert_identical(got, want)
    assert got.attrs["title"] == "day 0" and got["mask"].values.tolist() == [0.0, 1.0, 2.0]
    assert chunk_types(repo, "mask") == {"virtual"}


# -- S3 sources, S3 repository


def test_s3_sources_referenced_from_an_s3_repository(tmp_path, s3_location):
    import boto3

    endpoint = s3_location.endpoint
    bucket = s3.create_bucket(endpoint)
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=s3.REGION,
        aws_access_key_id=s3.ACCESS_KEY_ID,
        aws_secret_access_key=s3.SECRET_ACCESS_KEY,
    )
    paths = chunked(tmp_path, [2, 0, 1, 3])
    for path in paths:
        client.upload_file(path, bucket, f"era/{os.path.basename(path)}")
    prefix = f"s3://{bucket}/era/"
    config = icechunk.RepositoryConfig.default()
    config.set_virtual_chunk_container(
        icechunk.VirtualChunkContainer(
            prefix,
            icechunk.s3_store(
                region=s3.REGION, endpoint_url=endpoint, allow_http=True, force_path_style=True
            ),
        )
    )
    access = icechunk.containers_credentials(
        {
            prefix: icechunk.s3_credentials(
                access_key_id=s3.ACCESS_KEY_ID, secret_access_key=s3.SECRET_ACCESS_KEY
            )
        }
    )
    repo = icechunk.Repository.create(
        s3_location.storage(), config=config, authorize_virtual_chunk_access=access
    )
    options = {
        "endpoint": endpoint,
        "region": s3.REGION,
        "access_key_id": s3.ACCESS_KEY_ID,
        "secret_access_key": s3.SECRET_ACCESS_KEY,
        "allow_http": True,
    }
    result = ingest_virtual(
        f"{prefix}*.nc", repo, executor="processes", workers=2, source_options=options
    )
    assert result.files == [f"{prefix}d{i:02d}.nc" for i in range(4)]
    fresh = icechunk.Repository.open(s3_location.storage(), authorize_virtual_chunk_access=access)
    got = xr.open_zarr(fresh.readonly_session("main").store, consolidated=False, chunks=None)
    xr.testing.assert_identical(got.load(), mfdataset(sorted(paths)))
    assert {p for p, _, _ in references(fresh, "t2m").values()} == set(result.files)
    # A source no container covers is refused before anything is written.
    client.upload_file(paths[0], bucket, "other/d09.nc")
    with pytest.raises(ValueError, match=r"no virtual chunk container.*other/d09.nc"):
        ingest_virtual(f"s3://{bucket}/other/*.nc", repo, mode="a", source_options=options)


# -- the parts of VirtualiZarr and icechunk we lean on beyond their documented API


def test_pin_manifest_store_group_and_the_manifest_writer(tmp_path):
    import inspect

    from virtualizarr.manifests import ManifestArray
    from virtualizarr.writers.icechunk import write_manifest_to_icechunk

    from icechunk_distributed.virtualscan import (
        default_parser,
        file_url,
        manifest_arrays,
        parse_file,
    )

    (path,) = chunked(tmp_path, [0])
    arrays = manifest_arrays(parse_file(file_url(path), default_parser(), None))
    assert isinstance(arrays["t2m"], ManifestArray) and arrays["t2m"].metadata.chunks == (2, 3)
    params = set(inspect.signature(write_manifest_to_icechunk).parameters)
    assert {"store", "group", "arr_name", "manifest", "chunk_index_offsets"} <= params
    assert "last_updated_at" in params


def test_pin_icechunk_chunk_reference_iterator(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (path,) = chunked(src, [0])
    repo = virtual_repo(tmp_path / "repo", src)
    ingest_virtual([path], repo)
    refs = references(repo, "t2m")
    assert set(refs) == {(0, 0), (1, 0)} and all(r[0].endswith("d00.nc") for r in refs.values())


def test_loadable_variables_are_copied_beside_the_references(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    paths = chunked(src, range(5))
    repo = virtual_repo(tmp_path / "repo", src)
    ingest_virtual(paths, repo, loadable_variables=["rain"], executor="processes", workers=2)
    xr.testing.assert_identical(read_virtual(tmp_path / "repo", src), mfdataset(paths))
    assert chunk_types(repo, "t2m") == {"virtual"}
    assert "virtual" not in chunk_types(repo, "rain")


def test_a_directory_with_a_space_in_its_name(tmp_path):
    src = tmp_path / "era 5"
    src.mkdir()
    paths = chunked(src, range(3))
    repo = virtual_repo(tmp_path / "repo", src)
    ingest_virtual(str(src / "*.nc"), repo)
    xr.testing.assert_identical(read_virtual(tmp_path / "repo", src), mfdataset(paths))


def test_references_appended_to_a_copied_dataset_are_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    repo = virtual_repo(tmp_path / "repo", src)
    icd.ingest(chunked(src, range(2)), repo, concat_dim="time", progress=False)
    before = history(repo)
    with pytest.raises(TemplateMismatchError, match=r"another layout than the stored array"):
        ingest_virtual(chunked(src, [2]), repo, mode="a")
    assert history(repo) == before


# -- found in review: each was a wrong commit or a late, confusing failure


def _packed_day(src, i: int, scale: float, offset: float = 0.0) -> str:
    ds = day(i)
    path = src / f"d{i:02d}.nc"
    enc = {
        "dtype": "int16",
        "scale_factor": np.float32(scale),
        "add_offset": np.float32(offset),
        "_FillValue": np.int16(-32767),
    }
    ds.to_netcdf(path, engine="h5netcdf", encoding={"t2m": enc, "rain": {"chunksizes": (2, 3)}})
    return str(path)


def test_a_single_file_one_chunk_long_is_referenced(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    paths = chunked(src, [0], chunks=4)  # one chunk along time: one task writes it
    repo = virtual_repo(tmp_path / "repo", src)
    result = ingest_virtual(paths, repo, mode="a")
    assert result.write is not None and result.write.n_chunks == 2
    xr.testing.assert_identical(read_virtual(tmp_path / "repo", src), mfdataset(paths))
    later = chunked(src, [1, 2], chunks=4)
    ingest_virtual(paths + later, repo, mode="a")
    xr.testing.assert_identical(read_virtual(tmp_path / "repo", src), mfdataset(paths + later))
    assert chunk_types(repo, "t2m") == {"virtual"}


def test_files_packed_with_other_scale_factors_are_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    paths = [_packed_day(src, i, 0.01 * (i + 1)) for i in range(3)]
    repo = virtual_repo(tmp_path / "repo", src)
    with pytest.raises(
        TemplateMismatchError, match=r"d01.nc decodes 't2m' with other scale_factor"
    ):
        ingest_virtual(paths, repo)
    # Copying the variable decodes each file with its own attributes.
    ingest_virtual(paths, repo, loadable_variables=["t2m"])
    got = read_virtual(tmp_path / "repo", src)
    np.testing.assert_allclose(got.t2m.values, mfdataset(paths).t2m.values, rtol=1e-6)


def test_an_append_packed_otherwise_than_the_store_is_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    repo = virtual_repo(tmp_path / "repo", src)
    ingest_virtual([_packed_day(src, i, 0.01) for i in range(2)], repo)
    before = history(repo)
    with pytest.raises(TemplateMismatchError, match=r"'t2m'.*decoded with other attributes"):
        ingest_virtual([_packed_day(src, 2, 0.02)], repo, mode="a")
    assert history(repo) == before


def test_an_append_whose_times_the_stored_units_would_round_is_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    repo = virtual_repo(tmp_path / "repo", src)
    first = []
    for i in range(2):  # daily steps, stored in whole days
        ds = day(i, n=2).assign_coords(
            time=pd.date_range("2026-01-01", periods=2) + pd.Timedelta(days=2 * i)
        )
        path = src / f"a{i}.nc"
        ds.to_netcdf(path, engine="h5netcdf", encoding={
            "time": {"units": "days since 2000-01-01", "dtype": "int32"},
            "t2m": {"chunksizes": (2, 3)}, "rain": {"chunksizes": (2, 3)}})  # fmt: skip
        first.append(str(path))
    ingest_virtual(first, repo)
    before = history(repo)
    later = chunked(src, [10])  # 6-hourly steps
    with pytest.raises(TemplateMismatchError, match=r"cannot be stored exactly"):
        ingest_virtual(later, repo, mode="a")
    assert history(repo) == before


def test_an_append_without_a_stored_variable_is_refused_before_writing(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    repo = virtual_repo(tmp_path / "repo", src)
    ingest_virtual(chunked(src, range(2)), repo)
    before = history(repo)
    ds = day(2).drop_vars("rain")
    path = src / "d02.nc"
    ds.to_netcdf(path, engine="h5netcdf", encoding={"t2m": {"chunksizes": (2, 3)}})
    session = icd.writable_session(repo)
    with pytest.raises(TemplateMismatchError, match=r"missing \['rain'\]"):
        ingest_virtual([str(path)], session, mode="a")
    assert not session.has_uncommitted_changes and history(repo) == before


def test_a_static_loadable_variable_is_copied_from_the_first_file(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    paths = []
    for i in range(3):
        d = day(i)
        d["mask"] = (("y",), np.arange(3, dtype="f4") + i)
        path = src / f"d{i:02d}.nc"
        d.to_netcdf(
            path, engine="h5netcdf", encoding={v: {"chunksizes": (2, 3)} for v in ("t2m", "rain")}
        )
        paths.append(str(path))
    repo = virtual_repo(tmp_path / "repo", src)
    ingest_virtual(paths, repo, loadable_variables=["mask"])
    got = read_virtual(tmp_path / "repo", src)
    assert got["mask"].values.tolist() == [0.0, 1.0, 2.0]
    assert "virtual" not in chunk_types(repo, "mask")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"encoding": {"t2m": {"chunks": (4, 3)}}}, r"encoding= names referenced arrays \['t2m'\]"),
        ({"task_size": 2}, "task_size= does not apply to a virtual ingest"),
        ({"loadable_variables": ["nosuch"]}, r"variables the files do not have: \['nosuch'\]"),
    ],
)
def test_options_a_virtual_ingest_cannot_honour_are_refused(tmp_path, kwargs, match):
    src = tmp_path / "src"
    src.mkdir()
    repo = virtual_repo(tmp_path / "repo", src)
    before = history(repo)
    with pytest.raises(ValueError, match=match):
        ingest_virtual(chunked(src, range(2)), repo, **kwargs)
    assert history(repo) == before


@pytest.mark.parametrize("name", ["pct%41.nc", "hash#1.nc", "what?.nc"])
def test_file_names_a_url_cannot_carry_are_refused(tmp_path, name):
    src = tmp_path / "src"
    src.mkdir()
    (path,) = chunked(src, [0])
    odd = src / name
    os.rename(path, odd)
    repo = virtual_repo(tmp_path / "repo", src)
    with pytest.raises(ValueError, match=r"'%', '#' or '\?'.*virtual=False"):
        ingest_virtual([str(odd)], repo)


def test_sources_whose_only_common_directory_is_the_root_are_refused_clearly(tmp_path):
    import shutil
    import tempfile

    from icechunk_distributed.containers import ContainerError, source_containers

    if not os.path.isdir("/var/tmp") or str(tmp_path).startswith("/var/"):
        pytest.skip("needs a second top-level directory for files")
    elsewhere = tempfile.mkdtemp(dir="/var/tmp")
    try:
        paths = chunked(tmp_path, [0]) + chunked(elsewhere, [1])
        with pytest.raises(ContainerError, match=r"only common directory is /.*separately"):
            source_containers(paths)
    finally:
        shutil.rmtree(elsewhere)


# -- the fast header (h5py) against the parser's reading


def _odd_files(src) -> list[str]:
    """Files with what a header must get right: packing, static and 2-D coordinates."""
    paths = []
    for i in range(2):
        d = day(i)
        d["mask"] = (("y",), np.arange(3, dtype="f4"))
        d = d.assign_coords(
            hour=("time", d.time.dt.hour.values.astype("i4")),
            lat=(("y",), np.linspace(-10, 10, 3)),
        )
        path = src / f"d{i:02d}.nc"
        d.to_netcdf(path, engine="h5netcdf")
        paths.append(str(path))
    return paths


def test_the_fast_header_reads_what_the_parser_reads(tmp_path):
    from icechunk_distributed.virtualscan import VirtualHeaderReader, default_parser, same_header

    src = tmp_path / "src"
    src.mkdir()
    reader = VirtualHeaderReader("time", default_parser())
    for path in _odd_files(src) + chunked(src, [5], compression="gzip", shuffle=True):
        fast, parsed = reader(path), reader.parsed(path)
        assert same_header(fast, parsed), path
        assert fast.layouts.keys() == parsed.layouts.keys()
    loadable = VirtualHeaderReader("time", default_parser(), loadable=("mask", "hour"))
    assert same_header(loadable(path), loadable.parsed(path))


def test_a_fast_header_that_disagrees_is_replaced_by_the_parsers(tmp_path, monkeypatch):
    import icechunk_distributed.hdfheader as hdfheader

    real = hdfheader.read_hdf_header

    def wrong(*args, **kwargs):
        header = real(*args, **kwargs)
        # A reading that disagrees with the parser's: times an hour late.
        return dataclasses.replace(
            header, concat_values=header.concat_values + np.timedelta64(1, "h")
        )

    monkeypatch.setattr(hdfheader, "read_hdf_header", wrong)
    src = tmp_path / "src"
    src.mkdir()
    paths = _odd_files(src)
    repo = virtual_repo(tmp_path / "repo", src)
    ingest_virtual(paths, repo, executor="threads")
    got = read_virtual(tmp_path / "repo", src)
    np.testing.assert_array_equal(got.time.values, mfdataset(paths).time.values)


@pytest.mark.parametrize("encoding", [{}, {"compression": "gzip", "shuffle": True}, "contiguous"])
def test_tasks_read_references_with_h5py_as_the_parser_does(tmp_path, encoding):
    src = tmp_path / "src"
    src.mkdir()
    if encoding == "contiguous":
        paths = [str(p) for p in days(src, range(3))]  # contiguous: one chunk per file
    else:
        paths = chunked(src, range(3), **encoding)
    plan = icd.plan_ingest(paths, concat_dim="time", virtual=True, workers=1)
    loader = plan.loader
    assert isinstance(loader, VirtualLoader) and set(loader.prototypes) == {"t2m", "rain"}
    parsed = dataclasses.replace(loader, prototypes={})
    region = {"time": slice(0, 12)}
    fast, slow = loader(region), parsed(region)
    for name in ("t2m", "rain"):
        assert fast[name].data.manifest.dict() == slow[name].data.manifest.dict()
        assert fast[name].data.metadata == slow[name].data.metadata
