"""Loaders that misbehave on purpose, importable by every engine's workers."""

import hashlib
import os
import time

import numpy as np
import xarray as xr

from tasks import count_call, full_dataset, load_region


def calls(directory) -> dict[str, int]:
    """Calls per region key recorded by the loaders below."""
    out: dict[str, int] = {}
    for name in os.listdir(directory):
        key, _, _ = name.rpartition(".")
        out[key] = out.get(key, 0) + 1
    return out


def key_of(region) -> str:
    return "_".join(f"{d}{s.start}-{s.stop}" for d, s in sorted(region.items()))


def _full(region, n: int = 12) -> bool:
    """The coordinator's call for the full extent (variables without a region dim)."""
    return region["time"].stop - region["time"].start == n


class FailRegions:
    """Raise for the regions whose time start is in ``starts``; load the rest."""

    def __init__(self, starts=()):
        self.starts = set(starts)

    def __call__(self, region):
        if region["time"].start in self.starts and not _full(region):
            raise OSError(f"permanent failure at time={region['time'].start}")
        return load_region(region)


class SlowLoader:
    """The ``n``-step test dataset's piece after a pause: makes a run last long enough to be
    interrupted."""

    def __init__(self, seconds=0.05, directory=None, n=12):
        self.seconds = seconds
        self.directory = None if directory is None else str(directory)
        self.n = n

    def __call__(self, region):
        if self.directory is not None and not _full(region, self.n):
            count_call(self.directory, key_of(region))
        if not _full(region, self.n):
            time.sleep(self.seconds)
        return full_dataset(self.n).isel(region)


def soak_dataset(n: int) -> xr.Dataset:
    """``n`` steps of a tiny variable: one region per step."""
    return xr.Dataset(
        {"v": (("time", "x"), np.arange(n * 4, dtype="f4").reshape(n, 4))},
        coords={"time": np.arange(n, dtype="i8")},
    )


def fails(seed: int, index: int, attempt: int, rate: float) -> bool:
    """A deterministic coin: whether ``attempt`` of region ``index`` fails."""
    digest = hashlib.sha256(f"{seed}:{index}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < rate


class RandomFailures:
    """Soak loader: each attempt fails with probability ``rate``, decided by a seeded hash of
    (region, attempt), so the expected attempts of every region are known in advance."""

    def __init__(self, directory, n: int, seed: int = 0, rate: float = 0.02):
        self.directory, self.n, self.seed, self.rate = str(directory), n, seed, rate

    def __call__(self, region):
        start = region["time"].start
        if region["time"].stop - start == self.n:  # the coordinator's full-extent call
            return soak_dataset(self.n)
        attempt = count_call(self.directory, str(start))
        if fails(self.seed, start, attempt, self.rate):
            raise OSError(f"random transient failure: region {start}, attempt {attempt}")
        return soak_dataset(self.n).isel(region)

    def expected_attempts(self, retries: int) -> dict[str, int]:
        out = {}
        for i in range(self.n):
            attempt = 1
            while fails(self.seed, i, attempt, self.rate) and attempt <= retries:
                attempt += 1
            out[str(i)] = attempt
        return out


class GatedLoader:
    """The ``n``-step dataset, but only the first ``open_count`` regions to *start* finish:
    the others wait while the coordinator that made the loader lives, then fail. A coordinator
    run with it makes progress, but never completes, so a test can kill it midway.

    Which regions get through is decided by tickets (files created with ``O_EXCL`` in
    ``directory``), not by their index: however an engine orders or groups its calls, the
    first calls to run get through, so progress never depends on scheduling.
    """

    def __init__(self, directory, n=24, open_count=12, seconds=0.05):
        self.directory, self.n = str(directory), n
        self.open_count, self.seconds = open_count, seconds
        self.coordinator = os.getpid()

    def __call__(self, region):
        if not _full(region, self.n):
            if not self._ticket():
                while _alive(self.coordinator):
                    time.sleep(0.05)
                raise OSError("the coordinator is gone")
            time.sleep(self.seconds)
        return full_dataset(self.n).isel(region)

    def _ticket(self) -> bool:
        for k in range(self.open_count):
            try:
                fd = os.open(
                    os.path.join(self.directory, f"ticket-{k}"),
                    os.O_CREAT | os.O_EXCL | os.O_WRONLY,
                )
            except FileExistsError:
                continue
            os.close(fd)
            return True
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - another user's process
        return True
    # A killed child of ours is a zombie until reaped: still "there" for kill(0).
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


class StragglerLoader:
    """``load_region``, but the first call for the region starting at ``start`` is a
    straggler: it waits until ``release()`` (from the coordinator's side) or ``seconds``."""

    def __init__(self, directory, start: int, seconds: float = 120.0):
        self.directory, self.start, self.seconds = str(directory), start, seconds

    def release(self) -> None:
        with open(os.path.join(self.directory, "released"), "w"):
            pass

    def __call__(self, region):
        first = region["time"].start == self.start and not _full(region)
        if first and count_call(self.directory, "straggler") == 1:
            deadline = time.monotonic() + self.seconds
            released = os.path.join(self.directory, "released")
            while not os.path.exists(released):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the straggler was not released within {self.seconds} s")
                time.sleep(0.02)
        return load_region(region)
