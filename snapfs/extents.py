"""Extent maps: what each area of a view is, and SEEK_DATA/SEEK_HOLE over it.

Everything here is pure: no NBD, no qemu. The NBD client hands in *runs*,
``(start, length, flags)`` tuples per metadata context, each list sorted and
covering ``[0, size)``. The contexts do not split the disk at the same places,
so the first step is always to cut them at every boundary either of them has::

    base:allocation       |  data   |   zero (hole)    |   data   |
    qemu:allocation-depth |  1      |  1   |  0        |  1       |
                          +---------+------+-----------+----------+
    zipped                | d,1     | z,1  | z,0       | d,1      |
                               |        |       |          |
    layer view            zero:F   zero:T  zero:T     zero:F
                          hole:F   hole:F  hole:T     hole:F

The zipped pieces become extents with the flags the view's contract gives
(``docs/views.md``), and neighbours with equal flags are merged, so the map is
the same whatever way the server chose to split its replies.

A chain or layer view reports ``zero`` (reads as zero) and ``hole`` (not
allocated in the chain up to that layer, resp. in that layer alone; for an
image with no backing file, every zero area). A dirty view reports ``dirty``
(changed since the bitmap started) and ``zero`` (the disk's zero status, as in
the incremental-backup extents of ovirt-imageio).
"""

from __future__ import annotations

import bisect
import errno
import json
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, NamedTuple, Sequence

from .errors import Refused

# NBD "base:allocation" flags (NBD protocol, "Metadata contexts").
STATE_HOLE = 1
STATE_ZERO = 2
# "qemu:dirty-bitmap:NAME": bit 0 set where the bitmap has the area dirty.
STATE_DIRTY = 1



class Run(NamedTuple):
    """An area with the flags one metadata context reports for it (or, for
    the code that builds runs of its own, a kind: a layer's cluster state, a
    composed qcow2 file's cluster kind, a written area)."""

    start: int
    length: int
    flags: int

    @property
    def end(self) -> int:
        return self.start + self.length


def add_run(runs: list[Run], start: int, length: int, flags: int) -> None:
    """Append ``[start, start + length)`` to ``runs``, sorted by start, merging it
    into the last run when the flags are equal and the two touch or overlap.

    Every list of runs snapfs builds grows through here: block status replies,
    a layer's clusters, a composed qcow2 file's clusters, the unions and
    splices below, the areas a writer changed (which may overlap)::

        runs     | a:1 | b:2 |
        add            [c:2 ]      ->  | a:1 |  b+c:2  |
        add                     [d:2]  ->  | a:1 |  b+c:2  |d:2|   (a gap: no merge)
    """
    if length <= 0:
        return
    if runs:
        last = runs[-1]
        if last.flags == flags and last.start <= start <= last.start + last.length:
            end = max(last.start + last.length, start + length)
            runs[-1] = Run(last.start, end - last.start, flags)
            return
    runs.append(Run(start, length, flags))


@dataclass(frozen=True, slots=True)
class Extent:
    """An area of a chain or layer view."""

    start: int
    length: int
    zero: bool
    hole: bool

    @property
    def end(self) -> int:
        return self.start + self.length

    def to_dict(self) -> dict:
        return {"start": self.start, "length": self.length, "zero": self.zero, "hole": self.hole}


@dataclass(frozen=True, slots=True)
class DirtyExtent:
    """An area of a dirty view."""

    start: int
    length: int
    dirty: bool
    zero: bool

    @property
    def end(self) -> int:
        return self.start + self.length

    def to_dict(self) -> dict:
        return {"start": self.start, "length": self.length, "dirty": self.dirty, "zero": self.zero}


def zip_runs(size: int, *run_lists: Sequence[Run]) -> Iterator[tuple[int, int, tuple[int, ...]]]:
    """Cut several run lists at every boundary any of them has.

    Yields ``(start, length, (flags0, flags1, ...))`` covering ``[0, size)``.
    Every list must cover ``[0, size)`` exactly (the NBD client makes sure).
    """
    idx = [0] * len(run_lists)
    pos = 0
    while pos < size:
        flags = []
        end = size
        for i, runs in enumerate(run_lists):
            while runs[idx[i]][0] + runs[idx[i]][1] <= pos:
                idx[i] += 1
            start, length, f = runs[idx[i]]
            flags.append(f)
            end = min(end, start + length)
        yield pos, end - pos, tuple(flags)
        pos = end


def union_runs(size: int, *run_lists: Sequence[Run]) -> list[Run]:
    """One bitmap's runs from several copies of it: dirty where any is dirty.

    A checkpoint's bitmap is copied into each overlay created after it; the
    changes since the checkpoint are the union of every copy, as libvirt's
    backup merges them.
    """
    out: list[Run] = []
    for start, length, flags in zip_runs(size, *run_lists):
        add_run(out, start, length, STATE_DIRTY if any(x & STATE_DIRTY for x in flags) else 0)
    return out


def splice_runs(runs: Sequence[Run], start: int, end: int, new: Sequence[Run]) -> list[Run]:
    """``runs`` with ``[start, end)`` replaced by ``new`` (runs covering exactly that area).

    A writer changed that area; the rest of the disk keeps the runs read
    before. Runs cut at ``start`` and ``end`` keep their flags, and equal
    neighbours are merged::

        runs      |  a  |     b     |  c  |
        new             [  x  | y ]
        result    |  a  |b| x | y |b|  c  |     (b|x or y|b merged when equal)
    """
    out: list[Run] = []
    for s, n, f in runs:
        if s < start:
            add_run(out, s, min(s + n, start) - s, f)
    for s, n, f in new:
        add_run(out, s, n, f)
    for s, n, f in runs:
        if s + n > end:
            lo = max(s, end)
            add_run(out, lo, s + n - lo, f)
    return out


def merge(extents: Iterable) -> list:
    """Merge neighbours whose flags are equal (extents of one type)."""
    out: list = []
    for e in extents:
        if e.length == 0:
            continue
        if out:
            last = out[-1]
            if _flags(last) == _flags(e) and last.end == e.start:
                out[-1] = type(e)(last.start, last.length + e.length, *_flags(e))
                continue
        out.append(e)
    return out


def _flags(e) -> tuple[bool, bool]:
    if isinstance(e, Extent):
        return (e.zero, e.hole)
    return (e.dirty, e.zero)


def allocation_extents(
    size: int,
    allocation: Sequence[Run],
    depth: Sequence[Run] | None,
    has_backing: bool,
) -> list[Extent]:
    """Extents of a chain or layer view.

    ``allocation`` are base:allocation runs; ``depth`` are qemu:allocation-depth
    runs (depth 0 = allocated in no layer of the export), or None where the
    export has no such context (raw images). Without a backing file there is
    nothing beneath the image, so every area that reads as zero is a hole.
    """
    if has_backing and depth is None:
        raise ValueError("an image with a backing file needs qemu:allocation-depth")
    out = []
    if not has_backing:
        for start, length, (flags,) in zip_runs(size, allocation):
            zero = bool(flags & STATE_ZERO)
            out.append(Extent(start, length, zero, zero))
    else:
        for start, length, (flags, d) in zip_runs(size, allocation, depth):
            out.append(Extent(start, length, bool(flags & STATE_ZERO), d == 0))
    return merge(out)


def status_extents(size: int, allocation: Sequence[Run]) -> list[Extent]:
    """Extents straight from base:allocation (an export without allocation depth
    whose hole flag covers its whole chain, as a libvirt backup job's)."""
    return merge(Extent(s, n, bool(f & STATE_ZERO), bool(f & STATE_HOLE)) for s, n, f in allocation if n)


def dirty_extents(size: int, bitmap: Sequence[Run], allocation: Sequence[Run]) -> list[DirtyExtent]:
    """Extents of a dirty view: the bitmap's dirty bit and the disk's zero status."""
    out = [
        DirtyExtent(start, length, bool(b & STATE_DIRTY), bool(a & STATE_ZERO))
        for start, length, (b, a) in zip_runs(size, bitmap, allocation)
    ]
    return merge(out)


def full_dirty_extents(size: int, allocation: Sequence[Run]) -> list[DirtyExtent]:
    """Every area changed: the map of a full copy, with the disk's zero status."""
    out = [DirtyExtent(s, n, True, bool(f & STATE_ZERO)) for s, n, f in allocation if n]
    return merge(out)


class SeekError(Refused):
    """An lseek(2) result that is an error: ENXIO past the end or when no data follows."""

    def __init__(self, err: int):
        super().__init__(os.strerror(err), err)


class ExtentMap:
    """The extents of one view, with the view's idea of data and zeros.

    ``is_data(extent)`` says what SEEK_DATA finds and what st_blocks counts;
    ``reads_zero(extent)`` says where reads are answered with zeros without a
    round trip to the server.
    """

    def __init__(self, size: int, extents: list, is_data, reads_zero):
        self.size = size
        self.extents = extents
        self._starts = [e.start for e in extents]
        self._is_data = is_data
        self._reads_zero = reads_zero
        self.data_bytes = sum(e.length for e in extents if is_data(e))

    def find(self, offset: int) -> int:
        """Index of the extent holding ``offset`` (0 <= offset < size)."""
        return bisect.bisect_right(self._starts, offset) - 1

    def seek(self, offset: int, want_data: bool) -> int:
        """lseek(SEEK_DATA) or lseek(SEEK_HOLE) from ``offset``.

        As for local file systems: ENXIO at or past the end; SEEK_DATA with no
        data after ``offset`` is ENXIO; SEEK_HOLE finds the virtual hole at the
        end of the file when no real hole follows.
        """
        if offset < 0 or offset >= self.size:
            raise SeekError(errno.ENXIO)
        for i in range(self.find(offset), len(self.extents)):
            e = self.extents[i]
            if bool(self._is_data(e)) == want_data:
                return max(offset, e.start)
        if want_data:
            raise SeekError(errno.ENXIO)
        return self.size

    def pieces(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        """Split a read into ``(start, length, reads_zero)`` pieces, merged."""
        end = min(offset + length, self.size)
        if offset >= end:
            return
        i = self.find(offset)
        cur_start, cur_zero = offset, None
        pos = offset
        while pos < end:
            e = self.extents[i]
            z = bool(self._reads_zero(e))
            stop = min(e.end, end)
            if cur_zero is None:
                cur_zero = z
            elif z != cur_zero:
                yield cur_start, pos - cur_start, cur_zero
                cur_start, cur_zero = pos, z
            pos = stop
            i += 1
        yield cur_start, end - cur_start, bool(cur_zero)

    def to_json(self) -> bytes:
        return (json.dumps([e.to_dict() for e in self.extents], indent=None) + "\n").encode()
