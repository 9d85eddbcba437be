"""Repositories named by a location: a local directory or ``s3://bucket/prefix``.

What the command line's REPO argument names. :func:`open_location` opens the repository
there, or creates one where there is nothing yet (a missing path, an empty directory, an S3
prefix without a repository), and refuses a local path holding anything else: writing a
repository into it would mix it with other data. :func:`remove_if_untouched` undoes a
creation when the command that made it failed before its first commit.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import icechunk

if TYPE_CHECKING:
    from icechunk import Repository, RepositoryConfig, Storage

__all__ = [
    "LocationError",
    "RepositoryTarget",
    "S3Options",
    "is_url",
    "open_location",
    "remove_if_untouched",
    "storage_for",
]


class LocationError(ValueError):
    """The location is not a repository, or not a location this module understands."""


@dataclass(frozen=True)
class S3Options:
    """How to reach an ``s3://`` location; credentials come from the ``AWS_*`` environment.

    Attributes
    ----------
    endpoint_url : str, optional
        An S3-compatible endpoint (MinIO, Ceph, ...); such servers are addressed by path.
    region : str, optional
        The bucket's region.
    anonymous : bool
        Unsigned requests (a public bucket).
    allow_http : bool
        Allow an ``http://`` endpoint.
    """

    endpoint_url: str | None = None
    region: str | None = None
    anonymous: bool = False
    allow_http: bool = False


def is_url(location: str) -> bool:
    """Whether ``location`` is a URL rather than a local path."""
    return "://" in location


def storage_for(location: str, s3: S3Options | None = None) -> Storage:
    """Icechunk storage for a local directory or an ``s3://bucket/prefix`` URL.

    Parameters
    ----------
    location : str
        The directory or URL.
    s3 : S3Options, optional
        Endpoint, region and credentials mode for ``s3://`` locations.

    Returns
    -------
    icechunk.Storage
        Nothing is read or created yet.

    Raises
    ------
    LocationError
        Another URL scheme, or an ``s3://`` URL without a bucket.
    """
    scheme, _, rest = location.partition("://")
    if not is_url(location):
        # Absolute: icechunk caches storage clients by their configuration, so a relative
        # path would keep meaning the directory it meant first, whatever the cwd is now.
        return icechunk.local_filesystem_storage(os.path.abspath(location))
    if scheme != "s3":
        raise LocationError(f"{location}: a repository is a local directory or s3://bucket/prefix")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise LocationError(f"{location}: no bucket (expected s3://bucket/prefix)")
    s3 = s3 or S3Options()
    return icechunk.s3_storage(
        bucket=bucket,
        prefix=prefix.strip("/") or None,
        region=s3.region,
        endpoint_url=s3.endpoint_url,
        allow_http=s3.allow_http,
        anonymous=True if s3.anonymous else None,
        from_env=None if s3.anonymous else True,
        # S3-compatible servers (MinIO, moto, Ceph) are addressed by path, not by subdomain.
        force_path_style=bool(s3.endpoint_url),
    )


@dataclass
class RepositoryTarget:
    """The repository at a location, and whether :func:`open_location` created it.

    Attributes
    ----------
    location : str
        The directory or URL.
    repo : icechunk.Repository or None
        None when nothing is there and creating was not asked for.
    created : bool
        The repository was created by this call.
    was_dir : bool
        It was created in an existing, empty directory (kept if the creation is undone).
    """

    location: str
    repo: Repository | None
    created: bool = False
    was_dir: bool = False


def _local_state(location: str) -> str:
    """``"missing"``, ``"empty"`` (an empty directory) or ``"occupied"``."""
    if not os.path.lexists(location):
        return "missing"
    if os.path.isdir(location) and not any(os.scandir(location)):
        return "empty"
    return "occupied"


def open_location(
    location: str,
    s3: S3Options | None = None,
    *,
    create: bool,
    hint: str = "",
    config: RepositoryConfig | None = None,
    authorize: Mapping[str, Any] | None = None,
) -> RepositoryTarget:
    """Open the repository at ``location``, or create one if nothing is there.

    Parameters
    ----------
    location : str
        A local directory or ``s3://bucket/prefix``.
    s3 : S3Options, optional
        How to reach an ``s3://`` location.
    create : bool
        Create a repository where there is none (a missing path, an empty directory, an S3
        prefix without a repository). Without it such a location gives ``repo=None``.
    hint : str
        Appended to the message of the error for an occupied local path.
    config : icechunk.RepositoryConfig, optional
        The configuration of a repository created here (saved with it); an existing
        repository keeps its own.
    authorize : mapping, optional
        ``authorize_virtual_chunk_access`` of a repository created here.

    Returns
    -------
    RepositoryTarget
        The repository (or None) and whether it was created.

    Raises
    ------
    LocationError
        A local path that exists and is not a repository (a file, a directory with other
        contents), or a location :func:`storage_for` refuses.
    """
    storage = storage_for(location, s3)
    state = "unknown"
    if not is_url(location):
        state = _local_state(location)
        if state == "occupied":
            if not (os.path.isdir(location) and icechunk.Repository.exists(storage)):
                raise LocationError(f"{location} exists and is not an Icechunk repository{hint}")
            return RepositoryTarget(location, icechunk.Repository.open(storage))
    elif icechunk.Repository.exists(storage):
        return RepositoryTarget(location, icechunk.Repository.open(storage))
    if not create:
        return RepositoryTarget(location, None)
    repo = icechunk.Repository.create(
        storage,
        config=config,
        authorize_virtual_chunk_access=None if authorize is None else dict(authorize),
    )
    return RepositoryTarget(location, repo, created=True, was_dir=state == "empty")


def remove_if_untouched(target: RepositoryTarget) -> bool:
    """Remove a local repository :func:`open_location` created, if nothing was committed.

    A failed first ingest must not leave an empty repository behind: the next attempt would
    find the path occupied. A repository with a commit, or with a resumable run's work
    branch, is kept; so is anything on S3 (an empty repository there is harmless).

    Parameters
    ----------
    target : RepositoryTarget
        What :func:`open_location` returned.

    Returns
    -------
    bool
        Whether the repository was removed.
    """
    repo = target.repo
    if not target.created or repo is None or is_url(target.location):
        return False
    if set(repo.list_branches()) != {"main"} or len(list(repo.ancestry(branch="main"))) > 1:
        return False
    shutil.rmtree(target.location, ignore_errors=True)
    if target.was_dir:
        os.makedirs(target.location, exist_ok=True)
    return True
