"""What a repository holds, for a person: branches, commits, arrays, containers, runs.

:func:`describe_repository` is what ``icechunk-distributed info REPO`` prints. It reads
metadata only (array metadata, the first and last value of each index coordinate, the
branch's recent history), so it stays quick on repositories of any size; the one walk over
manifests, the stored size of all chunks, can be turned off.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import xarray as xr
import zarr
import zarr.errors

from icechunk_distributed.containers import describe_store
from icechunk_distributed.options import check_branch
from icechunk_distributed.runs import PUBLISHED_TAG_PREFIX, RUN_BRANCH_PREFIX, list_runs

if TYPE_CHECKING:
    from icechunk import Repository

__all__ = ["describe_repository", "format_bytes"]

_TAGS_SHOWN = 5
_TIME_UNITS: tuple[Literal["D", "m", "s", "ms", "us", "ns"], ...] = (
    "D",
    "m",
    "s",
    "ms",
    "us",
    "ns",
)


def format_bytes(n: float) -> str:
    """A byte count for a person, in decimal units (as the run summaries count MB).

    Parameters
    ----------
    n : float
        Bytes.

    Returns
    -------
    str
        For example ``"512 B"``, ``"1.5 MB"`` or ``"2.0 TB"``.
    """
    if n < 1000:
        return f"{int(n)} B"
    exponent = min(int(math.log10(n) // 3), 5)
    return f"{n / 1000**exponent:.1f} {'BkMGTP'[exponent]}B"


def _branches(repo: Repository) -> list[str]:
    # Work branches of resumable runs are the library's private state: listed under runs.
    names = sorted(b for b in repo.list_branches() if not b.startswith(RUN_BRANCH_PREFIX))
    lines = ["branches: " + ", ".join(f"{b} ({repo.lookup_branch(b)})" for b in names)]
    tags = sorted(t for t in repo.list_tags() if not t.startswith(PUBLISHED_TAG_PREFIX))
    if tags:
        more = f" and {len(tags) - _TAGS_SHOWN} more" if len(tags) > _TAGS_SHOWN else ""
        lines.append(f"tags: {', '.join(tags[:_TAGS_SHOWN])}{more}")
    return lines


def _commits(repo: Repository, branch: str, n_commits: int) -> list[str]:
    lines = [f"last commits on {branch}:"]
    for snapshot in itertools.islice(repo.ancestry(branch=branch), n_commits):
        when = snapshot.written_at.strftime("%Y-%m-%d %H:%M:%S %Z").strip()
        message = snapshot.message.splitlines()[0] if snapshot.message else ""
        lines.append(f"  {snapshot.id}  {when}  {message}")
    return lines


def _index_range(array: Any, name: str) -> str:
    """``first .. last`` of a 1-D index coordinate, decoded as xarray would (dates as dates)."""
    if array.shape[0] == 0:
        return "empty"
    ends = np.asarray([array[0], array[-1]])
    # Only the attributes that decode values: a base64 _FillValue would confuse decode_cf.
    attrs = {k: v for k, v in array.attrs.items() if k in ("units", "calendar")}
    # Undecodable values (odd units): show the stored numbers.
    with contextlib.suppress(ValueError, TypeError, OverflowError):
        ends = xr.decode_cf(xr.Dataset({name: ((name,), ends, attrs)}))[name].values
    if ends.dtype.kind == "M":
        # One unit for both ends, the coarsest that shows them exactly (days, or minutes...).
        # NaT equals nothing: judge the unit on the dates there are (NaT prints as NaT).
        dates = ends[~np.isnat(ends)]
        unit: Literal["D", "m", "s", "ms", "us", "ns"] = next(
            (u for u in _TIME_UNITS if (dates.astype(f"M8[{u}]") == dates).all()), "ns"
        )
        first, last = np.datetime_as_string(ends, unit=unit)
    else:
        first, last = ends
    return f"{first} .. {last}"


def _dims(array: Any) -> tuple[str, ...] | None:
    names = getattr(array.metadata, "dimension_names", None)  # zarr v3
    if names is None:
        names = array.attrs.get("_ARRAY_DIMENSIONS")  # zarr v2, as xarray writes it
    return None if names is None else tuple(str(n) for n in names)


def _array_row(path: str, array: Any) -> tuple[str, str, str, str, str]:
    dims = _dims(array)
    shape = (
        "(" + ", ".join(f"{d}: {n}" for d, n in zip(dims, array.shape, strict=True)) + ")"
        if dims is not None and len(dims) == len(array.shape)
        else str(tuple(array.shape))
    )
    dtype = str(array.dtype)
    if "scale_factor" in array.attrs or "add_offset" in array.attrs:
        dtype += " (packed)"
    nbytes = math.prod(array.shape) * array.dtype.itemsize
    chunks = "chunks " + str(tuple(array.chunks)) if array.chunks else ""
    return path, shape, dtype, chunks, format_bytes(nbytes)


def _arrays(repo: Repository, branch: str) -> list[str]:
    try:
        root = zarr.open_group(repo.readonly_session(branch).store, mode="r")
    except zarr.errors.GroupNotFoundError:  # a new repository: not even a root group yet
        return [f"arrays on {branch}: none"]
    members = sorted(
        (path, node) for path, node in root.members(max_depth=None) if isinstance(node, zarr.Array)
    )
    if not members:
        return [f"arrays on {branch}: none"]
    rows = [_array_row(path, node) for path, node in members]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [f"arrays on {branch} ({len(rows)}; sizes uncompressed):"]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)]
        lines.append("  " + "  ".join([*cells, row[4]]).rstrip())
    for path, node in members:
        dims = _dims(node)
        if dims is not None and len(dims) == 1 and path.rsplit("/", 1)[-1] == dims[0]:
            lines.append(f"  {path} spans {_index_range(node, dims[0])}")
    return lines


def _containers(repo: Repository) -> list[str]:
    """The virtual chunk containers, one line each (none: no lines)."""
    containers = repo.config.virtual_chunk_containers or {}
    if not containers:
        return []
    lines = [f"virtual chunk containers ({len(containers)}):"]
    width = max(map(len, containers))
    for prefix in sorted(containers):
        lines.append(f"  {prefix.ljust(width)}  {describe_store(containers[prefix].store)}")
    return lines


def _stored(repo: Repository) -> list[str]:
    stats = repo.chunk_storage_stats()
    native, inlined = int(stats.native_bytes), int(stats.inlined_bytes)
    virtual = int(stats.virtual_bytes)
    parts = [f"native {format_bytes(native)}", f"inlined {format_bytes(inlined)}"]
    if virtual:
        parts.append(f"virtual {format_bytes(virtual)}")
    total = format_bytes(native + inlined + virtual)
    return [f"stored chunks (all branches and tags): {total} ({', '.join(parts)})"]


def _runs(repo: Repository) -> list[str]:
    runs = list_runs(repo)
    if not runs:
        return ["unfinished runs: none"]
    lines = [f"unfinished runs ({len(runs)}):"]
    for run in runs:
        state = (
            "complete, not published yet"
            if run.complete
            else f"{run.n_done}/{run.n_regions} region(s) written"
        )
        target = f" -> {run.branch}" if run.branch else ""
        started = f", started {run.started}" if run.started else ""
        updated = run.updated.strftime("%Y-%m-%d %H:%M:%S %Z").strip()
        lines.append(f"  {run.run_id}{target}: {state}{started}, last checkpoint {updated}")
    lines.append(
        "  (rerun a run with the same run_id / --run-id to finish it, or drop it with "
        "icechunk_distributed.remove_run(repo, run_id))"
    )
    return lines


def describe_repository(
    repo: Repository,
    *,
    branch: str = "main",
    n_commits: int = 5,
    stored_sizes: bool = True,
) -> str:
    """A summary of a repository for a person: what ``icechunk-distributed info`` prints.

    Parameters
    ----------
    repo : icechunk.Repository
        The repository.
    branch : str, default "main"
        The branch whose commits and arrays are shown.
    n_commits : int, default 5
        How many of the branch's latest commits to list.
    stored_sizes : bool, default True
        Also report the bytes all chunks take in storage. That walks every manifest reachable
        from a branch or tag, the one step whose cost grows with the repository.

    Returns
    -------
    str
        Several lines: branches (and tags), the last commits on ``branch`` (id, UTC time,
        message), every array with its dimensions, dtype, chunks and uncompressed size, the
        range of each index coordinate, the virtual chunk containers (if any), stored sizes,
        and unfinished resumable runs.

    Raises
    ------
    ValueError
        If ``branch`` does not exist (the message lists the branches), or ``n_commits`` is
        negative.
    """
    if not isinstance(n_commits, int) or isinstance(n_commits, bool) or n_commits < 0:
        raise ValueError(f"n_commits must be a non-negative int, not {n_commits!r}")
    check_branch(repo, branch)
    lines = _branches(repo)
    if n_commits:
        lines += _commits(repo, branch, n_commits)
    lines += _arrays(repo, branch)
    lines += _containers(repo)
    if stored_sizes:
        lines += _stored(repo)
    lines += _runs(repo)
    return "\n".join(lines)
