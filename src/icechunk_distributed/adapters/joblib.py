"""joblib: ``loky`` by default, honouring ``joblib.parallel_config``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from icechunk_distributed.adapters.base import Adapter, Capabilities, Outcome, import_engine

__all__ = ["JoblibAdapter"]


def _call(fn: Callable[[Any], Any], key: Any, arg: Any) -> tuple[Any, Any]:
    return key, fn(arg)


class JoblibAdapter(Adapter):
    """Run tasks with ``joblib.Parallel(return_as="generator_unordered")``.

    Parameters
    ----------
    n_jobs : int, optional
        Workers. By default the ``n_jobs`` of an enclosing ``joblib.parallel_config``, else all
        CPUs. The backend is the configured one (``loky`` by default); the ``multiprocessing``
        backend is refused because it forks, and icechunk hangs in forked children.
    """

    name = "joblib"

    def __init__(self, n_jobs: int | None = None) -> None:
        joblib = import_engine("joblib", "joblib")
        from joblib import parallel

        config = getattr(parallel._backend, "config", {})
        configured = config.get("n_jobs", parallel.default_parallel_config["n_jobs"])
        if n_jobs is None and configured is parallel.default_parallel_config["n_jobs"]:
            n_jobs = -1
        self._n_jobs = n_jobs
        probe = joblib.Parallel(n_jobs=n_jobs)
        backend = type(probe._backend).__name__
        if backend == "MultiprocessingBackend":
            raise ValueError(
                "joblib's 'multiprocessing' backend forks worker processes, which hang once "
                "icechunk has been used here. Use the default 'loky' backend "
                "(joblib.parallel_config(backend='loky')) or 'threading'."
            )
        self._threads = backend in ("ThreadingBackend", "SequentialBackend")
        self._parallelism = max(1, probe._effective_n_jobs())

    @property
    def capabilities(self) -> Capabilities:
        """Loky pickles tasks into worker processes; the threading backend does not."""
        return Capabilities(
            crosses_processes=not self._threads,
            parallelism=self._parallelism,
        )

    def map_unordered(
        self,
        fn: Callable[[Any], Any],
        items: Iterable[tuple[Any, Any] | None],
        *,
        poll: float | None = None,
    ) -> Iterator[Outcome]:
        """Yield ``(key, result)`` in completion order (no backups: ``poll`` is never passed)."""
        joblib = import_engine("joblib", "joblib")
        parallel = joblib.Parallel(n_jobs=self._n_jobs, return_as="generator_unordered")
        calls = (joblib.delayed(_call)(fn, key, arg) for key, arg in filter(None, items))
        yield from parallel(calls)
