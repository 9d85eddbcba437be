"""S3-compatible storage (a moto server on 127.0.0.1): end to end, concurrent committers from
several processes, and credentials that must not leak."""

import json
import logging
import multiprocessing
import os
import pickle
import subprocess
import sys
import traceback
from concurrent.futures import ProcessPoolExecutor

import icechunk
import numpy as np
import pytest
import xarray as xr
import zarr

import icechunk_distributed as icd
import s3
from conftest import read_back, small_dataset
from icechunk_distributed import RegionWriteError, run_region_writes
from s3 import ACCESS_KEY_ID, SECRET_ACCESS_KEY, FailingLoader, FileCredentials, write_in_process

# The S3 fixtures, visible to pytest in this module (an assignment, not an import: ruff's F811
# would flag every test that takes an imported fixture as a parameter).
moto_endpoint, s3_location, s3_repo = s3.moto_endpoint, s3.s3_location, s3.s3_repo

ENC = {"Tair": {"chunks": (3, 6, 8)}}  # 12 time steps: 4 chunks along time


def spawn_pool(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def plus(ds: xr.Dataset, value: float) -> xr.Dataset:
    out = ds.copy()
    out["Tair"] = ds["Tair"] + np.float32(value)
    out["Tair"].attrs = ds["Tair"].attrs
    return out


def commits(repo: icechunk.Repository) -> list:
    return list(repo.ancestry(branch="main"))


# ---------------------------------------------------------------------------------------------
# End to end


@pytest.mark.parametrize("executor", ["threads", "processes"])
def test_write_append_and_update_on_s3(s3_repo, executor):
    ds = small_dataset()
    first = run_region_writes(ds.isel(time=slice(0, 6)), s3_repo, executor=executor,
                              encoding=ENC, progress=False)  # fmt: skip
    xr.testing.assert_identical(read_back(s3_repo), ds.isel(time=slice(0, 6)))
    if executor == "processes":  # tasks ran (and reached the endpoint) in other processes
        pids = {int(t.worker.split(":")[1]) for t in first.tasks}
        assert os.getpid() not in pids

    run_region_writes(ds.isel(time=slice(6, None)), s3_repo, executor=executor, mode="a",
                      append_dim="time", progress=False)  # fmt: skip
    xr.testing.assert_identical(read_back(s3_repo), ds)

    changed = plus(ds, 100)
    last = run_region_writes(changed, s3_repo, executor=executor, mode="r+",
                             regions=[{"time": slice(3, 9)}], progress=False)  # fmt: skip
    expected = xr.concat(
        [ds.isel(time=slice(0, 3)), changed.isel(time=slice(3, 9)), ds.isel(time=slice(9, None))],
        dim="time",
    )
    xr.testing.assert_identical(read_back(s3_repo), expected)
    history = commits(s3_repo)
    assert history[0].id == last.snapshot_id
    assert len(history) == 4  # the repository's initial commit + three runs


# ---------------------------------------------------------------------------------------------
# Concurrent committers: separate processes, one branch


def race(location, jobs, tmp_path):
    """Run ``write_in_process`` for every ``(source, kwargs)`` in its own spawn process, all
    at once; every writer's session is open before any of them commits."""
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    with spawn_pool(len(jobs)) as pool:
        futures = [
            pool.submit(
                write_in_process,
                location,
                source,
                barrier_dir=str(barrier),
                n_parties=len(jobs),
                executor="threads",
                **kwargs,
            )
            for source, kwargs in jobs
        ]
        outcomes = [f.result(timeout=600) for f in futures]
    assert len({o["pid"] for o in outcomes}) == len(jobs)  # really separate processes
    return outcomes


def test_concurrent_committers_on_disjoint_regions_all_land(s3_location, s3_repo, tmp_path):
    ds = small_dataset()
    placeholder = ds.copy(data={"Tair": np.full(ds["Tair"].shape, -1, dtype="f4")})
    run_region_writes(placeholder, s3_repo, encoding=ENC, progress=False)
    before = commits(s3_repo)

    # Each writer writes its own block, placed as Dataset.to_zarr(region=...) places it.
    jobs = [
        (
            ds.isel(time=slice(3 * k, 3 * k + 3)).drop_vars(["lat", "lon"]),
            {"mode": "r+", "region": {"time": slice(3 * k, 3 * k + 3)}, "message": f"w{k}"},
        )
        for k in range(4)
    ]
    outcomes = race(s3_location, jobs, tmp_path)

    assert [o["ok"] for o in outcomes] == [True] * 4, outcomes
    after = commits(s3_repo)
    assert len(after) == len(before) + 4
    assert {c.message for c in after[:4]} == {f"w{k}" for k in range(4)}
    assert {c.id for c in after[:4]} == {o["snapshot_id"] for o in outcomes}
    # Every writer's chunks are there: a lost commit would leave -1 placeholders.
    xr.testing.assert_identical(read_back(s3_repo), ds)


@pytest.mark.parametrize("root_first", [True, False])
def test_concurrent_committers_into_different_groups(s3_location, s3_repo, tmp_path, root_first):
    """mode "w-" into a new group each. A new repository has no root group, and every writer
    creates it: those commits conflict (one wins). Once "/" exists, all of them land."""
    if root_first:
        session = s3_repo.writable_session("main")
        zarr.open_group(session.store, mode="w-")
        session.commit("root group")
    sources = [plus(small_dataset(), k) for k in range(3)]
    jobs = [(src, {"group": f"g{k}", "encoding": ENC}) for k, src in enumerate(sources)]
    outcomes = race(s3_location, jobs, tmp_path)

    landed = [k for k, o in enumerate(outcomes) if o["ok"]]
    if root_first:
        assert landed == [0, 1, 2], outcomes
    else:
        assert len(landed) == 1, outcomes
        assert all(o["conflict"] for o in outcomes if not o["ok"]), outcomes
    session = s3_repo.readonly_session("main")
    assert sorted(zarr.open_group(session.store, mode="r").group_keys()) == [
        f"g{k}" for k in landed
    ]
    for k in landed:
        got = xr.open_zarr(session.store, group=f"g{k}", consolidated=False, chunks=None)
        xr.testing.assert_identical(got.load(), sources[k])


def test_concurrent_committers_on_the_same_chunks_one_wins(s3_location, s3_repo, tmp_path):
    ds = small_dataset()
    run_region_writes(ds, s3_repo, encoding=ENC, progress=False)
    before = commits(s3_repo)

    sources = [plus(ds, 1), plus(ds, 2)]
    jobs = [(src, {"mode": "r+", "message": f"writer {k}"}) for k, src in enumerate(sources)]
    outcomes = race(s3_location, jobs, tmp_path)

    winners = [k for k, o in enumerate(outcomes) if o["ok"]]
    losers = [o for o in outcomes if not o["ok"]]
    assert len(winners) == 1, outcomes
    assert len(losers) == 1 and losers[0]["conflict"], losers
    assert losers[0]["error"].startswith("CommitConflictError: ")
    assert "Nothing was committed" in losers[0]["error"]

    after = commits(s3_repo)
    assert len(after) == len(before) + 1  # the winner's commit only
    assert after[0].id == outcomes[winners[0]]["snapshot_id"]
    assert after[0].message == f"writer {winners[0]}"
    # All of the winner's chunks, none of the loser's.
    xr.testing.assert_identical(read_back(s3_repo), sources[winners[0]])


# ---------------------------------------------------------------------------------------------
# Credentials


def with_secret(texts: dict[str, str]) -> list[str]:
    """Names of the texts that contain the secret access key."""
    return [name for name, text in texts.items() if SECRET_ACCESS_KEY in (text or "")]


def test_credentials_do_not_leak_into_errors_logs_or_commits(s3_repo, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    logging.getLogger("icechunk_distributed").debug("caplog is live")
    ds = small_dataset()
    template = ds.chunk({"time": 3})
    texts: dict[str, str] = {}

    # A run whose task fails for good, on a spawn pool (its stderr is this test's fd 2).
    with spawn_pool(2) as pool, pytest.raises(RegionWriteError) as info:
        run_region_writes(FailingLoader(ds, fail_at=3), s3_repo, template=template,
                          executor=pool, retries=1, progress=True)  # fmt: skip
    exc = info.value
    assert [f.region for f in exc.failures] == [{"time": slice(3, 6)}]
    assert "cannot read the input file for time=3" in exc.failures[0].error
    assert "s3.py" in (exc.failures[0].traceback or "")  # the worker's traceback
    texts["str(exc)"] = str(exc)
    texts["repr(exc)"] = repr(exc)
    texts["formatted exc"] = "".join(traceback.format_exception(exc))
    for i, failure in enumerate(exc.failures):
        texts[f"failure {i} repr"] = repr(failure)
        texts[f"failure {i} error"] = failure.error
        texts[f"failure {i} traceback"] = failure.traceback or ""
        if failure.exception is not None:
            texts[f"failure {i} exception"] = "".join(traceback.format_exception(failure.exception))
            texts[f"failure {i} pickled exception"] = repr(pickle.dumps(failure.exception))
    assert commits(s3_repo)[0].message == "Repository initialized"  # nothing was committed

    # A run that succeeds, with caller metadata.
    result = run_region_writes(ds, s3_repo, executor="processes", encoding=ENC, message="ingest",
                               metadata={"source": "test"}, progress=True)  # fmt: skip
    xr.testing.assert_identical(read_back(s3_repo), ds)
    texts["repr(result)"] = repr(result)
    texts["repr(result.session)"] = repr(result.session)
    texts["repr(repo)"] = repr(s3_repo)
    for snap in commits(s3_repo):
        texts[f"commit {snap.id} message"] = snap.message
        texts[f"commit {snap.id} metadata"] = json.dumps(snap.metadata, default=repr)
        texts[f"commit {snap.id} repr"] = repr(snap)
    assert commits(s3_repo)[0].metadata["source"] == "test"

    out, err = capfd.readouterr()
    texts["captured stdout"], texts["captured stderr"] = out, err
    texts["caplog"] = caplog.text
    texts["caplog args"] = repr([(r.msg, r.args) for r in caplog.records])
    assert "caplog is live" in caplog.text
    assert "regions" in err  # the progress bars did write to stderr

    assert with_secret(texts) == []


@pytest.mark.parametrize("kind", ["static", "refreshable-scattered"])
def test_credentials_that_travel_in_every_task_payload(s3_location, tmp_path, kind):
    """Why docs/storage.md recommends other credentials on workers: pinned icechunk behaviour."""
    if kind == "static":
        credentials = {}  # s3_storage's default: the static test key pair
    else:
        get = FileCredentials.write(tmp_path)
        credentials = {"get_credentials": get, "scatter_initial_credentials": True}
    repo = icechunk.Repository.create(s3_location.storage(**credentials))
    session = icd.writable_session(repo)
    with session.allow_pickling() as snapshot:
        payload = pickle.dumps(snapshot)
    session.discard_changes()
    assert SECRET_ACCESS_KEY.encode() in payload
    assert SECRET_ACCESS_KEY.encode() in pickle.dumps(repo)


@pytest.mark.parametrize("kind", ["refreshable", "from_env"])
def test_credentials_that_stay_off_the_payload(s3_location, tmp_path, monkeypatch, kind):
    get = FileCredentials.write(tmp_path)
    if kind == "refreshable":
        credentials = {"get_credentials": get}
    else:  # the workers' environment (spawn children inherit the parent's when started)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
        credentials = {"from_env": True}
    repo = icechunk.Repository.create(s3_location.storage(**credentials))
    ds = small_dataset()
    run_region_writes(ds, repo, encoding=ENC, progress=False)  # the coordinator used them

    session = icd.writable_session(repo)
    with session.allow_pickling() as snapshot:
        payload = pickle.dumps(snapshot)
    session.discard_changes()
    assert SECRET_ACCESS_KEY.encode() not in payload
    assert SECRET_ACCESS_KEY.encode() not in pickle.dumps(repo)

    changed = plus(ds, 7)
    with spawn_pool(2) as pool:
        result = run_region_writes(changed, repo, executor=pool, mode="r+", progress=False)
    workers = {int(t.worker.split(":")[1]) for t in result.tasks} - {os.getpid()}
    assert workers
    if kind == "refreshable":  # the workers fetched their own credentials
        assert workers & set(get.callers())
    xr.testing.assert_identical(read_back(repo), changed)


def test_get_credentials_must_pickle_by_reference():
    """icechunk pickles ``get_credentials`` with plain pickle when the storage is built: a
    lambda or closure is refused there (pinned for docs/storage.md)."""
    # PicklingError for a module-level lambda, AttributeError for a local one (Python 3.12).
    with pytest.raises((pickle.PicklingError, AttributeError), match="Can't pickle"):
        s3.s3_storage("http://127.0.0.1:9", "bucket", "prefix", get_credentials=lambda: None)


@pytest.mark.skipif(
    "forkserver" not in multiprocessing.get_all_start_methods(), reason="needs forkserver"
)
@pytest.mark.skipif("AWS_ACCESS_KEY_ID" in os.environ, reason="AWS_ACCESS_KEY_ID already set")
def test_env_credentials_set_after_the_forkserver_started_do_not_reach_workers(
    s3_location, monkeypatch
):
    """executor="processes" forks workers from the forkserver, whose environment is the one
    this process had when the forkserver started (pinned for docs/storage.md)."""
    import multiprocessing.forkserver

    multiprocessing.forkserver.ensure_running()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
    repo = icechunk.Repository.create(s3_location.storage(from_env=True))
    with pytest.raises(RegionWriteError) as info:
        run_region_writes(small_dataset(), repo, executor="processes", encoding=ENC,
                          retries=0, progress=False)  # fmt: skip
    assert len(info.value.failures) == 4
    assert all("credential" in f.error for f in info.value.failures), info.value
    assert [c.message for c in commits(repo)] == ["Repository initialized"]


def test_icechunk_debug_log_redacts_the_secret(s3_location):
    """ICECHUNK_LOG=debug prints the access key id, never the secret (pinned icechunk
    behaviour, for docs/storage.md)."""
    code = (
        "import icechunk, icechunk_distributed as icd\n"
        "from conftest import small_dataset\n"
        "from s3 import S3Location\n"
        f"loc = S3Location({s3_location.endpoint!r}, {s3_location.bucket!r}, 'debug-log')\n"
        "repo = icechunk.Repository.create(loc.storage())\n"
        "icd.run_region_writes(small_dataset(), repo, executor='threads', progress=False)\n"
    )
    env = {**os.environ, "ICECHUNK_LOG": "debug", "NO_COLOR": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "DEBUG" in log and ACCESS_KEY_ID in log
    assert SECRET_ACCESS_KEY not in log
