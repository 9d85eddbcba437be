"""Benchmarks: ours against the baselines users would otherwise write, measured in one run.

    python -m benchmarks                 # S1-S6 (S1-S5: about 11 minutes on 2 cores)
    python -m benchmarks --only S1 --repeat 5
    python -m benchmarks --only S5       # 96 netCDF files (1 GB) into a new repository
    python -m benchmarks --only S6       # 1,000 small netCDF files referenced (virtual ingest)
    python -m benchmarks --smoke         # tiny sizes, one repetition: checks that it all runs

S5 and S6 generate their source files once into ``benchmarks/.cache/`` (about 1 GB and 50 MB,
ignored by git).

Every contender's result is read back and checked. Contenders alternate within each
repetition and the median is reported; ratios are ours / baseline (below 1: we are faster).
Results go to ``benchmarks/results/latest.json`` (and ``s4_scaling.png`` with matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("ICECHUNK_LOG", "error")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Worker processes (Lithops runs them from its own directory) import the scenario functions.
_root = str(Path(__file__).resolve().parent.parent)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [_root, os.environ.get("PYTHONPATH")] if p)

from benchmarks import ingest, scenarios, virtual  # noqa: E402 - after PYTHONPATH, which workers inherit

RESULTS = Path(__file__).parent / "results"


def measure(
    contenders: dict[str, Callable[[], float]], repeat: int, once: frozenset[str] = frozenset()
) -> dict[str, list[float]]:
    """Run every contender ``repeat`` times, alternating; ``once`` contenders run once."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(repeat):
        for name, run in contenders.items():
            if name in once and r > 0:
                continue
            times[name].append(run())
    return times


def rows_for(scenario: str, times: dict[str, list[float]], ours: str) -> list[dict[str, object]]:
    out = []
    mine = statistics.median(times[ours])
    for name, ts in times.items():
        med = statistics.median(ts)
        out.append(
            {
                "scenario": scenario,
                "contender": name,
                "median_s": med,
                "runs": ts,
                "ours_over_this": None if name == ours else mine / med,
            }
        )
    return out


def print_rows(rows: list[dict[str, object]]) -> None:
    print(f"\n{'scenario':<4} {'contender':<26} {'median s':>9} {'ours/this':>10}  runs")
    for row in rows:
        ratio = row["ours_over_this"]
        r = "" if ratio is None else f"{ratio:.2f}x"
        runs = ", ".join(f"{t:.2f}" for t in row["runs"])  # type: ignore[attr-defined]
        print(
            f"{row['scenario']:<4} {row['contender']:<26} {row['median_s']:>9.3f} {r:>10}  {runs}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="icechunk-distributed benchmarks")
    parser.add_argument("--only", default="S1,S2,S3,S4,S5,S6", help="comma-separated scenarios")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repetition")
    parser.add_argument("--full", action="store_true", help="S4 up to 100k tasks, 1M chunks")
    args = parser.parse_args(argv)
    repeat = 1 if args.smoke else args.repeat
    chosen = {s.strip().upper() for s in args.only.split(",")}
    rows: list[dict[str, object]] = []
    extra: dict[str, object] = {}
    t0 = time.perf_counter()

    if "S1" in chosen:
        n = 24 if args.smoke else 240
        with scenarios.S1(n_regions=n) as s1:
            times = measure(s1.contenders(), repeat)
        on_threads = {k: v for k, v in times.items() if "processes" not in k}
        rows += rows_for("S1", on_threads, "ours (threads)")
        on_processes = {k: v for k, v in times.items() if "processes" in k}
        rows += rows_for("S1", on_processes, "ours (processes)")
    if "S2" in chosen:
        n = 4 if args.smoke else 64
        with scenarios.S2(n_regions=n) as s2:
            times = measure(s2.contenders(), repeat)
            extra["S2_bytes"] = s2.nbytes
        for engine in ("processes", "dask", "ray"):
            ours = f"ours ({engine})"
            group = {
                k: v
                for k, v in times.items()
                if k in (ours, "to_icechunk (dask)", f"plain zarr ({engine})")
            }
            rows += rows_for("S2", group, ours)
    if "S3" in chosen:
        n = 12 if args.smoke else 240
        with scenarios.S3(n_regions=n) as s3:
            times = measure(s3.contenders(), repeat, once=frozenset({"documented per-region"}))
            extra["S3_calls"] = s3.calls
        rows += rows_for("S3", times, "ours (lithops)")
    if "S4" in chosen:
        sizes = (
            [200, 1000] if args.smoke else ([1000, 10000, 100000] if args.full else [1000, 10000])
        )
        chunks = 10_000 if args.smoke else (1_000_000 if args.full else 100_000)
        extra["S4"] = scenarios.s4(sizes, chunks)
        for point in extra["S4"]["tasks"]:  # type: ignore[index]
            print(
                f"S4   {point['n_tasks']:>7} tasks: {point['seconds']:.2f} s, coordinator "
                f"{point['coordinator_us_per_task']:.0f} us CPU/task, RSS growth "
                f"{point['rss_growth_mb']:.0f} MB"
            )
        merge = extra["S4"]["merge_commit"]  # type: ignore[index]
        print(f"S4   merge + commit of {merge['chunks']} chunk refs: {merge['seconds']:.2f} s")
        png = scenarios.plot_s4(extra["S4"], RESULTS / "s4_scaling.png")  # type: ignore[arg-type]
        if png:
            print(f"S4   plot: {png}")

    if "S5" in chosen:
        # W = the CPU count (2 for the smoke run: a small, quick cluster on any CI machine)
        with ingest.S5(smoke=args.smoke, workers=2 if args.smoke else None) as s5:
            times = measure(s5.contenders(), repeat)
            extra["S5"] = s5.report()
            s5.print_summary()
        rows += rows_for("S5", times, s5.OURS)
    if "S6" in chosen:
        with virtual.S6(smoke=args.smoke, workers=2 if args.smoke else None) as s6:
            times = measure(s6.contenders(), repeat)
            s6.scale()
            s6.profile()
            extra["S6"] = s6.report()
            s6.print_summary()
        rows += rows_for("S6", times, s6.OURS)

    print_rows(rows)
    RESULTS.mkdir(exist_ok=True)
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "loadavg_at_end": os.getloadavg(),
        },
        "seconds": time.perf_counter() - t0,
        "rows": rows,
        **extra,
    }
    (RESULTS / "latest.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"\nwrote {RESULTS / 'latest.json'} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
