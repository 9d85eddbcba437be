"""Many source files into one dataset: :func:`ingest`, and its dry run :func:`plan_ingest`.

The pipeline, for files instead of a Dataset: every file's header is read on the executor
(:mod:`~icechunk_distributed.scan`), the coordinator orders and checks them, works out which
files an append still has to write, builds the template the files form
(:mod:`~icechunk_distributed.filemap`), and hands a loader that reads each region's files to
:func:`~icechunk_distributed.run_region_writes`: the same planning, encodings, checked
merges, retries, resumable runs and single commit as any other write. What lands in the
repository is what ``xr.open_mfdataset(files)`` followed by ``to_zarr`` would store.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import icechunk
import xarray as xr

from icechunk_distributed import options as opts
from icechunk_distributed.adapters import open_adapter
from icechunk_distributed.api import plan_regions, run_region_writes
from icechunk_distributed.commitsize import (
    DEFAULT_MAX_CHUNKS_PER_COMMIT,
    check_max_chunks_per_commit,
)
from icechunk_distributed.containers import check_containers
from icechunk_distributed.errors import TemplateMismatchError
from icechunk_distributed.filemap import (
    FileLoader,
    StoredDataset,
    file_template,
    split_append,
    task_variables,
)
from icechunk_distributed.ingestplan import IngestMode, IngestPlan, IngestResult
from icechunk_distributed.progress import Progress
from icechunk_distributed.runner import Backups
from icechunk_distributed.runs import work_branch
from icechunk_distributed.scan import FileHeader, FileSet, combine_headers, scan_files
from icechunk_distributed.sources import SourceOptions, expand_paths
from icechunk_distributed.template import Mode
from icechunk_distributed.virtual import (
    VirtualLoader,
    VirtualOptions,
    check_virtual,
    check_virtual_append,
    check_virtual_options,
    file_batches,
    hdf_prototypes,
    virtual_template,
)
from icechunk_distributed.virtualscan import (
    VirtualHeaderReader,
    check_decoding,
    check_grid,
    check_layouts,
    check_loadable,
    check_urls,
    file_url,
    scan_virtual,
)

if TYPE_CHECKING:
    from icechunk import Repository, Session

    from icechunk_distributed.session import DistributedSession

__all__ = ["IngestPlan", "IngestResult", "ingest", "plan_ingest"]
Paths = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


def _check_args(concat_dim: object, mode: object, chunks: object) -> dict[str, int | None]:
    if not isinstance(concat_dim, str) or not concat_dim:
        raise TypeError(f"concat_dim must be a dimension name, not {concat_dim!r}")
    if mode not in ("w-", "w", "a"):
        raise ValueError(
            f"mode must be 'w-' (create), 'w' (overwrite) or 'a' (append new files), not {mode!r}"
        )
    if chunks is None:
        return {}
    if not isinstance(chunks, Mapping):
        raise TypeError(f"chunks must be a dict such as {{{concat_dim!r}: 24}}, not {chunks!r}")
    out: dict[str, int | None] = {}
    for dim, size in chunks.items():
        ok = size is None or (isinstance(size, int) and not isinstance(size, bool) and size > 0)
        if not ok and size != -1:
            raise ValueError(f"chunks[{dim!r}] must be a positive int, -1 or None, not {size!r}")
        out[str(dim)] = size
    return out


def _stored(target: object, branch: str, group: str | None, dim: str) -> StoredDataset | None:
    """The stored concat values and variables (None: no dataset to append to yet)."""
    store = _store_of(target, branch)
    try:
        stored = xr.open_zarr(store, group=group, consolidated=False, chunks=None)
    except (FileNotFoundError, KeyError, ValueError):
        return None
    with stored:
        if dim not in stored.variables:
            if stored.variables:
                raise TemplateMismatchError(
                    f"the store holds a dataset ({sorted(map(str, stored.data_vars))}) without "
                    f"a {dim!r} coordinate: an append needs the stored {dim!r} values to tell "
                    "new files from stored ones"
                )
            return None
        return StoredDataset.of(stored, dim)


# long: the steps of a plan in order, each a call; splitting would only pass them around.
def _make_plan(
    paths: Paths,
    target: object,
    adapter: Any,
    *,
    concat_dim: str,
    mode: IngestMode,
    chunks: dict[str, int | None],
    order: Literal["by_coords", "given"],
    step: Any,
    engine: str | None,
    options: SourceOptions,
    branch: str,
    group: str | None,
    task_size: int | str | None,
    encoding: Mapping[str, Mapping[str, Any]] | None,
    retries: int,
    progress: Progress,
    virtual: VirtualOptions | None = None,
) -> IngestPlan:
    listed = expand_paths(paths, options=options)
    scan = {"executor": adapter, "retries": retries, "progress": progress, "options": options}
    reference = None
    if virtual is not None:
        check_urls(listed)
        reader = VirtualHeaderReader(concat_dim, virtual.parser, options, virtual.loadable)
        headers, reference = scan_virtual(listed, reader, scan)
        check_layouts(headers)
    else:
        headers = scan_files(listed, concat_dim, engine=engine, **scan)
    files = combine_headers(headers, concat_dim, order=order, step=step)
    if reference is not None:
        check_loadable(reference, virtual.loadable if virtual else ())
        check_decoding(files)
        if target is not None:
            check_containers(target, [file_url(p) for p in files.paths])
    unknown = sorted(set(chunks) - set(files.headers[0].sizes))
    if unknown:
        raise ValueError(
            f"chunks= names dimensions the files do not have: {unknown}; they have "
            f"{sorted(files.headers[0].sizes)}"
        )
    write_mode: IngestMode = mode
    skipped: list[str] = []
    stored = _stored(target, branch, group, concat_dim) if mode == "a" else None
    if mode == "a" and stored is None:
        write_mode = "w-"  # nothing to append to yet: the first run of a daily job creates
    elif stored is not None:
        split = split_append(files, stored.values, step=step)
        skipped = [h.path for h in split.skipped]
        if not split.new:
            return IngestPlan(None, skipped, None, [], None, "a", concat_dim, (concat_dim,))
        files = combine_headers(split.new, concat_dim, order="given")
    if virtual is not None and reference is not None:
        return _virtual_plan(
            files,
            reference,
            skipped,
            stored,
            target,
            adapter,
            virtual,
            write_mode,
            (branch, group),
            options,
            (task_size, encoding),
        )
    template = file_template(files, engine=engine, options=options, chunks=chunks)
    if stored is not None:
        stored.check_append(template, files.paths[0])
    names = task_variables(template, concat_dim)
    loader = FileLoader.of(files, names, engine=engine, options=options)
    single = _single_task(template, names, concat_dim, files.size, write_mode)
    region_dims: tuple[str, ...] = () if single else (concat_dim,)
    regions = plan_regions(
        loader,
        target,  # type: ignore[arg-type]
        template=template,
        branch=branch,
        group=group,
        mode=_zarr_mode(write_mode),
        append_dim=concat_dim if write_mode == "a" else None,
        region_dims=region_dims,
        task_size=task_size,
        encoding=encoding,
        parallelism=adapter.capabilities.parallelism,
    )
    return IngestPlan(
        files, skipped, template, regions, loader, write_mode, concat_dim, region_dims
    )


def _virtual_plan(
    files: FileSet,
    reference: FileHeader,
    skipped: list[str],
    stored: StoredDataset | None,
    target: object,
    adapter: Any,
    virtual: VirtualOptions,
    mode: IngestMode,
    where: tuple[str, str | None],
    options: SourceOptions,
    planning: tuple[int | str | None, Mapping[str, Mapping[str, Any]] | None],
) -> IngestPlan:
    """The plan of a virtual ingest: whole files per task, references only.

    ``where`` is (branch, group); ``planning`` the ``task_size`` and ``encoding`` asked for.
    """
    (branch, group), dim = where, files.concat_dim
    check_grid(files, reference)  # the files to write: stored ones were checked when written
    if stored is not None:
        check_virtual_append(_store_of(target, branch), group, files, reference)
    template, along, static = virtual_template(
        files, reference, parser=virtual.parser, options=options, loadable=virtual.loadable
    )
    check_virtual_options(*planning, referenced=along + static)
    if stored is not None:
        stored.check_append(template, files.paths[0], referenced=along + static)
    loaded = [n for n in task_variables(template, dim) if n not in along]
    first = file_url(files.paths[0])
    loader = VirtualLoader.of(
        files,
        along,
        static,
        parser=virtual.parser,
        options=options,
        loaded=loaded,
        prototypes=hdf_prototypes(first, along, virtual.parser, options),
    )
    single = _single_task(template, task_variables(template, dim), dim, files.size, mode)
    region_dims: tuple[str, ...] = () if single else (dim,)
    regions = plan_regions(
        loader,
        target,  # type: ignore[arg-type]
        template=template,
        branch=branch,
        group=group,
        mode=_zarr_mode(mode),
        append_dim=dim if mode == "a" else None,
        region_dims=region_dims,
        regions=None if single else file_batches(files, adapter.capabilities.parallelism),
        parallelism=adapter.capabilities.parallelism,
    )
    return IngestPlan(files, skipped, template, regions, loader, mode, dim, region_dims)


def _single_task(
    template: xr.Dataset, names: Sequence[str], dim: str, size: int, mode: IngestMode
) -> bool:
    """Whether the task variables are one chunk along ``dim`` (a new dataset).

    No two tasks could share that chunk, so the planner would leave it to the coordinator,
    which would then read every file itself: give it to one task instead.
    """
    return mode != "a" and all(
        template[n].encoding["chunks"][template[n].dims.index(dim)] >= size for n in names
    )


def _store_of(target: object, branch: str) -> Any:
    if isinstance(target, icechunk.Repository):
        return target.readonly_session(branch).store
    return getattr(target, "store", None)


def _zarr_mode(mode: IngestMode) -> Mode:
    """The ``to_zarr`` mode of an ingest mode.

    An append is ``"a-"``: the stored variables without the concat dim (a land-sea mask,
    2-D lat/lon) keep the values of the first files ever ingested, as
    ``open_mfdataset`` of all the files would give them, instead of being rewritten with
    the newest file's.
    """
    return "a-" if mode == "a" else mode


def plan_ingest(
    paths: Paths,
    target: Repository | Session | DistributedSession | None = None,
    *,
    concat_dim: str,
    mode: IngestMode = "w-",
    chunks: Mapping[str, int | None] | None = None,
    order: Literal["by_coords", "given"] = "by_coords",
    step: Any = None,
    engine: str | None = None,
    source_options: Mapping[str, Any] | None = None,
    branch: str = "main",
    group: str | None = None,
    task_size: int | str | None = None,
    encoding: Mapping[str, Mapping[str, Any]] | None = None,
    executor: Any = "threads",
    workers: int | None = None,
    retries: int = 2,
    progress: Progress = None,
    virtual: bool = False,
    parser: Any = None,
    loadable_variables: Sequence[str] = (),
) -> IngestPlan:
    """What :func:`ingest` would write, with the same arguments (the dry run).

    The headers are read on ``executor`` and every check of the run is made; nothing is
    written. Arguments as in :func:`ingest`; without ``target`` the plan is for a new store.

    Returns
    -------
    IngestPlan
        Files in order, skipped files, template, and the regions with the files of each.
    """
    checked = _check_args(concat_dim, mode, chunks)
    how = check_virtual(virtual, parser, loadable_variables, checked, engine)
    if isinstance(target, icechunk.Repository):
        opts.check_branch(target, branch)
    with open_adapter(executor, workers=opts.check_workers(workers)) as adapter:
        return _make_plan(
            paths,
            target,
            adapter,
            concat_dim=concat_dim,
            mode=mode,
            chunks=checked,
            order=order,
            step=step,
            engine=engine,
            options=SourceOptions(dict(source_options or {})),
            branch=branch,
            group=group,
            task_size=task_size,
            encoding=encoding,
            retries=retries,
            progress=progress,
            virtual=how,
        )


# long: about 80 of its lines are the docstring of its 23 parameters; the body is glue.
def ingest(
    paths: Paths,
    target: Repository | Session | DistributedSession,
    *,
    concat_dim: str,
    executor: Any = "threads",
    mode: IngestMode = "w-",
    chunks: Mapping[str, int | None] | None = None,
    order: Literal["by_coords", "given"] = "by_coords",
    step: Any = None,
    engine: str | None = None,
    source_options: Mapping[str, Any] | None = None,
    branch: str = "main",
    group: str | None = None,
    task_size: int | str | None = None,
    encoding: Mapping[str, Mapping[str, Any]] | None = None,
    message: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    retries: int = 2,
    progress: Progress = None,
    workers: int | None = None,
    run_id: str | None = None,
    checkpoint_every: float = 10.0,
    backups: Backups | bool | None = None,
    virtual: bool = False,
    parser: Any = None,
    loadable_variables: Sequence[str] = (),
    max_chunks_per_commit: int | None = DEFAULT_MAX_CHUNKS_PER_COMMIT,
) -> IngestResult:
    """Write many source files into one dataset, in parallel, and commit once.

    Every file's header is read on ``executor``; the files are ordered along ``concat_dim``
    and checked (same variables, dtypes, dims and other coordinates; no overlapping or
    repeated values; no gaps if ``step`` is given) before anything is written. Each task then
    reads only the files of its region. The result is what ``xr.open_mfdataset(files,
    combine="by_coords")`` followed by ``to_zarr`` would store. See ``docs/ingest.md``.

    Parameters
    ----------
    paths : str, path, or sequence of them
        Files, globs (``"data/*.nc"``, ``"data/**/*.nc"``) or ``s3://`` URLs (globs too) of
        netCDF4/HDF5 files or Zarr stores (``*.zarr``). A glob's matches are sorted.
    target : icechunk.Repository, icechunk.Session or DistributedSession
        Where to write, as in :func:`~icechunk_distributed.run_region_writes`.
    concat_dim : str
        The dimension the files are concatenated along.
    executor : str, concurrent.futures.Executor or Adapter, default "threads"
        Where headers are read and regions written (one pool for both).
    mode : {"w-", "w", "a"}, default "w-"
        Create (refuse an existing dataset), overwrite, or append: write only the files
        whose ``concat_dim`` values all follow the stored ones; files already stored with
        the same values are skipped, files partly stored or inside the stored range are
        refused. On a store without the dataset, ``"a"`` creates it.
    chunks : dict, optional
        ``{dim: size}`` of the new arrays (``-1`` or None: whole); by default the first
        file's own chunks, as ``open_mfdataset`` + ``to_zarr`` would make them.
    order : {"by_coords", "given"}, default "by_coords"
        Sort the files by their ``concat_dim`` values, or keep the order given.
    step : optional
        The spacing of ``concat_dim`` values, when there must be no gaps (``"1D"``,
        ``"6h"``, or a number); a gap is refused, naming the files around it.
    engine : str, optional
        xarray's engine for the files (``"h5netcdf"``, ``"zarr"``); guessed by default.
    source_options : dict, optional
        How to reach ``s3://`` sources: obstore's configuration (``endpoint``, ``region``,
        ``access_key_id``, ``secret_access_key``, ``skip_signature``, ``allow_http``). Never
        shown in messages.
    branch, group, task_size, encoding, message, metadata, retries, progress, workers, \
run_id, checkpoint_every, backups, max_chunks_per_commit
        As in :func:`~icechunk_distributed.run_region_writes`. With ``run_id`` an ingest
        that failed or was killed resumes where it stopped; over ``max_chunks_per_commit``
        chunk references (virtual ones too) it commits in steps and publishes once.
    virtual : bool, default False
        Reference the files' chunks (file, offset, length) instead of copying their data,
        with VirtualiZarr (``pip install 'icechunk-distributed[virtual]'``). The repository
        needs a virtual chunk container covering the files (checked first), and readers
        need access to them. The files must share each array's dtype, chunk shape, codecs
        and fill value, and every file but the last must hold whole chunks along
        ``concat_dim``. See ``docs/virtual.md``.
    parser : VirtualiZarr parser, optional
        How to parse the files (``virtual=True``); ``virtualizarr.parsers.HDFParser()`` for
        netCDF4/HDF5 by default. It must pickle, to reach other processes.
    loadable_variables : sequence of str, optional
        Variables to copy rather than reference (``virtual=True``); dimension coordinates
        always are, as ``open_virtual_dataset`` loads them.

    Returns
    -------
    IngestResult
        Files written and skipped, and the write's result (commit, regions, bytes, time).

    Raises
    ------
    FileNotFoundError
        A path does not exist or a glob matches nothing.
    TemplateMismatchError
        Files that cannot form one dataset, or an append that would rewrite stored values;
        the message names the files. Nothing was written.
    RegionWriteError
        Regions failed on every attempt; nothing was committed.
    """
    t0 = time.perf_counter()
    # plan_ingest checks these too; here they fail before a pool is started.
    check_virtual(
        virtual, parser, loadable_variables, _check_args(concat_dim, mode, chunks), engine
    )
    if isinstance(target, icechunk.Repository):
        opts.check_branch(target, branch)
    # Checked now, not only when there is something to write: a bad cron line must fail
    # on its first day, whatever the directory holds.
    message, metadata = opts.check_message(message), opts.check_metadata(metadata)
    retries, progress = opts.check_retries(retries), opts.check_progress(progress)
    opts.check_checkpoint_every(checkpoint_every)
    check_max_chunks_per_commit(max_chunks_per_commit)
    if run_id is not None:
        work_branch(run_id)
    with open_adapter(executor, workers=opts.check_workers(workers)) as adapter:
        plan = plan_ingest(  # the dry run's own plan: one path from files to regions
            paths,
            target,
            concat_dim=concat_dim,
            mode=mode,
            chunks=chunks,
            order=order,
            step=step,
            engine=engine,
            source_options=source_options,
            branch=branch,
            group=group,
            task_size=task_size,
            encoding=encoding,
            executor=adapter,
            retries=retries,
            progress=progress,
            virtual=virtual,
            parser=parser,
            loadable_variables=loadable_variables,
        )
        scanned = time.perf_counter() - t0
        if plan.files is None or plan.loader is None:
            return IngestResult([], plan.skipped, None, time.perf_counter() - t0, scanned, virtual)
        n = len(plan.files.headers)
        result = run_region_writes(
            plan.loader,
            target,
            template=plan.template,
            executor=adapter,
            branch=branch,
            group=group,
            mode=_zarr_mode(plan.mode),
            append_dim=concat_dim if plan.mode == "a" else None,
            region_dims=plan.region_dims,
            regions=plan.regions,
            encoding=encoding,
            message=message
            or f"{'reference' if virtual else 'ingest'} {n} file(s) along {concat_dim!r}",
            metadata=metadata,
            retries=retries,
            progress=progress,
            run_id=run_id,
            checkpoint_every=checkpoint_every,
            backups=backups,
            max_chunks_per_commit=max_chunks_per_commit,
        )
    seconds = time.perf_counter() - t0
    copied = plan.loader.loaded if isinstance(plan.loader, VirtualLoader) else ()
    return IngestResult(
        plan.files.paths, plan.skipped, result, seconds, scanned, virtual, tuple(copied)
    )
