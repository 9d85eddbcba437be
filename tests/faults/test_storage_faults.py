"""A misbehaving object store: the fault proxy (tests/faultproxy.py) in front of moto.

Each scenario ends one of two ways, and the test checks which: the exact source committed once,
or the branch unchanged with an error that names the storage failure. Never a branch pointing at
a snapshot that cannot be read: every result is read back through a fresh session that talks
to moto directly, past the proxy.
"""

from __future__ import annotations

import datetime
import os
import time
import uuid

import icechunk
import pytest
import xarray as xr

import s3
from conftest import small_dataset
from faultproxy import Rule
from icechunk_distributed import Backups, RegionWriteError, list_runs, run_region_writes

moto_endpoint, fault_proxy, faulty_s3 = s3.moto_endpoint, s3.fault_proxy, s3.faulty_s3

EXECUTORS = ["threads", "processes"]
# 2 KB chunks of random float32: above icechunk's inline limit (512 B), so each chunk is a PUT.
N_TIME = 80
ENC = {"Tair": {"chunks": (1, 16, 32)}}


def source(n_time: int = N_TIME) -> xr.Dataset:
    return small_dataset(n_time=n_time, ny=16, nx=32)


def assert_committed_once(faulty: s3.FaultyS3, before: list[str], expected: xr.Dataset) -> None:
    assert faulty.history()[1:] == before  # one new commit on top of what was there
    assert sorted(faulty.direct.open().list_branches()) == ["main"]
    xr.testing.assert_identical(faulty.read_back(), expected)


def write(faulty: s3.FaultyS3, executor: str, ds: xr.Dataset, **kwargs):
    """Create the repository (no faults yet); return a writer to call once rules are set."""
    repo = icechunk.Repository.create(faulty.location.storage())
    before = faulty.history()

    def run(**more):
        options = {"progress": False, **kwargs, **more}
        return run_region_writes(ds, repo, executor=executor, encoding=ENC, **options)

    return run, before


# -- throttling and server errors


@pytest.mark.parametrize("executor", EXECUTORS)
def test_a_storm_of_503_and_500_on_chunk_writes(faulty_s3, executor):
    ds = source()
    run, before = write(faulty_s3, executor, ds)
    faulty_s3.proxy.set_rules(
        [  # 1 in 40 chunk PUTs throttled, 1 in 40 of the rest a server error: 5% in all
            Rule("PUT", "chunks/", "status", status=503, code="SlowDown", every=40),
            Rule("PUT", "chunks/", "status", status=500, code="InternalError", every=40),
        ]
    )
    result = run()
    assert all(n >= 1 for n in faulty_s3.proxy.fired())  # both really happened
    assert all(r.attempts == 1 for r in result.tasks)  # icechunk's own retries absorbed them
    assert_committed_once(faulty_s3, before, ds)


# -- connections reset while committing


def at_commit(proxy, rules):
    """A progress callback that sets ``rules`` once every task is done: they hit the
    coordinator's merge and commit only, whatever the tasks themselves asked of the store."""
    armed = []

    def progress(event):
        if event.n_done + event.n_failed == event.n_total and not armed:
            proxy.set_rules(rules)
            armed.append(event)

    return progress


@pytest.mark.parametrize("executor", EXECUTORS)
def test_connections_reset_while_writing_manifests_and_snapshots(faulty_s3, executor):
    ds = source(12)
    run, before = write(faulty_s3, executor, ds)
    rules = [
        Rule("PUT", "manifests/", "reset", times=2),
        Rule("PUT", "snapshots/", "reset", times=2),
        Rule("PUT", "transactions/", "reset", times=1),
        Rule("PUT", "manifests/", "lost", times=1),  # landed, but the answer was lost
    ]
    run(progress=at_commit(faulty_s3.proxy, rules))
    assert faulty_s3.proxy.fired() == [2, 2, 1, 1]
    assert_committed_once(faulty_s3, before, ds)


# -- a lost answer to the branch update


@pytest.mark.parametrize("executor", EXECUTORS)
def test_the_answer_to_the_branch_update_is_lost(faulty_s3, executor):
    """The conditional PUT that moves the branch lands, but its answer never arrives."""
    ds = source(12)
    run, before = write(faulty_s3, executor, ds)
    faulty_s3.proxy.set_rules([Rule("PUT", "repo", "lost", times=1)])
    run()
    assert faulty_s3.proxy.fired() == [1]
    assert_committed_once(faulty_s3, before, ds)


@pytest.mark.parametrize("executor", EXECUTORS)
def test_a_resumable_run_whose_branch_updates_lose_their_answers(
    faulty_s3, moto_endpoint, executor
):
    """A run_id run moves branches several times (work branch, checkpoint, commit,
    publication, tag, clean-up). The answer to each of them in turn is lost, one per run:
    every run still publishes once and leaves no work branch or run behind."""
    ds = source(12)
    proxy = faulty_s3.proxy
    for n in range(20):
        faulty = s3.FaultyS3.new_bucket(proxy, moto_endpoint)
        run, before = write(faulty, executor, ds)
        proxy.set_rules([Rule("PUT", "repo", "lost", after=n, times=1)])
        # No timed checkpoints (an hour apart), so that the updates come in a fixed order.
        run(run_id="lossy", checkpoint_every=3600)
        repo = faulty.direct.open()
        assert faulty.history()[-len(before) :] == before
        assert sorted(repo.list_branches()) == ["main"]
        assert [r.run_id for r in list_runs(repo)] == []
        xr.testing.assert_identical(faulty.read_back(), ds)
        if proxy.fired() == [0]:  # the run made only n updates: each one has been tried
            break
    else:
        pytest.fail("a run_id run kept making more branch updates")
    assert n >= 5


# -- a stalled request


@pytest.mark.parametrize("executor", EXECUTORS)
def test_a_chunk_write_stalls_for_30_s(faulty_s3, executor):
    ds = source(12)
    run, before = write(faulty_s3, executor, ds)
    faulty_s3.proxy.set_rules([Rule("PUT", "chunks/", "stall", times=1, seconds=30)])
    run()
    stats = faulty_s3.proxy.stats()
    assert stats["rules"][0]["fired"] == 1 and stats["stalled"] == 0
    assert_committed_once(faulty_s3, before, ds)


@pytest.mark.parametrize("executor", EXECUTORS)
def test_a_stalled_chunk_write_is_overtaken_by_a_backup(faulty_s3, executor):
    """The stall lasts until the test releases it: the run can only finish by a backup copy
    of the stalled task, which writes its own chunk."""
    ds = source(12)
    events = []
    run, before = write(faulty_s3, executor, ds)
    faulty_s3.proxy.set_rules([Rule("PUT", "chunks/", "stall", times=1, seconds=120)])
    run(backups=Backups(min_seconds=0.5), progress=events.append)
    assert faulty_s3.proxy.stats()["stalled"] == 1  # the first copy is still stuck
    assert any(e.kind == "backup" for e in events)
    faulty_s3.proxy.release()
    assert_committed_once(faulty_s3, before, ds)


@pytest.mark.parametrize("executor", EXECUTORS)
def test_a_stalled_request_is_retried_after_the_attempt_timeout(faulty_s3, executor):
    """With no backups, icechunk's own attempt timeout cuts the stalled request short and
    tries again; the run does not wait for the stall."""
    ds = source(12)
    config = icechunk.RepositoryConfig(
        storage=icechunk.StorageSettings(
            timeouts=icechunk.StorageTimeoutSettings(operation_attempt_timeout_ms=2_000)
        )
    )
    repo = icechunk.Repository.create(faulty_s3.location.storage(), config=config)
    before = faulty_s3.history()
    faulty_s3.proxy.set_rules([Rule("PUT", "chunks/", "stall", times=1, seconds=120)])
    run_region_writes(ds, repo, executor=executor, encoding=ENC, progress=False)
    assert faulty_s3.proxy.stats()["stalled"] == 1  # the first try is still stuck
    faulty_s3.proxy.release()
    assert_committed_once(faulty_s3, before, ds)


# -- credentials that expire


class ExpiringCredentials:
    """A ``get_credentials`` that hands out keys valid for ``lifetime`` seconds, named
    ``EXP<expiry>-<issued, ms>-<pid>-<n>`` so the proxy refuses them once expired; each key
    issued leaves a file in ``directory`` (picklable: travels to worker processes with the
    session)."""

    def __init__(self, directory: str, lifetime: float) -> None:
        self.directory = directory
        self.lifetime = lifetime

    def __call__(self) -> icechunk.S3StaticCredentials:
        now = time.time()
        expiry = int(now + self.lifetime)
        key = f"EXP{expiry}-{int(now * 1000)}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        open(os.path.join(self.directory, key), "w").close()
        return icechunk.S3StaticCredentials(
            access_key_id=key,
            secret_access_key=s3.SECRET_ACCESS_KEY,
            expires_after=datetime.datetime.fromtimestamp(expiry, datetime.UTC),
        )

    def issued(self) -> list[str]:
        return sorted(os.listdir(self.directory))

    def first_expiry(self) -> int | None:
        """When the first key issued expires (unix seconds), if any was issued."""
        issued = self.issued()
        return min(int(k[3:].split("-")[0]) for k in issued) if issued else None


class AfterExpiry:
    """A loader whose tasks after the first wait until the first key issued has expired."""

    def __init__(self, ds: xr.Dataset, credentials: ExpiringCredentials) -> None:
        self.ds = ds
        self.credentials = credentials

    def __call__(self, region: dict[str, slice]) -> xr.Dataset:
        if region["time"].start > 0:
            deadline = time.monotonic() + 120
            while True:
                first = self.credentials.first_expiry()
                if first is not None and first + 1 < time.time():
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError("the first credentials did not expire within 120 s")
                time.sleep(0.1)
        return self.ds.isel(region)


@pytest.mark.parametrize("executor", EXECUTORS)
def test_credentials_that_expire_mid_run_are_refreshed(faulty_s3, executor, tmp_path):
    ds = source(12)
    credentials = ExpiringCredentials(str(tmp_path), lifetime=10)
    faulty_s3.proxy.set_rules([], expiring=True)
    repo = icechunk.Repository.create(faulty_s3.location.storage(get_credentials=credentials))
    before = faulty_s3.history()
    run_region_writes(AfterExpiry(ds, credentials), repo, template=ds, executor=executor,
                      encoding=ENC, task_size=1, progress=False)  # fmt: skip
    used = [k for k in faulty_s3.proxy.stats()["access_keys"] if k.startswith("EXP")]
    first_expiry = credentials.first_expiry()
    assert first_expiry is not None
    # get_credentials was called again after the first key had expired, and the store saw
    # requests signed with such a later key (the proxy refused any expired one).
    assert any(int(k.split("-")[1]) / 1000 > first_expiry for k in used)
    assert_committed_once(faulty_s3, before, ds)


# -- failures that outlast every retry


def quick_retries(location: s3.S3Location) -> icechunk.Repository:
    """A repository whose storage gives up after 2 tries (icechunk's default is 10, backing
    off from 100 ms to 3 minutes), so that a persistent failure fails fast."""
    config = icechunk.RepositoryConfig(
        storage=icechunk.StorageSettings(
            retries=icechunk.StorageRetriesSettings(
                max_tries=2, initial_backoff_ms=10, max_backoff_ms=50
            )
        )
    )
    return icechunk.Repository.create(location.storage(), config=config)


@pytest.mark.parametrize("executor", EXECUTORS)
def test_chunk_writes_that_keep_failing_leave_the_branch_unchanged(faulty_s3, executor):
    ds = source(12)
    repo = quick_retries(faulty_s3.location)
    before = faulty_s3.history()
    faulty_s3.proxy.set_rules([Rule("PUT", "chunks/", "status", status=503, every=1)])
    with pytest.raises(RegionWriteError, match="nothing was committed") as info:
        run_region_writes(ds, repo, executor=executor, encoding=ENC, retries=1, progress=False)
    assert "StorageError" in str(info.value) and "SlowDown" in str(info.value)
    assert faulty_s3.history() == before


@pytest.mark.parametrize("executor", EXECUTORS)
def test_a_commit_whose_snapshot_cannot_be_written_leaves_the_branch_unchanged(faulty_s3, executor):
    ds = source(12)
    repo = quick_retries(faulty_s3.location)
    before = faulty_s3.history()
    rules = [Rule("PUT", "snapshots/", "status", status=500, code="InternalError", every=1)]
    progress = at_commit(faulty_s3.proxy, rules)
    with pytest.raises(icechunk.IcechunkError, match="InternalError"):
        run_region_writes(ds, repo, executor=executor, encoding=ENC, progress=progress)
    assert faulty_s3.proxy.fired() == [2]  # both tries of the commit's snapshot
    assert faulty_s3.history() == before
