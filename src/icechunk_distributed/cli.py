"""The ``icechunk-distributed`` command line (also ``python -m icechunk_distributed``)."""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="icechunk-distributed",
        description="Parallel, transactional writes of xarray/zarr data into Icechunk.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="write a synthetic dataset in parallel into a local repository and verify it",
    )
    demo.add_argument(
        "--executor", choices=["processes", "threads", "joblib", "serial"], default="processes"
    )
    demo.add_argument("--workers", type=int, default=None, help="pool size (default: CPUs)")
    demo.add_argument("--mb", type=float, default=64.0, help="dataset size in MB (default 64)")
    demo.add_argument(
        "--path", default=None, help="repository directory to create (default: a temporary one)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code.

    Parameters
    ----------
    argv : list of str, optional
        Arguments (``sys.argv[1:]`` by default).

    Returns
    -------
    int
        0 on success.
    """
    args = _parser().parse_args(argv)
    # Local-filesystem storage warns about concurrent committers on every open; the demo has one.
    os.environ.setdefault("ICECHUNK_LOG", "error")
    if args.command == "demo":
        from icechunk_distributed.demo import run_demo

        if args.mb <= 0:
            print("error: --mb must be positive", file=sys.stderr)
            return 2
        result = run_demo(
            executor=args.executor, workers=args.workers, megabytes=args.mb, path=args.path
        )
        print(result.summary())
        return 0
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
