"""What to write: the template, its encodings decided once by xarray, and the store's checks.

``Dataset.to_zarr`` decides every encoding (chunks, dtype, units and calendar of times, fill
values, scale/offset, strings, codecs) from the *whole* dataset. A parallel write must decide
them once, the same way, before any task runs; tasks then only apply them. This module makes
those decisions with xarray's own machinery:

- :func:`decide_encodings` takes each variable's encoding as ``to_zarr`` takes it (the
  explicit one replaces the variable's own) and makes the chunks ``to_zarr`` would choose
  explicit, so that a numpy variable can be replaced by a lazy stand-in;
- :func:`metadata_dataset` builds that stand-in dataset, and :func:`write_metadata` hands it
  to ``Dataset.to_zarr(compute=False)``: xarray validates modes, regions and encodings,
  creates or grows the arrays, and writes coordinates and the coordinator's variables
  (everything in memory) itself; the task variables' data are never computed there. Numpy
  time variables, whose units xarray infers from all their values, stay with the
  coordinator for that reason;
- :func:`stored_encodings` reads the encodings back from the store, as xarray does before a
  region write, and :func:`task_encoding` gives the tasks what to encode their pieces with.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import xarray as xr

from icechunk_distributed.errors import InvalidRegionError, TemplateMismatchError
from icechunk_distributed.planning import check_slice, default_region_dims

__all__ = [
    "MODES",
    "Mode",
    "StoreState",
    "TemplateInfo",
    "decide_encodings",
    "describe_template",
    "is_time_like",
    "metadata_dataset",
    "normalise_chunks",
    "pinned_chunks",
    "read_store",
    "resolve_region",
    "stored_encodings",
    "task_encoding",
    "write_metadata",
]

Mode = Literal["w-", "w", "a", "a-", "r+"]
MODES: tuple[Mode, ...] = ("w-", "w", "a", "a-", "r+")


# ---------------------------------------------------------------------------------------------
# Encodings xarray would derive from the data


def normalise_chunks(chunks: Any, var: xr.Variable) -> dict[str, int] | None:
    """``chunks``/``shards`` as given in an encoding, as ``{dim: size}`` (None if unusable)."""
    if chunks is None or isinstance(chunks, str):
        return None
    if isinstance(chunks, int):
        chunks = (chunks,) * var.ndim
    if isinstance(chunks, Mapping):
        chunks = tuple(chunks.get(d, var.sizes[d]) for d in var.dims)
    chunks = tuple(chunks)
    if len(chunks) != var.ndim:
        return None
    return {
        str(d): max(1, int(var.sizes[d] if c in (None, -1) else c))
        for d, c in zip(var.dims, chunks, strict=True)
    }


def _is_lazy(var: xr.Variable) -> bool:
    return var.chunks is not None


def _encode(var: xr.Variable, name: str, encoding: Mapping[str, Any]) -> xr.Variable:
    from xarray.backends.zarr import encode_zarr_variable

    var = var.copy(deep=False)
    var.encoding = dict(encoding)
    encoded: xr.Variable = encode_zarr_variable(var, name=name, zarr_format=3)
    return encoded


def _zarr_default_chunks(
    var: xr.Variable, name: str, encoding: Mapping[str, Any]
) -> tuple[int, ...]:
    """The chunks zarr picks when ``to_zarr`` creates ``var`` (numpy-backed) without any.

    xarray passes no chunks for a numpy variable and zarr guesses them from the shape and the
    *encoded* dtype; ask zarr the same question on an empty in-memory store.
    """
    import zarr
    from xarray.coding.strings import check_vlen_dtype

    probe = var[tuple(slice(0, 1) for _ in var.dims)]
    dtype: Any = _encode(probe, name, encoding).dtype
    if check_vlen_dtype(dtype) is str or np.dtype(dtype).kind == "O":  # type: ignore[no-untyped-call]
        dtype = str
    array = zarr.create_array(zarr.storage.MemoryStore(), shape=var.shape, dtype=dtype)
    return tuple(int(c) for c in array.chunks)


def is_time_like(var: xr.Variable) -> bool:
    """datetime64, timedelta64 or cftime values: their units are inferred from the data."""
    from xarray.core.common import contains_cftime_datetimes

    return var.dtype.kind in "mM" or (
        var.dtype == object and var.size > 0 and contains_cftime_datetimes(var)
    )


def pinned_chunks(var: xr.Variable, name: str, encoding: Mapping[str, Any]) -> dict[str, Any]:
    """The chunks ``to_zarr`` gives ``var`` without ``chunks``/``shards`` in ``encoding``.

    ``{"chunks": ...}`` (zarr's default for a numpy array, the first dask chunk along each
    dimension for a lazy one), or ``{}`` when the encoding sets them. Added to the encoding
    of a lazy stand-in for a numpy variable, it keeps the chunks what ``to_zarr`` would make.
    """
    if encoding.get("chunks") is not None or encoding.get("shards") is not None or not var.ndim:
        return {}
    if _is_lazy(var):
        assert var.chunks is not None
        return {"chunks": tuple(int(c[0]) if c else 0 for c in var.chunks)}
    return {"chunks": _zarr_default_chunks(var, name, encoding)}


# ---------------------------------------------------------------------------------------------
# Describing the template


@dataclass(frozen=True)
class TemplateInfo:
    """Which variables tasks write, along which dims, in which write units (chunks/shards).

    Attributes
    ----------
    region_dims : tuple of str
        Dimensions the regions split.
    sizes : dict
        Every dimension's size in the source.
    dims, units, itemsizes : dict
        For each variable the tasks write: its dims, its write unit per dim, its item size.
    all_units : dict
        The write units of every data variable.
    eager_vars : tuple of str
        Data variables the coordinator writes once (no region dim, or a single write unit
        along one: no two tasks could share them).
    """

    region_dims: tuple[str, ...]
    sizes: dict[str, int]
    dims: dict[str, tuple[str, ...]]
    units: dict[str, dict[str, int]]
    itemsizes: dict[str, int]
    all_units: dict[str, dict[str, int]]
    eager_vars: tuple[str, ...]


def units_of(var: xr.Variable, encoding: Mapping[str, Any]) -> dict[str, int]:
    """The write unit (shard, else chunk) of ``var`` along each of its dims."""
    for key in ("shards", "chunks"):
        units = normalise_chunks(encoding.get(key), var)
        if units:
            return units
    if var.chunks is not None:  # dask: the first chunk along each dim
        return {str(d): max(1, int(c[0])) for d, c in zip(var.dims, var.chunks, strict=True)}
    return {str(d): max(1, int(var.sizes[d])) for d in var.dims}


def describe_template(
    template: xr.Dataset,
    *,
    encodings: Mapping[str, Mapping[str, Any]] | None = None,
    region_dims: Sequence[str] | None = None,
    existing_units: Mapping[str, Mapping[str, int]] | None = None,
    keep: Sequence[str] = (),
    coordinator: Sequence[str] = (),
) -> TemplateInfo:
    """Work out write units, region dims and who writes which variable.

    Parameters
    ----------
    template : xarray.Dataset
        The dataset (lazy is fine).
    encodings : dict, optional
        Each data variable's encoding for this write (default: its own).
    region_dims : sequence of str, optional
        Dimensions to split; by default those along which any data variable has several
        write units.
    existing_units : dict, optional
        Write units of arrays that already exist (they win over everything else).
    keep : sequence of str
        Region dims that must stay even if no variable has several units along them (the
        append dim: tasks write the grown part).
    coordinator : sequence of str
        Data variables the coordinator writes whatever their chunks.

    Returns
    -------
    TemplateInfo
        The description.
    """
    encodings = encodings or {}
    sizes = {str(d): int(n) for d, n in template.sizes.items()}
    all_units: dict[str, dict[str, int]] = {}
    for name, var in template.data_vars.items():
        name = str(name)
        if existing_units and name in existing_units:
            all_units[name] = dict(existing_units[name])
        else:
            all_units[name] = units_of(var.variable, encodings.get(name, var.encoding))
    var_dims = {
        n: tuple(str(d) for d in template[n].dims) for n in all_units if n not in coordinator
    }

    def splittable(name: str, dims: Sequence[str]) -> bool:
        # Tasks write variables that have every region dim and more than one write unit
        # along each; the coordinator writes the rest once: splitting along a dim a
        # variable lacks, or inside its only chunk, would make several tasks write it.
        return set(dims) <= set(var_dims[name]) and all(
            all_units[name][d] < sizes[d] for d in dims if d not in keep
        )

    if region_dims is None:
        # Split along the dims where the variables have several write units, as far as the
        # largest such variable has them: smaller variables lacking one are written once by
        # the coordinator instead of collapsing the plan into one task.
        split = {n: d for n, d in var_dims.items() if default_region_dims({n: d}, all_units, sizes)}
        chosen = list(default_region_dims(split, all_units, sizes))
        if split:
            largest = max(split, key=lambda n: template[n].size * _itemsize(template[n].dtype))
            chosen = [d for d in chosen if d in var_dims[largest]]
        region_dims = tuple(chosen + [d for d in keep if d not in chosen])
    region_dims = tuple(region_dims)
    dims: dict[str, tuple[str, ...]] = {}
    eager: list[str] = []
    for name in all_units:
        if name in coordinator:
            eager.append(name)
        elif region_dims and splittable(name, region_dims):
            dims[name] = var_dims[name]
        elif not region_dims and not keep:
            dims[name] = var_dims[name]  # one task writes everything
        else:
            eager.append(name)
    return TemplateInfo(
        region_dims=region_dims,
        sizes=sizes,
        dims=dims,
        units={n: all_units[n] for n in dims},
        itemsizes={n: _itemsize(template[n].dtype) for n in dims},
        all_units=all_units,
        eager_vars=tuple(eager),
    )


def _itemsize(dtype: np.dtype[Any]) -> int:
    # Variable-length strings and objects: a guess per element for task sizing.
    return int(dtype.itemsize) if dtype.kind not in "OT" else 16


# ---------------------------------------------------------------------------------------------
# The store as it is


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


# ---------------------------------------------------------------------------------------------
# Writing the metadata through xarray


def decide_encodings(
    template: xr.Dataset,
    explicit: Mapping[str, Mapping[str, Any]],
    *,
    existing: Sequence[str] = (),
) -> dict[str, dict[str, Any]]:
    """Each new data variable's encoding for this write, as ``to_zarr`` would take it.

    The explicit ``encoding=`` entry replaces the variable's own encoding (as in ``to_zarr``),
    and the chunks ``to_zarr`` would choose are made explicit (:func:`pinned_chunks`).
    Variables in ``existing`` are in the store already and keep the stored encoding.
    """
    out = {}
    for name, var in template.data_vars.items():
        name = str(name)
        if name in existing:
            continue
        given = explicit.get(name)
        enc = dict(given if given is not None else var.encoding)
        out[name] = {**enc, **pinned_chunks(var.variable, name, enc)}
    return out


_PACKING = ("dtype", "scale_factor", "add_offset", "_FillValue", "missing_value")
# What xarray's CF encoders read from an encoding; the rest (chunks, codecs, shards) is the
# array's, already written, and would only make every task's argument bigger.
_CF_KEYS = frozenset({*_PACKING, "units", "calendar", "_Unsigned", "_Encoding"})


def task_encoding(stored: Mapping[str, Any], decided: Mapping[str, Any] | None) -> dict[str, Any]:
    """The encoding a piece of a variable is encoded with.

    The stored one, decoded, as xarray uses before a region write; for an array this write
    creates, the packing values exactly as given (``to_zarr`` encoded the whole variable with
    them: a ``float32`` scale factor read back from JSON as ``float64`` would round some
    values differently).
    """
    enc = {k: v for k, v in stored.items() if k in _CF_KEYS}
    if decided is not None and "units" not in stored:
        enc.update({k: decided[k] for k in _PACKING if k in decided})
    return enc


def metadata_dataset(
    template: xr.Dataset,
    info: TemplateInfo,
    decided: Mapping[str, Mapping[str, Any]],
    explicit: Mapping[str, Mapping[str, Any]],
    *,
    eager: xr.Dataset | None,
) -> tuple[xr.Dataset, dict[str, dict[str, Any]], list[str]]:
    """The dataset and ``encoding=`` that ``to_zarr(compute=False)`` writes the metadata from.

    Numpy-backed task variables become lazy stand-ins (never computed) with the chunks
    ``to_zarr`` would give the real data; the coordinator's own variables come from ``eager``
    (else the template). Everything in memory is written by xarray itself, exactly as
    ``to_zarr`` writes it; lazy coordinator variables are not (``compute=False``): their
    names are returned, for the coordinator to write them as tasks write theirs.

    Returns
    -------
    tuple
        The dataset, the ``encoding=`` argument for ``to_zarr``, and the lazy variables the
        coordinator still has to write.
    """
    import dask.array as da

    param = {n: dict(decided.get(n, v)) for n, v in explicit.items()}
    meta = template.copy()
    for name in info.dims:
        var = template[name].variable
        if _is_lazy(var):
            continue
        grid = tuple(info.all_units[name][str(d)] for d in var.dims)
        data = da.from_array(var.data, chunks=grid, name=False)  # type: ignore[no-untyped-call]
        stand_in = var.copy(deep=False, data=data)
        if name not in param and name in decided:
            stand_in.encoding = dict(decided[name])
        meta[name] = stand_in
    if eager is not None and eager is not template:
        # Values from the loader; dims, attributes and encoding are the template's.
        for name in info.eager_vars:
            var = template[name].variable
            loaded = var.copy(deep=False, data=eager[name].variable.data)
            if name in decided and name not in param:
                loaded.encoding = dict(decided[name])
            meta[name] = loaded
    lazy = [
        str(n)
        for n, v in meta.variables.items()
        if _is_lazy(v) and (n in template.coords or n in info.eager_vars)
    ]
    return meta, param, lazy


def write_metadata(
    store: Any,
    meta: xr.Dataset,
    encoding: Mapping[str, Mapping[str, Any]],
    *,
    group: str | None,
    mode: Mode,
    append_dim: str | None,
    region: Mapping[str, slice] | None,
) -> None:
    """Write ``meta`` (from :func:`metadata_dataset`) with ``to_zarr(compute=False)``.

    xarray creates (mode ``w``/``w-``/``a``), grows (``append_dim``) or opens the arrays,
    writes attributes, coordinates and every in-memory variable, and checks the mode, the
    region and the encodings as ``to_zarr`` does. The lazy stand-ins are never computed; they
    need not line up with the chunks (``safe_chunks=False``): tasks write whole chunks.
    """
    if region:
        # to_zarr refuses region writes of index coordinates: they were checked against the
        # store's (check_labels) and are not written again.
        meta = meta.drop_vars(list(meta.indexes))
    meta.to_zarr(
        store,
        group=group,
        mode=mode,
        append_dim=append_dim,
        region=dict(region) if region else None,
        encoding={k: dict(v) for k, v in encoding.items() if k in meta.variables} or None,
        compute=False,
        consolidated=False,
        safe_chunks=False,
    )


def stored_encodings(
    store: Any, group: str | None, names: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Each variable's encoding as stored, decoded as xarray does before a region write."""
    if not names:
        return {}
    stored = xr.open_zarr(store, group=group, consolidated=False, chunks=None)
    return {name: dict(stored[name].encoding) for name in names}
