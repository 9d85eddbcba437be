"""Helpers for the virtual ingest tests (importable by worker processes too)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import icechunk
import xarray as xr

import icechunk_distributed as icd
from ingest_files import day


def chunked(tmp_path, which, *, chunks: int = 2, n: int = 4, **encoding: Any) -> list[str]:
    """Files ``d<i>.nc`` chunked ``(chunks, ny)`` along time, with ``encoding`` for ``t2m``."""
    paths = []
    for i in which:
        ds = day(i, n=n)
        enc = {v: {"chunksizes": (chunks, ds.sizes["y"])} for v in ("t2m", "rain")}
        enc["t2m"].update(encoding)
        path = Path(tmp_path) / f"d{i:02d}.nc"
        ds.to_netcdf(path, engine="h5netcdf", encoding=enc)
        paths.append(str(path))
    return paths


def prefix_of(directory) -> str:
    """The ``file://`` container prefix of a directory."""
    return "file://" + Path(os.path.abspath(directory)).as_posix().rstrip("/") + "/"


def virtual_repo(path, sources) -> icechunk.Repository:
    """A new repository allowed to reference files under ``sources``, and to read them."""
    config = icechunk.RepositoryConfig.default()
    root = os.path.abspath(sources)
    config.set_virtual_chunk_container(
        icechunk.VirtualChunkContainer(prefix_of(root), icechunk.local_filesystem_store(root))
    )
    return icechunk.Repository.create(
        icechunk.local_filesystem_storage(str(path)),
        config=config,
        authorize_virtual_chunk_access={prefix_of(root): local_access()},
    )


def local_access() -> Any:
    """icechunk's "no credentials needed" for a local container."""
    return icechunk.credentials.LocalFileSystemAccess  # type: ignore[attr-defined]


def reopen(path, sources) -> icechunk.Repository:
    """The repository opened afresh, allowed to read the references."""
    return icechunk.Repository.open(
        icechunk.local_filesystem_storage(str(path)),
        authorize_virtual_chunk_access={prefix_of(sources): local_access()},
    )


def read_virtual(path, sources, branch: str = "main") -> xr.Dataset:
    """The committed dataset, from a fresh repository and read-only session."""
    session = reopen(path, sources).readonly_session(branch)
    return xr.open_zarr(session.store, consolidated=False, chunks=None).load()


class FailingParser:
    """VirtualiZarr's HDF parser, failing to write files named in ``marker`` while it exists.

    The first parse of each named file (its header, in the scan) succeeds; later ones (the
    write) fail. Picklable, so it can run in worker processes.
    """

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __call__(self, url: str, registry: Any) -> Any:
        from virtualizarr.parsers import HDFParser

        if os.path.exists(self.marker):
            for name in Path(self.marker).read_text().split():
                seen = Path(f"{self.marker}.{name}.seen")
                if url.endswith(name):
                    if seen.exists():
                        raise OSError(f"simulated failure reading {url}")
                    seen.touch()
        return HDFParser()(url=url, registry=registry)


def ingest_virtual(paths, repo, **kwargs: Any) -> icd.IngestResult:
    """``icd.ingest(virtual=True)`` along time, without progress bars."""
    kwargs.setdefault("progress", False)
    return icd.ingest(paths, repo, concat_dim="time", virtual=True, **kwargs)
