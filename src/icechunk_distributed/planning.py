"""Planning and validating regions: chunk-aligned, disjoint, covering, checked up front.

A *region* is a ``dict[str, slice]`` over some dimensions (the *region dims*). A region write is
safe when every zarr chunk (every shard, for sharded arrays) is written by exactly one task:
region edges must fall on chunk boundaries of every variable the tasks write, regions must not
overlap, and a variable that lacks one of the region dims must not be split along it.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from icechunk_distributed.errors import InvalidRegionError
from icechunk_distributed.sequences import ListLike

__all__ = [
    "Picked",
    "Region",
    "TiledRegions",
    "WritePlan",
    "build_plan",
    "check_slice",
    "default_region_dims",
    "dims_of_regions",
    "format_region",
    "parse_bytes",
    "validate_regions",
]

Region = dict[str, slice]

DEFAULT_TASK_BYTES = 64 * 2**20
"""Default work per task: large enough to amortise ~10 ms of per-task overhead, small enough
to spread over a few workers."""

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(size: str | int) -> int:
    """Parse a byte count such as ``"128MB"``, ``"1 GiB"`` or ``1000``.

    Parameters
    ----------
    size : str or int
        The size.

    Returns
    -------
    int
        Bytes.
    """
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", size)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot parse {size!r} as a size; use e.g. '128MB', '1GiB' or 1000")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


class TiledRegions(ListLike[Region]):
    """The plan's own regions: a grid of tiles, held as each dim's tile bounds.

    A region (a dict) is made when asked for: a million regions cost a few MB, not the
    ~300 bytes each of a list of dicts. Regions are numbered in C order of the tile grid
    (the last region dim varies fastest), as before.
    """

    def __init__(self, dims: Sequence[str], bounds: Sequence[np.ndarray]) -> None:
        self.dims = tuple(dims)
        self._starts = [b[:, 0].tolist() for b in bounds]
        self._stops = [b[:, 1].tolist() for b in bounds]
        self._shape = tuple(len(b) for b in bounds)
        self._n = math.prod(self._shape)

    def __len__(self) -> int:
        return self._n

    def _item(self, k: int) -> Region:
        at = [0] * len(self._shape)
        for d in range(len(self._shape) - 1, -1, -1):
            k, at[d] = divmod(k, self._shape[d])
        return self._region(at)

    def __iter__(self) -> Iterator[Region]:
        for at in np.ndindex(*self._shape):
            yield self._region(at)

    def _region(self, at: Sequence[int]) -> Region:
        """The region of the tile at grid position ``at``."""
        return {
            d: slice(self._starts[k][j], self._stops[k][j])
            for k, (d, j) in enumerate(zip(self.dims, at, strict=True))
        }

    def splits(self, dim: str, size: int) -> bool:
        """Whether the regions split ``dim`` (of ``size``): not all of them span it whole."""
        if dim not in self.dims:
            return False
        k = self.dims.index(dim)
        return self._n > 0 and (
            self._shape[k] > 1 or (self._starts[k][0], self._stops[k][0]) != (0, size)
        )

    def __repr__(self) -> str:
        return f"<TiledRegions: {len(self)} over {list(self.dims)}>"


class Picked(ListLike[Region]):
    """The regions at ``indices`` of ``regions``, looked up when asked for."""

    def __init__(self, regions: Sequence[Region], indices: Sequence[int]) -> None:
        self.regions, self.indices = regions, indices

    def __len__(self) -> int:
        return len(self.indices)

    def _item(self, k: int) -> Region:
        return self.regions[self.indices[k]]


@dataclass(frozen=True)
class WritePlan:
    """What the tasks write: variables, their chunk grids, and the regions.

    Attributes
    ----------
    region_dims : tuple of str
        Dimensions the regions split.
    sizes : dict
        Size of every dimension in the source (the part being written).
    offsets : dict
        Where the source starts in the target arrays (along ``append_dim``, and along the
        dims a ``region=`` places).
    units : dict
        For each variable written by tasks, its write unit (shard or chunk) per dimension.
    regions : sequence of dict
        The regions, in source coordinates (a :class:`TiledRegions` for the plan's own).
    """

    region_dims: tuple[str, ...]
    sizes: dict[str, int]
    offsets: dict[str, int]
    units: dict[str, dict[str, int]]
    dims: dict[str, tuple[str, ...]]
    itemsizes: dict[str, int]
    regions: Sequence[Region] = field(default_factory=list)

    @property
    def n_chunks(self) -> int:
        """Total write units (chunks or shards) the tasks write."""
        return sum(self.chunks_in(r) for r in self.regions)

    def chunks_in(self, region: Region) -> int:
        """Write units (chunks or shards) of every variable that ``region`` covers."""
        total = 0
        for var, units in self.units.items():
            n = 1
            for dim in self.dims[var]:
                start, stop = _bounds(region.get(dim), self.sizes[dim])
                o, u = self.offsets.get(dim, 0), units[dim]
                n *= (o + stop + u - 1) // u - (o + start) // u
            total += n
        return total

    def bytes_in(self, region: Region) -> int:
        """Uncompressed bytes of every variable inside ``region``."""
        total = 0
        for var, dims in self.dims.items():
            n = self.itemsizes[var]
            for dim in dims:
                start, stop = _bounds(region.get(dim), self.sizes[dim])
                n *= stop - start
            total += n
        return total

    def absolute(self, region: Region) -> Region:
        """``region`` shifted into target-array coordinates (by ``offsets``)."""
        if not self.offsets and all(
            type(s) is slice and s.start is not None and s.stop is not None for s in region.values()
        ):
            return dict(region)  # nothing to shift or fill in (most writes)
        out = {}
        # Dims placed by an offset (append, region=) are shifted even where tasks do not split.
        for dim in {**dict.fromkeys(region), **dict.fromkeys(self.offsets)}:
            o = self.offsets.get(dim, 0)
            start, stop = _bounds(region.get(dim), self.sizes[dim])
            out[dim] = slice(start + o, stop + o)
        return out


def _bounds(s: slice | None, size: int) -> tuple[int, int]:
    if s is None:
        return 0, size
    start = 0 if s.start is None else s.start
    stop = size if s.stop is None else s.stop
    return start, stop


def _allowed_edges(size: int, offset: int, units: Sequence[int]) -> np.ndarray:
    """Positions 0..size where a region may start or stop, for every unit in ``units``."""
    ok = np.ones(size + 1, dtype=bool)
    positions = np.arange(size + 1) + offset
    for u in units:
        ok &= positions % u == 0
    ok[0] = ok[size] = True  # the write's own edges: only one task touches those chunks
    return ok


def default_region_dims(
    dims: Mapping[str, Sequence[str]],
    units: Mapping[str, Mapping[str, int]],
    sizes: Mapping[str, int],
) -> tuple[str, ...]:
    """Dimensions along which some variable has several write units (in variable order)."""
    out: list[str] = []
    for var, var_dims in dims.items():
        for dim in var_dims:
            if units[var][str(dim)] < sizes[str(dim)] and dim not in out:
                out.append(str(dim))
    return tuple(out)


def dims_of_regions(regions: Sequence[Mapping[str, Any]], order: Sequence[str]) -> tuple[str, ...]:
    """The dims explicit ``regions`` name: in ``order``, then any others (sorted)."""
    keys = {str(d) for r in regions for d in r}
    return tuple([d for d in order if d in keys] + sorted(keys - set(order)))


def build_plan(
    *,
    dims: Mapping[str, tuple[str, ...]],
    units: Mapping[str, Mapping[str, int]],
    itemsizes: Mapping[str, int],
    sizes: Mapping[str, int],
    offsets: Mapping[str, int] | None = None,
    region_dims: Sequence[str] | None = None,
    regions: Sequence[Mapping[str, slice]] | None = None,
    task_size: int | str | None = None,
    parallelism: int | None = None,
    require_cover: bool = True,
    max_task_bytes: int | None = None,
) -> WritePlan:
    """Plan (or validate explicit) regions for variables with the given dims and write units."""
    offsets = dict(offsets or {})
    if region_dims is None:
        if regions:
            region_dims = dims_of_regions(regions, list(sizes))
        else:
            region_dims = default_region_dims(dims, units, sizes)
    region_dims = tuple(region_dims)
    for dim in region_dims:
        if dim not in sizes:
            raise InvalidRegionError(
                f"unknown region dimension {dim!r}; the dataset's dimensions are {list(sizes)}"
            )
    plan = WritePlan(
        region_dims=region_dims,
        sizes=dict(sizes),
        offsets=offsets,
        units={k: dict(v) for k, v in units.items()},
        dims=dict(dims),
        itemsizes=dict(itemsizes),
    )
    if regions is None:
        plan = replace(plan, regions=_plan(plan, task_size, parallelism, max_task_bytes))
        # Tiles of allowed edges: aligned, disjoint and covering by construction, so only
        # the checks that do not look at each region (a region costs microseconds, and a
        # plan may have millions; test_planning checks the tiling).
        validate_regions(plan, require_cover=require_cover, each=False)
    else:
        for i, region in enumerate(regions):
            _check_raw_region(i, region, sizes)
        explicit = [{k: slice(*_bounds(v, sizes.get(k, 0))) for k, v in r.items()} for r in regions]
        plan = replace(plan, regions=explicit)
        validate_regions(plan, require_cover=require_cover)
    return plan


def check_slice(where: str, value: Any, size: int | str) -> None:
    """Raise :class:`InvalidRegionError` unless ``value`` is a region slice ``to_zarr`` takes.

    Integer (or None) bounds, not negative, step 1. ``where`` names the slice in the message
    (``"region['time']"``); ``size`` is the dimension's, for the hint.
    """
    if not isinstance(value, slice):
        raise InvalidRegionError(
            f"{where} must be a slice(start, stop) with integer bounds and step 1, not "
            f"{type(value).__name__} ({value!r:.60})"
        )
    if value.step not in (None, 1):
        raise InvalidRegionError(
            f"{where} = {value} has step {value.step}; only step 1 is allowed (a region is "
            "a contiguous block, as in Dataset.to_zarr)"
        )
    for bound in (value.start, value.stop):
        if bound is None:
            continue
        if isinstance(bound, bool) or not isinstance(bound, int | np.integer):
            raise InvalidRegionError(
                f"{where} = {value}: bounds must be integers (positions, not labels), not "
                f"{type(bound).__name__}"
            )
        if bound < 0:
            raise InvalidRegionError(
                f"{where} = {value}: negative bounds are not allowed; give positions from 0 "
                f"to {size}"
            )


def _check_raw_region(i: int, region: Mapping[str, Any], sizes: Mapping[str, int]) -> None:
    """An explicit task region is ``{dim: slice}``, each slice as :func:`check_slice` wants."""
    if not isinstance(region, Mapping):
        raise InvalidRegionError(
            f"region #{i} must be a dict {{dim: slice}}, not {type(region).__name__}"
        )
    for dim, value in region.items():
        check_slice(f"region #{i}: {dim!r}", value, sizes.get(dim, "?"))


def _plan(
    plan: WritePlan,
    task_size: int | str | None,
    parallelism: int | None,
    max_task_bytes: int | None = None,
) -> Sequence[Region]:
    # Units along each region dim: intervals between edges allowed for every variable.
    edges: dict[str, np.ndarray] = {}
    for dim in plan.region_dims:
        var_units = [u[dim] for v, u in plan.units.items() if dim in plan.dims[v]]
        ok = _allowed_edges(plan.sizes[dim], plan.offsets.get(dim, 0), var_units)
        edges[dim] = np.flatnonzero(ok)
    n_units = {dim: len(e) - 1 for dim, e in edges.items()}
    total_units = math.prod(n_units.values()) if n_units else 1
    if total_units == 0:
        return []  # nothing to write
    whole = {dim: slice(0, plan.sizes[dim]) for dim in plan.region_dims}
    unit_bytes = max(1, plan.bytes_in(whole) // total_units)
    if isinstance(task_size, int) and not isinstance(task_size, bool):
        if task_size < 1:
            raise ValueError(f"task_size must be at least 1 chunk, got {task_size}")
        per_task = task_size
    else:
        target = DEFAULT_TASK_BYTES if task_size is None else parse_bytes(task_size)
        per_task = max(1, target // unit_bytes)
        if task_size is None:
            # Keep every worker busy (4 tasks each) before making tasks bigger.
            workers = parallelism or os.cpu_count() or 1
            per_task = max(1, min(per_task, math.ceil(total_units / (4 * workers))))
        if max_task_bytes:
            # The engine ships each task's data within a size limit (Lithops' data_limit).
            per_task = max(1, min(per_task, max_task_bytes // unit_bytes))
    # Block of units per task, filling the last region dim first (contiguous in C order).
    block: dict[str, int] = {}
    remaining = per_task
    for dim in reversed(plan.region_dims):
        block[dim] = max(1, min(n_units[dim], remaining))
        remaining = max(1, remaining // block[dim])
    # Each dim's tiles: blocks of units, the last one possibly shorter.
    bounds = []
    for dim in plan.region_dims:
        first = np.arange(0, n_units[dim], block[dim])
        last = np.minimum(first + block[dim], n_units[dim])
        bounds.append(np.stack([edges[dim][first], edges[dim][last]], axis=1).astype(np.int64))
    return TiledRegions(plan.region_dims, bounds)


def validate_regions(plan: WritePlan, *, require_cover: bool = True, each: bool = True) -> None:
    """Check the plan's regions; raise :class:`InvalidRegionError` naming what is wrong.

    Parameters
    ----------
    plan : WritePlan
        The plan whose ``regions`` to check.
    require_cover : bool
        Whether the regions must cover the whole extent of the region dims.
    each : bool
        Check each region's bounds and alignment, and that they are disjoint and cover
        the extent (False for the plan's own tiling, which is so by construction).
    """
    sizes, offsets = plan.sizes, plan.offsets
    for i, region in enumerate(plan.regions if each else ()):
        for dim, s in region.items():
            if dim not in plan.region_dims:
                raise InvalidRegionError(
                    f"region #{i} names dimension {dim!r}, which is not a region dimension "
                    f"({list(plan.region_dims)}) of the dataset (dimensions: {list(sizes)})"
                )
            if s.step not in (None, 1):
                raise InvalidRegionError(f"region #{i}: slice for {dim!r} has a step ({s})")
            start, stop = _bounds(s, sizes[dim])
            if not 0 <= start < stop <= sizes[dim]:
                raise InvalidRegionError(
                    f"region #{i}: {dim}={start}:{stop} is empty or out of bounds "
                    f"(dimension {dim!r} has size {sizes[dim]})"
                )
            for var, units in plan.units.items():
                if dim not in plan.dims[var]:
                    continue
                u, o = units[dim], offsets.get(dim, 0)
                for edge in (start, stop):
                    if edge not in (0, sizes[dim]) and (edge + o) % u:
                        where = f"offset {edge}" + (f" (array index {edge + o})" if o else "")
                        raise InvalidRegionError(
                            f"region #{i}: {dim}={start}:{stop} is not aligned with the "
                            f"chunks of {var!r}: {where} is not a multiple of its chunk size "
                            f"{u} along {dim!r}. Region edges must fall on chunk (or shard) "
                            "boundaries, or several tasks would write the same chunk."
                        )
    if not plan.regions:
        return
    # A variable without one of the region dims is written whole by every task that touches
    # it: splitting along that dim would make several tasks write its chunks.
    for var, var_dims in plan.dims.items():
        for dim in plan.region_dims:
            if dim in var_dims:
                continue
            if isinstance(plan.regions, TiledRegions):  # without a dict per region
                split = plan.regions.splits(dim, sizes[dim])
            else:
                split = any(
                    _bounds(r.get(dim), sizes[dim]) != (0, sizes[dim]) for r in plan.regions
                )
            if split:
                raise InvalidRegionError(
                    f"variable {var!r} has no dimension {dim!r}, but the regions split {dim!r}: "
                    f"every task would write all of {var!r}. Leave {dim!r} out of region_dims, "
                    f"or write {var!r} separately."
                )
    if each:
        _check_disjoint_cover(plan, require_cover)


def _check_disjoint_cover(plan: WritePlan, require_cover: bool) -> None:
    dims = plan.region_dims
    boxes = np.array(
        [[_bounds(r.get(d), plan.sizes[d]) for d in dims] for r in plan.regions], dtype=np.int64
    ).reshape(len(plan.regions), len(dims), 2)
    breaks = [np.unique(np.concatenate([boxes[:, k, 0], boxes[:, k, 1]])) for k in range(len(dims))]
    cells = math.prod(len(b) - 1 for b in breaks)
    if cells <= 20_000_000:
        counts = np.zeros([len(b) - 1 for b in breaks], dtype=np.int32)
        idx = [np.searchsorted(breaks[k], boxes[:, k, :]) for k in range(len(dims))]
        for i in range(len(plan.regions)):
            counts[tuple(slice(idx[k][i, 0], idx[k][i, 1]) for k in range(len(dims)))] += 1
        if (counts > 1).any():
            _raise_overlap(plan, boxes)
        if require_cover and dims:
            covered = all(
                b[0] == 0 and b[-1] == plan.sizes[d] for b, d in zip(breaks, dims, strict=True)
            )
            if not covered or (counts == 0).any():
                cell = np.argwhere(counts == 0)
                where = (
                    ", ".join(f"{d}={breaks[k][cell[0][k]]}" for k, d in enumerate(dims))
                    if len(cell)
                    else ", ".join(f"{d} 0:{plan.sizes[d]}" for d in dims)
                )
                raise InvalidRegionError(
                    f"the regions do not cover the whole dataset (first gap at {where}); "
                    "unwritten parts would read as fill values. Cover every region-dimension "
                    "index once, or use mode='r+' to update part of existing arrays."
                )
    else:  # pragma: no cover - only for huge irregular explicit region lists
        _raise_overlap(plan, boxes, exhaustive=True)


def _raise_overlap(plan: WritePlan, boxes: np.ndarray, exhaustive: bool = False) -> None:
    for i in range(len(boxes)):
        rest = boxes[i + 1 :]
        hit = np.all((rest[:, :, 0] < boxes[i, :, 1]) & (boxes[i, :, 0] < rest[:, :, 1]), axis=1)
        if hit.any():
            j = i + 1 + int(np.flatnonzero(hit)[0])
            raise InvalidRegionError(
                f"regions #{i} ({format_region(plan.regions[i])}) and "
                f"#{j} ({format_region(plan.regions[j])}) overlap: both would write the same "
                "chunks. Make the regions disjoint."
            )
    if not exhaustive:  # pragma: no cover - counts said there was an overlap
        raise AssertionError("overlap not found")


def format_region(region: Mapping[str, slice]) -> str:
    """``time=0:6, y=0:3`` (``everything`` for the empty region)."""
    return ", ".join(f"{d}={s.start}:{s.stop}" for d, s in region.items()) or "everything"
