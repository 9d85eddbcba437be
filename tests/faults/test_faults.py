"""Fault injection, for every engine and on local and S3 storage.

Each case ends one of two ways, and the test checks which: the exact source data is committed
once, or the target branch is unchanged and the error names what failed.
"""

import json

import icechunk
import numpy as np
import pytest
import xarray as xr
import zarr

import s3
from conftest import _engine_params, make_repo, read_back, start_engine
from fault_tasks import FailRegions, SlowLoader, calls
from icechunk_distributed import (
    CommitConflictError,
    RegionWriteError,
    list_runs,
    run_region_writes,
)
from icechunk_distributed.runs import read_state
from killing import kill_when
from tasks import DieOnce, FlakyLoader, full_dataset, load_region

moto_endpoint = s3.moto_endpoint

ENC = {"Tair": {"chunks": (2, 6, 8)}, "station": {"chunks": (2,)}}
RUN = {"template": full_dataset(), "encoding": ENC, "task_size": 1}  # 6 regions

ENGINES = ["threads", "processes", "joblib", *_engine_params("ray", "dask", "lithops")]


@pytest.fixture(params=ENGINES)
def engine(request):
    """The engine's name, after starting it once per session (Lithops: its executor object)."""
    name = request.param
    if name in ("ray", "dask", "lithops"):
        started = start_engine(request, name)
        return started if name == "lithops" else name
    return name


def engine_name(engine) -> str:
    return engine if isinstance(engine, str) else "lithops"


class Local:
    kind = "local"

    def __init__(self, path):
        self.path = path

    def create(self):
        return make_repo(self.path)

    def open(self):
        return icechunk.Repository.open(icechunk.local_filesystem_storage(str(self.path)))

    def spec(self):
        return json.dumps({"kind": "local", "path": str(self.path)})


class S3:
    kind = "s3"

    def __init__(self, location):
        self.location = location

    def create(self):
        return icechunk.Repository.create(self.location.storage())

    def open(self):
        return self.location.open()

    def spec(self):
        loc = self.location
        return json.dumps(
            {"kind": "s3", "endpoint": loc.endpoint, "bucket": loc.bucket, "prefix": loc.prefix}
        )


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return Local(tmp_path / "repo")
    endpoint = request.getfixturevalue("moto_endpoint")
    return S3(s3.S3Location(endpoint, s3.create_bucket(endpoint), "repo"))


def history(repo, branch="main"):
    return [s.id for s in repo.ancestry(branch=branch)]


def assert_unchanged(repo, before):
    # Same tip snapshot: the same content, and no commit was added (nor lost).
    assert history(repo) == before
    assert [b for b in repo.list_branches() if b != "main"] == []


def assert_committed_once(repo, before, expected=None):
    after = history(repo)
    assert after[1:] == before  # one new commit, on top of what was there
    xr.testing.assert_identical(read_back(repo), full_dataset() if expected is None else expected)


# -- transient errors: retried, exact attempt counts


def test_transient_errors_are_retried_exactly(engine, storage, tmp_path):
    repo = storage.create()
    before = history(repo)
    counted = tmp_path / "calls"
    counted.mkdir()
    result = run_region_writes(
        FlakyLoader(counted, fail_times=2), repo, **RUN, executor=engine, retries=2
    )
    assert [r.attempts for r in result.tasks] == [3] * 6
    # 3 calls per region, and for the coordinator's call for the full extent (variables
    # without a region dimension), which is retried the same way.
    per_region = calls(counted)
    assert per_region.pop("0-12") == 3 and sorted(per_region.values()) == [3] * 6
    assert_committed_once(repo, before)


# -- permanent errors: clean failure, branch unchanged


def test_permanent_error_leaves_the_branch_unchanged(engine, storage):
    repo = storage.create()
    before = history(repo)
    with pytest.raises(RegionWriteError, match=r"region #2 \(time=4:6\), 2 attempt") as info:
        run_region_writes(FailRegions({4}), repo, **RUN, executor=engine, retries=1)
    assert "permanent failure at time=4" in str(info.value)
    (failure,) = info.value.failures
    assert (failure.index, failure.attempts) == (2, 2)
    assert_unchanged(storage.open(), before)


# -- a worker process killed mid-task


def test_worker_killed_is_retried(engine, storage, tmp_path):
    if engine == "threads":
        pytest.skip("threads share the coordinator's process: no worker to kill")
    repo = storage.create()
    before = history(repo)
    result = run_region_writes(DieOnce(tmp_path), repo, **RUN, executor=engine, retries=2)
    assert (tmp_path / "died").exists()  # a worker really died
    if engine != "dask":  # dask's scheduler reruns a lost worker's task by itself
        assert max(r.attempts for r in result.tasks) >= 2
    assert_committed_once(repo, before)


# -- the coordinator killed (SIGKILL), then the same call resumes

COORDINATOR = """
import json, sys
import icechunk
import s3
from fault_tasks import GatedLoader
from icechunk_distributed import run_region_writes
from tasks import full_dataset

spec = json.loads(sys.argv[1])
if spec["kind"] == "local":
    storage = icechunk.local_filesystem_storage(spec["path"])
else:
    storage = s3.s3_storage(spec["endpoint"], spec["bucket"], spec["prefix"])
repo = icechunk.Repository.open(storage)
run_region_writes(
    GatedLoader(sys.argv[3]), repo, template=full_dataset(24), mode="w-", task_size=1,
    encoding={"Tair": {"chunks": (1, 6, 8)}, "station": {"chunks": (1,)}},
    executor=sys.argv[2], run_id="killed", checkpoint_every=0.05, workers=2,
)
"""


def test_coordinator_killed_then_resumed(engine, storage, tmp_path):
    repo = storage.create()
    before = history(repo)
    name = engine_name(engine)

    def far_enough() -> bool:
        runs = list_runs(storage.open())
        return bool(runs) and runs[0].n_done >= 4

    gate = tmp_path / "gate"
    gate.mkdir()
    args = [storage.spec(), name, str(gate)]
    kill_when(COORDINATOR, args, far_enough, tmp_path / "coordinator.log")
    repo = storage.open()
    (run,) = list_runs(repo)
    assert 4 <= run.n_done <= 12 and run.n_regions == 24
    assert history(repo) == before  # nothing published yet
    # What the killed coordinator had checkpointed, read before the rerun adds checkpoints.
    state, _ = read_state(repo, "killed")
    assert state is not None and len(state.done) == run.n_done
    result = run_region_writes(
        SlowLoader(0, n=24),
        repo,
        template=full_dataset(24),
        mode="w-",
        encoding={"Tair": {"chunks": (1, 6, 8)}, "station": {"chunks": (1,)}},
        task_size=1,
        executor=engine,
        run_id="killed",
    )
    assert result.n_resumed == run.n_done and len(result.tasks) == 24 - run.n_done
    assert sorted(r.index for r in result.tasks) == sorted(set(range(24)) - state.done)
    xr.testing.assert_identical(read_back(repo), full_dataset(24))
    assert sorted(repo.list_branches()) == ["main"]


# -- a concurrent committer


def commit_on_first_result(repo, change):
    """A progress callback that commits ``change(session)`` on main after the first result."""
    made = []

    def progress(event):
        if event.kind == "done" and not made:
            session = repo.writable_session("main")
            change(session)
            made.append(session.commit("a concurrent writer"))

    return progress, made


def test_concurrent_committer_on_other_chunks_both_survive(engine, storage):
    repo = storage.create()
    session = repo.writable_session("main")
    zarr.create_array(session.store, name="elsewhere/other", shape=(4,), chunks=(2,), dtype="i4")
    session.commit("the other writer's array")
    before = history(repo)

    def change(s):
        zarr.open_array(s.store, path="elsewhere/other", mode="r+")[:] = 7

    progress, made = commit_on_first_result(repo, change)
    # mode "a": the root group exists (it holds "elsewhere"); "w-" would be refused, as by
    # Dataset.to_zarr.
    run_region_writes(load_region, repo, **RUN, mode="a", executor=engine, progress=progress)
    after = history(repo)
    assert after[2:] == before and after[1] == made[0]  # theirs, then ours on top
    xr.testing.assert_identical(read_back(repo), full_dataset())
    other = zarr.open_array(repo.readonly_session("main").store, path="elsewhere/other", mode="r")
    assert other[:].tolist() == [7, 7, 7, 7]


def test_concurrent_committer_on_the_same_chunks_is_refused(engine, storage):
    repo = storage.create()
    old = full_dataset().copy(deep=True)
    old["Tair"] = old["Tair"] + 100
    run_region_writes(old, repo, encoding=ENC, task_size=2, executor="threads")
    before = history(repo)

    def change(s):
        zarr.open_array(s.store, path="Tair", mode="r+")[0:2] = -1

    progress, made = commit_on_first_result(repo, change)
    with pytest.raises(CommitConflictError, match="same chunks") as info:
        run_region_writes(
            load_region,
            repo,
            **{**RUN, "encoding": None},
            mode="r+",
            executor=engine,
            progress=progress,
        )
    assert "Nothing was committed" in str(info.value)
    assert history(repo) == [made[0], *before]  # only the other commit landed
    got = read_back(repo)
    expected = old["Tair"].values.copy()
    expected[0:2] = -1
    np.testing.assert_array_equal(got["Tair"].values, expected)


# -- a storage that refuses writes


def test_storage_refusing_writes_fails_cleanly(engine, tmp_path):
    local = Local(tmp_path / "repo")
    repo = local.create()
    before = history(repo)
    # Chunk objects go to <repo>/chunks/: a file in its place makes every chunk write fail.
    (tmp_path / "repo" / "chunks").write_text("not a directory")
    big = {**RUN, "encoding": {"Tair": {"chunks": (4, 6, 8)}, "station": {"chunks": (4,)}}}
    with pytest.raises(RegionWriteError, match=r"3 of 3 region\(s\) failed") as info:
        run_region_writes(SlowLoader(0), repo, **big, executor=engine, retries=1)
    text = str(info.value)
    assert "chunks" in text or "directory" in text.lower(), text
    assert all(f.attempts == 2 for f in info.value.failures)
    assert_unchanged(local.open(), before)
