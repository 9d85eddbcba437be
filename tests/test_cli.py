"""The command line: ``icechunk-distributed ingest`` and ``info``.

Every command must end with its exit code (0 success, 1 a failed run, 2 bad input, 130
interrupted) and one ``error: ...`` line, never a traceback, and without icechunk's Rust
warnings at the default level. Real subprocesses check what a user sees (and cost about two
seconds each, for the imports); ``main([...])`` in this process checks the many cases.
"""

import os
import subprocess
import sys

import h5py
import icechunk
import numpy as np
import pandas as pd
import pytest
import xarray as xr

import icechunk_distributed as icd
import s3
from icechunk_distributed.cli import exit_code, main
from icechunk_distributed.info import describe_repository, format_bytes
from icechunk_distributed.location import LocationError, open_location, storage_for

# Fixtures by assignment (see tests/s3.py).
moto_endpoint, s3_location = s3.moto_endpoint, s3.s3_location

RUST_WARNING = "not safe for concurrent"
PACKED = {"dtype": "int16", "scale_factor": 0.01, "add_offset": 10.0, "_FillValue": -32768}


def day(i: int) -> xr.Dataset:
    """Day ``i``: four 6-hourly steps of float32 ``tas`` and ``pr`` (packed in the files)."""
    rng = np.random.default_rng(i)
    pr = (rng.random((4, 3, 5)) * 50).astype("f4")
    pr[0, 0, 0] = np.nan  # stored as the _FillValue
    return xr.Dataset(
        {
            "tas": (("time", "y", "x"), rng.random((4, 3, 5)).astype("f4"), {"units": "K"}),
            "pr": (("time", "y", "x"), pr, {"units": "mm"}),
        },
        coords={
            "time": pd.date_range("2026-01-01", periods=4, freq="6h") + pd.Timedelta(days=i),
            "y": np.arange(3.0),
            "x": np.arange(5.0),
        },
        attrs={"title": "cli test"},
    )


def write_days(directory, days, *, zlib: bool = False) -> list[str]:
    """One h5netcdf file per day, ``pr`` packed as int16; ``tas`` compressed if ``zlib``."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in days:
        path = str(directory / f"day{i:02d}.nc")
        encoding = {"pr": dict(PACKED), "tas": {"zlib": True} if zlib else {}}
        day(i).to_netcdf(path, engine="h5netcdf", encoding=encoding)
        paths.append(path)
    return paths


def run(*args: str, cwd, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m icechunk_distributed ARGS`` in ``cwd``; never a traceback."""
    out = subprocess.run(
        [sys.executable, "-m", "icechunk_distributed", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert "Traceback" not in out.stderr, out.stderr
    return out


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """``main(ARGS)`` in this process: (exit code, stdout, stderr); never a traceback."""
    code = main(list(args))
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, out, err


def user_env() -> dict:
    """The environment without ICECHUNK_LOG (conftest sets it), as a user's shell has it."""
    return {k: v for k, v in os.environ.items() if k != "ICECHUNK_LOG"}


def read_back(path, branch: str = "main") -> xr.Dataset:
    repo = icechunk.Repository.open(icechunk.local_filesystem_storage(str(path)))
    store = repo.readonly_session(branch).store
    return xr.open_zarr(store, consolidated=False).load()


def assert_same_as_mfdataset(path, files) -> None:
    with xr.open_mfdataset(files, engine="h5netcdf", combine="by_coords") as expected:
        xr.testing.assert_identical(read_back(path), expected.load())


@pytest.fixture
def data(tmp_path, monkeypatch):
    """Three daily files in ``data/``, with the working directory at ``tmp_path``."""
    monkeypatch.chdir(tmp_path)
    return write_days(tmp_path / "data", range(3))


# ---------------------------------------------------------------------------------------------
# Subprocesses: what a user sees


def test_version_and_help(tmp_path, capsys):
    out = run("--version", cwd=tmp_path)
    assert out.returncode == 0
    assert f"icechunk-distributed {icd.__version__}" in out.stdout
    out = run("ingest", "--help", cwd=tmp_path)
    assert out.returncode == 0
    assert "SOURCE [SOURCE ...] REPO" in out.stdout and "examples:" in out.stdout
    for command in ([], ["info"], ["demo"]):
        code, text, _ = cli(capsys, *command, "--help")
        assert code == 0
        assert "examples:" in text if command else "exit codes:" in text


def test_ingest_then_info(data, tmp_path):
    out = run(
        "ingest", "data/*.nc", "repo", "--concat-dim", "time", "--executor", "threads",
        "--workers", "2", "--message", "first load", cwd=tmp_path, env=user_env(),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "ingested 3 file(s)" in out.stdout
    assert "commit " in out.stdout
    assert "new repository at repo" in out.stdout
    assert RUST_WARNING not in out.stderr  # the default level keeps icechunk's warnings quiet
    assert_same_as_mfdataset(tmp_path / "repo", data)

    info = run("info", "repo", cwd=tmp_path)
    assert info.returncode == 0, info.stderr
    for expected in ("branches: main", "first load", "tas", "pr", "int16 (packed)", "time: 12"):
        assert expected in info.stdout
    assert "time spans 2026-01-01T00:00 .. 2026-01-03T18:00" in info.stdout
    assert "unfinished runs: none" in info.stdout


def test_verbose_shows_icechunk_warnings_and_skipped_files(data, tmp_path, capsys):
    args = ("ingest", "data/*.nc", "repo", "--concat-dim", "time", "--executor", "serial")
    assert cli(capsys, *args)[0] == 0
    again = run(*args, "--append", "--verbose", cwd=tmp_path, env=user_env())
    assert again.returncode == 0, again.stderr
    assert "nothing to write; skipped 3 file(s)" in again.stdout
    assert "data/day02.nc" in again.stdout  # the skipped files
    assert RUST_WARNING in again.stderr


def test_bad_input_in_a_subprocess(data, tmp_path):
    combine = run(
        "ingest", "data/*.nc", "repo", "--concat-dim", "level", "--executor", "threads",
        cwd=tmp_path, env=user_env(),
    )  # fmt: skip
    assert combine.returncode == 2
    assert combine.stderr.startswith("error: 3 file(s) have no dimension 'level'")
    assert RUST_WARNING not in combine.stderr
    assert not (tmp_path / "repo").exists()  # a refused first ingest leaves no repository


def _corrupt(path) -> None:
    """Make ``tas``'s data unreadable but leave the header intact: the scan passes."""
    with h5py.File(path, "r") as f:
        chunk = f["tas"].id.get_chunk_info(0)
    with open(path, "r+b") as fh:
        fh.seek(chunk.byte_offset)
        fh.write(b"\xff" * chunk.size)


def test_a_failed_run_exits_1_and_leaves_no_empty_repository(tmp_path):
    files = write_days(tmp_path / "data", range(3), zlib=True)
    _corrupt(files[1])
    args = ("ingest", "data/*.nc", "repo", "--concat-dim", "time", "--executor", "threads")
    out = run(*args, "--retries", "0", cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    assert out.stderr.startswith("error: 1 of 3 region(s) failed")
    assert "nothing was committed" in out.stderr
    assert not (tmp_path / "repo").exists()


# ---------------------------------------------------------------------------------------------
# In this process: main([...])


def test_s3_sources_into_an_s3_repository(tmp_path, s3_location, monkeypatch, capsys):
    import boto3

    files = write_days(tmp_path / "data", range(2))
    bucket, endpoint = s3_location.bucket, s3_location.endpoint
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=s3.REGION,
        aws_access_key_id=s3.ACCESS_KEY_ID,
        aws_secret_access_key=s3.SECRET_ACCESS_KEY,
    )
    for path in files:
        client.upload_file(path, bucket, f"src/{os.path.basename(path)}")
    # Credentials come from the environment, for the repository and the sources alike.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.SECRET_ACCESS_KEY)
    repo_url = f"s3://{bucket}/{s3_location.prefix}"
    s3_args = ("--endpoint-url", endpoint, "--allow-http", "--region", s3.REGION)
    code, out, err = cli(
        capsys, "ingest", f"s3://{bucket}/src/*.nc", repo_url, "--concat-dim", "time",
        "--executor", "threads", *s3_args,
    )  # fmt: skip
    assert code == 0, err
    assert "ingested 2 file(s)" in out
    store = s3_location.open().readonly_session("main").store
    with xr.open_mfdataset(files, engine="h5netcdf", combine="by_coords") as expected:
        back = xr.open_zarr(store, consolidated=False).load()
        xr.testing.assert_identical(back, expected.load())
    code, info, err = cli(capsys, "info", repo_url, *s3_args)
    assert code == 0, err
    assert "tas" in info and "ingest 2 file(s)" in info
    assert s3.SECRET_ACCESS_KEY not in out + info


def test_ingest_on_processes(data, tmp_path, capsys):
    argv = ["ingest", "data/*.nc", "repo", "--concat-dim", "time", "--executor", "processes"]
    code, out, err = cli(capsys, *argv, "--workers", "2", "--chunks", "time=8,x=-1")
    assert code == 0, err
    assert "ingested 3 file(s)" in out and "on processes" in out
    assert_same_as_mfdataset(tmp_path / "repo", data)
    assert read_back(tmp_path / "repo")["tas"].encoding["chunks"] == (8, 3, 5)


def test_append_twice_like_a_daily_cron(data, tmp_path, capsys):
    common = ("--concat-dim", "time", "--executor", "threads", "--append")
    code, _, err = cli(capsys, "ingest", "data/day0[01].nc", "repo", *common)
    assert code == 0, err  # --append creates the dataset on the first run
    code, out, err = cli(capsys, "ingest", "data/*.nc", "repo", *common)
    assert code == 0, err
    assert "ingested 1 file(s)" in out
    assert "skipped 2 file(s) already in the store" in out
    code, out, err = cli(capsys, "ingest", "data/*.nc", "repo", *common)
    assert code == 0, err
    assert "nothing to write; skipped 3 file(s)" in out
    assert_same_as_mfdataset(tmp_path / "repo", data)
    repo = icechunk.Repository.open(icechunk.local_filesystem_storage(str(tmp_path / "repo")))
    assert len(list(repo.ancestry(branch="main"))) == 3  # the third run committed nothing


def test_dry_run_prints_the_plan_and_creates_nothing(data, tmp_path, capsys):
    args = ("ingest", "data/*.nc", "repo", "--concat-dim", "time", "--executor", "serial")
    code, out, err = cli(capsys, *args, "--dry-run")
    assert code == 0, err
    assert "3 file(s) to write" in out
    assert "dry run: nothing written (a new repository at repo)" in out
    assert not (tmp_path / "repo").exists()
    assert cli(capsys, *args, "-q")[0] == 0
    code, out, err = cli(capsys, *args, "--dry-run", "--append")
    assert code == 0, err
    assert "nothing to write: all 3 file(s) are in the store already" in out
    assert "dry run: nothing written (the repository at repo)" in out


def test_overwrite_and_the_hint_for_an_existing_dataset(data, tmp_path, capsys):
    new = write_days(tmp_path / "new", range(5, 7))
    args = ("--concat-dim", "time", "--executor", "threads")
    assert cli(capsys, "ingest", "data/*.nc", "repo", *args)[0] == 0
    code, _, err = cli(capsys, "ingest", "new/*.nc", "repo", *args)
    assert code == 2
    assert "already holds" in err
    assert "--append adds the new files, --overwrite replaces the dataset" in err
    code, _, err = cli(capsys, "ingest", "new/*.nc", "repo", *args, "--overwrite")
    assert code == 0, err
    assert_same_as_mfdataset(tmp_path / "repo", new)


BAD_OPTIONS = [
    (["--workers", "-3"], "argument --workers: must be a positive integer, not '-3'"),
    (["--workers", "0"], "argument --workers: must be a positive integer, not '0'"),
    (["--workers", "two"], "argument --workers: must be a positive integer, not 'two'"),
    (["--chunks", "time=abc"], "the chunk size of 'time' must be a positive integer"),
    (["--chunks", "time=-5"], "the chunk size of 'time' must be a positive integer"),
    (["--chunks", "24"], "expected DIM=SIZE"),
    (["--retries", "-1"], "argument --retries: must be an integer >= 0"),
    (["--executor", "nope"], "invalid choice: 'nope'"),
    (["--append", "--overwrite"], "not allowed with argument"),
    (["--run-id", "no spaces"], "run_id must be"),
    (["--step", "fortnightly"], "step='fortnightly'"),
    (["--branch", "dev"], "branch 'dev' does not exist"),
    (["--task-size", "huge"], "task_size 'huge'"),
]


@pytest.mark.parametrize(
    ("extra", "message"), BAD_OPTIONS, ids=[" ".join(b[0]) for b in BAD_OPTIONS]
)
def test_bad_options_exit_2(data, tmp_path, capsys, extra, message):
    args = ["ingest", "data/*.nc", "repo", "--concat-dim", "time", "--executor", "threads"]
    code, _, err = cli(capsys, *args, *extra)
    assert code == 2, err
    assert message in err
    assert not (tmp_path / "repo").exists()


def test_bad_sources_and_targets_exit_2(data, tmp_path, capsys):
    (tmp_path / "corrupt.nc").write_bytes(b"not a netCDF file" * 50)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hello")
    with xr.open_dataset(data[0], engine="h5netcdf") as ds:
        later = ds.drop_vars("pr").assign_coords(time=ds.time + np.timedelta64(9, "D"))
        later.to_netcdf(tmp_path / "nopr.nc", engine="h5netcdf")
    cases = [
        (["data/day09.nc", "repo"], "error: no such file: data/day09.nc"),
        (["data/*.zarr", "repo"], "error: no such file: data/*.zarr (matches nothing)"),
        (["data/*.nc", "corrupt.nc", "repo"], "could not be read:\n  corrupt.nc"),
        (["data/*.nc", "nopr.nc", "repo"], "nopr.nc"),
        (["data/day00.nc", "data/day01.nc"], "error: data/day01.nc exists and is not an Ice"),
        (["data/day00.nc", "plain"], "error: plain exists and is not an Icechunk repository"),
        (["data/day00.nc", "gs://bucket/repo"], "a local directory or s3://bucket/prefix"),
        (["data/day00.nc", "s3://"], "no bucket"),
    ]
    for paths, message in cases:
        code, _, err = cli(capsys, "ingest", *paths, "--concat-dim", "time", "--executor", "serial")
        assert (code, err.startswith("error: ")) == (2, True), (paths, err)
        assert message in err, (paths, err)
    assert not (tmp_path / "repo").exists()
    assert os.listdir(tmp_path / "plain") == ["notes.txt"]  # an occupied REPO is untouched


@pytest.mark.parametrize("mb", ["nan", "inf", "-inf", "-1", "0", "lots"])
def test_demo_refuses_sizes_that_are_not_positive_and_finite(capsys, mb):
    code, _, err = cli(capsys, "demo", f"--mb={mb}")
    assert code == 2
    assert f"argument --mb: must be positive and finite, not '{mb}'" in err


def test_a_failed_resumable_run_is_kept_and_listed_by_info(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    files = write_days(tmp_path / "data", range(3), zlib=True)
    _corrupt(files[1])
    args = ("ingest", "data/*.nc", "repo", "--concat-dim", "time", "--executor", "serial")
    code, _, err = cli(capsys, *args, "--retries", "0", "--run-id", "cron-1")
    assert code == 1, err
    assert "region(s) failed" in err
    code, out, err = cli(capsys, "info", "repo", "--no-stored-size", "--commits", "0")
    assert code == 0, err
    assert "unfinished runs (1):" in out
    assert "  cron-1 -> main: 2/3 region(s) written" in out
    assert "stored chunks" not in out and "last commits" not in out


def test_info_refuses_what_is_not_a_repository(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hello")
    assert cli(capsys, "info", "plain") == (
        2,
        "",
        "error: plain exists and is not an Icechunk repository\n",
    )
    assert cli(capsys, "info", "nowhere") == (2, "", "error: no Icechunk repository at nowhere\n")
    assert not (tmp_path / "nowhere").exists()
    open_location("new", create=True)
    code, _, err = cli(capsys, "info", "new", "--branch", "dev")
    assert code == 2
    assert "branch 'dev' does not exist" in err


def test_exit_codes_of_errors():
    moved = icd.TargetMovedError(
        "moved",
        run_id="r",
        work_branch="icechunk-distributed/r",
        snapshot_id=None,
        base_snapshot_id="a",
        tip_snapshot_id="b",
    )
    assert exit_code(icd.RegionWriteError("failed", [])) == 1
    assert exit_code(icd.CommitConflictError("conflict")) == 1
    assert exit_code(moved) == 1
    assert exit_code(RuntimeError("boom")) == 1
    assert exit_code(icechunk.IcechunkError("storage")) == 1
    assert exit_code(icd.TemplateMismatchError("files differ")) == 2
    assert exit_code(icd.RunMismatchError("other plan")) == 2
    assert exit_code(FileNotFoundError("no such file")) == 2
    assert exit_code(PermissionError("denied")) == 2
    assert exit_code(LocationError("not a repository")) == 2
    assert exit_code(ImportError("no ray")) == 2
    assert exit_code(KeyboardInterrupt()) == 130


def test_interrupt_exits_130_and_removes_the_new_repository(data, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("icechunk_distributed.ingestion.ingest", interrupted)
    argv = ["ingest", "data/day00.nc", "repo", "--concat-dim", "time", "--run-id", "r1"]
    assert cli(capsys, *argv) == (130, "", "interrupted (rerun with the same --run-id to resume)\n")
    assert not (tmp_path / "repo").exists()


def test_an_empty_directory_becomes_the_repository(data, tmp_path, capsys):
    (tmp_path / "repo").mkdir()
    argv = ["ingest", *data, "repo", "--concat-dim", "time", "--executor", "serial", "-q"]
    assert cli(capsys, *argv) == (0, "", "")  # --quiet: nothing on success
    assert_same_as_mfdataset(tmp_path / "repo", data)


def test_describe_repository(data, tmp_path):
    repo = open_location("r", create=True).repo
    empty = describe_repository(repo, stored_sizes=False)
    assert "arrays on main: none" in empty
    assert "Repository initialized" in empty
    icd.ingest(data, repo, concat_dim="time", message="three days", progress=False)
    repo.create_branch("dev", repo.lookup_branch("main"))
    text = describe_repository(repo, n_commits=1)
    assert "branches: dev (" in text and ", main (" in text
    assert "three days" in text and "Repository initialized" not in text  # one commit shown
    assert "tas   (time: 12, y: 3, x: 5)  float32         chunks (4, 3, 5)  720 B" in text
    assert "stored chunks (all branches and tags):" in text
    with pytest.raises(ValueError, match="branch 'nope' does not exist"):
        describe_repository(repo, branch="nope")
    with pytest.raises(ValueError, match="n_commits"):
        describe_repository(repo, n_commits=-1)


def test_format_bytes():
    sizes = [format_bytes(n) for n in (0, 999, 1000, 1_500_000, 2e12)]
    assert sizes == ["0 B", "999 B", "1.0 kB", "1.5 MB", "2.0 TB"]


def test_locations(tmp_path):
    with pytest.raises(LocationError, match="no bucket"):
        storage_for("s3://")
    with pytest.raises(LocationError, match="local directory or s3://"):
        storage_for("gs://bucket/prefix")
    assert open_location(str(tmp_path / "new"), create=False).repo is None
    assert not (tmp_path / "new").exists()
    created = open_location(str(tmp_path / "new"), create=True)
    assert created.created and created.repo is not None
    reopened = open_location(str(tmp_path / "new"), create=True)
    assert not reopened.created and reopened.repo is not None


def test_process_workers_end_quietly_on_ctrl_c():
    import signal

    from icechunk_distributed.cli import _executor

    adapter = _executor("processes", 1)
    try:
        handler = adapter.executor.submit(signal.getsignal, signal.SIGINT).result(timeout=120)
    finally:
        adapter.close()
    # Default action: the worker ends on SIGINT without a KeyboardInterrupt traceback.
    assert handler == signal.SIG_DFL
    assert _executor("threads", 4) == "threads"


# ---------------------------------------------------------------------------------------------
# --virtual: the files' chunks referenced, not copied


def file_prefix(directory) -> str:
    """The url prefix of a virtual chunk container for the files in ``directory``."""
    return directory.resolve().as_uri() + "/"


def read_virtual(path, prefixes, branch: str = "main") -> xr.Dataset:
    """The committed dataset, read with access to the containers ``prefixes`` only."""
    access = icechunk.containers_credentials(
        {p: icechunk.credentials.LocalFileSystemAccess for p in prefixes}
    )
    storage = icechunk.local_filesystem_storage(str(path))
    repo = icechunk.Repository.open(storage, authorize_virtual_chunk_access=access)
    return xr.open_zarr(repo.readonly_session(branch).store, consolidated=False).load()


def containers_of(path) -> dict:
    """The saved virtual chunk containers of the repository at ``path``."""
    repo = icechunk.Repository.open(icechunk.local_filesystem_storage(str(path)))
    return dict(repo.config.virtual_chunk_containers or {})


def test_virtual_ingest_into_a_new_repository(data, tmp_path, capsys):
    prefix = file_prefix(tmp_path / "data")
    args = ("ingest", "data/*.nc", "repo", "--concat-dim", "time", "--executor", "threads")
    code, out, err = cli(capsys, *args, "--virtual")
    assert code == 0, err
    assert "referenced 3 file(s)" in out and "new repository at repo" in out
    assert f"referenced, not copied: the chunks stay in the files under {prefix}" in out
    assert "added a virtual chunk container" not in out  # created with it
    assert list(containers_of(tmp_path / "repo")) == [prefix]
    back = read_virtual(tmp_path / "repo", [prefix])
    with xr.open_mfdataset(data, engine="h5netcdf", combine="by_coords") as expected:
        xr.testing.assert_identical(back, expected.load())  # pr is int16-packed in the files
    repo = icechunk.Repository.open(icechunk.local_filesystem_storage(str(tmp_path / "repo")))
    session = repo.readonly_session("main")
    kinds = [session.chunk_type(f"/{name}", [i, 0, 0]) for name in ("tas", "pr") for i in range(3)]
    assert kinds == [icechunk.ChunkType.virtual] * 6
    stats = repo.chunk_storage_stats()
    assert stats.native_bytes == 0 and stats.virtual_bytes == 3 * 4 * 3 * 5 * (4 + 2)

    code, info, err = cli(capsys, "info", "repo")
    assert code == 0, err
    assert f"virtual chunk containers (1):\n  {prefix}  local {tmp_path.resolve() / 'data'}" in info


def test_virtual_ingest_on_processes_in_a_subprocess(data, tmp_path):
    out = run(
        "ingest", "data/*.nc", "repo", "--concat-dim", "time", "--virtual", "--workers", "2",
        cwd=tmp_path, env=user_env(),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "on processes" in out.stdout and "referenced, not copied" in out.stdout
    assert RUST_WARNING not in out.stderr
    back = read_virtual(tmp_path / "repo", [file_prefix(tmp_path / "data")])
    with xr.open_mfdataset(data, engine="h5netcdf", combine="by_coords") as expected:
        xr.testing.assert_identical(back, expected.load())


def test_virtual_dry_run_writes_nothing(data, tmp_path, capsys):
    prefix = file_prefix(tmp_path / "data")
    args = ("ingest", "data/*.nc", "repo", "--concat-dim", "time", "--executor", "serial")
    code, out, err = cli(capsys, *args, "--virtual", "--dry-run")
    assert code == 0, err
    assert "3 file(s) to write" in out and ", referenced)" in out
    assert (
        f"dry run: nothing written (a new repository at repo; it would get a virtual chunk "
        f"container for {prefix})"
    ) in out
    assert not (tmp_path / "repo").exists()
    # An existing repository without a container: the dry run plans, and saves nothing.
    open_location("repo", create=True)
    code, out, err = cli(capsys, *args, "--virtual", "--dry-run")
    assert code == 0, err
    assert f"(the repository at repo; it would get a virtual chunk container for {prefix})" in out
    assert containers_of(tmp_path / "repo") == {}
    assert cli(capsys, "info", "repo")[1].count("arrays on main: none") == 1


VIRTUAL_REFUSED = [
    (["--virtual", "--chunks", "time=8"], "error: --chunks cannot be used with --virtual"),
    (["--virtual", "--engine", "h5netcdf"], "error: --engine cannot be used with --virtual"),
    (["--loadable", "pr"], "error: --loadable is for --virtual ingests"),
]


@pytest.mark.parametrize(
    ("extra", "message"), VIRTUAL_REFUSED, ids=[" ".join(v[0]) for v in VIRTUAL_REFUSED]
)
def test_options_a_virtual_ingest_refuses_exit_2(data, tmp_path, capsys, extra, message):
    args = ["ingest", "data/*.nc", "repo", "--concat-dim", "time", "--executor", "threads"]
    code, out, err = cli(capsys, *args, *extra)
    assert (code, out) == (2, "")
    assert err.startswith(message), err
    assert not (tmp_path / "repo").exists()


def test_loadable_and_virtual_reach_the_library(data, tmp_path, capsys, monkeypatch):
    import icechunk_distributed.ingestion as ingestion

    seen = {}
    real = ingestion.plan_ingest

    def plan_ingest(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(ingestion, "plan_ingest", plan_ingest)
    args = ("ingest", "data/*.nc", "repo", "--concat-dim", "time", "--executor", "serial")
    code, _, err = cli(
        capsys, *args, "--virtual", "--loadable", "y", "--loadable", "x", "--dry-run"
    )
    assert code == 0, err
    assert (seen["virtual"], seen["loadable_variables"]) == (True, ("y", "x"))


def test_virtual_ingest_adds_a_container_to_an_existing_repository(data, tmp_path, capsys):
    more = write_days(tmp_path / "more", range(3, 5))
    data_prefix, more_prefix = file_prefix(tmp_path / "data"), file_prefix(tmp_path / "more")
    open_location("repo", create=True)  # a repository without containers
    args = ("--concat-dim", "time", "--executor", "threads", "--virtual")
    code, out, err = cli(capsys, "ingest", "data/*.nc", "repo", *args)
    assert code == 0, err
    assert out.startswith(f"added a virtual chunk container for {data_prefix} to the repository\n")
    assert "new repository" not in out
    assert list(containers_of(tmp_path / "repo")) == [data_prefix]

    # Files elsewhere, appended: a second container; the first one is kept.
    code, out, err = cli(capsys, "ingest", "more/*.nc", "repo", *args, "--append")
    assert code == 0, err
    assert f"added a virtual chunk container for {more_prefix}" in out
    assert sorted(containers_of(tmp_path / "repo")) == [data_prefix, more_prefix]
    back = read_virtual(tmp_path / "repo", [data_prefix, more_prefix])
    with xr.open_mfdataset(data + more, engine="h5netcdf", combine="by_coords") as expected:
        xr.testing.assert_identical(back, expected.load())

    # Covered already: nothing added.
    code, out, err = cli(capsys, "ingest", "more/*.nc", "repo", *args, "--append")
    assert code == 0, err
    assert "added a virtual chunk container" not in out
    assert "nothing to write; skipped 2 file(s)" in out


def test_a_refused_virtual_ingest_leaves_the_configuration_alone(data, tmp_path, capsys):
    args = ("ingest", "data/*.nc", "repo", "--executor", "threads", "--virtual")
    code, out, err = cli(capsys, *args, "--concat-dim", "level")
    assert (code, out) == (2, "")
    assert "have no dimension 'level'" in err
    assert not (tmp_path / "repo").exists()  # the repository it created is removed again
    open_location("repo", create=True)
    code, out, err = cli(capsys, *args, "--concat-dim", "level")
    assert (code, out) == (2, "")
    assert "have no dimension 'level'" in err
    assert containers_of(tmp_path / "repo") == {}  # the container was not saved


def test_a_container_for_the_same_prefix_elsewhere_is_refused(data, tmp_path, capsys):
    prefix = file_prefix(tmp_path / "data")
    config = icechunk.RepositoryConfig.default()
    elsewhere = icechunk.local_filesystem_store(str(tmp_path / "elsewhere"))
    config.set_virtual_chunk_container(icechunk.VirtualChunkContainer(prefix, elsewhere))
    icechunk.Repository.create(
        icechunk.local_filesystem_storage(str(tmp_path / "repo")), config=config
    )
    args = ("ingest", "data/*.nc", "repo", "--concat-dim", "time", "--virtual")
    code, out, err = cli(capsys, *args, "--executor", "threads")
    assert (code, out) == (2, "")
    assert err.startswith(
        f"error: the repository's virtual chunk container for {prefix} reads from local "
        f"{tmp_path.resolve() / 'elsewhere'}, not from local {tmp_path.resolve() / 'data'}"
    ), err
    assert containers_of(tmp_path / "repo")[prefix].store == elsewhere
    assert (
        len(
            list(
                icechunk.Repository.open(
                    icechunk.local_filesystem_storage(str(tmp_path / "repo"))
                ).ancestry(branch="main")
            )
        )
        == 1
    )


def test_a_container_that_covers_the_sources_is_used(data, tmp_path, capsys):
    wide = tmp_path.resolve().as_uri() + "/"  # the parent of data/
    config = icechunk.RepositoryConfig.default()
    store = icechunk.local_filesystem_store(str(tmp_path.resolve()))
    config.set_virtual_chunk_container(icechunk.VirtualChunkContainer(wide, store))
    icechunk.Repository.create(
        icechunk.local_filesystem_storage(str(tmp_path / "repo")), config=config
    )
    args = ("ingest", "data/*.nc", "repo", "--concat-dim", "time", "--virtual")
    code, out, err = cli(capsys, *args, "--executor", "threads")
    assert code == 0, err
    assert "added a virtual chunk container" not in out
    assert f"the chunks stay in the files under {wide};" in out
    assert list(containers_of(tmp_path / "repo")) == [wide]
    back = read_virtual(tmp_path / "repo", [wide])
    with xr.open_mfdataset(data, engine="h5netcdf", combine="by_coords") as expected:
        xr.testing.assert_identical(back, expected.load())


def test_virtual_sources_in_several_directories(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    files = write_days(tmp_path / "data" / "a", range(2)) + write_days(
        tmp_path / "data" / "b", range(2, 4)
    )
    prefix = file_prefix(tmp_path / "data")  # the common directory
    args = ("ingest", "data/a/*.nc", "data/b/*.nc", "repo", "--concat-dim", "time")
    code, _, err = cli(capsys, *args, "--virtual", "--executor", "threads")
    assert code == 0, err
    assert list(containers_of(tmp_path / "repo")) == [prefix]
    back = read_virtual(tmp_path / "repo", [prefix])
    with xr.open_mfdataset(files, engine="h5netcdf", combine="by_coords") as expected:
        xr.testing.assert_identical(back, expected.load())


def test_virtual_s3_sources(tmp_path, s3_location, monkeypatch, capsys):
    import boto3

    monkeypatch.chdir(tmp_path)
    files = write_days(tmp_path / "data", range(2))
    bucket, endpoint = s3_location.bucket, s3_location.endpoint
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=s3.REGION,
        aws_access_key_id=s3.ACCESS_KEY_ID,
        aws_secret_access_key=s3.SECRET_ACCESS_KEY,
    )
    for path in files:
        client.upload_file(path, bucket, f"src/{os.path.basename(path)}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.SECRET_ACCESS_KEY)
    code, out, err = cli(
        capsys, "ingest", f"s3://{bucket}/src/*.nc", "repo", "--concat-dim", "time", "--virtual",
        "--executor", "threads", "--source-endpoint-url", endpoint, "--allow-http",
        "--source-region", s3.REGION,
    )  # fmt: skip
    assert code == 0, err
    prefix = f"s3://{bucket}/"
    assert f"the chunks stay in the files under {prefix}" in out
    assert list(containers_of(tmp_path / "repo")) == [prefix]
    credentials = icechunk.s3_credentials(
        access_key_id=s3.ACCESS_KEY_ID, secret_access_key=s3.SECRET_ACCESS_KEY
    )
    repo = icechunk.Repository.open(
        icechunk.local_filesystem_storage(str(tmp_path / "repo")),
        authorize_virtual_chunk_access=icechunk.containers_credentials({prefix: credentials}),
    )
    back = xr.open_zarr(repo.readonly_session("main").store, consolidated=False).load()
    with xr.open_mfdataset(files, engine="h5netcdf", combine="by_coords") as expected:
        xr.testing.assert_identical(back, expected.load())
    code, info, err = cli(capsys, "info", "repo", "--commits", "0")
    assert code == 0, err
    assert f"  {prefix}  S3-compatible (endpoint {endpoint}, region {s3.REGION})" in info
    assert s3.SECRET_ACCESS_KEY not in out + info
