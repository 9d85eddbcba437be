"""Benchmarks: ours against the baselines users would otherwise write, measured in one run.

    python -m benchmarks                 # S1-S6 (S2, S4: about 6 minutes each on 2 busy cores)
    python -m benchmarks --only S1 --repeat 5
    python -m benchmarks --only S5       # 96 netCDF files (1 GB) into a new repository
    python -m benchmarks --only S6       # 1,000 small netCDF files referenced (virtual ingest)
    python -m benchmarks --smoke         # tiny sizes, one repetition: checks that it all runs

S2 runs ours and plain zarr on threads, processes, joblib (loky), a dask LocalCluster, Ray and
Lithops localhost (2 workers each), plus ``icechunk.xarray.to_icechunk`` on the dask cluster and
cubed's ``store_icechunk`` on cubed's processes executor (each skipped, with a note, when its
package is missing). S4 runs ours and a minimal hand-written fork -> thread pool -> merge ->
commit loop at each size, alternating, each run in a fresh process.

S5 and S6 generate their source files once into ``benchmarks/.cache/`` (about 1 GB and 50 MB,
ignored by git).

Every contender's result is read back and checked. Contenders alternate within each
repetition and the median is reported; ratios are ours / baseline (below 1: we are faster):
of the medians, and ("paired") the median of the ratios within each repetition.
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
# The local Ray (S2) on 127.0.0.1 only, as in the tests (see tests/conftest.py).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Worker processes (Lithops runs them from its own directory) import the scenario functions.
_root = str(Path(__file__).resolve().parent.parent)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [_root, os.environ.get("PYTHONPATH")] if p)

from benchmarks import ingest, scenarios, virtual  # noqa: E402 - after PYTHONPATH, which workers inherit

RESULTS = Path(__file__).parent / "results"
# The 1-minute load average before each run of each contender (the machine may be shared).
LOADS: dict[str, list[float]] = {}


def measure(
    contenders: dict[str, Callable[[], float]], repeat: int, once: frozenset[str] = frozenset()
) -> dict[str, list[float]]:
    """Run every contender ``repeat`` times, alternating; ``once`` contenders run once."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(repeat):
        for name, run in contenders.items():
            if name in once and r > 0:
                continue
            LOADS.setdefault(name, []).append(round(os.getloadavg()[0], 2))
            times[name].append(run())
    return times


def rows_for(scenario: str, times: dict[str, list[float]], ours: str) -> list[dict[str, object]]:
    """Medians and ``ours / this``; where both ran as often, also the ratios within each
    repetition (run next to each other: steadier than a ratio of medians on a busy machine)."""
    out = []
    mine = statistics.median(times[ours])
    for name, ts in times.items():
        med = statistics.median(ts)
        paired = (
            [o / t for o, t in zip(times[ours], ts, strict=True)]
            if name != ours and len(ts) == len(times[ours])
            else None
        )
        out.append(
            {
                "scenario": scenario,
                "contender": name,
                "median_s": med,
                "runs": ts,
                "ours_over_this": None if name == ours else mine / med,
                "paired_ratios": paired,
                "paired_ratio_median": statistics.median(paired) if paired else None,
                "load_1min_before_runs": LOADS.get(name),
            }
        )
    return out


def print_rows(rows: list[dict[str, object]]) -> None:
    print(
        f"\n{'scenario':<4} {'contender':<34} {'median s':>9} {'ours/this':>10} {'paired':>7}  runs"
    )
    for row in rows:
        ratio, paired = row["ours_over_this"], row.get("paired_ratio_median")
        r = "" if ratio is None else f"{ratio:.2f}x"
        p = "" if paired is None else f"{paired:.2f}x"
        runs = ", ".join(f"{t:.2f}" for t in row["runs"])  # type: ignore[attr-defined]
        print(
            f"{row['scenario']:<4} {row['contender']:<34} {row['median_s']:>9.3f} {r:>10} "
            f"{p:>7}  {runs}"
        )


def s2_targets(times: dict[str, list[float]], engines: tuple[str, ...]) -> list[dict[str, object]]:
    """Per engine: ours / to_icechunk (target <= 1.0x) and plain zarr's throughput over ours
    (target >= 0.95x); ours on processes / cubed. Ratios of medians, and the median of the
    ratios within each repetition. Printed, and kept in the JSON."""

    def ratios(ours: str, other: str) -> tuple[float, float]:
        paired = [o / t for o, t in zip(times[ours], times[other], strict=True)]
        return statistics.median(times[ours]) / statistics.median(times[other]), (
            statistics.median(paired)
        )

    out: list[dict[str, object]] = []
    for engine in engines:
        ours = f"ours ({engine})"
        ic, ic_paired = ratios(ours, "to_icechunk (dask)")
        plain, plain_paired = ratios(ours, f"plain zarr ({engine})")
        row: dict[str, object] = {
            "engine": engine,
            "ours_s": statistics.median(times[ours]),
            "ours_over_to_icechunk": ic,
            "ours_over_to_icechunk_paired": ic_paired,
            "throughput_vs_plain_zarr": 1 / plain,
            "throughput_vs_plain_zarr_paired": 1 / plain_paired,
        }
        line = (
            f"S2   {ours:<17} {ic:.2f}x to_icechunk (paired {ic_paired:.2f}x; target <= 1.00x), "
            f"throughput {1 / plain:.2f}x plain zarr (paired {1 / plain_paired:.2f}x; >= 0.95x)"
        )
        cubed = "cubed store_icechunk (processes)"
        if engine == "processes" and cubed in times:
            row["ours_over_cubed"], row["ours_over_cubed_paired"] = ratios(ours, cubed)
            line += f", {row['ours_over_cubed']:.2f}x cubed"
        print(line)
        out.append(row)
    return out


def source_state() -> dict[str, object]:
    """The commit measured, and a digest of uncommitted changes to src/ (others edit it)."""
    import hashlib
    import subprocess

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], capture_output=True, text=True, cwd=_root)
        return out.stdout if out.returncode == 0 else ""

    diff = git("diff", "HEAD", "--", "src")
    return {
        "commit": git("rev-parse", "HEAD").strip() or None,
        "src_uncommitted": bool(diff),
        "src_diff_sha256": hashlib.sha256(diff.encode()).hexdigest()[:16] if diff else None,
        "src_untracked": git("ls-files", "--others", "--exclude-standard", "src").split(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="icechunk-distributed benchmarks")
    parser.add_argument("--only", default="S1,S2,S3,S4,S5,S6", help="comma-separated scenarios")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repetition")
    parser.add_argument(
        "--full",
        action="store_true",
        help="S4 up to 1M tasks (hand-written loop to 100k), 1M chunks",
    )
    args = parser.parse_args(argv)
    repeat = 1 if args.smoke else args.repeat
    chosen = {s.strip().upper() for s in args.only.split(",")}
    rows: list[dict[str, object]] = []
    extra: dict[str, object] = {}
    t0 = time.perf_counter()
    source_at_start = source_state()

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
            extra["S2_engines"] = list(s2.engines)
            extra["S2_skipped"] = s2.skipped
            extra["S2_lithops_calls"] = s2.calls
        for engine in s2.engines:
            ours = f"ours ({engine})"
            names = [ours, f"plain zarr ({engine})", "to_icechunk (dask)"]
            if engine == "processes":
                names.append("cubed store_icechunk (processes)")
            group = {k: times[k] for k in names if k in times}
            rows += rows_for("S2", group, ours)
        extra["S2_targets"] = s2_targets(times, s2.engines)
    if "S3" in chosen:
        n = 12 if args.smoke else 240
        with scenarios.S3(n_regions=n) as s3:
            times = measure(s3.contenders(), repeat, once=frozenset({"documented per-region"}))
            extra["S3_calls"] = s3.calls
        rows += rows_for("S3", times, "ours (lithops)")
    if "S4" in chosen:
        sizes = [200, 1000] if args.smoke else [1000, 10000]
        if args.full:
            sizes += [100_000, 1_000_000]
        chunks = 10_000 if args.smoke else (1_000_000 if args.full else 100_000)
        s4 = scenarios.s4(sizes, chunks, repeat=repeat)
        extra["S4"] = s4
        hand = {p["n_tasks"]: p for p in s4["hand"]}
        versus = {v["n_tasks"]: v for v in s4["ours_over_hand"]}
        for point in s4["tasks"]:
            n = point["n_tasks"]
            vs = (
                f"; hand-written loop {hand[n]['seconds']:.2f} s, ours / hand "
                f"{versus[n]['ours_over_hand']:.2f}x (target <= 1.2x)"
                if n in hand
                else f"; hand-written loop not run above {scenarios.S4_HAND_MAX:,} tasks"
            )
            also = (
                f" (hand: {hand[n]['coordinator_us_per_task']:.0f} us, "
                f"{hand[n]['rss_growth_mb']:.0f} MB)"
                if n in hand
                else ""
            )
            print(
                f"S4   {n:>7} tasks: ours {point['seconds']:.2f} s{vs}; coordinator "
                f"{point['coordinator_us_per_task']:.0f} us CPU/task, RSS growth "
                f"{point['rss_growth_mb']:.0f} MB{also}"
            )
            if n in hand:
                group = {
                    f"ours ({n} tasks)": point["runs"],
                    f"hand loop ({n} tasks)": hand[n]["runs"],
                }
                rows += rows_for("S4", group, f"ours ({n} tasks)")
        merge = s4["merge_commit"]
        print(f"S4   merge + commit of {merge['chunks']} chunk refs: {merge['seconds']:.2f} s")
        png = scenarios.plot_s4(s4, RESULTS / "s4_scaling.png")
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
        "source_at_start": source_at_start,
        "source_at_end": source_state(),
        "rows": rows,
        **extra,
    }
    (RESULTS / "latest.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"\nwrote {RESULTS / 'latest.json'} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
