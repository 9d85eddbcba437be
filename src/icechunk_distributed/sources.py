"""Source files of an ingest: globs expanded, and one file opened, locally or on S3.

Local paths go straight to xarray. ``s3://`` URLs go through `obstore
<https://developmentseed.org/obstore>`_ (the ``[s3]`` extra): a netCDF/HDF5 object is read
through obstore's file-like reader (h5py reads file objects), a Zarr store through zarr's
``ObjectStore``. obstore is small and has no dependencies to clash with; ``s3fs`` pins
``botocore`` to a narrow range, which fights the ``boto3`` a user already has.

Options for S3 (endpoint, region, credentials) are obstore's configuration keys. They travel
to the tasks inside :class:`SourceOptions`, whose ``repr`` shows the keys but never a value,
so neither an error message nor a log line can carry a credential.
"""

from __future__ import annotations

import glob
import io
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import xarray as xr

__all__ = [
    "SourceOptions",
    "expand_paths",
    "guess_engine",
    "is_remote",
    "open_binary",
    "open_source",
]

_ZARR_SUFFIXES = (".zarr", ".zarr/")
_CLIENT_KEYS = frozenset({"allow_http", "timeout", "connect_timeout", "allow_invalid_certificates"})


@dataclass(frozen=True)
class SourceOptions:
    """How to reach ``s3://`` sources: obstore's configuration.

    Keys such as ``endpoint``, ``region``, ``access_key_id``, ``secret_access_key``,
    ``skip_signature``, ``allow_http``. The values never appear in a ``repr`` (they may be
    credentials).
    """

    options: Mapping[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"SourceOptions(keys={sorted(self.options)})"

    def store(self, url: str) -> Any:
        """An obstore store rooted at ``url`` (a bucket, or a prefix in one)."""
        try:
            from obstore.store import from_url
        except ImportError as exc:  # pragma: no cover - depends on the installation
            raise ImportError(
                f"reading {url.split('://')[0]}:// sources needs obstore: "
                "pip install 'icechunk-distributed[s3]'"
            ) from exc
        client = {k: v for k, v in self.options.items() if k in _CLIENT_KEYS}
        config = {k: v for k, v in self.options.items() if k not in _CLIENT_KEYS}
        return from_url(url, config=config, client_options=client)  # type: ignore[call-overload]


def is_remote(path: str) -> bool:
    """Whether ``path`` is a URL (``s3://...``) rather than a local path."""
    return "://" in path


def _split(url: str) -> tuple[str, str]:
    """``(bucket, key)`` of ``s3://bucket/key``."""
    rest = url.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    return bucket, key


def expand_paths(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    options: SourceOptions | None = None,
) -> list[str]:
    """Paths, globs (``*``, ``?``, ``[...]``, ``**``) or URLs, as a list of files.

    Each glob's matches are sorted (as ``xr.open_mfdataset`` sorts a glob's); a list keeps its
    order. A pattern that matches nothing is an error (a typo must not ingest zero files), as
    is a plain path that does not exist.

    Raises
    ------
    FileNotFoundError
        A pattern matched nothing, or a path does not exist; the message names them.
    """
    given = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    files: list[str] = []
    missing: list[str] = []
    for p in given:
        p = os.fspath(p)
        if not isinstance(p, str):
            raise TypeError(f"paths must be str or os.PathLike, not {type(p).__name__}")
        if glob.has_magic(p):
            found = (
                _glob_remote(p, options) if is_remote(p) else sorted(glob.glob(p, recursive=True))
            )
            if not found:
                missing.append(f"{p} (matches nothing)")
            files.extend(found)
        elif not is_remote(p) and not os.path.exists(p):
            missing.append(p)
        else:
            files.append(p)
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise FileNotFoundError(f"no such file: {shown}")
    if not files:
        raise FileNotFoundError("no source files given")
    return files


def _glob_remote(pattern: str, options: SourceOptions | None) -> list[str]:
    import obstore

    scheme = pattern.split("://", 1)[0]
    bucket, key = _split(pattern)
    # List below the pattern's literal prefix, then match: object stores have no directories.
    literal = key[: min((key.find(c) for c in "*?[" if c in key), default=len(key))]
    prefix = literal.rsplit("/", 1)[0] + "/" if "/" in literal else ""
    store = (options or SourceOptions()).store(f"{scheme}://{bucket}")
    names = [meta["path"] for batch in obstore.list(store, prefix=prefix or None) for meta in batch]
    # A Zarr store is a directory of objects: match the store, not its chunks.
    tops = {n.split(".zarr/", 1)[0] + ".zarr" if ".zarr/" in n else n for n in names}
    match = glob_pattern(key)
    return [f"{scheme}://{bucket}/{n}" for n in sorted(tops) if match.fullmatch(n)]


def glob_pattern(pattern: str) -> re.Pattern[str]:
    """A glob as ``glob.glob(recursive=True)`` reads it, for object keys.

    ``*``, ``?`` and ``[...]`` stay inside one path segment; ``**/`` is any number of
    segments, none included (``fnmatch`` would let ``*`` cross ``/``).
    """
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]+/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2 :]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1 : end].replace("\\", "\\\\")
            out.append("[^" + body[1:] + "]" if body.startswith("!") else "[" + body + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def guess_engine(path: str) -> str | None:
    """The xarray engine for ``path``: ``"zarr"`` for ``*.zarr``, else None (xarray guesses)."""
    return "zarr" if path.rstrip("/").endswith(".zarr") else None


@contextmanager
def open_source(
    path: str,
    *,
    engine: str | None = None,
    chunks: Any = None,
    options: SourceOptions | None = None,
    drop: Sequence[str] = (),
) -> Iterator[xr.Dataset]:
    """Open one source file (decoded, as ``xr.open_mfdataset`` opens each of its files).

    Parameters
    ----------
    path : str
        A local path or an ``s3://`` URL of a netCDF4/HDF5 file or a Zarr store.
    engine : str, optional
        xarray's engine; ``"zarr"`` for ``*.zarr`` and xarray's guess otherwise.
    chunks : dict, optional
        As in ``xr.open_dataset``: ``{}`` for lazy data in the file's own chunks, None to load
        on access.
    options : SourceOptions, optional
        How to reach ``s3://`` sources.
    drop : sequence of str
        Variables not to open at all (``drop_variables``): a task reading two variables of a
        file need not decode its other coordinates.
    """
    engine = engine or guess_engine(path)
    options = options or SourceOptions()
    if engine == "zarr":
        where: Any = path
        if is_remote(path):
            from zarr.storage import ObjectStore

            where = ObjectStore(options.store(path.rstrip("/")), read_only=True)
        with warnings.catch_warnings():
            # Consolidated metadata when there is some, else the arrays' own: both are fine.
            warnings.filterwarnings("ignore", ".*consolidated metadata", RuntimeWarning)
            ds = xr.open_dataset(
                where, engine="zarr", chunks=chunks, consolidated=None, drop_variables=drop
            )
        with ds:
            yield ds
        return
    if is_remote(path):
        engine = engine or "h5netcdf"
    with (
        open_binary(path, options) as handle,
        xr.open_dataset(handle, engine=engine, chunks=chunks, drop_variables=drop) as ds,
    ):
        yield ds


@contextmanager
def open_binary(path: str, options: SourceOptions | None = None) -> Iterator[Any]:
    """A local path as it is, or an ``s3://`` object as a seekable binary file (for h5py)."""
    if not is_remote(path):
        yield path
        return
    import obstore

    bucket, key = _split(path)
    root = (options or SourceOptions()).store(f"{path.split('://', 1)[0]}://{bucket}")
    handle = _Reader(obstore.open_reader(root, key))
    try:
        yield handle
    finally:
        handle.close()


class _Reader(io.RawIOBase):
    """An obstore reader as a standard binary file.

    h5py wants ``bytes``; obstore returns its own buffer type.
    """

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = memoryview(self._handle.read(len(buffer)))
        n = len(data)
        memoryview(buffer).cast("B")[:n] = data
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return int(self._handle.seek(offset, whence))

    def tell(self) -> int:
        return int(self._handle.tell())

    def close(self) -> None:
        if not self.closed:
            self._handle.close()
        super().close()
