"""Composed qcow2 files: every view ``NAME.raw`` also as ``NAME.qcow2``.

The file is a qcow2 version 3 image with 64 KiB clusters whose guest content
and allocation are the view's map (docs/views.md, "qcow2 files"). Nothing is
stored: the metadata is computed from the map when it is read, and a data
cluster's bytes are the view's own bytes, read from its export.

Each guest cluster gets one of four kinds, from the states of the map's
extents it touches::

    state of an extent       chain / layer view      dirty view
    UNALLOCATED              hole                    not dirty
    ZERO                     zero, not hole          dirty, reads as zero
    DATA                     data                    dirty, data

    a cluster touching       has no backing file     has one (layer with
                             (chain views,           backing, dirty views:
                             base layers)            rebased onto a backup)
    one state only           that state              that state
    DATA and ZERO            DATA                    DATA
    UNALLOCATED and others   DATA if any, else ZERO  FILL

FILL is a data cluster whose bytes come from beneath the view, not from the
view alone: a layer's cluster that it holds only in part must carry what the
layers beneath show in the rest (qemu copies a partly written cluster the
same way), and a dirty view's cluster that is dirty only in part must carry
the disk's bytes in the rest (they are unchanged since the backup it is
rebased onto). With 64 KiB clusters in the images and bitmaps, no cluster is
mixed and no FILL cluster exists.

The file, in 64 KiB clusters, metadata first and data in guest order::

    cluster  0          header, extensions, backing file name
             1          refcount table (RT clusters)
             1+RT       refcount blocks (RB clusters, 16-bit refcounts)
             ...        L1 table (L1C clusters)
             ...        L2 tables, one per 512 MiB of guest space that has
                        any cluster not UNALLOCATED, in guest order
             M          data clusters: the DATA and FILL clusters of the
                        guest, in guest order, each 64 KiB
             M + D      end of file

    L2 entry  UNALLOCATED  0
              ZERO         1                     (QCOW_OFLAG_ZERO, no cluster)
              DATA, FILL   offset | 1 << 63      (QCOW_OFLAG_COPIED: refcount 1)

Every cluster of the file has refcount 1 and every one is used, so ``qemu-img
check`` finds no error and no leak. The guest size is the view's size
rounded up to 512 bytes (qemu's sector), the last data cluster is padded
with zeros. Pure: no qemu, no FUSE; ``tests/test_1_qcow2_compose.py`` checks
the arithmetic, and qemu judges the files composed (tests tiers 1 and 3).
"""

from __future__ import annotations

import bisect
import os
import struct
import sys
from array import array
from dataclasses import dataclass

from .. import extents as ex

CLUSTER_BITS = 16
CLUSTER = 1 << CLUSTER_BITS
L2_ENTRIES = CLUSTER // 8  # one L2 table maps 512 MiB
REFCOUNT_ORDER = 4  # 16-bit refcounts, qemu's default
REFCOUNTS_PER_BLOCK = CLUSTER * 8 >> REFCOUNT_ORDER
HEADER_LENGTH = 104  # a version 3 header without optional fields

MAGIC = b"QFI\xfb"
EXT_BACKING_FORMAT = 0xE2792ACA
OFLAG_COPIED = 1 << 63
OFLAG_ZERO = 1
# The longest backing file name qemu accepts.
MAX_BACKING_NAME = 1023

UNALLOCATED, ZERO, DATA, FILL = 0, 1, 2, 3

_HEADER = struct.Struct(">4sIQIIQIIQQIIQQQQII")
_EXT = struct.Struct(">II")


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def extent_state(e) -> int:
    """UNALLOCATED, ZERO or DATA for an extent of a chain, layer or dirty view."""
    if isinstance(e, ex.DirtyExtent):
        return UNALLOCATED if not e.dirty else ZERO if e.zero else DATA
    return UNALLOCATED if e.hole else ZERO if e.zero else DATA


def _kind(mask: int, backed: bool) -> int:
    """The kind of a cluster touching the states in ``mask`` (bit per state)."""
    if mask & (mask - 1) == 0:
        return mask.bit_length() - 1
    if backed and mask & 1 << UNALLOCATED:
        return FILL
    return DATA if mask & 1 << DATA else ZERO


def cluster_runs(size: int, extents, backed: bool) -> list[ex.Run]:
    """``(first cluster, count, kind)`` covering every guest cluster, merged.

    extents: the view's map (sorted, covering ``[0, size)``). backed: the
    composed file has (or will be rebased onto) something beneath it.
    """
    out: list[ex.Run] = []

    def emit(c: int, n: int, kind: int) -> None:
        ex.add_run(out, c, n, kind)

    pending_c, pending_mask = -1, 0  # the cluster the last extent ended in
    for e in extents:
        if e.length <= 0:
            continue
        bit = 1 << extent_state(e)
        first, last = e.start // CLUSTER, (e.end - 1) // CLUSTER
        if first == pending_c:
            pending_mask |= bit
        else:
            if pending_c >= 0:
                emit(pending_c, 1, _kind(pending_mask, backed))
            pending_c, pending_mask = first, bit
        if last > first:
            emit(pending_c, 1, _kind(pending_mask, backed))
            emit(first + 1, last - first - 1, _kind(bit, backed))
            pending_c, pending_mask = last, bit
    if pending_c >= 0:
        emit(pending_c, 1, _kind(pending_mask, backed))
    clusters = _ceil(size, CLUSTER)
    covered = out[-1][0] + out[-1][1] if out else 0
    emit(covered, clusters - covered, UNALLOCATED)
    return out


@dataclass(frozen=True)
class Piece:
    """Part of a read of the file.

    meta: the bytes, for metadata. Else guest ``[start, start + length)``
    read from the view (``fill`` False) or from beneath it (``fill`` True);
    the part of it at or past the view's size reads as zero.
    """

    length: int
    meta: bytes | None = None
    start: int = 0
    fill: bool = False


class Qcow2Image:
    """The composed qcow2 file of one view's map.

    size: the view's size; backing: the backing file name to record (None
    for chain and dirty views); backed: clusters the view holds only in part
    are FILL (see the module's docstring).
    """

    def __init__(self, size: int, extents, backing: tuple[str, str] | None = None,
                 backed: bool | None = None):
        self.view_size = size
        self.size = _ceil(size, 512) * 512  # qemu's virtual size: whole sectors
        self.backing = backing
        if backing is not None and len(os.fsencode(backing[0])) > MAX_BACKING_NAME:
            raise ValueError(f"backing file name too long: {backing[0]!r}")
        self.backed = backing is not None if backed is None else backed
        self.clusters = _ceil(self.size, CLUSTER)
        self.runs = cluster_runs(size, extents, self.backed)
        self.has_fill = any(kind == FILL for _, _, kind in self.runs)

        # Data runs in guest order, each with its first cluster in the file
        # (relative to the data area); the L1 slots that need an L2 table.
        self._data: list[tuple[int, int, int, bool]] = []  # (file, guest, count, fill)
        l2_used: set[int] = set()
        d = 0
        for c, n, kind in self.runs:
            if kind != UNALLOCATED:
                l2_used.update(range(c // L2_ENTRIES, (c + n - 1) // L2_ENTRIES + 1))
            if kind in (DATA, FILL):
                self._data.append((d, c, n, kind == FILL))
                d += n
        self.data_clusters = d
        self._data_starts = [f for f, _, _, _ in self._data]
        self._data_file = {g: f for f, g, _, _ in self._data}  # guest run start -> file cluster
        self._run_starts = [c for c, _, _ in self.runs]

        self.l1_size = _ceil(self.clusters, L2_ENTRIES)
        self.l1_clusters = _ceil(self.l1_size * 8, CLUSTER)  # none for an empty disk
        self.l2_slots = sorted(l2_used)
        self._l2_of = {slot: i for i, slot in enumerate(self.l2_slots)}
        # Refcount blocks cover every cluster of the file, themselves included.
        fixed = 1 + self.l1_clusters + len(self.l2_slots) + self.data_clusters
        rt, rb = 1, 1
        while True:
            total = fixed + rt + rb
            rb2 = _ceil(total, REFCOUNTS_PER_BLOCK)
            rt2 = max(1, _ceil(rb2 * 8, CLUSTER))
            if (rt2, rb2) == (rt, rb):
                break
            rt, rb = rt2, rb2
        self.rt_clusters, self.rb_clusters = rt, rb
        self.rt_start = 1
        self.rb_start = self.rt_start + rt
        self.l1_start = self.rb_start + rb
        self.l2_start = self.l1_start + self.l1_clusters
        self.data_start = self.l2_start + len(self.l2_slots)  # M
        self.total_clusters = self.data_start + self.data_clusters
        self.file_size = self.total_clusters * CLUSTER

    @property
    def metadata_bytes(self) -> int:
        return self.data_start * CLUSTER

    # -- metadata clusters ---------------------------------------------------

    def header(self) -> bytes:
        exts = b""
        name = b""
        if self.backing is not None:
            name = os.fsencode(self.backing[0])  # file names need not be UTF-8
            fmt = self.backing[1].encode()
            exts += _EXT.pack(EXT_BACKING_FORMAT, len(fmt)) + fmt + bytes(-len(fmt) % 8)
        exts += _EXT.pack(0, 0)
        name_offset = HEADER_LENGTH + len(exts) if name else 0
        hdr = _HEADER.pack(
            MAGIC, 3, name_offset, len(name), CLUSTER_BITS, self.size, 0,
            self.l1_size, self.l1_start * CLUSTER,
            self.rt_start * CLUSTER, self.rt_clusters,
            0, 0,  # no snapshots
            0, 0, 0,  # incompatible, compatible, autoclear features
            REFCOUNT_ORDER, HEADER_LENGTH)
        out = hdr + exts + name
        return out + bytes(CLUSTER - len(out))

    def _table(self, values: array) -> bytes:
        if sys.byteorder == "little":
            values.byteswap()
        return values.tobytes()

    def _refcount_table(self, i: int) -> bytes:
        per = CLUSTER // 8
        first = i * per
        t = array("Q", bytes(CLUSTER))
        n = max(0, min(per, self.rb_clusters - first))
        if n:
            off = (self.rb_start + first) * CLUSTER
            t[:n] = array("Q", range(off, off + n * CLUSTER, CLUSTER))
        return self._table(t)

    def _refcount_block(self, i: int) -> bytes:
        used = max(0, min(REFCOUNTS_PER_BLOCK, self.total_clusters - i * REFCOUNTS_PER_BLOCK))
        return b"\x00\x01" * used + bytes(2 * (REFCOUNTS_PER_BLOCK - used))

    def _l1(self, i: int) -> bytes:
        per = CLUSTER // 8
        t = array("Q", bytes(CLUSTER))
        for slot in self.l2_slots:
            if i * per <= slot < (i + 1) * per:
                t[slot - i * per] = (self.l2_start + self._l2_of[slot]) * CLUSTER | OFLAG_COPIED
        return self._table(t)

    def _l2(self, slot: int) -> bytes:
        lo, hi = slot * L2_ENTRIES, min((slot + 1) * L2_ENTRIES, self.clusters)
        t = array("Q", bytes(CLUSTER))
        r = bisect.bisect_right(self._run_starts, lo) - 1
        while r < len(self.runs) and self.runs[r][0] < hi:
            c, n, kind = self.runs[r]
            a, b = max(c, lo), min(c + n, hi)
            if kind == ZERO:
                t[a - lo:b - lo] = array("Q", [OFLAG_ZERO]) * (b - a)
            elif kind in (DATA, FILL):
                f = self.data_start + self._data_file[c] + (a - c)
                off = f * CLUSTER | OFLAG_COPIED
                t[a - lo:b - lo] = array("Q", range(off, off + (b - a) * CLUSTER, CLUSTER))
            r += 1
        return self._table(t)

    def metadata_cluster(self, i: int) -> bytes:
        """The bytes of file cluster ``i`` (< ``data_start``)."""
        if i == 0:
            return self.header()
        if i < self.rb_start:
            return self._refcount_table(i - self.rt_start)
        if i < self.l1_start:
            return self._refcount_block(i - self.rb_start)
        if i < self.l2_start:
            return self._l1(i - self.l1_start)
        if i < self.data_start:
            return self._l2(self.l2_slots[i - self.l2_start])
        raise IndexError(i)

    # -- reads -----------------------------------------------------------------

    def pieces(self, offset: int, length: int) -> list[Piece]:
        """What ``[offset, offset + length)`` of the file is, clipped at its end."""
        end = min(offset + length, self.file_size)
        out: list[Piece] = []
        pos = max(0, offset)
        meta_end = self.data_start * CLUSTER
        while pos < end and pos < meta_end:
            c = pos // CLUSTER
            stop = min(end, (c + 1) * CLUSTER)
            data = self.metadata_cluster(c)
            lo = pos - c * CLUSTER
            out.append(Piece(stop - pos, meta=data[lo:lo + stop - pos]))
            pos = stop
        while pos < end:
            rel = pos - meta_end
            i = bisect.bisect_right(self._data_starts, rel // CLUSTER) - 1
            f, g, n, fill = self._data[i]
            run_end = meta_end + (f + n) * CLUSTER
            stop = min(end, run_end)
            out.append(Piece(stop - pos, start=g * CLUSTER + rel - f * CLUSTER, fill=fill))
            pos = stop
        return out

    def guest_offset(self, file_offset: int) -> int | None:
        """Where a byte of the data area comes from in the guest (None for metadata)."""
        rel = file_offset - self.data_start * CLUSTER
        if rel < 0 or file_offset >= self.file_size:
            return None
        f, g, _, _ = self._data[bisect.bisect_right(self._data_starts, rel // CLUSTER) - 1]
        return g * CLUSTER + rel - f * CLUSTER
