"""The data and loaders of the cluster tests (tests/test_clusters.py).

Self-contained on purpose: it imports nothing from the other test modules. The workers of the
clusters in tests/clusters.py run from their own directories without the tests on their
``PYTHONPATH``, like the workers of a real cluster, so a loader defined here only reaches them
if the library ships this module (by value), never because they can import it. A dependency
on ``tasks`` or ``conftest`` would be one more module to ship.

The loaders also run on the coordinator, once, for the full extent (the variables without a
region dimension); they never block there.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid

import numpy as np
import xarray as xr

N_TIME = 12
"""Time steps of the test dataset: 12 one-step regions with ``task_size=1``."""

ENCODING = {"Tair": {"chunks": (1, 6, 8)}, "station": {"chunks": (1,)}}
"""One chunk per time step: a run with ``task_size=1`` has ``N_TIME`` regions."""

HOLD_DEADLINE = 300.0
"""Seconds a held task waits for its release at most (a stuck test must not hang a worker)."""


def cluster_dataset(n_time: int = N_TIME) -> xr.Dataset:
    """time/y/x float32 with NaNs and attributes, cftime (noleap) time, 2-D lat/lon, an int
    variable along time, and a variable without the time dimension (the coordinator's)."""
    import cftime

    rng = np.random.default_rng(42)
    ny, nx = 6, 8
    lat, lon = np.meshgrid(np.linspace(-60, 60, ny), np.linspace(0, 350, nx), indexing="ij")
    tair = rng.random((n_time, ny, nx)).astype("f4")
    tair[::3, 0, 0] = np.nan
    times = [
        cftime.datetime(2026, 1, 1 + i // 24, i % 24, calendar="noleap") for i in range(n_time)
    ]
    return xr.Dataset(
        {
            "Tair": (("time", "y", "x"), tair, {"units": "K", "long_name": "air temperature"}),
            "station": (("time",), np.arange(n_time, dtype="i4")),
            "mask": (("y", "x"), (lat > 0).astype("i1"), {"meaning": "north"}),
        },
        coords={
            "time": ("time", np.array(times)),
            "lat": (("y", "x"), lat),
            "lon": (("y", "x"), lon),
        },
        attrs={"title": "cluster test"},
    )


def template(n_time: int = N_TIME) -> xr.Dataset:
    """The loaders' template: the dataset, lazy along time."""
    return cluster_dataset(n_time).chunk({"time": 1})


def load(region: dict[str, slice]) -> xr.Dataset:
    """A plain loader: the piece of :func:`cluster_dataset`, built inside the task."""
    return cluster_dataset().isel(region)


def _key(region: dict[str, slice]) -> str:
    t = region["time"]
    return f"{t.start}-{t.stop}"


class GatedLoader:
    """A loader that says when it started and, while a *hold* file exists, waits.

    Every task call (not the coordinator's full-extent call) first leaves a file
    ``started/<start>-<stop>.<pid>.<random>`` in ``directory``: the test finds which process,
    hence which node, runs a region. Then, if ``directory/hold`` exists and the region starts
    at ``hold_from`` or later, it waits until the file is removed (``HOLD_DEADLINE`` at most).
    Regions before ``hold_from`` run through: a resumable run checkpoints them first.
    """

    def __init__(self, directory: str | os.PathLike[str], hold_from: int = 0) -> None:
        self.directory = str(directory)
        self.hold_from = hold_from
        self.n_time = N_TIME

    def __call__(self, region: dict[str, slice]) -> xr.Dataset:
        t = region["time"]
        if t.stop - t.start < self.n_time:  # a task, not the coordinator's full extent
            started = os.path.join(self.directory, "started")
            name = f"{_key(region)}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
            with open(os.path.join(started, name), "w"):
                pass
            hold = os.path.join(self.directory, "hold")
            deadline = time.monotonic() + HOLD_DEADLINE
            while t.start >= self.hold_from and os.path.exists(hold):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"region {_key(region)} was held for {HOLD_DEADLINE} s")
                time.sleep(0.02)
        return cluster_dataset(self.n_time).isel(region)

    # -- read by the test, in the test process

    @staticmethod
    def prepare(directory: str | os.PathLike[str], hold: bool = True) -> None:
        """Create ``directory/started`` and, with ``hold``, the hold file."""
        os.makedirs(os.path.join(directory, "started"), exist_ok=True)
        if hold:
            with open(os.path.join(directory, "hold"), "w"):
                pass

    @staticmethod
    def release(directory: str | os.PathLike[str]) -> None:
        """Let every held task go on."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, "hold"))

    @staticmethod
    def starts(directory: str | os.PathLike[str]) -> list[tuple[int, int]]:
        """``(region start, pid)`` of every task call so far."""
        out = []
        for name in os.listdir(os.path.join(directory, "started")):
            key, pid, _ = name.split(".")
            out.append((int(key.split("-")[0]), int(pid)))
        return out
