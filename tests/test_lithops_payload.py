"""Lithops' data_limit counts the whole job: in-memory datasets larger than it still run."""

import numpy as np
import pytest
import xarray as xr

import icechunk_distributed as icd
from conftest import read_back


def test_jobs_fit_the_limit_together():
    from icechunk_distributed.adapters.lithops import JOB_DATA_SHARE, _jobs

    args = [b"x" * 1000] * 10
    jobs = _jobs(args, 4000)
    assert sorted(i for job in jobs for i in job) == list(range(10))
    assert all(sum(len(args[i]) for i in job) <= JOB_DATA_SHARE * 4000 for job in jobs)
    assert _jobs([b"x" * 5000], 4000) == [[0]]  # one call over the limit: Lithops says why
    assert _jobs(args, None) == [list(range(10))]
    assert _jobs([], 4000) == []


@pytest.mark.lithops
def test_a_dataset_over_the_data_limit_runs_on_lithops_by_name(repo):
    pytest.importorskip("lithops")
    rng = np.random.default_rng(1)
    # 12 MB of data, three times Lithops' default 4 MiB limit on a job's data.
    ds = xr.Dataset({"a": (("time", "x"), rng.random((1500, 1000)).astype("f8"))})
    regions = icd.plan_regions(ds, executor="lithops", encoding={"a": {"chunks": (100, 1000)}})
    assert all((r["time"].stop - r["time"].start) * 1000 * 8 <= 2 * 2**20 for r in regions)
    result = icd.run_region_writes(
        ds, repo, executor="lithops", encoding={"a": {"chunks": (100, 1000)}}, progress=False
    )
    assert [t.region for t in result.tasks] == regions
    xr.testing.assert_identical(read_back(repo), ds)


@pytest.mark.lithops
def test_one_chunk_over_the_limit_is_refused_before_writing(repo):
    pytest.importorskip("lithops")
    ds = xr.Dataset({"a": (("time", "x"), np.zeros((2, 600_000)))})  # one 9.6 MB chunk
    before = repo.lookup_branch("main")
    with pytest.raises(icd.PayloadTooLargeError, match="data_limit"):
        icd.run_region_writes(
            ds, repo, executor="lithops", encoding={"a": {"chunks": (2, 600_000)}}
        )
    assert repo.lookup_branch("main") == before
