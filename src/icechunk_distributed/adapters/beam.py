"""Apache Beam: each round of tasks is one batch pipeline; results come back as its output.

A round's ``(key, arg)`` items are staged as files in a results location, read by the
pipeline, spread over the workers (``Reshuffle``), run with ``Map``, and the ``(key,
result)`` pairs are written with ``WriteToText``. The coordinator reads them with Beam's
``FileSystems`` (local paths, ``gs://``, ``s3://``...) only once the pipeline has finished.

Why the results travel as the pipeline's output and never as files the tasks write
themselves: a runner may run a bundle more than once (a crashed worker, a lost lease, a
failed write of the bundle's output) and keeps the output of one attempt only.
``WriteToText`` writes each bundle attempt to its own temporary file and, at the end,
keeps only the files of the attempts the runner committed. So every task yields exactly
one result, from the committed attempt; the fork another attempt wrote is never merged
(its chunks are orphans that ``garbage_collect`` reclaims), as for a failed attempt.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import os
import struct
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from icechunk_distributed.adapters.base import (
    Adapter,
    Capabilities,
    ItemFeed,
    Outcome,
    import_engine,
)

__all__ = [
    "DEFAULT_REMOTE_WORKERS",
    "INPUT_SHARD_BYTES",
    "BeamAdapter",
    "BeamPipelineError",
    "is_beam_object",
]

INPUT_SHARD_BYTES = 16 * 2**20
"""Bytes of staged task arguments per input file: few files to write and list, while the
``Reshuffle`` after reading them still spreads single tasks over the workers."""

DEFAULT_REMOTE_WORKERS = 8
"""Task slots assumed for a remote runner whose options set neither ``max_num_workers`` nor
``num_workers`` (only the default task plan depends on it; pass ``workers=``)."""

_LOCAL_RUNNERS = frozenset(
    {
        "DirectRunner",
        "SwitchingDirectRunner",
        "BundleBasedDirectRunner",
        "FnApiRunner",
        "PrismRunner",
        "TestDirectRunner",
    }
)
"""Runners whose workers run on this machine (a local temporary directory reaches them);
``StandardOptions.LOCAL_RUNNERS`` of Beam 2.77, kept here so that telling a remote runner
from a local one imports nothing."""

_HEADER = struct.Struct(">Q")  # the length of one staged record


class BeamPipelineError(RuntimeError):
    """A round's Beam pipeline failed or was cancelled: none of its results are used.

    Beam hands over a pipeline's output only when the whole pipeline has finished, so every
    task of the round counts as failed for this attempt; the library retries them on fresh
    forks (``retries=``), each in the next round's pipeline.
    """


def is_beam_object(obj: Any) -> bool:
    """Whether ``obj`` is a Beam ``Pipeline`` or ``PipelineOptions`` (or a subclass of one).

    Recognised by class names and modules, so nothing is imported: an object of these
    classes only exists once its user imported ``apache_beam``.

    Parameters
    ----------
    obj : object
        A candidate ``executor=`` value.

    Returns
    -------
    bool
        True for ``beam.Pipeline``, ``TestPipeline``, ``PipelineOptions`` and its views or
        subclasses (a user's ``class MyOptions(PipelineOptions)`` included).
    """
    return any(
        (cls.__module__ or "").startswith("apache_beam.")
        and cls.__name__ in ("Pipeline", "PipelineOptions")
        for cls in type(obj).__mro__
    )


def _runner_name(runner: Any) -> str:
    """A runner's class name, from a runner object or a name Beam accepts (``"direct"``)."""
    if runner is None:
        return "DirectRunner"  # Beam's default when the options name no runner
    if not isinstance(runner, str):
        return type(runner).__name__
    name = runner.rsplit(".", 1)[-1]
    return name if name.lower().endswith("runner") else name[:1].upper() + name[1:] + "Runner"


class BeamAdapter(Adapter):
    """Run each round of tasks as one Apache Beam batch pipeline.

    Parameters
    ----------
    pipeline : apache_beam.Pipeline, optional
        A pipeline whose runner and options to use. It is not run itself: a Beam pipeline
        runs once, and every round (the first attempts, then each round of retries) is a
        new pipeline with the same runner and options.
    options : apache_beam.options.pipeline_options.PipelineOptions, optional
        The options of the pipelines (runner, project, region, temp_location, ...). Without
        ``pipeline`` or ``options``: the in-process FnApiRunner (the engine of Beam's
        DirectRunner for batch pipelines) with ``workers`` threads.
    workers : int, optional
        Task slots. For the adapter's own in-process runner, its worker threads (the CPU
        count by default); otherwise what the task plan assumes (default: the options'
        ``direct_num_workers`` on a local runner, ``max_num_workers`` or ``num_workers``
        on a remote one, else :data:`DEFAULT_REMOTE_WORKERS`).
    results_location : str, optional
        Where task arguments are staged and results written: a directory every worker
        and this process can reach (``gs://bucket/dir``, ``s3://...``). Default: the
        options' ``temp_location`` for a remote runner, a temporary directory for a local
        one. A subdirectory unique to the adapter is used, and removed by :meth:`close`.

    Raises
    ------
    ValueError
        A remote runner (Dataflow, Flink, Spark, a portable job server) without a shared
        location: no ``results_location`` and no ``temp_location``, or a local path; or
        streaming options. Raised when the adapter is made, before the run writes anything.

    Notes
    -----
    Beam's fixed cost is per pipeline (about 0.5-1 s in process, minutes on Dataflow), and
    not per element, so the adapter declares no per-call overhead: the loop hands over
    every task of a round and they all go into one pipeline, one element per task. Batching
    tasks into fewer, larger elements would save nothing and would take away the runner's
    freedom to spread and rebalance single tasks over its workers.

    Results arrive when the pipeline ends: progress is reported all at once, after it, and
    a failed pipeline (:class:`BeamPipelineError`) fails every task of its round. There are
    no straggler backups (``supports_backups`` is False): the loop cannot see which task of
    a running pipeline is late.

    A task's own error (an exception from the task function) is a result, not a bundle
    failure: it comes home like any result and the library retries the task on a fresh
    fork in the next round. Only a crash (a dead worker, an exception outside the task's
    ``try``) fails a bundle; the runner then retries the bundle (Dataflow batch: four
    attempts, then the job fails; the in-process FnApiRunner: never, the pipeline fails),
    and only the committed attempt's results reach the coordinator.
    """

    name = "beam"

    def __init__(
        self,
        pipeline: Any = None,
        *,
        options: Any = None,
        workers: int | None = None,
        results_location: str | None = None,
    ) -> None:
        import_engine("apache_beam", "beam")
        from apache_beam.options.pipeline_options import (
            DirectOptions,
            PipelineOptions,
            StandardOptions,
        )

        if pipeline is not None and options is not None:
            raise ValueError("BeamAdapter takes a pipeline or options, not both")
        if pipeline is not None:
            options, self._runner = pipeline.options, pipeline.runner
        elif options is None:
            options = _in_process_options(workers)
            self._runner = None
        else:
            if not isinstance(options, PipelineOptions):
                raise TypeError(f"options= must be PipelineOptions, not {type(options).__name__}")
            self._runner = None
        if options.view_as(StandardOptions).streaming:
            # A streaming job retries a failing bundle forever: the run would never end.
            raise ValueError("executor='beam' runs batch pipelines: set streaming=False")
        self.options = options
        runner = self._runner or options.view_as(StandardOptions).runner
        self.runner_name = _runner_name(runner)
        self.local = self.runner_name in _LOCAL_RUNNERS
        self._mode = options.view_as(DirectOptions).direct_running_mode
        self._workers = workers or _workers_of(options, self.local)
        self._owned_dir: str | None = None
        self.location = self._results_root(results_location)
        self.n_pipelines = 0  # pipelines run, for the record: one per round

    @classmethod
    def from_object(cls, obj: Any, *, workers: int | None = None) -> BeamAdapter:
        """The adapter for an ``executor=`` that :func:`is_beam_object` recognised.

        Parameters
        ----------
        obj : apache_beam.Pipeline or PipelineOptions
            The caller's pipeline (its runner and options are used) or options.
        workers : int, optional
            As for :class:`BeamAdapter`.

        Returns
        -------
        BeamAdapter
            A new adapter (close it: it removes its results directory).
        """
        if hasattr(obj, "view_as"):  # PipelineOptions and its views
            return cls(options=obj, workers=workers)
        return cls(obj, workers=workers)

    def _results_root(self, results_location: str | None) -> str:
        """The adapter's own directory under the results location (refusing unshared ones)."""
        from apache_beam.options.pipeline_options import GoogleCloudOptions

        base = results_location
        if base is None and not self.local:
            base = self.options.view_as(GoogleCloudOptions).temp_location
        if not self.local and (base is None or "://" not in base):
            given = "no results_location= and no temp_location" if base is None else repr(base)
            raise ValueError(
                f"executor='beam' with the {self.runner_name} runs tasks on remote workers, "
                f"which write their results where this process reads them; {given} is not "
                "such a place. Pass results_location='gs://bucket/dir' (or s3://...), or set "
                "temp_location in the pipeline options."
            )
        if base is None:
            import tempfile

            self._owned_dir = tempfile.mkdtemp(prefix="icechunk-distributed-beam-")
            return self._owned_dir
        own = f"icechunk-distributed-{uuid.uuid4().hex}"
        # Joined by hand for URLs: Beam's join would load the scheme's filesystem (and its
        # client library) here, and a missing one is better reported by the run itself.
        return base.rstrip("/") + "/" + own if "://" in base else os.path.join(base, own)

    @property
    def capabilities(self) -> Capabilities:
        """Tasks are pickled (Beam elements); a round is one pipeline, so no batching."""
        # Only the in-process runner's threads are sure to import what this process does.
        in_process = self.local and self._mode in ("in_memory", "multi_threading")
        return Capabilities(
            crosses_processes=True, parallelism=int(self._workers), shares_modules=in_process
        )

    def map_unordered(
        self,
        fn: Callable[[Any], Any],
        items: Iterable[tuple[Any, Any] | None],
        *,
        poll: float | None = None,
    ) -> Iterator[Outcome]:
        """Run every item in one pipeline; yield the results once it has finished.

        A failed pipeline yields a :class:`BeamPipelineError` for every item (the loop
        retries them); an item the output lacks is reported by the loop as unanswered.
        """
        fs = _filesystems()

        round_dir = fs.join(self.location, f"round-{uuid.uuid4().hex}")
        try:
            keys, shards = _stage_inputs(ItemFeed(items), round_dir)
            if not keys:
                return
            failure = self._run_pipeline(fn, shards, round_dir, len(keys))
            if failure is not None:
                for key in keys:
                    yield key, failure
                return
            seen: set[int] = set()
            for index, result in _read_results(round_dir):
                if 0 <= index < len(keys) and index not in seen:  # one result per task
                    seen.add(index)
                    yield keys[index], result
        finally:
            _delete(round_dir)

    def _run_pipeline(
        self, fn: Callable[[Any], Any], shards: list[str], round_dir: str, n_tasks: int
    ) -> BeamPipelineError | None:
        """Build and run one round's pipeline; the error if it did not finish."""
        import cloudpickle

        beam = import_engine("apache_beam", "beam")  # untyped in part: used as Any
        fs = _filesystems()
        pipeline = beam.Pipeline(runner=self._runner, options=self.options)
        _ = (
            pipeline
            | "Inputs" >> beam.Create(shards, reshuffle=False)
            | "Read" >> beam.FlatMap(_read_shard)
            # Without it the runner fuses reading and running: every task of an input file
            # would run in the one bundle that read it, on one worker.
            | "Spread" >> beam.Reshuffle()
            | "Run" >> beam.Map(_run_element, cloudpickle.dumps(fn))
            | "Results" >> beam.io.WriteToText(fs.join(round_dir, "results"))
        )
        self.n_pipelines += 1
        result = None
        try:
            result = pipeline.run()
            state = result.wait_until_finish()
        except Exception as exc:
            _cancel(result)  # a remote job may still run after its client gave up
            error = BeamPipelineError(
                f"the Beam pipeline of {n_tasks} task(s) failed on {self.runner_name}: "
                f"{type(exc).__name__}: {exc}"
            )
            error.__cause__ = exc
            return error
        except BaseException:  # Ctrl-C while waiting: do not leave a remote job running
            _cancel(result)
            raise
        if str(state).rsplit(".", 1)[-1] != "DONE":
            return BeamPipelineError(
                f"the Beam pipeline of {n_tasks} task(s) on {self.runner_name} ended in "
                f"state {state}, not DONE"
            )
        return None

    def close(self) -> None:
        """Remove the adapter's directory of staged inputs and results (best effort)."""
        if self._owned_dir is not None:
            import shutil

            shutil.rmtree(self._owned_dir, ignore_errors=True)
        else:
            _delete(self.location)


def _in_process_options(workers: int | None) -> Any:
    """Options of the adapter's default runner: the FnApiRunner, threads in this process.

    Not ``runner="DirectRunner"``: Beam 2.77's DirectRunner first tries the Prism runner,
    downloading its binary from GitHub at run time, and only falls back to the FnApiRunner
    when that fails; naming the FnApiRunner gives the same engine without the download.
    """
    from apache_beam.options.pipeline_options import PipelineOptions

    n = workers or os.cpu_count() or 1
    # in_memory runs one bundle at a time; multi_threading runs n in parallel threads.
    mode = "multi_threading" if n > 1 else "in_memory"
    return PipelineOptions(  # flags=[]: never this process's command line (sys.argv)
        [], runner="FnApiRunner", direct_num_workers=n, direct_running_mode=mode
    )


def _workers_of(options: Any, local: bool) -> int:
    """Task slots the options suggest (see ``workers`` of :class:`BeamAdapter`)."""
    from apache_beam.options.pipeline_options import DirectOptions, WorkerOptions

    if local:
        direct = options.view_as(DirectOptions)
        if direct.direct_running_mode == "in_memory":
            return 1
        return int(direct.direct_num_workers or os.cpu_count() or 1)
    worker = options.view_as(WorkerOptions)
    return int(worker.max_num_workers or worker.num_workers or DEFAULT_REMOTE_WORKERS)


def _stage_inputs(feed: ItemFeed, round_dir: str) -> tuple[list[Any], list[str]]:
    """Write every available item to input files; return the keys, by index, and the files.

    Streamed to files as items are pulled, so the coordinator holds one record at a time;
    in files rather than in ``beam.Create``, whose values go into the job description
    (Dataflow refuses large ones: "job graph too large").
    """
    import cloudpickle
    from apache_beam.io.filesystem import CompressionTypes

    fs = _filesystems()

    keys: list[Any] = []
    shards: list[str] = []
    out: Any = None
    size = 0
    try:
        for key, arg in iter(feed.pull, None):
            if out is None or size >= INPUT_SHARD_BYTES:
                if out is not None:
                    out.close()
                shards.append(fs.join(round_dir, f"inputs-{len(shards):05d}.bin"))
                out = fs.create(shards[-1], compression_type=CompressionTypes.UNCOMPRESSED)
                size = 0
            record = cloudpickle.dumps((len(keys), arg))
            out.write(_HEADER.pack(len(record)) + record)
            size += _HEADER.size + len(record)
            keys.append(key)
    finally:
        if out is not None:
            out.close()
    return keys, shards


def _read_exact(stream: Any, n: int) -> bytes:
    """``n`` bytes, or fewer only at the end of the stream (remote streams read in parts)."""
    parts: list[bytes] = []
    while n > 0:
        part = stream.read(n)
        if not part:
            break
        parts.append(part)
        n -= len(part)
    return b"".join(parts)


def _read_shard(path: str) -> Iterator[bytes]:
    """In a worker: the records of one input file, each a pickled ``(index, arg)``."""
    from apache_beam.io.filesystem import CompressionTypes

    fs = _filesystems()

    with fs.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as stream:
        while header := _read_exact(stream, _HEADER.size):
            (length,) = _HEADER.unpack(header)
            record = _read_exact(stream, length)
            if len(record) != length:
                raise OSError(f"{path}: truncated record ({len(record)} of {length} bytes)")
            yield record


@functools.lru_cache(maxsize=4)
def _function(pickled: bytes) -> Callable[[Any], Any]:
    """The task function, unpickled once per worker process rather than once per task."""
    import cloudpickle

    fn: Callable[[Any], Any] = cloudpickle.loads(pickled)
    return fn


def _run_element(record: bytes, pickled_fn: bytes) -> str:
    """In a worker: run one task; return ``(index, result)`` as one line of text.

    The task function's exception is returned as the result, not raised: raised, it would
    fail the whole bundle, which Beam retries as a whole (on Dataflow four times, then the
    job fails and every result of the round is lost); returned, only this task counts as
    failed and the library retries it alone, on a fresh fork.
    """
    import cloudpickle

    index, arg = cloudpickle.loads(record)
    try:
        result = _function(pickled_fn)(arg)
    except Exception as exc:
        result = exc
    try:
        data = cloudpickle.dumps((index, result))
    except Exception as exc:  # an unpicklable result still reports the task as failed
        problem = RuntimeError(f"the task's result {result!r:.200} cannot be pickled: {exc}")
        data = cloudpickle.dumps((index, problem))
    return base64.b64encode(data).decode("ascii")


def _read_results(round_dir: str) -> Iterator[tuple[int, Any]]:
    """The ``(index, result)`` pairs of a finished pipeline's output files."""
    import cloudpickle
    from apache_beam.io.filesystem import CompressionTypes

    fs = _filesystems()

    pattern = fs.join(round_dir, "results*")
    files = sorted(m.path for m in fs.match([pattern])[0].metadata_list)
    for path in files:
        with fs.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as stream:
            data = stream.read()
        for line in data.splitlines():
            if line.strip():
                index, result = cloudpickle.loads(base64.b64decode(line))
                yield int(index), result


def _delete(directory: str) -> None:
    """Remove a directory and what is under it, if it exists (best effort)."""
    fs = _filesystems()

    # Object stores have no directories: a trailing "/" deletes every object under the
    # prefix (gs://, s3://), where a local path must name the directory itself. Failing
    # (nothing there) is fine: these are temporary files only.
    path = directory.rstrip("/") + "/" if "://" in directory else directory
    with contextlib.suppress(Exception):
        fs.delete([path])


def _filesystems() -> Any:
    """Beam's ``FileSystems`` (local paths, ``gs://``, ``s3://``, ...), typed as ``Any``.

    Beam's own annotations are partial, and mypy (strict) refuses calls to its untyped ones.
    """
    from apache_beam.io.filesystems import FileSystems

    return FileSystems


def _cancel(result: Any) -> None:
    """Cancel a submitted pipeline (a Dataflow job keeps running otherwise)."""
    if result is not None:
        with contextlib.suppress(Exception):  # already finished, or the runner cannot cancel
            result.cancel()
