"""Resumable runs: checkpoints on a work branch, resume, conditional publication, clean-up."""

import datetime as dt

import icechunk
import pytest
import xarray as xr
import zarr

from conftest import read_back
from fault_tasks import FailRegions, SlowLoader, calls
from icechunk_distributed import (
    RegionWriteError,
    RunMismatchError,
    TargetMovedError,
    garbage_collect,
    list_runs,
    remove_run,
    run_region_writes,
)
from icechunk_distributed.runs import work_branch
from tasks import full_dataset, load_region

ENC = {"Tair": {"chunks": (2, 6, 8)}, "station": {"chunks": (2,)}}
RUN = {"mode": "w-", "encoding": ENC, "task_size": 1, "template": full_dataset()}  # 6 regions


def branches(repo):
    return sorted(repo.list_branches())


def tip(repo, branch="main"):
    return repo.lookup_branch(branch)


def run_state(repo, branch):
    info = next(iter(repo.ancestry(branch=branch)))
    return info.metadata["icechunk_distributed_run"]


def test_run_publishes_once_and_removes_its_work_branch(repo):
    before = tip(repo)
    result = run_region_writes(
        load_region, repo, **RUN, executor="threads", run_id="r1", checkpoint_every=1e-6
    )
    xr.testing.assert_identical(read_back(repo), full_dataset())
    assert branches(repo) == ["main"]
    assert list_runs(repo) == []
    assert tip(repo) == result.snapshot_id
    # Metadata checkpoint + one per merged region, then the final commit, on top of `before`.
    assert result.n_checkpoints == 7
    history = [s.id for s in repo.ancestry(branch="main")]
    assert history[: result.n_checkpoints + 2][-1] == before
    state = run_state(repo, "main")
    assert state["complete"] and state["done"] == [[0, 6]] and state["base"] == before

    # The same call again: already published, nothing written, no new commit.
    again = run_region_writes(load_region, repo, **RUN, executor="threads", run_id="r1")
    assert again.snapshot_id == result.snapshot_id and again.tasks == []
    assert again.n_resumed == 6
    assert tip(repo) == result.snapshot_id


def test_failed_run_keeps_progress_and_the_rerun_writes_only_the_rest(repo, tmp_path):
    before = tip(repo)
    with pytest.raises(RegionWriteError, match="call again with run_id='r2'") as info:
        run_region_writes(
            FailRegions({4, 8}), repo, **RUN, executor="threads", run_id="r2", retries=1
        )
    assert "target branch is unchanged" in str(info.value)
    assert tip(repo) == before  # the target did not move
    (run,) = list_runs(repo)
    assert (run.run_id, run.branch, run.n_regions, run.n_done) == ("r2", "main", 6, 4)
    assert not run.complete and run.base_snapshot_id == before

    counted = tmp_path / "calls"
    counted.mkdir()
    result = run_region_writes(
        SlowLoader(0, counted), repo, **RUN, executor="processes", run_id="r2"
    )
    assert sorted(r.index for r in result.tasks) == [2, 4]  # regions starting at 4 and 8
    assert calls(counted) == {"time4-6": 1, "time8-10": 1}
    assert result.n_resumed == 4
    xr.testing.assert_identical(read_back(repo), full_dataset())
    assert branches(repo) == ["main"]


def test_a_rerun_with_another_plan_is_refused_before_writing(repo):
    with pytest.raises(RegionWriteError):
        run_region_writes(FailRegions({0}), repo, **RUN, executor="serial", run_id="r3")
    n = len(list(repo.ancestry(branch=work_branch("r3"))))
    with pytest.raises(RunMismatchError, match=r"differs in \['n_regions'\].*remove_run"):
        run_region_writes(
            load_region, repo, **{**RUN, "task_size": 2}, executor="serial", run_id="r3"
        )
    assert len(list(repo.ancestry(branch=work_branch("r3")))) == n
    repo.create_branch("dev", tip(repo))
    with pytest.raises(RunMismatchError, match="writes to branch 'main', not 'dev'"):
        run_region_writes(load_region, repo, **RUN, branch="dev", run_id="r3")
    assert remove_run(repo, "r3") and not remove_run(repo, "r3")
    run_region_writes(load_region, repo, **{**RUN, "task_size": 2}, run_id="r3")
    xr.testing.assert_identical(read_back(repo), full_dataset())


def _commit_elsewhere(repo, branch="main"):
    session = repo.writable_session(branch)
    zarr.group(session.store).attrs["other"] = "writer"
    return session.commit("someone else")


def test_target_moved_before_resume_finishes_the_work_but_overwrites_nothing(repo):
    with pytest.raises(RegionWriteError):
        run_region_writes(FailRegions({0}), repo, **RUN, executor="threads", run_id="r4")
    other = _commit_elsewhere(repo)
    with pytest.raises(TargetMovedError, match=r"moved while run 'r4'.*remove_run") as info:
        run_region_writes(load_region, repo, **RUN, executor="threads", run_id="r4")
    err = info.value
    assert err.tip_snapshot_id == other and tip(repo) == other
    # The resumed call completed the work on the work branch, ready to publish deliberately.
    assert err.snapshot_id == tip(repo, err.work_branch)
    xr.testing.assert_identical(read_back(repo, err.work_branch), full_dataset())
    assert [r.run_id for r in list_runs(repo)] == ["r4"] and list_runs(repo)[0].complete
    # The second way forward offered: start over on top of the other commit.
    remove_run(repo, "r4")
    run_region_writes(load_region, repo, **{**RUN, "mode": "w"}, run_id="r4")
    xr.testing.assert_identical(read_back(repo).drop_attrs(), full_dataset().drop_attrs())
    assert other in [s.id for s in repo.ancestry(branch="main")]  # written on top of it


def test_target_moved_during_the_run_keeps_the_complete_result(repo):
    moved = []

    def progress(event):
        if event.kind == "done" and not moved:
            moved.append(_commit_elsewhere(repo))

    with pytest.raises(TargetMovedError, match="complete result is on branch") as info:
        run_region_writes(
            load_region, repo, **RUN, executor="threads", run_id="r5", progress=progress
        )
    err = info.value
    assert tip(repo) == moved[0]  # the other commit is the tip, untouched
    assert err.work_branch == work_branch("r5") and err.snapshot_id == tip(repo, err.work_branch)
    xr.testing.assert_identical(read_back(repo, err.work_branch), full_dataset())
    # The first way forward offered: publish over the other commit, deliberately.
    repo.reset_branch("main", err.snapshot_id)
    xr.testing.assert_identical(read_back(repo), full_dataset())


def test_stopped_between_commit_and_publication(repo, monkeypatch):
    from icechunk_distributed import resume

    def crash(self, snapshot_id):
        raise KeyboardInterrupt

    monkeypatch.setattr(resume.ResumableRun, "publish", crash)
    with pytest.raises(KeyboardInterrupt):
        run_region_writes(load_region, repo, **RUN, run_id="r6")
    monkeypatch.undo()
    before = tip(repo)
    assert run_state(repo, work_branch("r6"))["complete"]
    result = run_region_writes(load_region, repo, **RUN, run_id="r6")
    assert result.tasks == [] and result.n_resumed == 6
    assert repo.ancestry(branch="main") is not None and tip(repo) != before
    xr.testing.assert_identical(read_back(repo), full_dataset())
    assert branches(repo) == ["main"]


def test_failure_before_the_first_checkpoint_leaves_no_work_branch(repo):
    def bad_eager(region):
        raise OSError("the source is offline")

    with pytest.raises(OSError, match="offline"):
        run_region_writes(bad_eager, repo, **RUN, run_id="r7", retries=0)
    assert branches(repo) == ["main"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"run_id": "no spaces"}, ValueError, "run_id must be"),
        ({"run_id": "ok", "commit": False}, ValueError, "cannot go with commit=False"),
        ({"run_id": "ok", "branch": "nope"}, ValueError, "branch 'nope' does not exist"),
        ({"run_id": "ok", "checkpoint_every": 0}, ValueError, "checkpoint_every must be"),
    ],
)
def test_run_id_arguments_are_checked(repo, kwargs, error, match):
    with pytest.raises(error, match=match):
        run_region_writes(load_region, repo, **RUN, **kwargs)
    assert branches(repo) == ["main"]


def test_run_id_needs_a_repository(repo):
    with pytest.raises(TypeError, match="run_id= needs the Repository"):
        run_region_writes(load_region, repo.writable_session("main"), **RUN, run_id="x")


# The coordinator killed with SIGKILL, then resumed: tests/faults/test_faults.py, for every
# engine on local and S3 storage.


def test_garbage_collect_spares_unfinished_runs_and_reclaims_removed_ones(repo):
    # Chunks of over 512 bytes: smaller ones are kept inside manifests, not as objects.
    big = {**RUN, "encoding": {"Tair": {"chunks": (4, 6, 8)}, "station": {"chunks": (4,)}}}
    with pytest.raises(RegionWriteError):
        run_region_writes(FailRegions({0}), repo, **big, run_id="gc")
    with pytest.raises(ValueError, match="too recent to be safe"):
        garbage_collect(repo, older_than=dt.timedelta(minutes=5))
    future = dt.datetime.now(dt.UTC) + dt.timedelta(days=30)
    report = garbage_collect(repo, older_than=dt.timedelta(days=1), now=future)
    (run,) = list_runs(repo)
    assert report.cutoff < dt.datetime.fromisoformat(run.started)
    assert report.chunks_deleted == 0
    # The run's progress is intact after the collection: finish it.
    run_region_writes(load_region, repo, **big, run_id="gc")
    xr.testing.assert_identical(read_back(repo), full_dataset())

    with pytest.raises(RegionWriteError):
        run_region_writes(
            FailRegions({0}), repo, **{**big, "mode": "r+", "encoding": None}, run_id="gone"
        )
    remove_run(repo, "gone")
    dry = garbage_collect(repo, older_than=dt.timedelta(days=1), now=future, dry_run=True)
    assert dry.dry_run and dry.chunks_deleted > 0
    done = garbage_collect(repo, older_than=dt.timedelta(days=1), now=future)
    assert done.chunks_deleted == dry.chunks_deleted
    assert garbage_collect(repo, older_than=dt.timedelta(days=1), now=future).chunks_deleted == 0
    xr.testing.assert_identical(read_back(repo), full_dataset())


@pytest.mark.parametrize("mode", ["a", "r+"])
def test_resume_in_modes_that_write_into_existing_arrays(repo, mode):
    # The first 12 steps exist; mode "a" appends 12 more, mode "r+" rewrites them (+1).
    first = full_dataset(24).isel(time=slice(0, 12))
    run_region_writes(first, repo, encoding=ENC, executor="serial")
    if mode == "a":
        source, expected = full_dataset(24).isel(time=slice(12, 24)), full_dataset(24)
        kwargs = {"append_dim": "time"}
    else:
        source = first.copy(deep=True)
        source["Tair"] = source["Tair"] + 1
        expected, kwargs = source, {}
    source = source.drop_vars("mask")  # written once already; not part of this write

    def failing(region):
        if region["time"].start in (0, 4):  # source coordinates
            raise OSError("not yet")
        return source.isel(region)

    call = {"mode": mode, "task_size": 1, "run_id": "append" if mode == "a" else "update"}
    call.update(kwargs)
    with pytest.raises(RegionWriteError):
        run_region_writes(failing, repo, template=source, executor="threads", **call)
    (run,) = list_runs(repo)
    assert run.n_done == 4
    result = run_region_writes(source, repo, executor="threads", **call)
    assert result.n_resumed == 4 and sorted(r.index for r in result.tasks) == [0, 2]
    xr.testing.assert_identical(read_back(repo), expected)
    assert branches(repo) == ["main"]


def test_backups_through_run_region_writes(repo, tmp_path):
    from fault_tasks import StragglerLoader
    from icechunk_distributed import Backups

    events = []
    loader = StragglerLoader(tmp_path, start=6)  # region 3 stalls until its backup has won

    def progress(event):
        events.append(event)
        if event.kind == "done" and event.index == 3:
            loader.release()

    result = run_region_writes(
        loader,
        repo,
        **RUN,
        executor="threads",
        workers=4,
        backups=Backups(factor=2, min_done=0.5, min_seconds=0.5, poll=0.05),
        progress=progress,
    )
    # On a busy machine another task may look slow enough to be backed up too.
    assert 3 in [e.index for e in events if e.kind == "backup"]
    attempts = [r.attempts for r in result.tasks]
    assert attempts[3] == 2 and set(attempts) <= {1, 2}  # the backup won
    xr.testing.assert_identical(read_back(repo), full_dataset())


def test_a_published_run_is_not_written_again_after_later_commits(repo):
    day1 = full_dataset(24).isel(time=slice(0, 12))
    day2 = full_dataset(24).isel(time=slice(12, 24))
    run_region_writes(day1, repo, encoding=ENC, executor="serial")
    call = {"mode": "a", "append_dim": "time", "task_size": 1, "run_id": "day2"}
    first = run_region_writes(day2, repo, executor="threads", **call)
    later = _commit_elsewhere(repo)
    again = run_region_writes(day2, repo, executor="threads", **call)  # a retried job
    assert again.snapshot_id == first.snapshot_id and again.tasks == []
    assert tip(repo) == later  # nothing new committed, nothing appended twice
    assert read_back(repo).sizes["time"] == 24
    with pytest.raises(RunMismatchError, match="this one is published"):
        run_region_writes(day2, repo, executor="threads", **{**call, "task_size": 2})


def test_stopped_between_publication_and_clean_up(repo, monkeypatch):
    from icechunk_distributed import resume

    def publish_then_die(self, snapshot_id):
        self.repo.reset_branch(self.branch, snapshot_id, from_snapshot_id=self.base)
        raise KeyboardInterrupt

    monkeypatch.setattr(resume.ResumableRun, "publish", publish_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_region_writes(load_region, repo, **RUN, run_id="r8")
    monkeypatch.undo()
    published = tip(repo)
    assert branches(repo) == ["icechunk-distributed/r8", "main"]
    result = run_region_writes(load_region, repo, **RUN, run_id="r8")
    assert result.snapshot_id == published == tip(repo) and result.tasks == []
    assert branches(repo) == ["main"] and list_runs(repo) == []


@pytest.mark.parametrize(
    "bad", [{"mode": "x"}, {"retries": -1}, {"template": None}], ids=["mode", "retries", "template"]
)
def test_bad_arguments_with_run_id_leave_no_work_branch(repo, bad):
    with pytest.raises((ValueError, TypeError)):
        run_region_writes(load_region, repo, **{**RUN, **bad}, run_id="bad")
    assert branches(repo) == ["main"]


def test_a_changed_chunk_grid_is_named_in_the_mismatch(repo):
    with pytest.raises(RegionWriteError):
        run_region_writes(FailRegions({0}), repo, **RUN, run_id="grid")
    enc4 = {"Tair": {"chunks": (4, 6, 8)}, "station": {"chunks": (4,)}}
    with pytest.raises(RunMismatchError, match=r"differs in \['n_regions', 'units'\]"):
        run_region_writes(load_region, repo, **{**RUN, "encoding": enc4}, run_id="grid")


def test_a_failed_tag_keeps_the_run_findable(repo, monkeypatch):
    # Found in review: a failed create_tag was ignored and the work branch deleted, so a
    # retry after a later commit appended the same data twice.
    day1 = full_dataset(24).isel(time=slice(0, 12))
    day2 = full_dataset(24).isel(time=slice(12, 24))
    run_region_writes(day1, repo, encoding=ENC, executor="serial")

    def throttled(self, *args, **kwargs):
        raise icechunk.IcechunkError("503 SlowDown (injected)")

    monkeypatch.setattr(icechunk.Repository, "create_tag", throttled)
    call = {"mode": "a", "append_dim": "time", "run_id": "day2", "executor": "serial"}
    with pytest.raises(icechunk.IcechunkError, match="SlowDown"):
        run_region_writes(day2, repo, **call)
    monkeypatch.undo()
    published = tip(repo)  # the target did move: only the tag and the clean-up failed
    later = _commit_elsewhere(repo)
    again = run_region_writes(day2, repo, **call)
    assert again.snapshot_id == published and again.tasks == []
    assert tip(repo) == later and read_back(repo).sizes["time"] == 24
    assert branches(repo) == ["main"]


def test_a_checkpoint_survives_a_failed_reopen(repo, monkeypatch):
    # Found in review: once a checkpoint was committed, one failure to open the next session
    # left a read-only session behind, and the next merge failed with a misleading error.
    real = icechunk.Repository.writable_session
    started, failed = [], []

    def flaky(self, branch, *args, **kwargs):
        # Once tasks are done, the next session opened on the work branch is a reopen after
        # a checkpoint: fail it once.
        if started and not failed and branch.startswith("icechunk-distributed/"):
            failed.append(branch)
            raise icechunk.IcechunkError("connection reset (injected)")
        return real(self, branch, *args, **kwargs)

    def progress(event):
        started.append(event)

    monkeypatch.setattr(icechunk.Repository, "writable_session", flaky)
    result = run_region_writes(
        load_region, repo, **RUN, run_id="reopen", checkpoint_every=1e-6, progress=progress
    )
    assert failed and result.n_checkpoints == 7
    xr.testing.assert_identical(read_back(repo), full_dataset())
