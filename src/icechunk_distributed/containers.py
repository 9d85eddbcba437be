"""Virtual chunk containers for the files a virtual ingest references (the command line's).

A repository reads a virtual reference only through a virtual chunk container whose url
prefix covers the reference's file, and only when it was opened with access to that
container. :func:`source_containers` names the containers the sources need: the common
directory of the local files (``file:///abs/dir/``) and the bucket of ``s3://`` ones
(``s3://bucket/``). :func:`open_for_virtual` creates a repository with them, or opens an
existing one with the missing ones added to its configuration (in memory: the caller saves
it with ``repo.save_config()`` once the ingest succeeded) and access to all of them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import icechunk

from icechunk_distributed.location import (
    LocationError,
    RepositoryTarget,
    S3Options,
    is_url,
    open_location,
)
from icechunk_distributed.scan import short_list
from icechunk_distributed.sources import expand_paths
from icechunk_distributed.virtualscan import file_url

__all__ = [
    "Container",
    "ContainerError",
    "VirtualTarget",
    "check_containers",
    "check_virtual_flags",
    "describe_store",
    "open_for_sources",
    "open_for_virtual",
    "source_containers",
]


class ContainerError(ValueError):
    """A container for the sources' prefix that reads from elsewhere, or options that clash."""


@dataclass(frozen=True)
class Container:
    """A virtual chunk container the sources need, and the access to it.

    Attributes
    ----------
    prefix : str
        Its url prefix: ``file:///abs/dir/`` or ``s3://bucket/``.
    store : icechunk.ObjectStoreConfig
        Where the prefix's files are read from.
    credential : object
        What a repository opened with access to it is given (``LocalFileSystemAccess``, or
        S3 credentials from the environment, or anonymous ones).
    """

    prefix: str
    store: Any
    credential: Any

    def virtual_chunk_container(self) -> icechunk.VirtualChunkContainer:
        """The container, for ``RepositoryConfig.set_virtual_chunk_container``."""
        return icechunk.VirtualChunkContainer(self.prefix, self.store)


@dataclass
class VirtualTarget:
    """The repository of a virtual ingest, opened with access to the sources' containers.

    Attributes
    ----------
    target : RepositoryTarget
        As :func:`~icechunk_distributed.location.open_location` returns it.
    added : list of Container
        Containers added to an existing repository's configuration, not saved yet (or,
        with no repository there yet and none created, those a new one would get).
    prefixes : list of str
        The prefixes of the containers that cover the sources (existing or new).
    """

    target: RepositoryTarget
    added: list[Container] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)

    def dry_run_note(self) -> str:
        """What a run would change in the configuration (appended to the dry run's line)."""
        if not self.added:
            return ""
        return f"; it would get a virtual chunk container for {_names(self.added)}"

    def save_added(self) -> str:
        """Save the containers added to an existing repository; the line that says so."""
        if not self.added or self.target.repo is None:
            return ""
        self.target.repo.save_config()
        return f"added a virtual chunk container for {_names(self.added)} to the repository\n"

    def summary(self) -> str:
        """The line after a virtual ingest's summary: nothing copied, how to read it."""
        prefixes = ", ".join(self.prefixes)
        return (
            f"referenced, not copied: the chunks stay in the files under {prefixes}; "
            "readers open the repository with authorize_virtual_chunk_access for "
            + ("it" if len(self.prefixes) == 1 else "them")
        )


def _names(containers: Sequence[Container]) -> str:
    return ", ".join(c.prefix for c in containers)


def check_virtual_flags(virtual: bool, chunks: object, engine: object, loadable: object) -> None:
    """Refuse the command line's options a virtual (or a byte) ingest cannot take.

    Raises
    ------
    ContainerError
        ``--chunks`` or ``--engine`` with ``--virtual``, or ``--loadable`` without it.
    """
    if loadable and not virtual:
        raise ContainerError("--loadable is for --virtual ingests (the others copy everything)")
    if virtual and (chunks or engine):
        raise ContainerError(
            f"{'--chunks' if chunks else '--engine'} cannot be used with --virtual: references "
            "keep the files' own chunks, and VirtualiZarr parses the files (ingest without "
            "--virtual to copy the data)"
        )


def _local(directory: str) -> Container:
    if os.path.dirname(os.path.abspath(directory)) == os.path.abspath(directory):
        raise ContainerError(
            f"the sources' only common directory is {directory}: icechunk needs a container "
            "below the root. Ingest the files of each directory tree separately (with "
            "--append), or move them under one directory"
        )
    uri = file_url(directory).rstrip("/") + "/"  # as the references name files
    return Container(
        uri,
        icechunk.local_filesystem_store(directory.rstrip("/") + "/"),
        icechunk.credentials.LocalFileSystemAccess,
    )


def _s3(bucket: str, options: Mapping[str, Any]) -> Container:
    """The container of ``s3://bucket/``, reached as the sources are (obstore's options)."""
    endpoint = options.get("endpoint") or None
    anonymous = bool(options.get("skip_signature"))
    store = icechunk.s3_store(
        region=options.get("region"),
        endpoint_url=endpoint,
        allow_http=bool(options.get("allow_http")),
        anonymous=anonymous,
        # S3-compatible servers (MinIO, moto, Ceph) are addressed by path, not by subdomain.
        s3_compatible=bool(endpoint),
        force_path_style=bool(endpoint),
    )
    credential = (
        icechunk.s3_anonymous_credentials() if anonymous else icechunk.s3_from_env_credentials()
    )
    return Container(f"s3://{bucket}/", store, credential)


def source_containers(
    sources: Sequence[str], options: Mapping[str, Any] | None = None
) -> list[Container]:
    """The containers that cover ``sources``: one for the local files, one per bucket.

    Parameters
    ----------
    sources : sequence of str
        Files, globs or ``s3://`` URLs, as the command line got them. Local globs are
        expanded (their directories may differ); a URL's bucket is all that counts.
    options : mapping, optional
        obstore's options of the ``s3://`` sources (``endpoint``, ``region``,
        ``allow_http``, ``skip_signature``).

    Raises
    ------
    FileNotFoundError
        A local path that does not exist or a glob that matches nothing.
    LocationError
        A URL scheme other than ``s3://``, or one without a bucket.
    """
    local = [s for s in sources if not is_url(s)]
    out = []
    if local:
        dirs = [os.path.dirname(os.path.abspath(f)) for f in expand_paths(local)]
        out.append(_local(os.path.commonpath(dirs)))
    buckets: list[str] = []
    for url in (s for s in sources if is_url(s)):
        scheme, _, rest = url.partition("://")
        bucket = rest.split("/", 1)[0]
        if scheme != "s3" or not bucket:
            raise LocationError(f"{url}: a virtual ingest references local files or s3:// URLs")
        if bucket not in buckets:
            buckets.append(bucket)
    return out + [_s3(b, options or {}) for b in buckets]


_KINDS = {"LocalFileSystem": "local", "S3": "S3", "S3Compatible": "S3-compatible"}


def describe_store(store: Any) -> str:
    """Where a container's store reads from, for a person.

    ``local /abs/dir``, ``S3 (region eu-west-1)``, ``S3-compatible (endpoint
    http://host:9000, region us-east-1)``, or the store's kind (``Gcs``, ``Http``, ...).
    """
    kind = type(store).__name__
    name = _KINDS.get(kind, kind)
    try:
        inner = store[0]
    except (TypeError, IndexError):
        return name
    if isinstance(inner, str | os.PathLike):  # a local store's path is a pathlib.Path
        return f"{name} {os.fspath(inner)}"
    parts = [
        f"{label} {value}"
        for label, attr in (("endpoint", "endpoint_url"), ("region", "region"))
        if (value := getattr(inner, attr, None))
    ]
    return f"{name} ({', '.join(parts)})" if parts else name


def _same_place(have: Any, want: Container) -> bool:
    """Whether an existing container's store reads where ``want``'s would."""
    if type(have).__name__ != type(want.store).__name__:
        return False
    a, b = have[0], want.store[0]
    if isinstance(a, str | os.PathLike) and isinstance(b, str | os.PathLike):
        return os.path.normpath(os.fspath(a)) == os.path.normpath(os.fspath(b))
    return bool(
        (getattr(a, "endpoint_url", None) or "").rstrip("/")
        == (getattr(b, "endpoint_url", None) or "").rstrip("/")
    )


def _plan(
    existing: Mapping[str, Any], needed: Sequence[Container]
) -> tuple[list[Container], dict[str, Any]]:
    """The containers to add, and the access to give: per prefix that covers a source."""
    added: list[Container] = []
    access: dict[str, Any] = {}
    for want in needed:
        if want.prefix in existing:
            have = existing[want.prefix].store
            if not _same_place(have, want):
                raise ContainerError(
                    f"the repository's virtual chunk container for {want.prefix} reads from "
                    f"{describe_store(have)}, not from {describe_store(want.store)} where the "
                    "files are. Change or remove that container first "
                    "(RepositoryConfig.set_virtual_chunk_container, repo.save_config())"
                )
            access[want.prefix] = want.credential
            continue
        covering = [p for p in existing if want.prefix.startswith(p)]
        if covering:
            access[max(covering, key=len)] = want.credential
        else:
            added.append(want)
            access[want.prefix] = want.credential
    return added, access


def open_for_virtual(
    location: str,
    s3: S3Options | None,
    needed: Sequence[Container],
    *,
    create: bool,
    hint: str = "",
) -> VirtualTarget:
    """The repository at ``location``, with containers for ``needed`` and access to them.

    A repository created here gets the containers in its saved configuration. An existing
    one gets the missing containers in memory only (``added``): save them with
    ``repo.save_config()`` once the ingest succeeded, so a refused ingest changes nothing.

    Raises
    ------
    ContainerError
        The repository has a container with a needed prefix that reads from elsewhere.
    LocationError
        As :func:`~icechunk_distributed.location.open_location`.
    """
    config = icechunk.RepositoryConfig.default()
    for want in needed:
        config.set_virtual_chunk_container(want.virtual_chunk_container())
    access = {want.prefix: want.credential for want in needed}
    target = open_location(
        location,
        s3,
        create=create,
        hint=hint,
        config=config,
        authorize=icechunk.containers_credentials(access),
    )
    if target.repo is None or target.created:
        # Nothing to add to a created repository; a dry run's new one would get them all.
        return VirtualTarget(target, [] if target.created else list(needed), sorted(access))
    config = target.repo.config
    added, access = _plan(config.virtual_chunk_containers or {}, needed)
    for want in added:
        config.set_virtual_chunk_container(want.virtual_chunk_container())
    target.repo = target.repo.reopen(
        config=config, authorize_virtual_chunk_access=icechunk.containers_credentials(access)
    )
    return VirtualTarget(target, added, sorted(access))


def open_for_sources(
    location: str,
    s3: S3Options | None,
    sources: Sequence[str],
    source_options: Mapping[str, Any] | None,
    *,
    create: bool,
    hint: str = "",
) -> VirtualTarget:
    """:func:`open_for_virtual` with the containers :func:`source_containers` names."""
    needed = source_containers(sources, source_options)
    return open_for_virtual(location, s3, needed, create=create, hint=hint)


def _config(target: Any) -> Any:
    """The configuration of the repository behind a Repository, Session or DistributedSession."""
    import icechunk

    if isinstance(target, icechunk.Repository):
        return target.config
    session = getattr(target, "session", target)
    return session.config


def check_containers(target: Any, urls: Sequence[str]) -> None:
    """Refuse files no virtual chunk container of the repository covers.

    Raises
    ------
    ValueError
        Naming the files and showing the configuration that would allow them.
    """
    containers = _config(target).virtual_chunk_containers or {}
    prefixes = tuple(containers)
    odd = [u for u in urls if not u.startswith(prefixes)] if prefixes else list(urls)
    if not odd:
        return
    root = os.path.commonpath([os.path.dirname(u.split("://", 1)[1]) for u in odd])
    scheme = odd[0].split("://", 1)[0]
    prefix = f"{scheme}://{root.rstrip('/')}/"
    local = scheme == "file"
    store = (
        f'icechunk.local_filesystem_store("{root}")' if local else 'icechunk.s3_store(region="...")'
    )
    access = (
        f'{{"{prefix}": icechunk.credentials.LocalFileSystemAccess}}'
        if local
        else f'icechunk.containers_credentials({{"{prefix}": icechunk.s3_credentials(...)}})'
    )
    have = f"it has containers for {sorted(prefixes)}" if prefixes else "it has none"
    raise ValueError(
        f"the repository has no virtual chunk container for {len(odd)} file(s): "
        f"{short_list(odd)} ({have}), so references to them could not be read. Add one to "
        "its configuration and save it, then open it with access to the files:\n"
        "  config = icechunk.RepositoryConfig.default()\n"
        f'  config.set_virtual_chunk_container(icechunk.VirtualChunkContainer("{prefix}", '
        f"{store}))\n"
        f"  repo = icechunk.Repository.open(storage, config=config, "
        f"authorize_virtual_chunk_access={access})\n"
        "  repo.save_config()"
    )
