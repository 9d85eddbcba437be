"""Parity: ``run_region_writes`` writes exactly what ``Dataset.to_zarr`` writes.

Each case (``parity.cases``) is a list of steps. The steps go through ``to_zarr`` into one
repository (one commit each: the reference) and through ``run_region_writes`` into another;
then :func:`parity.compare.assert_same_repos` compares the two from fresh read-only sessions:
node set, zarr metadata, raw stored values, decoded datasets and their encodings.

If ``to_zarr`` itself refuses a step, ``run_region_writes`` must refuse it too (and both
repositories must still be equal after the steps before it); a ``ReferenceRefused`` warning
records each such case.
"""

from __future__ import annotations

import concurrent.futures
import copy
import multiprocessing
import tempfile
import warnings
from pathlib import Path
from typing import Any

import dask
import icechunk
import numpy as np
import pytest
import xarray as xr
import zarr
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import icechunk_distributed as icd
from parity import cases
from parity.cases import Step
from parity.compare import assert_same_repos


class ReferenceRefused(UserWarning):
    """``to_zarr`` refused a step; the test checked that ``run_region_writes`` refuses it too."""


@pytest.fixture(scope="session")
def process_pool():
    pool = concurrent.futures.ProcessPoolExecutor(
        2, mp_context=multiprocessing.get_context("forkserver")
    )
    yield pool
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(params=["threads", "processes"])
def executor(request) -> Any:
    if request.param == "threads":
        return "threads"
    return request.getfixturevalue("process_pool")


def new_repo(path: Path) -> icechunk.Repository:
    return icechunk.Repository.create(icechunk.local_filesystem_storage(str(path)))


def write_reference(
    repo: icechunk.Repository, steps: list[Step]
) -> tuple[int | None, BaseException | None]:
    """Apply the steps with ``to_zarr``; return the index and error of a refused step."""
    for i, step in enumerate(steps):
        session = repo.writable_session("main")
        try:
            source = step.ds if step.reference is None else step.reference
            # One thread: dask's threaded scheduler writing through one icechunk session
            # can fail or hang (field notes); the reference is about what is written.
            with dask.config.set(scheduler="synchronous"):
                source.to_zarr(session.store, consolidated=False, **step.kwargs)
        except Exception as e:
            session.discard_changes()
            return i, e
        session.commit(f"to_zarr step {i}")
    return None, None


def write_ours(
    repo: icechunk.Repository, steps: list[Step], executor: Any, refused_at: int | None
) -> None:
    for i, step in enumerate(steps):
        if i == refused_at:
            with pytest.raises(Exception):  # noqa: B017,PT011 - any refusal will do
                icd.run_region_writes(
                    step.ds,
                    repo,
                    executor=executor,
                    message=f"step {i}",
                    **step.kwargs,
                    **step.ours,
                )
            return
        icd.run_region_writes(
            step.ds, repo, executor=executor, message=f"step {i}", **step.kwargs, **step.ours
        )


def check_parity(build, tmp: Path, executor: Any) -> None:
    ref_repo, our_repo = new_repo(tmp / "reference"), new_repo(tmp / "ours")
    # Each side gets its own datasets (and its own netCDF files): nothing is shared.
    refused_at, error = write_reference(ref_repo, build(tmp / "src-reference"))
    if refused_at is not None:
        warnings.warn(
            ReferenceRefused(
                f"{cases.case_id(build)}: to_zarr refused step {refused_at}: "
                f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            ),
            stacklevel=2,
        )
    write_ours(our_repo, build(tmp / "src-ours"), executor, refused_at)
    assert_same_repos(our_repo, ref_repo)


@pytest.mark.parametrize("build", cases.SINGLE, ids=cases.case_id)
def test_single_write(build, executor, tmp_path):
    check_parity(build, tmp_path, executor)


@pytest.mark.parametrize("build", cases.SEQUENCES, ids=cases.case_id)
def test_sequence(build, executor, tmp_path):
    check_parity(build, tmp_path, executor)


# ---------------------------------------------------------------------------------------------
# Random small datasets, threads only.

DTYPES = ["float32", "float64", "int16", "uint8", "bool", "datetime64[ns]", "object"]


def _random_values(rng: np.random.Generator, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if dtype.startswith("float"):
        a = rng.normal(size=shape).astype(dtype)
        a[rng.random(shape) < 0.1] = np.nan
        return a
    if dtype in ("int16", "uint8"):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    if dtype == "bool":
        return rng.random(shape) < 0.5
    if dtype == "datetime64[ns]":
        a = np.datetime64("2001-01-01", "ns") + rng.integers(0, 10**6, size=shape) * np.timedelta64(
            1, "m"
        )
        a[rng.random(shape) < 0.1] = np.datetime64("NaT", "ns")
        return a
    if dtype == "object":
        words = np.array(["", "a", "bc", "déf", "ghij"], dtype=object)
        return words[rng.integers(0, len(words), size=shape)]
    raise ValueError(dtype)


def _aligned(n: int, offset: int, z: int) -> tuple[int, ...]:
    """Chunk sizes for ``n`` items starting at ``offset`` that end on multiples of ``z``."""
    sizes, pos = [], offset
    while pos < offset + n:
        end = min((pos // z + 1) * z, offset + n)
        sizes.append(end - pos)
        pos = end
    return tuple(sizes)


@st.composite
def random_steps(draw) -> list[Step]:
    dtype = draw(st.sampled_from(DTYPES))
    n_first = draw(st.integers(1, 12))
    appends = draw(st.lists(st.integers(1, 12), min_size=1, max_size=3))
    nx = draw(st.integers(1, 12))
    two_d = draw(st.booleans())
    ct = draw(st.integers(1, 12))
    cx = draw(st.integers(1, 12))
    use_encoding = draw(st.booleans())
    packed = dtype.startswith("float") and draw(st.booleans())  # int16 packing, as in netCDF
    backing = draw(st.sampled_from(["numpy", "dask"]))
    task_size = draw(st.sampled_from([None, 1, 2]))
    seed = draw(st.integers(0, 2**16))

    rng = np.random.default_rng(seed)
    nt = n_first + sum(appends)
    dims = ("time", "x") if two_d else ("time",)
    shape = (nt, nx) if two_d else (nt,)
    coords = {"time": np.datetime64("2020-01-01", "ns") + np.arange(nt) * np.timedelta64(1, "D")}
    if two_d:
        coords["x"] = np.arange(nx)
    attrs = {} if dtype.startswith("datetime") else {"units": "u"}  # units is an encoding there
    full = xr.Dataset({"v": (dims, _random_values(rng, dtype, shape), attrs)}, coords=coords)
    chunks = (ct, cx)[: len(dims)]
    v_encoding: dict[str, Any] = {"chunks": chunks} if use_encoding else {}
    if packed:
        v_encoding.update(
            dtype="int16", scale_factor=0.001, add_offset=0.5, _FillValue=np.int16(-32767)
        )
    encoding = {"v": v_encoding} if v_encoding else {}

    # The zarr chunks the first write creates: encoding, else the first part's dask chunks.
    # (object-dtype dask data is computed by to_zarr first: then zarr picks whole-array chunks)
    if use_encoding:
        zc = (ct, cx)
    elif dtype == "object":
        zc = (n_first, nx)
    else:
        zc = (min(ct, n_first), min(cx, nx))
    zchunks = dict(zip(dims, zc, strict=False))

    def part(a: int, b: int) -> xr.Dataset:
        p = full.isel(time=slice(a, b))
        if backing == "numpy":
            return p
        # dask chunks aligned to the zarr chunks, counted from the append offset (as to_zarr
        # demands: a dask chunk straddling zarr chunks is refused, see dask-misaligned)
        return p.chunk(
            {
                d: _aligned(b - a if d == "time" else nx, a if d == "time" else 0, zchunks[d])
                for d in dims
            }
        )

    ours = {} if task_size is None else {"task_size": task_size}
    steps = [Step(part(0, n_first), {"mode": "w-", "encoding": encoding}, ours)]
    start = n_first
    for n in appends:
        steps.append(Step(part(start, start + n), {"mode": "a", "append_dim": "time"}, ours))
        start += n
    return steps


# No shrinking: it replays hundreds of examples (40-90 s here); the failing example is printed
# as drawn, and it is small anyway (sizes <= 12, at most 4 steps).
@settings(
    max_examples=15,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow],
)
@given(steps=random_steps())
def test_random_appends(steps):
    with tempfile.TemporaryDirectory() as tmp:
        # each side gets its own copy of the drawn datasets
        check_parity(lambda _src: copy.deepcopy(steps), Path(tmp), "threads")


# ---------------------------------------------------------------------------------------------
# The same, against icechunk's own writer (icechunk.xarray.to_icechunk).

TO_ICECHUNK = [cases.era5_packed, cases.dask_packed, cases.dask_no_encoding, cases.append_dask]


@pytest.mark.parametrize("build", TO_ICECHUNK, ids=cases.case_id)
def test_matches_to_icechunk(build, tmp_path):
    from icechunk.xarray import to_icechunk

    ref_repo, our_repo = new_repo(tmp_path / "reference"), new_repo(tmp_path / "ours")
    for i, step in enumerate(build(tmp_path / "src-reference")):
        session = ref_repo.writable_session("main")
        with dask.config.set(scheduler="synchronous"):
            to_icechunk(step.ds, session, **step.kwargs)
        session.commit(f"to_icechunk step {i}")
    write_ours(our_repo, build(tmp_path / "src-ours"), "threads", None)
    assert_same_repos(our_repo, ref_repo)


def _times(values: np.ndarray) -> zarr.storage.MemoryStore:
    """A store whose variable ``t`` decodes as times (``days since``) from int64 ``values``."""
    store = zarr.storage.MemoryStore()
    array = zarr.create_array(
        store, name="t", shape=values.shape, dtype="i8", dimension_names=["i"],
        attributes={"units": "days since 1970-01-01", "calendar": "proleptic_gregorian"},
    )  # fmt: skip
    array[:] = values
    return store


def test_a_reference_xarray_cannot_read_matches_only_the_same_failure():
    from parity.compare import diff_decoded

    too_far = _times(np.array([0, 2**62]))  # overflows nanoseconds when decoded
    assert diff_decoded(_times(np.array([0, 2**62])), too_far, None) == []
    assert "ours reads" in diff_decoded(_times(np.array([0, 1])), too_far, None)[0]
