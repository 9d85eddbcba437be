"""Apache Beam (executor="beam"): the real in-process runner, no mocks.

The adapter's default runner is the FnApiRunner, the engine Beam's DirectRunner runs batch
pipelines on (it runs here in threads of this process). Its retry behaviour, pinned below:
a bundle that raises is never retried, the pipeline fails (so a crash costs the library one
attempt of every task of the round); ``direct_runner_bundle_repeat`` runs every bundle once
more before the real run and drops that attempt's output, which is exactly the case of a
runner retrying a bundle whose first attempt wrote its fork.
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import xarray as xr
import zarr

import icechunk_distributed as icd
from conftest import make_repo, read_back
from icechunk_distributed import RegionWriteError, run_region_writes, store_arrays
from icechunk_distributed.adapters import get_adapter
from tasks import DieOnce, FlakyLoader, ShiftedLoader, count_call, full_dataset, load_region
from test_bad_input import n_chunk_objects, n_objects

pytestmark = pytest.mark.beam


@pytest.fixture(autouse=True)
def _beam_installed():
    """Skip (not fail) without apache-beam; imported only when a test of this file runs."""
    pytest.importorskip("apache_beam")


# Four regions of three time steps; a chunk of Tair (3 x 6 x 8 float32, 576 B) is over the
# 512 B icechunk inlines, so every chunk a task writes is a file under chunks/.
ENC = {"Tair": {"chunks": (3, 6, 8)}, "station": {"chunks": (3,)}}


def options(**kw):
    """In-process pipeline options: the FnApiRunner, two threads unless told otherwise."""
    from apache_beam.options import pipeline_options

    kw = {"runner": "FnApiRunner", "direct_num_workers": 2,
          "direct_running_mode": "multi_threading", **kw}  # fmt: skip
    return pipeline_options.PipelineOptions([], **kw)  # [], not the command line


def beam_adapter(**kw):
    from icechunk_distributed.adapters.beam import BeamAdapter

    return BeamAdapter(options=options(**kw))


def region_key(region):
    return f"{region['time'].start}-{region['time'].stop}"


class PoisonedFirstCall:
    """A loader whose first call for each region returns wrong data: Tair negated (as
    incompressible as the right data, so its chunks are files too, not inlined)."""

    def __init__(self, directory):
        self.directory = str(directory)

    def __call__(self, region):
        piece = load_region(region)
        if count_call(self.directory, region_key(region)) == 1:
            piece["Tair"] = -piece["Tair"]
        return piece


class WorkerCrash(BaseException):
    """Escapes the task's ``except Exception``: to Beam, the bundle crashed."""


class CrashOnce(ShiftedLoader):
    """``ShiftedLoader`` whose first call for the region starting at 3 crashes its bundle."""

    def __init__(self, directory, plus=0):
        super().__init__(plus=plus)
        self.directory = str(directory)

    def __call__(self, region):
        if region["time"].start == 3 and count_call(self.directory, "crash") == 1:
            raise WorkerCrash("worker lost")
        return super().__call__(region)


def plus(ds, n):
    return ds.copy(data={k: v.values + n for k, v in ds.data_vars.items()})


def calls(directory, key):
    return len([f for f in os.listdir(directory) if f.startswith(f"{key}.")])


def test_importing_the_package_imports_no_beam():
    code = (
        "import sys, concurrent.futures as cf, icechunk_distributed\n"
        "import icechunk_distributed.adapters.beam\n"
        "from icechunk_distributed.adapters import get_adapter, known_executors\n"
        "assert 'beam' in known_executors()\n"
        "get_adapter('threads').close()\n"
        "with cf.ThreadPoolExecutor(1) as pool:\n"
        "    get_adapter(pool)\n"
        "print('apache_beam' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_beam_objects_resolve_to_the_adapter():
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from icechunk_distributed.adapters.beam import BeamAdapter

    class MyOptions(PipelineOptions):  # a user's options class is recognised too
        pass

    by_name = get_adapter("beam", workers=3)
    assert isinstance(by_name, BeamAdapter) and by_name.runner_name == "FnApiRunner"
    caps = by_name.capabilities
    assert (caps.crosses_processes, caps.parallelism) == (True, 3)
    assert (caps.per_call_overhead, caps.supports_backups, caps.max_arg_bytes) == (0, False, None)
    by_options = get_adapter(MyOptions([], runner="FnApiRunner", direct_num_workers=2,
                                       direct_running_mode="multi_threading"))  # fmt: skip
    assert isinstance(by_options, BeamAdapter) and by_options.capabilities.parallelism == 2
    pipeline = beam.Pipeline(runner="BundleBasedDirectRunner")
    shutil.rmtree(pipeline.local_tempdir)  # made by Pipeline(), removed only by run()
    by_pipeline = get_adapter(pipeline)
    assert by_pipeline.runner_name == "BundleBasedDirectRunner"
    for adapter in (by_name, by_options, by_pipeline):
        location = adapter.location
        assert os.path.isdir(location)
        adapter.close()
        assert not os.path.exists(location)


def test_map_unordered_runs_one_pipeline_and_returns_task_errors():
    def task(x):
        if x == 3:
            raise ValueError("three")
        return x * 10

    adapter = beam_adapter()
    with adapter:
        out = dict(adapter.map_unordered(task, [((0,), 1), ((1, 2), 2), ("k", 3)]))
        assert out[(0,)] == 10 and out[(1, 2)] == 20
        assert isinstance(out["k"], ValueError) and str(out["k"]) == "three"
        assert adapter.n_pipelines == 1  # every item of a round in one pipeline
        assert os.listdir(adapter.location) == []  # the round's files are gone


def test_region_writes_by_name_and_through_pipeline_options(tmp_path):
    ds = full_dataset()
    repo = make_repo(tmp_path / "repo")
    result = run_region_writes(ds.isel(time=slice(0, 6)), repo, executor="beam", encoding=ENC,
                               progress=False)  # fmt: skip
    assert result.executor == "beam" and [t.attempts for t in result.tasks] == [1, 1]
    xr.testing.assert_identical(read_back(repo), ds.isel(time=slice(0, 6)))
    # The rest as an append, from a loader, through a PipelineOptions object.
    run_region_writes(ShiftedLoader(6), repo, template=ds.isel(time=slice(6, None)).chunk(),
                      mode="a", append_dim="time", executor=options(), progress=False)  # fmt: skip
    xr.testing.assert_identical(read_back(repo), ds)


def test_store_arrays_through_a_pipeline(tmp_path):
    import apache_beam as beam

    repo = make_repo(tmp_path / "repo")
    session = icd.writable_session(repo)
    a = zarr.create_array(session.store, name="a", shape=(10, 6), chunks=(3, 6), dtype="f8")
    src = np.arange(60.0).reshape(10, 6)
    pipeline = beam.Pipeline(options=options())
    shutil.rmtree(pipeline.local_tempdir)  # made by Pipeline(), removed only by its run()
    result = store_arrays([src], [a], executor=pipeline, progress=False)
    assert result.executor == "beam" and result.n_regions == len(result.tasks) > 1
    result.session.commit("arrays")
    fresh = repo.readonly_session("main").store
    np.testing.assert_array_equal(zarr.open_array(fresh, path="a")[:], src)


def test_a_failing_region_is_retried_by_the_library(tmp_path):
    ds = full_dataset()
    repo = make_repo(tmp_path / "repo")
    adapter = beam_adapter()
    with adapter:
        result = run_region_writes(FlakyLoader(tmp_path, fail_times=1), repo, executor=adapter,
                                   template=ds.chunk({"time": 3}), encoding=ENC,
                                   progress=False)  # fmt: skip
    # Each region's first call raised: a failed result, not a failed bundle. One pipeline
    # for the first attempts, one for the retries.
    assert [t.attempts for t in result.tasks] == [2] * 4
    assert adapter.n_pipelines == 2
    xr.testing.assert_identical(read_back(repo), ds)


def test_an_attempt_beam_discards_is_never_merged(tmp_path):
    """Every bundle runs twice, its first run's output dropped (direct_runner_bundle_repeat):
    the tasks of that run wrote their forks (poisoned data), and none is merged."""
    ds = full_dataset()
    repo = make_repo(tmp_path / "repo")
    adapter = beam_adapter(direct_runner_bundle_repeat=1)
    with adapter:
        result = run_region_writes(PoisonedFirstCall(tmp_path), repo, executor=adapter,
                                   template=ds.chunk({"time": 3}), encoding=ENC,
                                   progress=False)  # fmt: skip
    xr.testing.assert_identical(read_back(repo), ds)  # no poisoned value was merged
    assert [calls(tmp_path, f"{s}-{s + 3}") for s in (0, 3, 6, 9)] == [2] * 4
    assert [t.attempts for t in result.tasks] == [1] * 4  # one result per task reached us
    assert adapter.n_pipelines == 1
    # The discarded run really wrote: 4 Tair chunks committed, 4 orphans beside them.
    assert n_chunk_objects(tmp_path / "repo") == 8


# Beam's threads that talked to the dead worker end with its broken channel.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_worker_fails_the_pipeline_and_the_library_retries_it(tmp_path):
    """A worker process really dies (``os._exit`` in the first task it runs)."""
    ds = full_dataset()
    repo = make_repo(tmp_path / "repo")
    adapter = beam_adapter(direct_running_mode="multi_processing")  # ~4 s to start workers
    with adapter:
        result = run_region_writes(DieOnce(tmp_path), repo, executor=adapter,
                                   template=ds.chunk({"time": 3}), encoding=ENC,
                                   progress=False)  # fmt: skip
    assert (tmp_path / "died").exists()
    # The FnApiRunner does not retry the bundle: the pipeline fails, so every task of the
    # round failed its first attempt; the library's next round (a new pipeline) succeeds.
    assert [t.attempts for t in result.tasks] == [2] * 4
    assert adapter.n_pipelines == 2
    xr.testing.assert_identical(read_back(repo), ds)


def test_a_failed_pipeline_changes_nothing_and_a_run_id_rerun_finishes_it(tmp_path):
    ds = full_dataset()
    repo = make_repo(tmp_path / "repo")
    run_region_writes(ds, repo, encoding=ENC, progress=False)
    before = repo.lookup_branch("main")
    source = CrashOnce(tmp_path, plus=1)  # r+: every value one more; the first run crashes
    kw = {"template": ds.chunk({"time": 3}), "mode": "r+", "executor": "beam", "retries": 0,
          "run_id": "beam-rerun", "progress": False}  # fmt: skip
    with pytest.raises(RegionWriteError, match="Beam pipeline of 4 task") as info:
        run_region_writes(source, repo, **kw)
    assert len(info.value.failures) == 4  # the whole round: a pipeline's results come at its end
    assert "BeamPipelineError" in info.value.failures[0].error
    assert repo.lookup_branch("main") == before
    xr.testing.assert_identical(read_back(repo), ds)
    result = run_region_writes(source, repo, **kw)  # the same run again: no crash this time
    assert result.run_id == "beam-rerun"
    xr.testing.assert_identical(read_back(repo), plus(ds, 1))


def test_a_remote_runner_needs_a_shared_results_location(tmp_path):
    from apache_beam.options.pipeline_options import PipelineOptions

    from icechunk_distributed.adapters.beam import BeamAdapter

    dataflow = {"runner": "DataflowRunner", "project": "p", "region": "europe-west1"}
    with pytest.raises(ValueError, match="no results_location= and no temp_location"):
        BeamAdapter(options=PipelineOptions([], **dataflow))
    with pytest.raises(ValueError, match="'/tmp/shared' is not"):
        BeamAdapter(options=PipelineOptions([], **dataflow, temp_location="/tmp/shared"))
    with pytest.raises(ValueError, match="streaming=False"):  # retries a crash forever
        BeamAdapter(options=PipelineOptions([], **dataflow, streaming=True))
    adapter = BeamAdapter(options=PipelineOptions([], **dataflow, temp_location="gs://b/tmp"))
    assert adapter.location.startswith("gs://b/tmp/icechunk-distributed-")
    adapter = BeamAdapter(options=PipelineOptions([], **dataflow), results_location="s3://b/r/")
    assert adapter.location.startswith("s3://b/r/icechunk-distributed-")
    # Refused before the run writes anything.
    ds = full_dataset()
    repo = make_repo(tmp_path / "repo")
    before = (repo.lookup_branch("main"), n_objects(tmp_path / "repo"))
    with pytest.raises(ValueError, match="results_location"):
        run_region_writes(ds, repo, executor=PipelineOptions([], **dataflow), encoding=ENC)
    assert (repo.lookup_branch("main"), n_objects(tmp_path / "repo")) == before


def _prism_binary():
    """A Prism binary or zip given in BEAM_PRISM_LOCATION, or one Beam cached earlier."""
    cache = os.path.expanduser("~/.apache_beam/cache/prism/bin")
    names = sorted(os.listdir(cache)) if os.path.isdir(cache) else []
    found = [os.path.join(cache, n) for n in names if "prism" in n and not n.endswith(".tmp")]
    return os.environ.get("BEAM_PRISM_LOCATION") or next(iter(found), None)


@pytest.mark.skipif(
    _prism_binary() is None,
    reason="Prism needs its binary, which Beam downloads from GitHub at run time: none is "
    "cached (~/.apache_beam/cache/prism/bin) or given (BEAM_PRISM_LOCATION)",
)
def test_prism_runner(tmp_path):
    from apache_beam.options.pipeline_options import PipelineOptions

    ds = full_dataset()
    repo = make_repo(tmp_path / "repo")
    prism = PipelineOptions([], runner="PrismRunner", prism_location=_prism_binary())
    run_region_writes(ds, repo, executor=prism, encoding=ENC, progress=False)
    xr.testing.assert_identical(read_back(repo), ds)
