"""What an ingest plans (:class:`IngestPlan`: the dry run) and did (:class:`IngestResult`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import xarray as xr

from icechunk_distributed.filemap import FileLoader, task_variables
from icechunk_distributed.planning import Region, format_region
from icechunk_distributed.results import WriteResult
from icechunk_distributed.scan import FileSet
from icechunk_distributed.virtual import VirtualLoader

__all__ = ["IngestMode", "IngestPlan", "IngestResult"]

IngestMode = Literal["w-", "w", "a"]


@dataclass
class IngestPlan:
    """What :func:`ingest` would do: the files in order, what it skips, the regions.

    Attributes
    ----------
    files : FileSet or None
        The files to write, in concat order, with their offsets (None: nothing to write).
    skipped : list of str
        Files an append found in the store already.
    template : xarray.Dataset or None
        The dataset the files form (lazy where the tasks write).
    regions : list of dict
        One ``{concat_dim: slice}`` per task, in the template's coordinates.
    loader : FileLoader, VirtualLoader or None
        What each task runs to read its region (or, virtual, to parse its files).
    mode : str
        The write mode: ``"w-"``, ``"w"``, or ``"a"`` (appending along ``concat_dim``).
    concat_dim : str
        The dimension the files are concatenated along.
    region_dims : tuple of str
        ``(concat_dim,)``, or ``()`` when the arrays have one chunk along it (one task).
    """

    files: FileSet | None
    skipped: list[str]
    template: xr.Dataset | None
    regions: list[Region]
    loader: FileLoader | VirtualLoader | None
    mode: IngestMode
    concat_dim: str
    region_dims: tuple[str, ...]

    def files_of(self, region: Region) -> list[str]:
        """The files the task for ``region`` opens."""
        if self.loader is None:
            return []
        s = region.get(self.concat_dim, slice(0, sum(self.loader.lengths)))
        return [path for path, _ in self.loader.parts(s.start, s.stop)]

    def summary(self, *, tasks_shown: int = 5) -> str:
        """A few lines for a person: files, skipped, variables, size, chunks, tasks."""
        if self.files is None or self.template is None:
            return f"nothing to write: all {len(self.skipped)} file(s) are in the store already"
        dim, t = self.concat_dim, self.template
        values = self.files.concat_values()
        span = (
            f" ({_label(values[0])} .. {_label(values[-1])})"
            if values is not None and len(values)
            else ""
        )
        variables = task_variables(t, dim)
        nbytes = sum(int(t[n].nbytes) for n in variables)
        if isinstance(self.loader, VirtualLoader):
            copied = set(self.loader.loaded)
            kind = "referenced" + (f"; {', '.join(sorted(copied))} copied" if copied else "")
        else:
            kind = "copied"
        lines = [
            f"{len(self.files.headers)} file(s) to write"
            + (f", {len(self.skipped)} already in the store (skipped)" if self.skipped else "")
            + f"; {'appending' if self.mode == 'a' else 'writing'} {self.files.size} {dim!r} "
            f"steps{span}",
            f"variables: {', '.join(variables)} ({nbytes / 1e6:.1f} MB, {kind})",
            "chunks: "
            + ", ".join(
                f"{n} {dict(zip(t[n].dims, t[n].encoding.get('chunks', ()), strict=False))}"
                for n in variables[:3]
            ),
            f"{len(self.regions)} task(s):",
        ]
        for region in self.regions[:tasks_shown]:
            names = [os.path.basename(p.rstrip("/")) for p in self.files_of(region)]
            shown = ", ".join(names[:3]) + (f" +{len(names) - 3}" if len(names) > 3 else "")
            lines.append(f"  {format_region(region)}: {shown}")
        if len(self.regions) > tasks_shown:
            lines.append(f"  ... and {len(self.regions) - tasks_shown} more")
        return "\n".join(lines)


def _label(value: Any) -> str:
    """A concat value for a person: times without trailing zero fractions."""
    if isinstance(value, np.datetime64):
        return str(np.datetime_as_string(value, unit="s")).replace("T00:00:00", "")
    return str(value)


@dataclass
class IngestResult:
    """What :func:`ingest` did.

    Attributes
    ----------
    files : list of str
        The files written, in concat order.
    skipped : list of str
        Files an append found in the store already (not written again).
    write : WriteResult or None
        The write (None when there was nothing to write).
    seconds : float
        Wall time of the whole call, the scan included.
    scan_seconds : float
        Of which reading the headers.
    virtual : bool
        Whether the files were referenced (``virtual=True``) rather than copied.
    copied : tuple of str
        Of a virtual ingest, the variables copied rather than referenced along the concat
        dim (``loadable_variables``).
    """

    files: list[str]
    skipped: list[str]
    write: WriteResult | None
    seconds: float
    scan_seconds: float
    virtual: bool = False
    copied: tuple[str, ...] = ()

    @property
    def snapshot_id(self) -> str | None:
        """The commit (None if nothing was written or committed)."""
        return None if self.write is None else self.write.snapshot_id

    def summary(self) -> str:
        """One screen for a person: files, regions, bytes, seconds, MB/s, commit, skipped."""
        skipped = f"; skipped {len(self.skipped)} file(s) already in the store" * bool(self.skipped)
        if self.write is None:
            return f"nothing to write{skipped} ({self.seconds:.1f} s)"
        w = self.write
        mb = w.bytes_written / 1e6
        rate = mb / self.seconds if self.seconds else 0.0
        resumed = f", {w.n_resumed} resumed" if w.n_resumed else ""
        commit = f"commit {w.snapshot_id} on {w.branch}" if w.snapshot_id else "not committed"
        if self.virtual:  # no bytes copied: count the references instead
            kind = "chunk(s), references and copies" if self.copied else "chunk reference(s)"
            verb, amount = "referenced", f"{w.n_chunks} {kind}"
            speed = f"{len(self.files) / max(self.seconds, 1e-9):.0f} files/s"
        else:
            verb, amount, speed = "ingested", f"{mb:.1f} MB", f"{rate:.1f} MB/s"
        return (
            f"{verb} {len(self.files)} file(s): {w.n_regions} region(s){resumed}, {amount} "
            f"in {self.seconds:.1f} s ({speed}; scan {self.scan_seconds:.1f} s) on "
            f"{w.executor}\n{commit}{skipped}"
        )
