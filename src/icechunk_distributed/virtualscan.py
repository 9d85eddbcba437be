"""The scan of a virtual ingest: each file parsed (or read with h5py), its header sent home.

:class:`VirtualHeaderReader` runs in a task: a VirtualiZarr parser turns the file into a
``ManifestStore``, its coordinates are decoded by xarray, and the header names each
referenced array's *layout* (all its metadata but the shape), which must be the same in every
file. For the default HDF parser, h5py alone reads the same facts faster
(:mod:`~icechunk_distributed.hdfheader`); :func:`scan_virtual` checks that reading against
the parser's on one file. :func:`check_grid` refuses files that would put references off
the chunk grid. The helpers here (:func:`parse_file`, :func:`manifest_arrays`,
:func:`load_arrays`) are shared with the template and the loader.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from icechunk_distributed.errors import TemplateMismatchError
from icechunk_distributed.scan import FileHeader, FileSet, VariableHeader, scan_files, short_list
from icechunk_distributed.sources import SourceOptions, is_remote

__all__ = [
    "VirtualHeaderReader",
    "check_decoding",
    "check_grid",
    "check_layouts",
    "check_loadable",
    "check_urls",
    "decoding",
    "default_parser",
    "file_url",
    "layout",
    "load_arrays",
    "loaded_names",
    "manifest_arrays",
    "parse_file",
    "plain_hdf",
    "registry",
    "same_header",
    "scan_virtual",
]


def default_parser() -> Any:
    """VirtualiZarr's HDF5/netCDF4 parser."""
    try:
        from virtualizarr.parsers import HDFParser
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ImportError(
            "virtual ingest needs VirtualiZarr: pip install 'icechunk-distributed[virtual]'"
        ) from exc
    return HDFParser()


def file_url(path: str) -> str:
    """The URL references name: ``file:///abs/path`` for a local path, a URL as it is."""
    if is_remote(path):
        return path
    # Not Path.as_uri(): obstore reads "%20" literally; icechunk parses either spelling.
    return "file://" + Path(os.path.abspath(path)).as_posix()


def registry(url: str, options: SourceOptions | None) -> Any:
    """An obstore registry that resolves ``url`` (local files, or its bucket)."""
    from obspec_utils.registry import ObjectStoreRegistry

    if url.startswith("file://"):
        from obstore.store import LocalStore

        return ObjectStoreRegistry({"file://": LocalStore()})
    scheme, rest = url.split("://", 1)
    root = f"{scheme}://{rest.split('/', 1)[0]}"
    return ObjectStoreRegistry({root: (options or SourceOptions()).store(root)})


def parse_file(url: str, parser: Any, options: SourceOptions | None) -> Any:
    """The parser's ``ManifestStore`` of one file."""
    return parser(url=url, registry=registry(url, options))


def manifest_arrays(store: Any) -> dict[str, Any]:
    """The ``ManifestArray`` of every array at the root of a ``ManifestStore``.

    ``ManifestStore`` has no public accessor for its group; VirtualiZarr itself reads
    ``_group`` (``tests/test_virtual.py`` pins it). Going through xarray instead costs a
    ``Dataset`` per file in every task.
    """
    return dict(store._group.arrays)


def layout(array: Any) -> str:
    """What must agree across files for one virtual array: all metadata but its shape."""
    meta = dataclasses.replace(array.metadata, attributes={}).to_dict()
    meta.pop("shape", None)
    return json.dumps(meta, sort_keys=True, default=str)


def loaded_names(arrays: Mapping[str, Any], loadable: Iterable[str]) -> list[str]:
    """The arrays to load: dimension coordinates (as xarray loads them) and ``loadable``."""
    dims = {d for a in arrays.values() for d in (a.metadata.dimension_names or ())}
    return sorted({n for n in arrays if n in dims} | (set(loadable) & set(arrays)))


def load_arrays(store: Any, names: Sequence[str], arrays: Mapping[str, Any]) -> xr.Dataset:
    """``names`` decoded by xarray from a ``ManifestStore`` (the others are not opened)."""
    drop = [n for n in arrays if n not in names]
    with xr.open_zarr(
        store, consolidated=False, zarr_format=3, chunks=None, drop_variables=drop
    ) as ds:
        loaded: xr.Dataset = ds.load()
    return loaded


@dataclass(frozen=True)
class VirtualHeaderReader:
    """Reads one file's header in a task: parsed once, coordinates loaded, layouts noted.

    Picklable (the parser is a plain object), so it ships to any engine.
    """

    concat_dim: str
    parser: Any
    options: SourceOptions | None = None
    loadable: tuple[str, ...] = ()
    fast: bool = True

    def __call__(self, path: str) -> FileHeader:
        """The header of ``path``: as the byte scan's, with each virtual array's layout.

        Read with h5py alone when the parser is the default HDF parser (``fast``; see
        :mod:`~icechunk_distributed.hdfheader`), else (or if h5py cannot tell) parsed.
        """
        if self.fast and plain_hdf(self.parser):
            from icechunk_distributed.hdfheader import read_hdf_header

            header = read_hdf_header(
                path, self.concat_dim, options=self.options, loadable=self.loadable
            )
            if header is not None:
                return header
        return self.parsed(path)

    def parsed(self, path: str) -> FileHeader:
        """The header of ``path`` as the parser and xarray see it (the reference)."""
        dim = self.concat_dim
        store = parse_file(file_url(path), self.parser, self.options)
        arrays = manifest_arrays(store)
        names = loaded_names(arrays, self.loadable)
        loaded = load_arrays(store, names, arrays)
        variables: dict[str, VariableHeader] = {}
        sizes: dict[str, int] = {}
        layouts: dict[str, str] = {}
        for name, array in arrays.items():
            dims = tuple(str(d) for d in (array.metadata.dimension_names or ()))
            sizes.update(zip(dims, map(int, array.shape), strict=True))
            if name in loaded.variables:
                dtype = str(loaded[name].dtype)
            else:
                dtype = str(array.dtype)
                layouts[name] = layout(array)
            if name != dim:
                variables[name] = VariableHeader(dims, dtype, dict(array.metadata.attributes))
        coord_names = set(loaded.coords) | _named_coordinates(arrays)
        return FileHeader(
            str(path),
            variables,
            sizes,
            np.asarray(loaded[dim].values) if dim in loaded.indexes else None,
            {str(n): np.asarray(i) for n, i in loaded.indexes.items() if n != dim},
            {  # coordinates along the dim: the coordinator writes them (loaded data
                # variables along it are written by the tasks)
                str(n): np.asarray(v.values)
                for n, v in loaded.coords.items()
                if n != dim and dim in v.dims
            },
            tuple(sorted(str(n) for n in coord_names if n != dim)),
            layouts,
        )


def plain_hdf(parser: Any) -> bool:
    """Whether ``parser`` is VirtualiZarr's HDF parser with its default settings."""
    return (
        type(parser).__name__ == "HDFParser"
        and type(parser).__module__.startswith("virtualizarr.")
        and getattr(parser, "group", None) is None
        and not getattr(parser, "drop_variables", None)
    )


def same_header(fast: FileHeader, parsed: FileHeader) -> bool:
    """Whether two readings of one file agree on everything but the form of the layouts."""

    def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
        return a.keys() == b.keys() and all(
            a[k].dtype == b[k].dtype
            and np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind in "fc")
            for k in a
        )

    a, b = fast.concat_values, parsed.concat_values
    return (
        {n: (v.dims, v.dtype) for n, v in fast.variables.items()}
        == {n: (v.dims, v.dtype) for n, v in parsed.variables.items()}
        and fast.sizes == parsed.sizes
        and fast.layouts.keys() == parsed.layouts.keys()
        and fast.coord_names == parsed.coord_names
        and (a is None) == (b is None)
        and (a is None or b is None or same({"v": a}, {"v": b}))
        and same(fast.coords, parsed.coords)
        and same(fast.concat_coords, parsed.concat_coords)
    )


def _named_coordinates(arrays: Mapping[str, Any]) -> set[str]:
    """Arrays that a ``coordinates`` attribute names (CF's non-index coordinates)."""
    out: set[str] = set()
    for array in arrays.values():
        names = array.metadata.attributes.get("coordinates")
        if isinstance(names, str):
            out.update(n for n in names.split() if n in arrays)
    return out


def scan_virtual(
    paths: Sequence[str], reader: VirtualHeaderReader, scan: Mapping[str, Any]
) -> tuple[list[FileHeader], FileHeader]:
    """Every file's header, read on the executor, and the first one's as the parser sees it.

    The parser's reading of one file (on the coordinator) is the reference: its layouts are
    the arrays' metadata, and a fast reading that disagrees with it is replaced by the
    parser's, for every file. ``scan`` holds :func:`~icechunk_distributed.scan.scan_files`'
    options.
    """
    headers = scan_files(paths, reader.concat_dim, reader=reader, **scan)
    reference = reader.parsed(paths[0])
    if not same_header(headers[0], reference):
        slow = dataclasses.replace(reader, fast=False)
        headers = scan_files(paths, reader.concat_dim, reader=slow, **scan)
    return headers, reference


def check_urls(paths: Sequence[str]) -> None:
    """Refuse file names a reference cannot carry: a URL would read ``%``, ``#``, ``?``.

    Icechunk decodes ``%41`` in a reference to ``A`` (another file); ``#`` and ``?`` end a
    URL's path.

    Raises
    ------
    ValueError
        Naming the files.
    """
    odd = [p for p in paths if any(c in p.split("://", 1)[-1] for c in "%#?")]
    if odd:
        raise ValueError(
            f"{len(odd)} file(s) have '%', '#' or '?' in their names, which a reference (a "
            f"URL) cannot carry: {short_list(odd)}. Rename them, or ingest with virtual=False"
        )


def check_layouts(headers: Sequence[FileHeader]) -> None:
    """Every file stores each referenced array alike: dtype, chunks, codecs, fill value.

    Raises
    ------
    TemplateMismatchError
        Naming the first file that differs, the array and what differs.
    """
    first = headers[0]
    for h in headers[1:]:
        if h.layouts == first.layouts:
            continue
        for name in sorted(set(h.layouts) | set(first.layouts)):
            want, got = first.layouts.get(name), h.layouts.get(name)
            if want == got:
                continue
            a = json.loads(want) if want else {}
            b = json.loads(got) if got else {}
            keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            shown = "; ".join(f"{k}: {b.get(k)} instead of {a.get(k)}" for k in keys)
            odd = [x.path for x in headers if x.layouts.get(name) != want]
            raise TemplateMismatchError(
                f"{len(odd)} file(s) store {name!r} with another layout (dtype, chunks, codecs or "
                f"fill value) than {first.path}: {short_list(odd)} ({shown or 'missing'}). "
                "A virtual dataset has one layout per array: ingest with virtual=False "
                "(copying re-encodes), or ingest the two kinds of files apart"
            )


def check_loadable(reference: FileHeader, loadable: Sequence[str]) -> None:
    """Refuse ``loadable_variables`` the files do not have."""
    unknown = sorted(set(loadable) - set(reference.variables) - set(reference.sizes))
    if unknown:
        raise ValueError(
            f"loadable_variables names variables the files do not have: {unknown}; they have "
            f"{sorted(reference.variables)}"
        )


# What CF decoding reads from a referenced array's attributes: files that differ in them
# would be decoded with the first file's (the arrays keep one set of attributes).
_DECODING = ("scale_factor", "add_offset", "_FillValue", "missing_value")


def decoding(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The attributes that decode an array's values, normalised for comparison.

    ``units`` and ``calendar`` count for times (units with "since") only.
    """
    out: dict[str, Any] = {}
    for key in _DECODING:
        if key in attrs:
            out[key] = _normal(attrs[key])
    units = attrs.get("units")
    if isinstance(units, str) and " since " in units:
        out["units"] = units
        out["calendar"] = attrs.get("calendar", "standard")
    return out


def _normal(value: Any) -> Any:
    values = np.atleast_1d(np.asarray(value))
    if values.dtype.kind in "biuf":
        return tuple("nan" if np.isnan(v) else float(v) for v in values.astype("f8"))
    return str(value)


def check_decoding(files: FileSet) -> None:
    """Every file decodes each referenced array alike (scale, offset, fill, time units).

    Raises
    ------
    TemplateMismatchError
        Naming the files, the array and the attribute.
    """
    first = files.headers[0]
    for name in first.layouts:
        want = decoding(first.variables[name].attrs) if name in first.variables else {}
        for h in files.headers[1:]:
            got = decoding(h.variables[name].attrs) if name in h.variables else {}
            if got != want:
                keys = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
                raise TemplateMismatchError(
                    f"{h.path} decodes {name!r} with other {', '.join(keys)} than "
                    f"{first.path} ({got.get(keys[0])} instead of {want.get(keys[0])}): "
                    "references keep one set of attributes per array, so its values would "
                    f"be decoded wrongly. Pass loadable_variables=[{name!r}] to copy it, or "
                    "ingest with virtual=False"
                )


def check_grid(files: FileSet, reference: FileHeader) -> None:
    """Every file but the last holds whole chunks of every virtual array along the dim.

    A virtual array has one chunk grid; a file that ends inside a chunk would put the next
    file's first chunk off the grid.

    Raises
    ------
    TemplateMismatchError
        Naming the files, their lengths and the chunk size.
    """
    dim = files.concat_dim
    first = reference
    sizes = {
        n: json.loads(lay)["chunk_grid"]["configuration"]["chunk_shape"][
            first.variables[n].dims.index(dim)
        ]
        for n, lay in first.layouts.items()
        if n in first.variables and dim in first.variables[n].dims
    }
    for name, size in sizes.items():
        odd = [h.path for h in files.headers[:-1] if h.sizes[dim] % size]
        if odd:
            n = files.headers[[h.path for h in files.headers].index(odd[0])].sizes[dim]
            raise TemplateMismatchError(
                f"{len(odd)} file(s) end inside a chunk of {name!r} ({size} {dim!r} steps per "
                f"chunk): {short_list(odd)} ({odd[0]} has {n} steps). A virtual dataset has "
                "one chunk grid: every file but the last must hold whole chunks. Ingest "
                "these files with virtual=False (copying the data) instead"
            )
