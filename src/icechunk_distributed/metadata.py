"""The coordinator's writes: metadata, coordinates and the variables no task writes.

:func:`write_metadata` hands a stand-in of the template to ``Dataset.to_zarr(compute=False)``
(:func:`metadata_dataset` builds it): xarray validates the mode, the region and the
encodings, creates or grows the arrays, and writes everything in memory itself; the task
variables are lazy stand-ins and are never computed there. :func:`eager_data` reads a
loader's coordinator variables once; :func:`write_lazy` writes lazy coordinator variables the
way tasks write theirs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import xarray as xr

from icechunk_distributed.errors import TemplateMismatchError
from icechunk_distributed.planning import Region
from icechunk_distributed.task import Loader, same_dtype, write_variables
from icechunk_distributed.template import (
    Mode,
    TemplateInfo,
    is_lazy,
    stored_encodings,
    task_encoding,
)

__all__ = ["eager_data", "metadata_dataset", "write_lazy", "write_metadata"]


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
        if name in decided and var.dtype != object:
            # One dask chunk, never computed: the chunks are pinned in the encoding, and
            # to_zarr(compute=False) builds a graph node per dask chunk (2.6 s of the
            # coordinator's time at 2,000 chunks, growing with the chunk count). Not for
            # objects: xarray infers their stored dtype from the values.
            data = da.zeros(var.shape, dtype=var.dtype, chunks=var.shape)
        elif is_lazy(var):
            continue  # an existing array: its stored chunks decide
        else:
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
        if is_lazy(v) and (n in template.coords or n in info.eager_vars)
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


def eager_data(
    loader: Loader, template: xr.Dataset, info: TemplateInfo, *, retries: int
) -> xr.Dataset:
    """A loader's coordinator variables: ``load(full extent)``, checked against the template.

    Never the template's own data, which may be placeholders. Tried ``retries + 1`` times,
    as tasks are. A loader with a ``coordinator_variables(names, region)`` method is asked
    for just those variables instead (a file loader reads them from one file rather than
    opening every file of the full extent).
    """
    names = list(info.eager_vars)
    full = {d: slice(0, info.sizes[d]) for d in info.region_dims}
    provide = getattr(loader, "coordinator_variables", None)
    for attempt in range(retries + 1):
        try:
            data = provide(names, full) if callable(provide) else loader(full)
            break
        except Exception:
            if attempt == retries:
                raise
    missing = [n for n in names if not isinstance(data, xr.Dataset) or n not in data]
    if missing:
        raise TemplateMismatchError(
            f"the loader, called with the full extent {full}, returned no {missing}; "
            "variables the tasks do not write are read from it once"
        )
    for name in names:
        got, want = data[name], template[name]
        if got.shape != want.shape or not same_dtype(got.dtype, want.dtype):
            raise TemplateMismatchError(
                f"the loader returned {name!r} with shape {got.shape} and dtype "
                f"{got.dtype}; the template has {want.shape} and {want.dtype}"
            )
    return data


def write_lazy(
    store: Any,
    data: xr.Dataset,
    *,
    group: str | None,
    decided: Mapping[str, Mapping[str, Any]],
    placed: Region,
    skip: Sequence[str] = (),
    stored_dims: Mapping[str, tuple[str, ...]],
) -> None:
    """Write lazy coordinator variables (``to_zarr(compute=False)`` left them) as tasks do.

    ``placed`` is where the source sits in the stored arrays; variables in ``skip`` are
    left as they are.
    """
    names = [str(n) for n in data.variables if str(n) not in skip]
    stored = stored_encodings(store, group, names)
    write_variables(
        store,
        group,
        data[names],
        encodings={n: task_encoding(stored[n], decided.get(n)) for n in names},
        region=placed,
        stored_dims=dict(stored_dims),
    )
