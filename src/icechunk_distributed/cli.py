"""The ``icechunk-distributed`` command line (also ``python -m icechunk_distributed``).

Commands: ``ingest`` (many netCDF/HDF5/Zarr files into one dataset in a repository),
``info`` (what a repository holds) and ``demo``. Exit codes: 0 success, 1 a run that failed,
2 bad input (nothing was written), 130 interrupted. Errors are one ``error: ...`` line on
stderr; ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from icechunk_distributed._version import __version__
from icechunk_distributed.errors import (
    CommitConflictError,
    DistributedWriteError,
    RegionWriteError,
    TemplateMismatchError,
)
from icechunk_distributed.location import (
    RepositoryTarget,
    S3Options,
    is_url,
    open_location,
    remove_if_untouched,
)

__all__ = ["BadInputError", "exit_code", "main"]

EXECUTORS = ("serial", "threads", "processes", "joblib", "dask", "ray", "lithops")
_DEMO_EXECUTORS = ("processes", "threads", "joblib", "serial")


class BadInputError(ValueError):
    """Input the command refuses before doing anything (exit code 2)."""


# ---------------------------------------------------------------------------------------------
# Argument types: each refuses a bad value with a message argparse prints (exit code 2).


def _integer(minimum: int) -> Callable[[str], int]:
    """An argument type: integers from ``minimum`` on (``--workers 0`` is not a pool)."""
    kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {kind}, not {text!r}")
        return value

    return parse


_positive_int, _count = _integer(1), _integer(0)


def _megabytes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    # "nan" and "inf" parse as floats; neither is a size (and nan slips through "<= 0").
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be positive and finite, not {text!r}")
    return value


def _chunks(text: str) -> dict[str, int]:
    """``time=24,lat=90`` as ``{"time": 24, "lat": 90}`` (``-1``: the whole dimension)."""
    out: dict[str, int] = {}
    for item in text.split(","):
        dim, sep, size = (part.strip() for part in item.partition("="))
        if not sep or not dim:
            raise argparse.ArgumentTypeError(f"expected DIM=SIZE[,DIM=SIZE...], not {text!r}")
        try:
            n = int(size)
        except ValueError:
            n = 0
        if n < 1 and n != -1:
            raise argparse.ArgumentTypeError(
                f"the chunk size of {dim!r} must be a positive integer or -1 (the whole "
                f"dimension), not {size!r}"
            )
        out[dim] = n
    return out


def _number_or_text(text: str) -> int | float | str:
    """A step or task size: numbers as numbers (``6``, ``0.25``), the rest as given (``1D``)."""
    with contextlib.suppress(ValueError):
        return int(text)
    with contextlib.suppress(ValueError):
        if math.isfinite(number := float(text)):  # "nan" stays text, for the library to refuse
            return number
    return text


# ---------------------------------------------------------------------------------------------
# The parser


_INGEST_EXAMPLES = """\
examples:
  # many daily files into a new repository, on a process pool, resumable if interrupted
  icechunk-distributed ingest 'data/era5/*.nc' ./era5-repo --concat-dim time \\
      --executor processes --chunks time=24 --run-id era5-2026

  # the daily cron: append the new files, skip those already in the store
  icechunk-distributed ingest 'data/era5/2026-12-*.nc' ./era5-repo --concat-dim time --append

  # what would be written, without writing anything (no repository is created)
  icechunk-distributed ingest 'data/era5/*.nc' ./era5-repo --concat-dim time --dry-run

  # reference the files' chunks instead of copying them (a virtual chunk container is added)
  icechunk-distributed ingest 'data/era5/*.nc' ./era5-virtual --concat-dim time --virtual

  # from and to S3 (credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)
  icechunk-distributed ingest 's3://bucket/era5/*.nc' s3://bucket/repos/era5 \\
      --concat-dim time --region eu-west-1

Quote globs: the command expands them itself (sorted), also on S3. REPO is a local
directory (created if missing or empty) or s3://bucket/prefix (created if no repository
is there). Files are ordered by their --concat-dim values and checked before anything is
written; the result is what xr.open_mfdataset(files) followed by to_zarr would store.
"""

_INFO_EXAMPLES = """\
examples:
  icechunk-distributed info ./era5-repo
  icechunk-distributed info s3://bucket/repos/era5 --region eu-west-1 --branch dev
"""

_DEMO_EXAMPLES = """\
examples:
  icechunk-distributed demo                       # 64 MB synthetic dataset, process pool
  icechunk-distributed demo --executor threads --mb 8
  icechunk-distributed demo --ingest              # 8 daily netCDF files through ingest
  icechunk-distributed demo --ingest --path ./demo-repo   # keep the repository
  icechunk-distributed demo --ingest --virtual    # reference the files, copy nothing
"""

_MAIN_EPILOG = """\
exit codes: 0 success, 1 the run failed (nothing committed), 2 bad input (nothing
written), 130 interrupted. "icechunk-distributed COMMAND --help" shows examples.
"""


def _add_output_options(p: argparse.ArgumentParser) -> None:
    loud = p.add_mutually_exclusive_group()
    loud.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bar or summary; errors only"
    )
    loud.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show icechunk's warnings, skipped files, and tracebacks of errors",
    )


def _add_storage_options(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group(
        "S3 repository (REPO = s3://bucket/prefix; credentials from the AWS_* environment)"
    )
    group.add_argument("--endpoint-url", metavar="URL", help="an S3-compatible endpoint (MinIO)")
    group.add_argument("--region", help="the bucket's region")
    group.add_argument("--anonymous", action="store_true", help="unsigned requests")
    group.add_argument("--allow-http", action="store_true", help="allow an http:// endpoint")


def _subcommand(commands: Any, name: str, summary: str, description: str, epilog: str) -> Any:
    return commands.add_parser(
        name,
        help=summary,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _add_ingest(commands: Any) -> None:
    p = _subcommand(
        commands,
        "ingest",
        "write many netCDF/HDF5/Zarr files into one dataset in a repository",
        "Write many netCDF/HDF5/Zarr files into one dataset, in parallel, and commit once.",
        _INGEST_EXAMPLES,
    )
    p.usage = "%(prog)s [options] --concat-dim DIM SOURCE [SOURCE ...] REPO"
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="files, globs or s3:// URLs")
    p.add_argument("repo", metavar="REPO", help="a local directory or s3://bucket/prefix")
    p.add_argument("--concat-dim", required=True, metavar="DIM", help="dimension to concatenate")
    p.add_argument(
        "--executor", choices=EXECUTORS, default="processes", help="(default: %(default)s)"
    )
    p.add_argument("--workers", type=_positive_int, metavar="N", help="pool size")
    p.add_argument(
        "--chunks",
        type=_chunks,
        action="append",
        metavar="DIM=N[,DIM=N]",
        help="chunk sizes of new arrays (-1: whole); default: the first file's",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--append", action="store_true", help="append files not yet stored (creates if needed)"
    )
    mode.add_argument("--overwrite", action="store_true", help="replace the stored dataset")
    p.add_argument(
        "--order",
        choices=("by_coords", "given"),
        default="by_coords",
        help="sort files by their DIM values, or keep the order given (default: %(default)s)",
    )
    p.add_argument(
        "--step",
        type=_number_or_text,
        help="spacing of DIM values; refuse gaps (e.g. 1D, 6h, 0.25)",
    )
    p.add_argument("--engine", help="xarray engine for the files (h5netcdf, zarr, ...)")
    v = p.add_argument_group("virtual ingest (netCDF4/HDF5; a container for the files is added)")
    v.add_argument("--virtual", action="store_true", help="reference the files' chunks, copy none")
    v.add_argument("--loadable", action="append", metavar="NAME", help="copy NAME (repeatable)")
    p.add_argument("--branch", default="main", help="branch to commit to (default: main)")
    p.add_argument("--group", help="zarr group of the dataset (default: the root)")
    p.add_argument(
        "--task-size",
        type=_number_or_text,
        metavar="SIZE",
        help="chunks per task (4) or bytes (256MB)",
    )
    p.add_argument("--message", help="commit message")
    p.add_argument("--run-id", metavar="ID", help="resumable: rerun with the same ID to resume")
    p.add_argument(
        "--retries", type=_count, default=2, metavar="N", help="retries per task (default: 2)"
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan; write nothing")
    _add_output_options(p)
    _add_storage_options(p)
    src = p.add_argument_group("S3 sources (default: the repository's endpoint and region)")
    src.add_argument("--source-endpoint-url", metavar="URL", help="endpoint ('' for AWS's)")
    src.add_argument("--source-region", metavar="REGION", help="region of the sources' bucket")
    src.add_argument("--source-anonymous", action="store_true", help="unsigned source reads")
    p.set_defaults(handler=_cmd_ingest)


def _add_info(commands: Any) -> None:
    p = _subcommand(
        commands,
        "info",
        "what a repository holds: branches, commits, arrays, unfinished runs",
        "Branches, the last commits, arrays (dims, dtype, chunks, sizes), the stored size, "
        "and unfinished resumable runs of a repository.",
        _INFO_EXAMPLES,
    )
    p.add_argument("repo", metavar="REPO", help="a local directory or s3://bucket/prefix")
    p.add_argument("--branch", default="main", help="branch to describe (default: main)")
    p.add_argument(
        "--commits", type=_count, default=5, metavar="N", help="commits to list (default: 5)"
    )
    p.add_argument("--no-stored-size", action="store_true", help="skip the walk over all manifests")
    _add_output_options(p)
    _add_storage_options(p)
    p.set_defaults(handler=_cmd_info)


def _add_demo(commands: Any) -> None:
    p = _subcommand(
        commands,
        "demo",
        "write a synthetic dataset in parallel and verify it",
        "Write a synthetic dataset in parallel into a local repository and verify the "
        "read-back; with --ingest, write sample daily netCDF files and ingest them instead.",
        _DEMO_EXAMPLES,
    )
    p.add_argument("--executor", choices=_DEMO_EXECUTORS, default="processes")
    p.add_argument("--workers", type=_positive_int, metavar="N", help="pool size (default: CPUs)")
    p.add_argument("--mb", type=_megabytes, default=64.0, help="data size in MB (default: 64)")
    p.add_argument("--path", help="repository directory to create (default: a temporary one)")
    p.add_argument("--ingest", action="store_true", help="write sample netCDF files; ingest them")
    p.add_argument("--virtual", action="store_true", help="--ingest, files referenced")
    _add_output_options(p)
    p.set_defaults(handler=_cmd_demo)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="icechunk-distributed",
        description="Parallel, transactional writes of xarray/zarr data into Icechunk.",
        epilog=_MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=_version_text())
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_ingest(commands)
    _add_info(commands)
    _add_demo(commands)
    return parser


def _version_text() -> str:
    import icechunk  # already imported by the package; named here for its version

    return f"icechunk-distributed {__version__} (icechunk {icechunk.__version__})"


# ---------------------------------------------------------------------------------------------
# Commands


def _source_options(args: argparse.Namespace, sources: Sequence[str]) -> dict[str, Any] | None:
    """The obstore options of ``s3://`` sources: the repository's endpoint and region by default.

    Credentials are not passed: obstore reads ``AWS_*`` variables itself, in every worker.
    """
    if not any(is_url(s) for s in sources):
        return None
    endpoint = args.endpoint_url if args.source_endpoint_url is None else args.source_endpoint_url
    options: dict[str, Any] = {}
    if endpoint:
        options["endpoint"] = endpoint
    if args.source_region or args.region:
        options["region"] = args.source_region or args.region
    if args.allow_http:
        options["allow_http"] = True
    if args.source_anonymous or args.anonymous:
        options["skip_signature"] = True
    return options or None


def _quiet_interrupt() -> None:
    """Process-pool worker initializer: Ctrl-C ends the worker without a traceback.

    A terminal sends SIGINT to every process of the foreground group, so each worker would
    print its own ``KeyboardInterrupt`` traceback; the command reports the interrupt once.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _executor(name: str, workers: int | None) -> Any:
    """The executor to hand the library: its name, or for ``processes`` a pool of its own kind.

    The pool's workers end quietly on Ctrl-C (see :func:`_quiet_interrupt`).
    """
    if name != "processes":
        return name
    from concurrent.futures import Executor, ProcessPoolExecutor

    from icechunk_distributed.adapters.local import FuturesAdapter, safe_mp_context

    n = workers or os.cpu_count() or 1

    def pool() -> Executor:
        return ProcessPoolExecutor(n, mp_context=safe_mp_context(), initializer=_quiet_interrupt)

    return FuturesAdapter(pool(), owned=True, factory=pool)


def _ingest_options(args: argparse.Namespace, sources: Sequence[str]) -> dict[str, Any]:
    chunks: dict[str, int] = {}
    for given in args.chunks or []:
        chunks.update(given)
    return {
        "concat_dim": args.concat_dim,
        "mode": "a" if args.append else "w" if args.overwrite else "w-",
        "chunks": chunks or None,
        "order": args.order,
        "step": args.step,
        "engine": args.engine,
        "virtual": args.virtual,
        "loadable_variables": tuple(args.loadable or ()),
        "source_options": _source_options(args, sources),
        "branch": args.branch,
        "group": args.group,
        "task_size": args.task_size,
        "retries": args.retries,
        # Sized here for "processes" (see _executor); the library sizes the pools it starts.
        "workers": None if args.executor == "processes" else args.workers,
        # None: a bar when stderr is a terminal (the library decides).
        "progress": False if args.quiet else None,
    }


_NOT_A_REPO_HINT = (
    " (REPO, the last argument, must be a repository, a new path or an empty directory)"
)


def _s3(args: argparse.Namespace) -> S3Options:
    return S3Options(args.endpoint_url, args.region, args.anonymous, args.allow_http)


def _open(
    location: str, args: argparse.Namespace, *, create: bool, hint: str = _NOT_A_REPO_HINT
) -> RepositoryTarget:
    return open_location(location, _s3(args), create=create, hint=hint)


def _flag_hint(error: BaseException, mode: str) -> BadInputError | None:
    """The library's advice names its arguments (``mode='a'``); name the flags too."""
    if isinstance(error, TemplateMismatchError) and mode == "w-" and "mode='w-'" in str(error):
        return BadInputError(
            f"{error}\nOn the command line: --append adds the new files, --overwrite replaces "
            "the dataset."
        )
    return None


def _cmd_ingest(args: argparse.Namespace) -> int:
    from icechunk_distributed.containers import check_virtual_flags, open_for_sources
    from icechunk_distributed.ingestion import ingest, plan_ingest

    sources, location = args.sources, args.repo
    check_virtual_flags(args.virtual, args.chunks, args.engine, args.loadable)
    options = _ingest_options(args, sources)
    vt = None
    if args.virtual:  # the repository gets containers for the sources, and access to them
        vt = open_for_sources(
            location, _s3(args), sources, options["source_options"],
            create=not args.dry_run, hint=_NOT_A_REPO_HINT,
        )  # fmt: skip
    target = vt.target if vt else _open(location, args, create=not args.dry_run)
    options["executor"] = executor = _executor(args.executor, args.workers)
    try:
        if args.dry_run:
            plan = plan_ingest(sources, target.repo, **options)
        else:
            assert target.repo is not None
            result = ingest(
                sources, target.repo, message=args.message, run_id=args.run_id, **options
            )
    except BaseException as error:
        remove_if_untouched(target)
        hinted = _flag_hint(error, options["mode"])
        if hinted is not None:
            raise hinted from error
        raise
    finally:
        if not isinstance(executor, str):
            executor.close()  # the library closes only the pools it starts itself
    if args.dry_run:
        where = "a new repository" if target.repo is None else "the repository"
        more = vt.dry_run_note() if vt else ""
        print(f"{plan.summary()}\ndry run: nothing written ({where} at {location}{more})")
        return 0
    # Saved only now: a refused or failed ingest leaves the repository's configuration alone.
    saved = vt.save_added() if vt and result.write is not None else ""
    if args.verbose and result.skipped:
        print("skipped (already in the store):", *result.skipped, sep="\n  ")
    if not args.quiet:
        new = f"\nnew repository at {location}" if target.created else ""
        virtual = f"\n{vt.summary()}" if vt and result.write is not None else ""
        print(f"{saved}{result.summary()}{new}{virtual}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from icechunk_distributed.info import describe_repository

    target = _open(args.repo, args, create=False, hint="")
    if target.repo is None:
        raise BadInputError(f"no Icechunk repository at {args.repo}")
    text = describe_repository(
        target.repo,
        branch=args.branch,
        n_commits=args.commits,
        stored_sizes=not args.no_stored_size,
    )
    print(f"repository: {args.repo}\n{text}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from icechunk_distributed.demo import run_demo, run_ingest_demo

    demo: Callable[..., Any] = run_ingest_demo if args.ingest or args.virtual else run_demo
    result = demo(
        **({"virtual": True} if args.virtual else {}),
        executor=args.executor,
        workers=args.workers,
        megabytes=args.mb,
        path=args.path,
        out=io.StringIO() if args.quiet else None,
        progress=False if args.quiet else None,
    )
    if not args.quiet:
        print(result.summary())
    return 0


# ---------------------------------------------------------------------------------------------
# Errors and the entry point


def exit_code(error: BaseException) -> int:
    """The exit code for an error that ended a command.

    Parameters
    ----------
    error : BaseException
        What the command raised.

    Returns
    -------
    int
        130 for an interrupt; 1 for a run that failed (:class:`RegionWriteError`,
        :class:`CommitConflictError` and :class:`TargetMovedError`, storage errors, anything
        unexpected); 2 for bad input, refused before anything was written (bad arguments,
        missing or unreadable source files, files that cannot be combined, a path that is not a
        repository, a missing optional executor).
    """
    if isinstance(error, KeyboardInterrupt):
        return 130
    if isinstance(error, RegionWriteError | CommitConflictError):
        return 1
    bad_input = (
        ValueError,  # TemplateMismatchError, RunMismatchError, BadInputError, bad options
        TypeError,
        FileNotFoundError,
        PermissionError,
        IsADirectoryError,
        NotADirectoryError,
        ImportError,  # an executor whose package is not installed
    )
    return 2 if isinstance(error, bad_input) else 1


def _message(error: BaseException) -> str:
    text = str(error).strip()
    if isinstance(error, DistributedWriteError | ValueError | OSError) and text:
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _configure_logs(verbose: bool) -> None:
    """Quiet icechunk's Rust log below errors, unless ``--verbose`` or ``ICECHUNK_LOG`` is set.

    Local storage warns "not safe for concurrent commits" on every open, which a command with
    one committer should not print. Icechunk read ``ICECHUNK_LOG`` when this package imported
    it, so the filter is set again here; the variable itself reaches worker processes.
    """
    import icechunk

    os.environ.setdefault("ICECHUNK_LOG", "warn" if verbose else "error")
    icechunk.set_logs_filter(os.environ["ICECHUNK_LOG"])


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code.

    Parameters
    ----------
    argv : list of str, optional
        Arguments (``sys.argv[1:]`` by default).

    Returns
    -------
    int
        0 on success, 1 if a run failed, 2 for bad input, 130 if interrupted.
    """
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error argparse printed
        return exc.code if isinstance(exc.code, int) else 2
    verbose = bool(getattr(args, "verbose", False))
    try:
        _configure_logs(verbose)
        code: int = args.handler(args)
        return code
    except (Exception, KeyboardInterrupt) as error:
        if verbose:
            traceback.print_exc()
        code = exit_code(error)
        if code == 130:
            resume = (
                " (rerun with the same --run-id to resume)" if getattr(args, "run_id", None) else ""
            )
            print(f"interrupted{resume}", file=sys.stderr)
        else:
            print(f"error: {_message(error)}", file=sys.stderr)
        return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
