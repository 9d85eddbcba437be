"""The demo (the main job) and the command line."""

import os
import subprocess
import sys

import pytest
import xarray as xr

from icechunk_distributed.cli import main
from icechunk_distributed.demo import (
    DemoSpec,
    ingest_spec,
    run_demo,
    run_ingest_demo,
    sample_files,
    synthetic_dataset,
)


@pytest.mark.parametrize("executor", ["threads", "processes"])
def test_demo_writes_and_verifies(tmp_path, executor):
    path = tmp_path / "repo"
    result = run_demo(executor=executor, workers=2, megabytes=4, path=str(path))
    assert result.n_regions == DemoSpec.from_megabytes(4).n_time // 8
    assert result.nbytes == DemoSpec.from_megabytes(4).nbytes
    assert len(result.snapshot_id) == 20
    assert path.exists()  # a given path is kept


def test_synthetic_dataset_pieces_match_the_whole():
    spec = DemoSpec(n_time=16, ny=4, nx=5, time_chunk=4)
    whole = synthetic_dataset(spec)
    assert whole["Tair"].isnull().sum() == 16
    piece = synthetic_dataset(spec, 4, 8)
    assert piece.identical(whole.isel(time=slice(4, 8)))


def test_cli_demo(capsys):
    assert main(["demo", "--executor", "threads", "--mb", "2"]) == 0
    assert "verified; commit" in capsys.readouterr().out


def test_cli_rejects_bad_size(capsys):
    assert main(["demo", "--mb", "0"]) == 2
    assert "argument --mb: must be positive" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "icechunk_distributed", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "demo" in out.stdout


def test_cli_demo_ingest(capsys):
    assert main(["demo", "--ingest", "--executor", "threads", "--mb", "1"]) == 0
    out, err = capsys.readouterr()
    assert "ingested 8 file(s): 8 region(s)" in out
    assert "verified: identical to xr.open_mfdataset of the 8 files" in out
    assert "8 daily netCDF files" in err


def test_ingest_demo_keeps_the_repository_at_path_and_removes_its_files(tmp_path):
    import tempfile

    before = set(os.listdir(tempfile.gettempdir()))
    result = run_ingest_demo(executor="serial", megabytes=0.5, path=str(tmp_path / "repo"))
    assert result.path == str(tmp_path / "repo")
    assert (tmp_path / "repo").exists()
    assert result.result.files and len(result.result.files) == result.n_files == 8
    assert result.result.snapshot_id is not None
    leftovers = set(os.listdir(tempfile.gettempdir())) - before
    assert not [n for n in leftovers if n.startswith("icechunk-distributed-demo-")]


def test_sample_files_are_daily_with_a_packed_variable(tmp_path):
    spec = ingest_spec(0.2, n_files=2)
    paths = sample_files(str(tmp_path), spec)
    assert [os.path.basename(p) for p in paths] == ["day-2026-01-01.nc", "day-2026-01-02.nc"]
    with xr.open_dataset(paths[0], engine="h5netcdf", decode_cf=False) as raw:
        assert raw["precip"].dtype == "int16"
        assert {"scale_factor", "add_offset", "_FillValue"} <= set(raw["precip"].attrs)
        assert raw["Tair"].dtype == "float32"
        assert raw.sizes["time"] == 24
    with xr.open_dataset(paths[0], engine="h5netcdf") as decoded:
        assert int(decoded["precip"].isnull().sum()) == 24  # one missing cell per step


def test_cli_demo_quiet_prints_nothing(capsys):
    assert main(["demo", "--executor", "threads", "--mb", "1", "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")


def test_cli_demo_ingest_virtual(capsys):
    assert main(["demo", "--ingest", "--virtual", "--executor", "threads", "--mb", "1"]) == 0
    out, err = capsys.readouterr()
    assert "referenced 8 file(s): 8 region(s), 16 chunk reference(s)" in out
    assert (
        "referenced, not copied: 8 of 8 chunks of Tair, 8 of 8 chunks of precip are virtual "
        "references into the files"
    ) in out
    assert "verified: identical to xr.open_mfdataset of the 8 files (read with" in out
    assert "demo --ingest --virtual: 8 daily netCDF files" in err


def test_cli_demo_virtual_implies_ingest(capsys):
    assert main(["demo", "--virtual", "--executor", "serial", "--mb", "0.2", "-q"]) == 0
    assert capsys.readouterr() == ("", "")


def test_virtual_ingest_demo_keeps_the_files_a_kept_repository_references(tmp_path):
    import icechunk

    path = tmp_path / "repo"
    result = run_ingest_demo(executor="serial", megabytes=0.5, path=str(path), virtual=True)
    files_dir = tmp_path / "repo-files"
    assert result.virtual is not None and result.virtual.files_dir == str(files_dir)
    assert result.virtual.chunk_types == {"Tair": {"virtual": 8}, "precip": {"virtual": 8}}
    assert result.virtual.repo_bytes < result.virtual.files_bytes / 10
    assert f"it references the files in {files_dir}: keep them" in result.summary()
    files = sorted(str(p) for p in files_dir.glob("day-*.nc"))
    assert len(files) == 8
    # The kept repository reads back after the demo, with access to the files' directory.
    prefix = files_dir.resolve().as_uri() + "/"
    access = icechunk.containers_credentials({prefix: icechunk.credentials.LocalFileSystemAccess})
    repo = icechunk.Repository.open(
        icechunk.local_filesystem_storage(str(path)), authorize_virtual_chunk_access=access
    )
    back = xr.open_zarr(repo.readonly_session("main").store, consolidated=False).load()
    with xr.open_mfdataset(files, engine="h5netcdf", combine="by_coords") as expected:
        xr.testing.assert_identical(back, expected.load())


def test_virtual_ingest_demo_refuses_a_files_directory_in_use(tmp_path):
    (tmp_path / "repo-files").mkdir()
    (tmp_path / "repo-files" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="repo-files is not empty"):
        run_ingest_demo(executor="serial", megabytes=0.2, path=str(tmp_path / "repo"), virtual=True)
    assert os.listdir(tmp_path / "repo-files") == ["notes.txt"]
    assert not (tmp_path / "repo").exists()
