"""Soak: 5,000 regions on a process pool, 2% of attempts failing at random (seeded)."""

import collections

import xarray as xr

from conftest import read_back
from fault_tasks import RandomFailures, calls, soak_dataset
from icechunk_distributed import run_region_writes

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
