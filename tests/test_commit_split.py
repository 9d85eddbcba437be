"""max_chunks_per_commit: commits in steps on a work branch, one publication, refusals.

Design under test: a write whose plan holds more chunk references than the limit commits in
steps on a work branch (the caller's ``run_id`` run, or an internal one) and then moves the
target branch to the last step in one reset. So the target's new tip descends from every
intermediate commit (its ancestry holds them, each under the limit), but the branch itself
only ever points at the old tip or the complete result.
"""

import icechunk
import numpy as np
import pytest
import xarray as xr
import zarr

from icechunk_distributed import (
    RegionWriteError,
    TargetMovedError,
    ingest,
    list_runs,
    run_region_writes,
    writable_session,
)
from icechunk_distributed.commitsize import DEFAULT_MAX_CHUNKS_PER_COMMIT
from icechunk_distributed.runs import RUN_BRANCH_PREFIX, published_tag
from ingest_files import days
from parity.compare import assert_same_repos

N_TIME = 60
ENC = {"a": {"chunks": (1, 4, 4)}, "b": {"chunks": (1, 8)}}
# 60 x 4 chunks of a + 60 of b = 300 chunk references; 2 time steps a task: 30 regions of 10.
N_CHUNKS = 300
RUN = {"encoding": ENC, "task_size": 2, "region_dims": ["time"], "progress": False}


def dataset() -> xr.Dataset:
    rng = np.random.default_rng(0)
    a = rng.random((N_TIME, 8, 8)).astype("f4")
    a[::7, 0, 0] = np.nan
    return xr.Dataset(
        {
            "a": (("time", "y", "x"), a, {"units": "K"}),
            "b": (("time", "x"), rng.integers(0, 100, (N_TIME, 8)).astype("i4")),
        },
        coords={
            "time": np.datetime64("2026-01-01", "ns") + np.arange(N_TIME) * np.timedelta64(1, "h"),
            "x": np.arange(8.0),
        },
        attrs={"title": "split"},
    )


class FailAt:
    """A loader that fails for good at the regions starting at ``starts`` (along time)."""

    def __init__(self, starts=()):
        self.starts = set(starts)

    def __call__(self, region):
        if (
            region["time"].start in self.starts
            and region["time"].stop - region["time"].start < N_TIME
        ):
            raise OSError(f"permanent failure at time={region['time'].start}")
        return dataset().isel(region)


def make_repo(path) -> icechunk.Repository:
    return icechunk.Repository.create(icechunk.local_filesystem_storage(str(path)))


@pytest.fixture
def reference(tmp_path) -> icechunk.Repository:
    """What ``Dataset.to_zarr`` writes, for comparison."""
    ref = make_repo(tmp_path / "reference")
    session = ref.writable_session("main")
    dataset().to_zarr(session.store, encoding=ENC, consolidated=False, mode="w-")
    session.commit("reference")
    return ref


def n_refs(repo, parent, child) -> int:
    """Chunk references changed from ``parent`` to ``child``."""
    diff = repo.diff(from_snapshot_id=parent, to_snapshot_id=child)
    return sum(len(coords) for coords in diff.updated_chunks.values())


def new_commits(repo, base, branch="main"):
    """The snapshots on ``branch`` since ``base``, oldest first."""
    out = []
    for info in repo.ancestry(branch=branch):
        if info.id == base:
            return out[::-1]
        out.append(info)
    raise AssertionError(f"{base} is not in the history of {branch}")


def per_commit(repo, base, branch="main") -> list[int]:
    commits = new_commits(repo, base, branch)
    parents = [base] + [c.id for c in commits[:-1]]
    return [n_refs(repo, p, c.id) for p, c in zip(parents, commits, strict=True)]


class Watch:
    """A progress callback: what a reader of main, and the work branch, show meanwhile."""

    def __init__(self, repo):
        self.repo, self.seen = repo, []

    def __call__(self, event):
        work = [b for b in self.repo.list_branches() if b.startswith(RUN_BRANCH_PREFIX)]
        ahead = len(list(self.repo.ancestry(branch=work[0]))) if work else 0
        self.seen.append((self.repo.lookup_branch("main"), ahead))


def test_split_write_without_run_id_publishes_once(repo, reference):
    base = repo.lookup_branch("main")
    n_base = len(list(repo.ancestry(branch="main")))
    watch = Watch(repo)
    result = run_region_writes(
        dataset(), repo, **{**RUN, "progress": watch}, executor="threads", max_chunks_per_commit=50
    )
    assert_same_repos(repo, reference)  # values, zarr metadata, decoded dataset
    assert result.n_chunks == N_CHUNKS and result.run_id is None
    # Readers of main saw the old tip while the work branch grew, then the result at once.
    assert {tip for tip, _ in watch.seen} == {base}
    assert max(ahead for _, ahead in watch.seen) > n_base + 2
    assert repo.lookup_branch("main") == result.snapshot_id
    # The new tip's parent chain holds the intermediate commits: the metadata commit, the
    # checkpoints, then the last step; each at most the limit (regions of 10 under a limit of
    # 50 are merged one at a time, so here exactly 50, 5 regions a commit).
    counts = per_commit(repo, base)
    assert counts == [2, 50, 50, 50, 50, 50, 50]  # 2: the coordinates time and x
    assert len(counts) == result.n_checkpoints + 1
    commits = new_commits(repo, base)
    assert "metadata" in commits[0].message and "checkpoint" in commits[1].message
    assert commits[-1].message.startswith("icechunk-distributed: 30 regions")
    # Cleaned up like a finished run: no work branch, no record, and no tag (nobody calls an
    # internal run again).
    assert sorted(repo.list_branches()) == ["main"]
    assert list_runs(repo) == [] and repo.list_tags() == set()


def test_split_write_with_run_id_checkpoints_by_count(repo, reference):
    base = repo.lookup_branch("main")
    limit = 100  # batches of 2 results: checkpoints once 80 are uncommitted
    kwargs = {**RUN, "max_chunks_per_commit": limit, "checkpoint_every": 1e6}
    result = run_region_writes(dataset(), repo, **kwargs, executor="threads", run_id="big")
    assert_same_repos(repo, reference)
    counts = per_commit(repo, base)
    assert max(counts) <= limit and sum(counts) == N_CHUNKS + 2
    assert len(counts) == result.n_checkpoints + 1 and result.n_checkpoints >= 1 + 3
    assert result.run_id == "big" and repo.lookup_tag(published_tag("big")) == result.snapshot_id
    assert sorted(repo.list_branches()) == ["main"]
    # Published: the same call again writes nothing.
    again = run_region_writes(dataset(), repo, **kwargs, executor="threads", run_id="big")
    assert again.snapshot_id == result.snapshot_id and again.tasks == []


def test_failed_split_run_with_run_id_keeps_steps_and_resumes(repo, reference):
    base = repo.lookup_branch("main")
    kwargs = {**RUN, "template": dataset(), "max_chunks_per_commit": 50, "retries": 0}
    with pytest.raises(RegionWriteError, match="call again with run_id='r'"):
        run_region_writes(FailAt({40}), repo, **kwargs, executor="threads", run_id="r")
    assert repo.lookup_branch("main") == base
    assert max(per_commit(repo, base, RUN_BRANCH_PREFIX + "r")) <= 50
    result = run_region_writes(FailAt(), repo, **kwargs, executor="threads", run_id="r")
    assert 0 < result.n_resumed < 30
    assert_same_repos(repo, reference)
    assert max(per_commit(repo, base)) <= 50


def test_failed_split_write_leaves_main_exactly_as_it_was(repo):
    base = repo.lookup_branch("main")
    watch = Watch(repo)
    kwargs = {**RUN, "template": dataset(), "progress": watch, "retries": 0}
    with pytest.raises(RegionWriteError) as info:
        run_region_writes(
            FailAt({50}), repo, **kwargs, executor="threads", max_chunks_per_commit=50
        )
    assert "target branch is unchanged" in str(info.value)
    assert "run_id" not in str(info.value)  # nothing to resume: the internal run is gone
    assert max(ahead for _, ahead in watch.seen) > 2  # steps were committed meanwhile
    assert repo.lookup_branch("main") == base
    assert [s.id for s in repo.ancestry(branch="main")] == [base]
    assert sorted(repo.list_branches()) == ["main"] and list_runs(repo) == []


@pytest.mark.parametrize("commit", [False, True])
def test_session_target_over_the_limit_is_refused_before_writing(repo, commit):
    base = repo.lookup_branch("main")
    session = writable_session(repo, "main")
    with pytest.raises(
        ValueError, match=r"300 chunk references, more than max_chunks_per_commit=50"
    ) as info:
        run_region_writes(
            dataset(), session, **RUN, commit=commit, executor="threads", max_chunks_per_commit=50
        )
    assert "Pass the Repository itself as target" in str(info.value)
    assert "commit=False" in str(info.value) or commit
    assert not session.has_uncommitted_changes  # nothing was written
    assert repo.lookup_branch("main") == base and sorted(repo.list_branches()) == ["main"]


def test_repository_with_commit_false_over_the_limit_is_refused(repo):
    with pytest.raises(ValueError, match="commit=False leaves the one commit to you"):
        run_region_writes(
            dataset(), repo, **RUN, commit=False, executor="threads", max_chunks_per_commit=50
        )
    assert sorted(repo.list_branches()) == ["main"]


def test_session_target_under_the_limit_is_unchanged(repo, reference):
    session = writable_session(repo, "main")
    result = run_region_writes(
        dataset(), session, **RUN, commit=False, executor="threads", max_chunks_per_commit=300
    )
    assert result.snapshot_id is None and session.has_uncommitted_changes
    session.commit("mine")
    assert_same_repos(repo, reference)


def test_a_region_over_the_limit_is_refused_up_front(repo):
    base = repo.lookup_branch("main")
    with pytest.raises(ValueError, match=r"region 0 holds 20 chunk references.*Lower task_size"):
        run_region_writes(
            dataset(), repo, **{**RUN, "task_size": 4}, executor="threads", max_chunks_per_commit=15
        )
    assert repo.lookup_branch("main") == base and sorted(repo.list_branches()) == ["main"]


def test_the_coordinators_own_writes_over_the_limit_are_refused(repo):
    base = repo.lookup_branch("main")
    # Without region_dims, b (no y) is written by the coordinator: 60 chunks in one commit.
    kwargs = {**RUN, "region_dims": None}
    with pytest.raises(ValueError, match=r"coordinator's own writes.*62 chunk references"):
        run_region_writes(dataset(), repo, **kwargs, executor="threads", max_chunks_per_commit=50)
    assert repo.lookup_branch("main") == base and sorted(repo.list_branches()) == ["main"]


@pytest.mark.parametrize("limit", ["default", None, N_CHUNKS])
def test_under_the_limit_a_write_is_one_commit_as_before(repo, reference, limit):
    base = repo.lookup_branch("main")
    extra = {} if limit == "default" else {"max_chunks_per_commit": limit}
    result = run_region_writes(dataset(), repo, **RUN, executor="threads", **extra)
    assert_same_repos(repo, reference)
    assert [c.id for c in new_commits(repo, base)] == [result.snapshot_id]
    assert result.n_checkpoints == 0 and sorted(repo.list_branches()) == ["main"]
    assert DEFAULT_MAX_CHUNKS_PER_COMMIT < 50_000_000


@pytest.mark.parametrize(
    ("value", "error"),
    [(0, ValueError), (-5, ValueError), (1.5, TypeError), (True, TypeError), ("10", TypeError)],
)
def test_bad_limits_are_refused_before_anything(repo, value, error):
    with pytest.raises(error, match="max_chunks_per_commit"):
        run_region_writes(dataset(), repo, **RUN, max_chunks_per_commit=value)
    assert [s.id for s in repo.ancestry(branch="main")] == [repo.lookup_branch("main")]
    assert sorted(repo.list_branches()) == ["main"]


def test_numpy_integer_limit_is_accepted(repo, reference):
    run_region_writes(
        dataset(), repo, **RUN, executor="threads", max_chunks_per_commit=np.int64(60)
    )
    assert_same_repos(repo, reference)


def test_a_split_write_does_not_publish_over_a_moved_target(repo):
    base = repo.lookup_branch("main")

    def commit_to_main(event):  # someone else commits to main while the run writes
        if event.n_done == 1:
            other = repo.writable_session("main")
            zarr.open_group(other.store, mode="a").attrs["other"] = "writer"
            other.commit("someone else")

    kwargs = {**RUN, "progress": commit_to_main}
    with pytest.raises(TargetMovedError) as info:
        run_region_writes(dataset(), repo, **kwargs, executor="threads", max_chunks_per_commit=50)
    err = info.value
    moved = repo.lookup_branch("main")
    assert moved != base and next(iter(repo.ancestry(branch="main"))).message == "someone else"
    # The complete result is kept on the work branch, to publish deliberately.
    assert repo.lookup_branch(err.work_branch) == err.snapshot_id
    assert max(per_commit(repo, base, err.work_branch)) <= 50
    repo.reset_branch("main", err.snapshot_id)
    xr.testing.assert_identical(
        xr.open_zarr(repo.readonly_session("main").store, consolidated=False).load(), dataset()
    )


def test_a_partial_rewrite_under_the_limit_is_one_commit(repo, reference):
    run_region_writes(dataset(), repo, **RUN, executor="threads")
    tip = repo.lookup_branch("main")
    # r+ into 12 of the 60 steps: 60 chunk references, while the arrays hold 300.
    regions = [{"time": slice(i, i + 2)} for i in range(0, 12, 2)]
    kwargs = {**RUN, "mode": "r+", "regions": regions, "encoding": None}
    result = run_region_writes(
        dataset(), repo, **kwargs, executor="threads", max_chunks_per_commit=100
    )
    assert result.n_chunks == 60 and result.n_checkpoints == 0
    assert [c.id for c in new_commits(repo, tip)] == [result.snapshot_id]
    assert_same_repos(repo, reference)


def test_ingest_splits_its_commit_too(tmp_path):
    days(tmp_path, range(3))  # 3 files of 4 steps, 2 variables: 24 chunks of one step
    files, base_repos = str(tmp_path / "d*.nc"), {}
    for name, limit in [("split", 8), ("one", None)]:
        repo = base_repos[name] = make_repo(tmp_path / name)
        base = repo.lookup_branch("main")
        result = ingest(
            files,
            repo,
            concat_dim="time",
            chunks={"time": 1},
            executor="threads",
            progress=False,
            max_chunks_per_commit=limit,
        )
        assert result.write is not None
        counts = per_commit(repo, base)
        if limit is None:
            assert len(counts) == 1
        else:
            assert len(counts) >= 3 and max(counts) <= limit
    assert_same_repos(base_repos["split"], base_repos["one"])
