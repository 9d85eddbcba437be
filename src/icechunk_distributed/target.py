"""The target as it is: what a group of the store holds, and whether a write may go there.

:func:`check_store` applies ``Dataset.to_zarr``'s rules for each mode before anything is
written (create only, overwrite, append, add variables, write into existing arrays), places a
``region=`` write (:func:`resolve_region`, explicit or by labels) and refuses index labels
that differ from the stored ones where the write overlaps them (:func:`check_labels`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import xarray as xr

from icechunk_distributed.errors import InvalidRegionError, TemplateMismatchError
from icechunk_distributed.planning import Region, check_slice, format_region
from icechunk_distributed.template import Mode

__all__ = [
    "StoreCheck",
    "StoreState",
    "appendable",
    "check_labels",
    "check_store",
    "read_store",
    "resolve_region",
]


@dataclass
class StoreState:
    """What a group of the store holds, as far as a write into it cares.

    Attributes
    ----------
    dataset : xarray.Dataset
        The group opened by xarray (lazy, index coordinates in memory).
    units : dict
        Each array's write unit (shard, else chunk) per dimension.
    dims : dict
        Each array's dimension names.
    """

    dataset: xr.Dataset
    units: dict[str, dict[str, int]]
    dims: dict[str, tuple[str, ...]]

    @property
    def sizes(self) -> dict[str, int]:
        """Dimension sizes in the store."""
        return {str(d): int(n) for d, n in self.dataset.sizes.items()}


def read_store(store: Any, group: str | None) -> StoreState | None:
    """The group's arrays and index coordinates (None if the group does not exist)."""
    import zarr

    try:
        zgroup = zarr.open_group(store, path=group or "", mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
        return None
    arrays = dict(zgroup.arrays())
    if not arrays:
        return StoreState(xr.Dataset(), {}, {})
    try:
        dataset = xr.open_zarr(store, group=group, consolidated=False, chunks=None)
    except (KeyError, ValueError) as exc:
        raise TemplateMismatchError(
            f"group {group or '/'!r} cannot be read as an xarray Dataset ({exc}); writing into "
            "it needs arrays written by xarray (with dimension names)"
        ) from exc
    units, dims = {}, {}
    for name, array in arrays.items():
        if name not in dataset.variables:
            continue
        var_dims = tuple(str(d) for d in dataset[name].dims)
        grid = array.shards or array.chunks
        units[name] = {d: int(c) for d, c in zip(var_dims, grid, strict=True)}
        dims[name] = var_dims
    return StoreState(dataset, units, dims)


def resolve_region(
    region: Mapping[str, Any] | Literal["auto"],
    template: xr.Dataset,
    state: StoreState,
) -> dict[str, slice]:
    """``to_zarr(region=...)`` semantics: explicit slices checked, ``"auto"`` from labels.

    Parameters
    ----------
    region : dict or "auto"
        ``{dim: slice}`` (step 1, integer bounds within the stored size) or ``"auto"`` (per
        dimension or for all), found from the index coordinates' labels in the store.
    template : xarray.Dataset
        What is written.
    state : StoreState
        The store.

    Returns
    -------
    dict
        ``{dim: slice(start, stop)}`` with integer bounds, for the source's dims listed.
    """
    if isinstance(region, str):
        if region != "auto":
            raise InvalidRegionError(f"region must be a dict of slices or 'auto', not {region!r}")
        region = {str(d): "auto" for d in template.dims}
    if not isinstance(region, Mapping):
        raise InvalidRegionError(
            f"region must be a dict {{dim: slice}} or 'auto', not {type(region).__name__}"
        )
    stored = state.sizes
    out: dict[str, slice] = {}
    for dim, value in region.items():
        dim = str(dim)
        if dim not in template.dims:
            raise InvalidRegionError(
                f"region names dimension {dim!r}, which the dataset does not have "
                f"(dimensions: {list(template.dims)})"
            )
        if dim not in stored:
            raise InvalidRegionError(
                f"region names dimension {dim!r}, which the store does not have "
                f"(dimensions in the store: {list(stored)})"
            )
        size = int(template.sizes[dim])
        if isinstance(value, str) and value == "auto":
            out[dim] = _auto_region(dim, template, state)
            continue
        check_slice(f"region[{dim!r}]", value, stored[dim])
        start = 0 if value.start is None else int(value.start)
        stop = stored[dim] if value.stop is None else int(value.stop)
        if not start < stop <= stored[dim]:
            raise InvalidRegionError(
                f"region[{dim!r}] = {start}:{stop} is empty or outside the stored dimension "
                f"({dim!r} has size {stored[dim]} in the store)"
            )
        if stop - start != size:
            raise InvalidRegionError(
                f"region[{dim!r}] = {start}:{stop} holds {stop - start} elements, the dataset "
                f"has {size} along {dim!r}"
            )
        out[dim] = slice(start, stop)
    return out


def _auto_region(dim: str, template: xr.Dataset, state: StoreState) -> slice:
    size = int(template.sizes[dim])
    if dim not in template.indexes or dim not in state.dataset.indexes:
        return slice(0, size)  # an unindexed dimension: from the start, as xarray places it
    index = pd.Index(state.dataset.indexes[dim])
    positions = index.get_indexer(template.indexes[dim])
    if (positions < 0).any():
        missing = np.asarray(template.indexes[dim])[positions < 0]
        raise InvalidRegionError(
            f"region='auto': {int((positions < 0).sum())} value(s) of {dim!r} are not in the "
            f"store (first: {missing[0]!r}); a region write cannot add labels. Append them "
            "with mode='a', append_dim=..."
        )
    if (np.diff(positions) != 1).any():
        raise InvalidRegionError(
            f"region='auto': the values of {dim!r} are not one contiguous, ordered run of the "
            "store's; a region write needs a contiguous block"
        )
    return slice(int(positions[0]), int(positions[-1]) + 1)


def check_labels(
    template: xr.Dataset,
    state: StoreState,
    offsets: Mapping[str, int],
    *,
    skip: Sequence[str] = (),
) -> None:
    """Refuse a write whose index labels differ from the stored ones where they overlap.

    ``offsets`` place the dataset in the stored arrays; ``skip`` names dims with no overlap
    (the append dim). Without this, data shifted by one step would land under the old labels.
    """
    for dim, index in template.indexes.items():
        dim = str(dim)
        if dim in skip or dim not in state.dataset.indexes:
            continue
        o = int(offsets.get(dim, 0))
        stored = state.dataset.indexes[dim]
        mine = np.asarray(index)
        theirs = np.asarray(stored[o : o + len(mine)])
        if len(theirs) != len(mine):
            raise TemplateMismatchError(
                f"the dataset's {dim!r} has {len(mine)} labels, the store holds "
                f"{len(stored)} from position {o}: they do not fit"
            )
        same = theirs == mine
        if theirs.dtype.kind in "fc":
            same |= pd.isnull(theirs) & pd.isnull(mine)
        if not np.all(same):
            first = int(np.flatnonzero(~np.asarray(same))[0])
            raise TemplateMismatchError(
                f"the dataset's {dim!r} labels differ from the store's at position "
                f"{o + first}: {mine[first]!r} here, {theirs[first]!r} in the store. Writing "
                "would put the new data under the old labels. Use region='auto' to place the "
                "data by its labels, or mode='a' with append_dim to add new ones."
            )


def appendable(stored: np.dtype[Any], new: np.dtype[Any]) -> bool:
    """Whether data of dtype ``new`` may be written into an array holding ``stored``.

    xarray's rule: numbers, times, bools and objects are cast by the stored encoding;
    fixed-width strings must match exactly (or go into an object array), or they would be
    truncated.
    """
    if new.kind in "iufcmMbO" or (new.kind in "SU" and stored.kind == "O"):
        return True
    return bool(new == stored) or (new.kind in "OT" and stored.kind in "OT")


@dataclass
class StoreCheck:
    """What :func:`check_store` found: where the write goes among the stored arrays.

    Attributes
    ----------
    offsets : dict
        Where the source starts in the stored arrays, per dimension (region or append).
    units : dict
        The stored write units (shard, else chunk) of the data variables that exist.
    placed : dict
        The resolved ``region=`` (empty without one).
    existing : tuple of str
        The template's variables already in the store.
    stored_dims : dict
        Their dimension order in the store.
    """

    offsets: dict[str, int] = field(default_factory=dict)
    units: dict[str, dict[str, int]] = field(default_factory=dict)
    placed: Region = field(default_factory=dict)
    existing: tuple[str, ...] = ()
    stored_dims: dict[str, tuple[str, ...]] = field(default_factory=dict)


def check_store(
    store: Any,
    template: xr.Dataset,
    *,
    group: str | None,
    mode: Mode,
    append_dim: str | None,
    region: Mapping[str, slice] | Literal["auto"] | None,
    encoding: Mapping[str, Any],
) -> StoreCheck:
    """Check the store against the mode, as ``Dataset.to_zarr`` would; nothing is written.

    Parameters
    ----------
    store : zarr store
        The target as the plan must see it.
    template : xarray.Dataset
        What is written.
    group, mode, append_dim, region, encoding
        As given to :func:`~icechunk_distributed.run_region_writes` (``encoding`` checked).

    Returns
    -------
    StoreCheck
        Offsets, units and placement of the write.

    Raises
    ------
    TemplateMismatchError
        The mode does not allow this write into what the store holds.
    """
    names = [str(n) for n in template.variables]
    where = f"group {group or '/'!r}"
    if mode == "w":
        return StoreCheck()
    state = read_store(store, group)
    present = [] if state is None else [n for n in names if n in state.units]
    if mode == "w-":
        _check_create(state, present, where)
        return StoreCheck()
    if state is None:
        if mode == "r+" or append_dim is not None:
            raise TemplateMismatchError(
                f"mode={mode!r} writes into existing arrays, but {where} does not "
                "exist; use mode='w-' to create it"
            )
        return StoreCheck()
    if mode == "r+" or region is not None:
        missing = [n for n in names if n not in state.units]
        if missing:
            raise TemplateMismatchError(
                f"variable {missing[0]!r} is not in the store ({where}); mode='r+' and "
                "region= only write into existing arrays. Use mode='a' without region= "
                "to add variables."
            )
    given = sorted(set(encoding) & set(present))
    if given:
        raise ValueError(
            f"encoding= given for {given}, which already exist in the store: their "
            "encoding is the stored one and cannot change (as in Dataset.to_zarr). "
            "Drop those entries, or rewrite them with mode='w'."
        )
    if append_dim is not None and append_dim not in state.sizes:
        raise TemplateMismatchError(
            f"append_dim {append_dim!r} is not a dimension of the arrays in {where} "
            f"(dimensions: {sorted(state.sizes)})"
        )
    found = StoreCheck(existing=tuple(present))
    if region is not None:
        found.placed = _place_region(region, template, state)
        found.offsets = {d: s.start for d, s in found.placed.items()}
    elif append_dim is not None:
        found.offsets = {append_dim: state.sizes[append_dim]}
    for name in present:
        found.stored_dims[name] = _check_existing(
            name, template[name], state, skip={append_dim or "", *found.placed}
        )
    check_labels(template, state, found.offsets, skip=[append_dim or ""])
    found.units = {n: state.units[n] for n in present if n in template.data_vars}
    return found


def _check_create(state: StoreState | None, present: list[str], where: str) -> None:
    """mode='w-': nothing may exist yet."""
    if present:
        raise TemplateMismatchError(
            f"{where} already holds {sorted(present)}; mode='w-' only creates. Use "
            "mode='w' to overwrite, 'r+' to write into them, or 'a' to append."
        )
    if state is not None:
        raise TemplateMismatchError(
            f"{where} already exists; mode='w-' only creates a new group (as in "
            "Dataset.to_zarr). Use mode='a' to add variables to it, or mode='w' to "
            "replace it."
        )


def _place_region(
    region: Mapping[str, slice] | Literal["auto"], template: xr.Dataset, state: StoreState
) -> Region:
    """Resolve ``region=``; every variable must have one of its dimensions."""
    placed = resolve_region(region, template, state)
    loose = [
        str(n) for n, v in template.variables.items() if not set(placed) & set(map(str, v.dims))
    ]
    if loose:
        raise TemplateMismatchError(
            f"with region={format_region(placed)}, every variable must have one of its "
            f"dimensions (as in Dataset.to_zarr); {loose} do not. Drop them: "
            f"ds.drop_vars({loose!r})"
        )
    return placed


def _check_existing(
    name: str, var: xr.DataArray, state: StoreState, *, skip: set[str]
) -> tuple[str, ...]:
    """An existing variable: same dims, a dtype it can take, same sizes outside ``skip``."""
    dims = state.dims[name]
    if set(map(str, var.dims)) != set(dims):
        raise TemplateMismatchError(f"{name!r}: the store has dims {dims}, the dataset {var.dims}")
    stored_dtype = state.dataset[name].dtype
    if not appendable(stored_dtype, var.dtype):
        raise TemplateMismatchError(
            f"{name!r}: the store holds {stored_dtype}, the dataset {var.dtype}; "
            "fixed-width strings and bytes must keep their exact dtype (as in "
            "Dataset.to_zarr). Cast the variable, or rewrite it with mode='w'."
        )
    for dim in dims:
        if dim not in skip and state.sizes[dim] != var.sizes[dim]:
            raise TemplateMismatchError(
                f"{name!r}: size along {dim!r} is {state.sizes[dim]} in the store and "
                f"{var.sizes[dim]} in the dataset. Write part of the arrays with "
                "region={...} or region='auto' (mode='r+')."
            )
    return dims
