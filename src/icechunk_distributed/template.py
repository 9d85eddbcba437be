"""What to write: the template, and its encodings decided once by xarray's own machinery.

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
import xarray as xr

from icechunk_distributed.planning import default_region_dims

__all__ = [
    "MODES",
    "Mode",
    "TemplateInfo",
    "decide_encodings",
    "describe_template",
    "is_lazy",
    "is_time_like",
    "normalise_chunks",
    "pinned_chunks",
    "stored_encodings",
    "task_encoding",
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


def is_lazy(var: xr.Variable) -> bool:
    """Whether the variable's data is a lazy (dask) array."""
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
    if is_lazy(var):
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


# long: 25 lines of docstring; one pass over the variables, clearer whole.
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


def stored_encodings(
    store: Any, group: str | None, names: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Each variable's encoding as stored, decoded as xarray does before a region write."""
    if not names:
        return {}
    stored = xr.open_zarr(store, group=group, consolidated=False, chunks=None)
    return {name: dict(stored[name].encoding) for name in names}
