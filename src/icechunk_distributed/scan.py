"""Source files before an ingest: each file's header read on the executor, then combined.

The first step of ingesting many files into one dataset (issue 13). :func:`read_header` runs
in a task: it opens one file lazily and returns what the coordinator needs to know about it,
with the values of the concat coordinate, but no data. :func:`scan_files` runs it for every
file on any engine, through the same run loop as region writes (retries, progress).
:func:`combine_headers` orders the files along the concat dimension (by the concat
coordinate's values, as ``xr.open_mfdataset(combine="by_coords")`` does, or as given) and
refuses, before anything is written, files that cannot form one dataset, naming the files
and what differs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from icechunk_distributed import shipping
from icechunk_distributed.adapters import open_adapter
from icechunk_distributed.errors import TemplateMismatchError
from icechunk_distributed.progress import Progress, observing
from icechunk_distributed.runner import TaskLoop
from icechunk_distributed.sources import SourceOptions, is_remote, open_source

__all__ = [
    "FileHeader",
    "FileSet",
    "HeaderReader",
    "Unreadable",
    "VariableHeader",
    "as_step",
    "check_step",
    "combine_headers",
    "read_header",
    "scan_files",
    "short_list",
]

_SHOWN = 5  # files named in a message, at most


@dataclass(frozen=True)
class VariableHeader:
    """One variable of a file: what must agree across files."""

    dims: tuple[str, ...]
    dtype: str
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FileHeader:
    """What :func:`read_header` learns from one file, without reading its data.

    Attributes
    ----------
    path : str
        The file.
    variables : dict
        Data variables and coordinates other than the concat coordinate.
    sizes : dict
        Dimension sizes.
    concat_values : numpy.ndarray or None
        The concat coordinate's values (None if the file has no such coordinate).
    coords : dict
        The values of the other index coordinates, to check that files agree on them.
    concat_coords : dict
        The values of the other coordinates along ``concat_dim`` (the coordinator writes
        coordinates; these are small).
    coord_names : tuple of str
        The coordinates other than the concat coordinate.
    layouts : dict
        For a virtual ingest: per referenced array, its layout (dtype, chunk shape, codecs,
        fill value), which must be the same in every file.
    """

    path: str
    variables: dict[str, VariableHeader]
    sizes: dict[str, int]
    concat_values: np.ndarray | None
    coords: dict[str, np.ndarray]
    concat_coords: dict[str, np.ndarray] = field(default_factory=dict)
    coord_names: tuple[str, ...] = ()
    layouts: dict[str, str] = field(default_factory=dict)


def read_header(
    path: str,
    concat_dim: str,
    *,
    engine: str | None = None,
    options: SourceOptions | None = None,
) -> FileHeader:
    """Open one file lazily and describe it (runs in a task, near the data).

    Parameters
    ----------
    path : str
        A file xarray can open.
    concat_dim : str
        The dimension the files are concatenated along.
    engine : str, optional
        xarray's backend (``"h5netcdf"``, ``"zarr"``, ...); xarray guesses by default.
    options : SourceOptions, optional
        How to reach ``s3://`` sources.

    Returns
    -------
    FileHeader
        Variables, sizes, and the index coordinates' values.
    """
    with open_source(path, engine=engine, chunks={}, options=options) as ds:
        variables = {
            str(name): VariableHeader(
                tuple(str(d) for d in var.dims), str(var.dtype), dict(var.attrs)
            )
            for name, var in ds.variables.items()
            if name != concat_dim
        }
        coords = {
            str(name): np.asarray(index) for name, index in ds.indexes.items() if name != concat_dim
        }
        values = np.asarray(ds.indexes[concat_dim]) if concat_dim in ds.indexes else None
        sizes = {str(d): int(n) for d, n in ds.sizes.items()}
        along = {
            str(name): np.asarray(var.values)
            for name, var in ds.coords.items()
            if name != concat_dim and concat_dim in var.dims
        }
        names = tuple(sorted(str(n) for n in ds.coords if n != concat_dim))
    return FileHeader(str(path), variables, sizes, values, coords, along, names)


HeaderReader = Callable[[str], FileHeader]


@dataclass(frozen=True)
class _ScanTask:
    path: str
    concat_dim: str
    engine: str | None
    options: SourceOptions | None
    reader: HeaderReader | None = None


class Unreadable(Exception):
    """A file's header could not be read in the task (the original error, as text)."""


def _scan(arg: _ScanTask | bytes) -> FileHeader | BaseException:
    try:
        task: _ScanTask = shipping.loads(arg)
        if task.reader is not None:
            header: FileHeader = task.reader(task.path)
            return header
        return read_header(task.path, task.concat_dim, engine=task.engine, options=task.options)
    except Exception as exc:  # travels home as the result: the loop retries, then reports
        # As text in a plain exception: the engine pickles results with plain pickle,
        # which refuses an exception class of the user's shipped by value.
        return Unreadable(f"{type(exc).__name__}: {exc}")


def scan_files(
    paths: Sequence[str | os.PathLike[str]],
    concat_dim: str,
    *,
    executor: Any = "threads",
    engine: str | None = None,
    retries: int = 2,
    progress: Progress = None,
    workers: int | None = None,
    options: SourceOptions | None = None,
    reader: HeaderReader | None = None,
) -> list[FileHeader]:
    """Read every file's header on ``executor``; return them in the order given.

    Parameters
    ----------
    paths : sequence of str or path
        The files.
    concat_dim : str
        The dimension they are concatenated along.
    executor, retries, progress, workers : optional
        As for :func:`~icechunk_distributed.run_region_writes` (``retries`` per file).
    engine : str, optional
        xarray's backend for the files.
    options : SourceOptions, optional
        How to reach ``s3://`` sources.
    reader : callable, optional
        Reads one file's header in a task instead of :func:`read_header` (picklable; a
        virtual ingest's parses the file with VirtualiZarr).

    Returns
    -------
    list of FileHeader
        One per file.

    Raises
    ------
    FileNotFoundError
        A path does not exist (checked before anything runs).
    TemplateMismatchError
        A file could not be read on any attempt; the message names every such file.
    """
    files = _existing([os.fspath(p) for p in paths])
    headers: dict[int, FileHeader] = {}
    shared: dict[Any, Any] = {}

    def keep(i: int, header: FileHeader, attempts: int) -> None:
        headers[i] = _share(header, shared)

    with (
        open_adapter(executor, workers=workers) as adapter,
        shipping.for_workers(by_value=not adapter.capabilities.shares_modules) as dumps,
        observing(progress, len(files), "scan") as obs,
    ):
        crosses = adapter.capabilities.crosses_processes

        def make_arg(i: int, attempt: int) -> _ScanTask | bytes:
            task = _ScanTask(files[i], concat_dim, engine, options, reader)
            # A reader from the user's own module must reach workers elsewhere (shipping).
            return dumps(task) if crosses else task

        loop = TaskLoop(
            adapter,
            _scan,
            retries=retries,
            is_success=lambda out: isinstance(out, FileHeader),
            describe_error=lambda out: str(out) if isinstance(out, Unreadable) else repr(out),
            on_success=keep,
            observers=obs,
        )
        failed = loop.run(len(files), make_arg)
    if failed:
        lines = "\n".join(f"  {files[f.index]}: {f.result}" for f in failed[:_SHOWN])
        more = f"\n  ... and {len(failed) - _SHOWN} more" if len(failed) > _SHOWN else ""
        raise TemplateMismatchError(
            f"{len(failed)} of {len(files)} file(s) could not be read:\n{lines}{more}"
        )
    return [headers[i] for i in range(len(files))]


def _existing(files: list[str]) -> list[str]:
    """``files``, once every local one is known to exist (checked before anything runs)."""
    missing = [p for p in files if not is_remote(p) and not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} file(s) do not exist: {short_list(missing)}")
    return files


def _share(header: FileHeader, shared: dict[Any, Any]) -> FileHeader:
    """``header`` with its parts replaced by equal ones seen in earlier headers.

    Files of one set repeat each other: the same variables and attributes, the same
    latitudes, the same layouts. One copy of each keeps the coordinator's memory growing by
    what differs (the concat values), not by the whole header, per file.
    """
    for name, text in header.layouts.items():
        header.layouts[name] = shared.setdefault(text, text)
    for name, var in header.variables.items():
        key = ("variable", name, var.dims, var.dtype, repr(sorted(var.attrs.items(), key=str)))
        header.variables[name] = shared.setdefault(key, var)
    for name, values in header.coords.items():
        seen = shared.setdefault(("coord", name), values)
        if seen is not values and _same_values(values, seen):
            header.coords[name] = seen
    return header


@dataclass(frozen=True)
class FileSet:
    """Files that form one dataset along ``concat_dim``, in order.

    Attributes
    ----------
    headers : list of FileHeader
        The files, in concat order.
    concat_dim : str
        The dimension they are concatenated along.
    offsets : list of int
        Where each file starts along ``concat_dim``.
    size : int
        The concatenated size.
    """

    headers: list[FileHeader]
    concat_dim: str
    offsets: list[int]
    size: int

    @property
    def paths(self) -> list[str]:
        """The files, in concat order."""
        return [h.path for h in self.headers]

    def concat_values(self) -> np.ndarray | None:
        """The concat coordinate of the whole set (None if the files have none)."""
        parts = [h.concat_values for h in self.headers]
        if any(p is None for p in parts):
            return None
        return np.concatenate([p for p in parts if p is not None])


def combine_headers(
    headers: Sequence[FileHeader],
    concat_dim: str,
    *,
    order: Literal["by_coords", "given"] = "by_coords",
    step: Any = None,
) -> FileSet:
    """Order files along ``concat_dim`` and refuse any that cannot form one dataset.

    Parameters
    ----------
    headers : sequence of FileHeader
        From :func:`scan_files`.
    concat_dim : str
        The dimension to concatenate along.
    order : {"by_coords", "given"}, default "by_coords"
        Sort the files by their first concat value (as ``combine="by_coords"``), or keep the
        given order (then the values must still increase).
    step : optional
        The spacing of the concat values when the user knows there are no gaps: a number,
        or for times anything ``pandas.Timedelta`` takes (``"1D"``, ``"6h"``). Any other
        step, within a file or between two, is refused.

    Returns
    -------
    FileSet
        The files in order, with their offsets.

    Raises
    ------
    TemplateMismatchError
        Files differ in variables, dims, dtypes or other coordinates; lack ``concat_dim``;
        or their concat values overlap, repeat, do not increase, or leave a gap ``step``
        forbids.
    """
    if not headers:
        raise ValueError("no files to combine")
    if order not in ("by_coords", "given"):
        raise ValueError(f"order must be 'by_coords' or 'given', not {order!r}")
    lacking = [h.path for h in headers if concat_dim not in h.sizes]
    if lacking:
        raise TemplateMismatchError(
            f"{len(lacking)} file(s) have no dimension {concat_dim!r}: {short_list(lacking)}"
        )
    empty = [h.path for h in headers if h.sizes[concat_dim] == 0]
    if empty:
        raise TemplateMismatchError(
            f"{len(empty)} file(s) have no {concat_dim!r} steps: {short_list(empty)}"
        )
    _check_same(headers, concat_dim)
    unindexed = [h.path for h in headers if h.concat_values is None]
    if unindexed and len(unindexed) < len(headers):
        raise TemplateMismatchError(
            f"{len(unindexed)} of {len(headers)} file(s) have no {concat_dim!r} coordinate: "
            f"{short_list(unindexed)}; the files must all have it or all lack it"
        )
    ordered = list(headers)
    if order == "by_coords":
        unindexed = [h.path for h in headers if h.concat_values is None]
        if unindexed:
            raise TemplateMismatchError(
                f"order='by_coords' needs a {concat_dim!r} coordinate in every file; "
                f"{short_list(unindexed)} have none. Pass order='given' to keep the list's order."
            )
        ordered.sort(key=_first)
    _check_increasing(ordered, concat_dim)
    if step is not None:
        check_step(ordered, concat_dim, step)
    offsets, n = [], 0
    for h in ordered:
        offsets.append(n)
        n += h.sizes[concat_dim]
    return FileSet(ordered, concat_dim, offsets, n)


def _first(header: FileHeader) -> Any:
    # Empty files and files without concat values were refused before sorting.
    assert header.concat_values is not None
    return header.concat_values[0]


def _check_same(headers: Sequence[FileHeader], concat_dim: str) -> None:
    """Every file like the first: variables, dims, dtypes, sizes and other coordinates."""
    first = headers[0]
    checks: list[tuple[str, Callable[[FileHeader], Any]]] = [
        ("variables", lambda h: sorted(h.variables)),
        ("coordinates", lambda h: h.coord_names),
        ("dimensions", lambda h: {n: v.dims for n, v in h.variables.items()}),
        ("dtypes", lambda h: {n: v.dtype for n, v in h.variables.items()}),
        ("sizes", lambda h: {d: n for d, n in h.sizes.items() if d != concat_dim}),
        ("codecs, chunks or fill values", lambda h: h.layouts),
    ]
    for what, of in checks:
        want = of(first)
        odd = [h.path for h in headers[1:] if of(h) != want]
        if odd:
            got = of(next(h for h in headers if h.path == odd[0]))
            raise TemplateMismatchError(
                f"{len(odd)} file(s) differ from {first.path} in their {what}: "
                f"{short_list(odd)}. {first.path}: {_diff(want, got)[0]}; {odd[0]}: "
                f"{_diff(want, got)[1]}"
            )
    for name, values in first.coords.items():
        odd = [h.path for h in headers[1:] if not _same_values(h.coords.get(name), values)]
        if odd:
            raise TemplateMismatchError(
                f"{len(odd)} file(s) have other values of coordinate {name!r} than "
                f"{first.path}: {short_list(odd)}; files may differ only along {concat_dim!r}"
            )


def _check_increasing(ordered: Sequence[FileHeader], concat_dim: str) -> None:
    """Concat values increase within each file and from one file to the next."""
    previous: FileHeader | None = None
    for h in ordered:
        values = h.concat_values
        if values is None or not len(values):
            continue
        if len(values) > 1 and not np.all(values[1:] > values[:-1]):
            raise TemplateMismatchError(
                f"{h.path}: its {concat_dim!r} values do not strictly increase"
            )
        if previous is not None and previous.concat_values is not None:
            last = previous.concat_values[-1]
            if not values[0] > last:
                same = np.array_equal(values, previous.concat_values)
                kind = "repeat (the same values: one file twice?)" if same else "overlap"
                raise TemplateMismatchError(
                    f"the {concat_dim!r} values of {previous.path} and {h.path} {kind}: "
                    f"the first ends at {last}, the second starts at {values[0]}"
                )
        previous = h


def as_step(step: Any, values: np.ndarray) -> Any:
    """``step`` in the units of ``values``.

    A ``timedelta64`` for datetime64 values, a ``timedelta`` for cftime dates.
    """
    cftime = values.dtype == object and len(values) > 0 and hasattr(values[0], "calendar")
    if values.dtype.kind in "mM" or cftime:
        import pandas as pd

        try:
            delta = pd.Timedelta(step)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"step={step!r} is not a time step such as '1D' or '6h'") from exc
        return delta.to_pytimedelta() if cftime else delta.to_timedelta64()
    if isinstance(step, str | np.timedelta64) or not np.isscalar(step):
        raise ValueError(f"step={step!r} must be a number for numeric {values.dtype} values")
    return step


def check_step(
    ordered: Sequence[FileHeader], concat_dim: str, step: Any, *, before: Any = None
) -> None:
    """No gap: consecutive concat values ``step`` apart, within and across files.

    ``before`` is the value just before the first file (the store's last, for an append).
    """
    previous, previous_path = before, "the store"
    for h in ordered:
        values = h.concat_values
        if values is None or not len(values):
            raise TemplateMismatchError(
                f"step= needs {concat_dim!r} values in every file; {h.path} has none"
            )
        want = as_step(step, values)
        if previous is not None and not _same_step(values[0] - previous, want):
            raise TemplateMismatchError(
                f"a gap in {concat_dim!r}: {previous_path} ends at {previous}, {h.path} starts "
                f"at {values[0]}, but step={step!r}"
            )
        bad = np.flatnonzero(~_same_step(values[1:] - values[:-1], want))
        if len(bad):
            raise TemplateMismatchError(
                f"a gap in {concat_dim!r} inside {h.path}: {values[bad[0]]} is followed by "
                f"{values[bad[0] + 1]}, but step={step!r}"
            )
        previous, previous_path = values[-1], h.path


def _same_step(steps: Any, want: Any) -> Any:
    """``steps == want``, within rounding for floats (0.1 + 0.2 is not 0.3)."""
    steps = np.asarray(steps)
    if steps.dtype.kind == "f":
        return np.isclose(steps, want, rtol=1e-9, atol=0)
    return steps == want


def _same_values(a: np.ndarray | None, b: np.ndarray) -> bool:
    if a is None or a.shape != b.shape:
        return False
    same = a == b
    if a.dtype.kind in "fc":
        same |= np.isnan(a) & np.isnan(b)
    return bool(np.all(same))


def _diff(want: Any, got: Any) -> tuple[Any, Any]:
    """Only the entries that differ, for a short message."""
    if isinstance(want, Mapping) and isinstance(got, Mapping):
        keys = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        return {k: want.get(k) for k in keys}, {k: got.get(k) for k in keys}
    return want, got


def short_list(paths: Sequence[str]) -> str:
    """The first few paths, and how many more."""
    shown = ", ".join(paths[:_SHOWN])
    return shown + (f" and {len(paths) - _SHOWN} more" if len(paths) > _SHOWN else "")
