"""The pipeline's seams: the backup rule, step order, all-or-nothing arrays, results, pins.

Pins: where the package relies on another library's private behaviour, a test here fails
loudly when that library changes it.
"""

import asyncio
import json

import icechunk
import joblib
import numpy as np
import pytest
import zarr
from zarr.buffer import default_buffer_prototype

import icechunk_distributed as icd
from conftest import read_back
from icechunk_distributed import RegionWriteError, RegionWriter, SessionStateError
from icechunk_distributed.adapters import Capabilities
from icechunk_distributed.adapters.joblib import JoblibAdapter
from icechunk_distributed.adapters.local import FuturesAdapter
from icechunk_distributed.forks import chunk_key
from icechunk_distributed.runner import Backups, batch_rule, pick_straggler
from tasks import full_dataset, load_region

ENC = {"Tair": {"chunks": (2, 6, 8)}, "station": {"chunks": (2,)}}
RULE = Backups(factor=3.0, min_done=0.5, min_seconds=1.0)


def straggler(**state):
    base = {
        "running": {(0,): 0.0, (1,): 5.0},
        "backed_up": set(),
        "durations": [1.0, 1.0, 2.0],
        "n_round": 4,
        "n_unresolved": 2,
        "now": 10.0,
    }
    return pick_straggler(RULE, **{**base, **state})


def test_the_backup_rule_picks_the_oldest_call_over_the_limit():
    assert straggler() == (0,)  # ran 10 s, limit max(1, 3 x median 1) = 3 s
    assert straggler(now=7.5) == (0,)  # (1,) has run 2.5 s only
    assert straggler(backed_up={(0,)}) == (1,)  # one backup per call
    assert straggler(backed_up={(0,)}, now=7.0) is None


def test_the_backup_rule_waits_for_enough_finished_tasks_and_a_yardstick():
    assert straggler(n_unresolved=3) is None  # 1 of 4 done, under min_done
    assert straggler(durations=[]) is None  # nothing to compare with yet
    assert straggler(durations=[0.01], now=0.9, running={(0,): 0.0}) is None  # min_seconds


def test_batches_fill_each_worker_twice_and_respect_the_payload_limit():
    caps = Capabilities(crosses_processes=True, parallelism=4, per_call_overhead=1.0)
    cheap = batch_rule(Capabilities(crosses_processes=True, parallelism=4), 100)
    assert cheap(127) == 1  # cheap calls: one task each, until a round is much bigger
    assert cheap(128 * 3) == 3  # still 32 calls per worker slot
    assert cheap(1_000_000) == 16  # at most 16 tasks per call
    assert batch_rule(caps, 0)(80) == 10  # 80 tasks, 2 calls per worker
    limited = Capabilities(**{**caps.__dict__, "max_arg_bytes": 100_000})
    assert batch_rule(limited, 20_000)(80) == 3  # 0.8 x 100 kB / (20 kB + framing)


def test_region_writer_steps_refuse_to_run_out_of_order(repo):
    writer = RegionWriter(full_dataset(), repo, encoding=ENC, progress=False)
    with pytest.raises(SessionStateError, match=r"write_regions\(\) needs write_metadata\(\)"):
        writer.write_regions("serial")
    with pytest.raises(SessionStateError, match=r"commit\(\) needs write_regions\(\)"):
        writer.commit()
    writer.write_metadata()
    with pytest.raises(SessionStateError, match=r"write_metadata\(\) already ran"):
        writer.write_metadata()
    writer.write_regions("serial")
    with pytest.raises(SessionStateError, match=r"write_regions\(\) already ran"):
        writer.write_regions("serial")
    writer.commit("steps")
    with pytest.raises(SessionStateError, match=r"commit\(\) already ran"):
        writer.commit()
    assert read_back(repo).identical(full_dataset())


class _FailsAt:
    """An array-like source whose second half fails when a task reads it."""

    shape = (8,)
    dtype = np.dtype("f8")

    def __init__(self, bad_from: int) -> None:
        self.bad_from = bad_from
        self.start = 0

    def __getitem__(self, index):
        piece = _FailsAt(self.bad_from)
        piece.start = index[0].start or 0
        return piece

    def compute(self):
        if self.start >= self.bad_from:
            raise OSError("cannot read this piece")
        return np.full(4, 7.0)


def test_store_arrays_is_all_or_nothing(repo):
    session = icd.writable_session(repo)
    a = zarr.create_array(session.store, name="a", shape=(8,), chunks=(4,), dtype="f8")
    session.commit("array")
    session = icd.writable_session(repo)
    a = zarr.open_array(session.store, path="a", mode="r+")
    with pytest.raises(RegionWriteError, match="nothing was merged"):
        icd.store_arrays(_FailsAt(4), a, retries=0, progress=False)
    assert not session.has_uncommitted_changes  # the half that succeeded was not merged
    result = icd.store_arrays(_FailsAt(8), a, progress=False)
    assert isinstance(result, icd.WriteResult)
    assert (result.n_regions, result.n_chunks, result.bytes_written) == (2, 2, 64)
    assert [t.index for t in result.tasks] == [0, 1]
    result.session.commit("written")
    np.testing.assert_array_equal(
        zarr.open_array(repo.readonly_session("main").store, path="a")[:], 7.0
    )


def test_a_resumable_runs_result_session_is_on_the_target_branch(repo):
    ds = full_dataset()
    result = icd.run_region_writes(ds, repo, encoding=ENC, run_id="r1", progress=False)
    assert result.session.branch == "main"
    assert not result.session.read_only
    assert result.session.snapshot_id == result.snapshot_id
    assert icd.list_runs(repo) == []  # the work branch is gone; the session is not on it
    assert read_back(repo).identical(ds)


# -- pins of other libraries' private behaviour


@pytest.mark.parametrize(
    "encoding",
    [
        None,
        {"name": "default", "separator": "."},
        {"name": "v2", "separator": "."},
        {"name": "v2", "separator": "/"},
    ],
)
def test_pin_chunk_keys_match_zarrs_own(encoding):
    """forks.chunk_key re-implements zarr's chunk key encodings (zarr has no public one)."""
    store = zarr.storage.MemoryStore()
    kwargs = {} if encoding is None else {"chunk_key_encoding": encoding}
    array = zarr.create_array(store, name="a", shape=(4, 6), chunks=(2, 2), dtype="i4", **kwargs)
    array[2:4, 4:6] = 1
    keys, raw = asyncio.run(_listing(store))
    meta = json.loads(raw)
    assert [k for k in keys if k.startswith("a/") and not k.endswith("zarr.json")] == [
        f"a/{chunk_key(meta, (1, 2))}"
    ]


async def _listing(store):
    keys = [k async for k in store.list()]
    raw = await store.get("a/zarr.json", prototype=default_buffer_prototype())
    return keys, raw.to_bytes()


def test_pin_joblib_backend_detection():
    """JoblibAdapter reads joblib's private ``_backend`` to find the configured backend."""
    with joblib.parallel_config(backend="threading", n_jobs=3):
        adapter = JoblibAdapter()
        assert not adapter.capabilities.crosses_processes
        assert adapter.capabilities.parallelism == 3
    with joblib.parallel_config(backend="loky", n_jobs=2):
        adapter = JoblibAdapter()
        assert adapter.capabilities.crosses_processes
        assert adapter.capabilities.parallelism == 2
    with (
        joblib.parallel_config(backend="multiprocessing"),
        pytest.raises(ValueError, match="forks"),
    ):
        JoblibAdapter()


def test_pin_futures_pool_size():
    """FuturesAdapter reads ``_max_workers`` of a pool the caller made (no public size)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(3) as pool:
        assert FuturesAdapter(pool).capabilities.parallelism == 3


def test_pin_icechunk_storage_repr_names_in_memory_storage():
    """check_shareable reads the storage kind from ``repr(repo.storage)`` (no public field)."""
    repo = icechunk.Repository.create(icechunk.in_memory_storage())
    session = icd.writable_session(repo)
    with pytest.raises(icd.UnshareableStorageError):
        session.check_shareable()


def test_the_coordinator_registry_survives_garbage_collection_inside_it():
    """A session freed by the collector while the registry is locked must not deadlock."""
    import gc

    from icechunk_distributed.coordinator import coordinator_of

    repo = icechunk.Repository.create(icechunk.in_memory_storage())

    class Holder:
        pass

    for _ in range(50):
        holder = Holder()
        holder.session, holder.me = repo.writable_session("main"), holder  # a garbage cycle
        coordinator_of(holder.session)
        del holder
    thresholds = gc.get_threshold()
    gc.set_threshold(1, 1, 1)
    try:
        session = repo.writable_session("main")
        assert coordinator_of(session) is coordinator_of(session)
    finally:
        gc.set_threshold(*thresholds)


def test_failed_regions_close_the_pickling_window(repo):
    import pickle

    ds = full_dataset()

    def offline(region):  # the coordinator's full read works; the tasks' reads fail
        if region["time"] != slice(0, ds.sizes["time"]):
            raise OSError("the source is offline")
        return load_region(region)

    writer = RegionWriter(offline, repo, template=ds.chunk({"time": 2}), retries=0)
    writer.write_metadata()
    with pytest.raises(RegionWriteError, match="offline"):
        writer.write_regions("serial")
    with pytest.raises(icd.PicklingNotAllowedError):
        pickle.dumps(writer.session)  # the tasks' block ended with the failure
