"""Soak: 5,000 regions on a process pool, 2% of attempts failing at random (seeded); 2,000
regions against an object store that throttles and drops connections."""

import collections

import icechunk
import numpy as np
import pytest
import xarray as xr

import s3
from conftest import read_back
from fault_tasks import RandomFailures, calls, soak_dataset
from faultproxy import Rule
from icechunk_distributed import run_region_writes

moto_endpoint, fault_proxy, faulty_s3 = s3.moto_endpoint, s3.fault_proxy, s3.faulty_s3

N = 5_000


def test_soak_5000_regions_with_random_failures(repo, tmp_path, capsys):
    counted = tmp_path / "calls"
    counted.mkdir()
    loader = RandomFailures(counted, N, seed=2026, rate=0.02)
    expected = loader.expected_attempts(retries=3)
    result = run_region_writes(
        loader,
        repo,
        template=soak_dataset(N),
        encoding={"v": {"chunks": (1, 4)}},
        task_size=1,
        executor="processes",
        retries=3,
    )
    # Every region once, with exactly the attempts the seeded failures call for.
    assert len(result.tasks) == N
    got = {str(r.region["time"].start): r.attempts for r in result.tasks}
    assert got == expected
    assert calls(counted) == expected  # what the workers really did
    xr.testing.assert_identical(read_back(repo), soak_dataset(N))
    histogram = collections.Counter(expected.values())
    assert histogram[2] > 0  # the failures really happened
    with capsys.disabled():
        retried = sum(a - 1 for a in expected.values())
        print(
            f"\nsoak: {N} regions, {retried} retries ({dict(sorted(histogram.items()))} "
            f"regions by attempts), {result.seconds:.1f} s on {result.executor}"
        )


@pytest.mark.timeout(1800)  # about 2 minutes on 2 cores; more beside a CPU hog
def test_soak_2000_regions_on_a_throttling_object_store(faulty_s3, capsys):
    """2,000 regions on processes against S3 that throttles 2% of all requests (503
    SlowDown) and resets 1% of connections, at random (seeded): the exact source, once."""
    n = 2_000
    rng = np.random.default_rng(2026)
    ds = xr.Dataset(  # 1 KB chunks of random float32: each one a PUT (over the inline limit)
        {"v": (("time", "x"), rng.random((n, 256), dtype="f4"))},
        coords={"time": np.arange(n, dtype="i8")},
    )
    repo = icechunk.Repository.create(faulty_s3.location.storage())
    before = faulty_s3.history()
    faulty_s3.proxy.set_rules(
        [
            Rule("*", "", "status", status=503, code="SlowDown", rate=0.02, seed=1),
            Rule("*", "", "reset", rate=0.01, seed=2),
        ]
    )
    result = run_region_writes(ds, repo, encoding={"v": {"chunks": (1, 256)}}, task_size=1,
                               executor="processes", progress=False)  # fmt: skip
    stats = faulty_s3.proxy.stats()
    faulty_s3.proxy.set_rules([])
    assert faulty_s3.history()[1:] == before
    xr.testing.assert_identical(faulty_s3.read_back(), ds)
    throttled, reset = (r["fired"] for r in stats["rules"])
    assert throttled > 0 and reset > 0
    assert len(result.tasks) == n and all(r.attempts == 1 for r in result.tasks)
    with capsys.disabled():
        print(
            f"\nsoak on S3: {n} regions, {sum(stats['requests'].values())} requests, "
            f"{throttled} answered 503 and {reset} reset, all retried by icechunk "
            f"({dict(sorted(stats['requests'].items()))}); {result.seconds:.1f} s"
        )
