"""Block status of plain qcow2 and raw images, read from the files themselves.

Every view's first stat needs its map, and asking qemu costs a qemu-nbd
start per export (about 10 ms: a process, an image open, a connection). A
listing of 1000 disks of 5 layers asks for 9000 exports. The answers qemu
would give are in the files: a qcow2 image's L1 and L2 tables, a raw file's
holes. This module computes the runs qemu-nbd would report, per NBD
metadata context, for the images where that answer is certain, and says
``None`` for anything else, so qemu is asked as before. qemu still reads
every byte of guest data.

What qemu-nbd reports, as read from qemu's sources (``block/qcow2.c``
``qcow2_co_block_status``, ``block/io.c`` ``bdrv_co_do_block_status`` and
``bdrv_co_common_block_status_above``, ``nbd/server.c``)::

    one layer,        L2 entry               base:allocation    allocation-depth
    "backing": null   0 (or offset 0)        hole|zero (3)      0
                      zero flag (bit 0)      hole|zero (3)      1
                      compressed (bit 62)    data (0)           1
                      offset                 data (0)           1
    raw file          data / hole            0 / 3              (no context)

    a chain, top first:   the first layer whose entry is not 0 answers,
                          with depth = its place + 1; none: 3 and depth 0

A data cluster reads as zero in one more case: when qemu looks through it
into the image file and the file has a hole there. qemu looks through when
it guesses the image was preallocated with metadata: at least a ninth (and
at least two) more clusters in use (a non-zero refcount) than the file has
allocated (``qcow2_detect_metadata_preallocation``). The same guess is made
here; when it says preallocated, only images whose every data cluster lies
in data of the file are answered, so looking through changes nothing.

Also left to qemu (``NotPlain``): version 2 images, extended L2 entries,
internal snapshots, a dirty or corrupt flag, an external data file (or
data-file-raw without one), encryption, a compression type its flag does not
match, any entry with reserved bits or an unaligned offset, more than a
million runs, a chain whose layers differ in size (qemu reports the area
past a short backing file as allocated zeros), a raw file whose size is no
multiple of 512, block devices, a file system without SEEK_DATA, a file
locked for writing, and a file that is not the one scanned (its pin). qemu
then reports what it reports, errors included.
"""

from __future__ import annotations

import bisect
import errno
import functools
import os
import stat
import sys
from array import array
from dataclasses import dataclass

from ..extents import STATE_HOLE, STATE_ZERO, Run, add_run
from . import check_pinned, fd_locked_for_write
from .qcow2 import Qcow2Error, read_header_from

# What an area of one layer is (the rows of the table above).
UNALLOCATED, ZERO, DATA = 0, 1, 2

OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
OFFSET_MASK = 0x00FFFFFFFFFFFE00
# Bits an L1 or standard L2 entry must not have (docs/interop/qcow2.txt).
L1_RESERVED = 0x7F000000000001FF
L2_RESERVED = 0x3F000000000001FE

INCOMPAT_PLAIN = 1 << 3  # compression type (zstd); the rest is left to qemu
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

# A map this fragmented is left to qemu rather than kept in a worker thread's
# lists (a crafted 384 KiB file can describe millions of runs).
MAX_RUNS = 1 << 20

MAX_L1_BYTES = 32 << 20  # qemu's QCOW_MAX_L1_SIZE


class NotPlain(Exception):
    """qemu is asked instead; the message says why (for the debug log)."""


@dataclass(frozen=True)
class LayerStatus:
    """What each area of one image holds: ``(start, length, kind)`` runs covering ``[0, size)``."""

    size: int
    kinds: list[Run]  # flags: UNALLOCATED, ZERO or DATA


def from_qemu_map(entries: list[dict]) -> LayerStatus:
    """One layer's status from what ``qemu-img map --output=json`` says of it
    opened alone (``"backing": null``): qemu's own answer, for images snapfs
    does not read (a remote host's). NotPlain for an area that is data and
    reads as zero (no kind here says that: qemu is asked per export)."""
    kinds: list = []
    pos = 0
    for e in entries:
        start, length = int(e["start"]), int(e["length"])
        if start != pos or length <= 0:
            raise NotPlain("qemu-img map: extents not contiguous")
        if "present" not in e:
            # qemu before 6.1 says nothing of it: an unallocated area and a zero
            # cluster would look the same, and one hides the layer below.
            raise NotPlain("qemu-img map does not say what is present (qemu older than 6.1)")
        if not e["present"]:
            kind = UNALLOCATED
        elif e.get("data"):
            if e.get("zero"):
                raise NotPlain("data that reads as zero")
            kind = DATA
        else:
            kind = ZERO
        add_run(kinds, start, length, kind)
        if len(kinds) > MAX_RUNS:
            raise NotPlain("more than a million runs")
        pos += length
    if pos % 512:
        raise NotPlain("size is no multiple of 512")
    return LayerStatus(pos, kinds)


def _data_segments(fd: int, end: int) -> list[tuple[int, int]]:
    """Where the file has data (SEEK_DATA/SEEK_HOLE), as ``(start, end)``."""
    out = []
    pos = 0
    while pos < end:
        if len(out) > MAX_RUNS:
            raise NotPlain("more than a million runs")
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break
            raise NotPlain(f"no SEEK_DATA here: {e.strerror}") from None
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        out.append((data, min(hole, end)))
        pos = hole
    return out


def _open(path: str, pin: tuple[int, int] | None) -> int:
    try:
        if pin is not None:
            check_pinned(path, pin)
        # O_NONBLOCK: a FIFO swapped in after the check must not block the open.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as e:
        raise NotPlain(f"cannot open: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotPlain("not a regular file")
        if pin is not None and (st.st_dev, st.st_ino) != tuple(pin):
            raise NotPlain("not the file scanned")
        if fd_locked_for_write(fd):
            raise NotPlain("locked for writing")
    except BaseException:
        os.close(fd)
        raise
    return fd


def layer_status(path: str, fmt: str, pin: tuple[int, int] | None) -> LayerStatus:
    """What each area of one image holds; NotPlain when qemu must be asked."""
    fd = _open(path, pin)
    try:
        return _layer_status(fd, fmt)
    except OSError as e:
        raise NotPlain(f"reading the image: {e.strerror}") from None
    finally:
        os.close(fd)


def _layer_status(fd: int, fmt: str) -> LayerStatus:
    size = os.fstat(fd).st_size
    if fmt == "raw":
        if size % 512:
            raise NotPlain("size is no multiple of 512")
        kinds: list = []
        pos = 0
        for a, b in _data_segments(fd, size):
            add_run(kinds, pos, a - pos, ZERO)
            add_run(kinds, a, b - a, DATA)
            pos = b
        add_run(kinds, pos, size - pos, ZERO)
        return LayerStatus(size, kinds)
    if fmt == "qcow2":
        return _qcow2_status(fd, size)
    raise NotPlain(f"format {fmt}")


def _pread(fd: int, length: int, offset: int) -> bytes:
    buf = os.pread(fd, length, offset)
    if len(buf) != length:
        raise NotPlain(f"short read at {offset}")
    return buf


def _qcow2_status(fd: int, file_size: int) -> LayerStatus:
    try:
        with os.fdopen(os.dup(fd), "rb") as f:
            hdr = read_header_from(f)
    except Qcow2Error as e:
        raise NotPlain(f"header: {e}") from None
    cs = hdr.cluster_size
    if hdr.version != 3 or hdr.incompatible & ~INCOMPAT_PLAIN or hdr.refcount_order > 6:
        raise NotPlain(f"version {hdr.version}, incompatible features 0x{hdr.incompatible:x}")
    if hdr.nb_snapshots or hdr.snapshots_offset % cs:
        raise NotPlain("internal snapshots")
    if hdr.autoclear & AUTOCLEAR_DATA_FILE_RAW:
        raise NotPlain("data-file-raw")  # qemu refuses it without a data file
    ctype = hdr.compression_type
    if (ctype, bool(hdr.incompatible & INCOMPAT_PLAIN)) not in ((0, False), (1, True)):
        raise NotPlain(f"compression type {ctype}")  # qemu refuses the mismatch
    if hdr.size % 512:
        raise NotPlain("size is no multiple of 512")
    per_l2 = cs // 8
    nclusters = -(-hdr.size // cs)
    nl1 = -(-nclusters // per_l2)
    if nl1 > hdr.l1_size or hdr.l1_size * 8 > MAX_L1_BYTES:
        raise NotPlain("L1 table size")
    if _preallocated(fd, hdr, file_size):
        segments = _data_segments(fd, file_size)
    else:
        segments = None  # qemu never looks into the file
    starts = [a for a, _ in segments or ()]
    l1 = array("Q", _pread(fd, nl1 * 8, hdr.l1_offset))
    if sys.byteorder == "little":
        l1.byteswap()
    kinds: list = []
    for i, l1e in enumerate(l1):
        first = i * per_l2
        n = min(per_l2, nclusters - first)
        if l1e & L1_RESERVED:
            raise NotPlain(f"reserved bits in L1 entry {i}")
        l2_off = l1e & OFFSET_MASK
        if l2_off == 0:
            add_run(kinds, first * cs, n * cs, UNALLOCATED)
            continue
        if l2_off % cs or l2_off + n * 8 > file_size:
            raise NotPlain(f"L1 entry {i} points outside the file")
        table = _pread(fd, n * 8, l2_off)
        if table.count(0) == len(table):
            add_run(kinds, first * cs, n * cs, UNALLOCATED)
            continue
        kind = _uniform(table, n, cs.bit_length() - 1)
        if kind == ZERO or kind == DATA and segments is None:
            add_run(kinds, first * cs, n * cs, kind)
            continue
        # Entry by entry, but not through runs of 64 empty entries.
        for b in range(0, n, 64):
            part = table[b * 8:(b + 64) * 8]
            if part.count(0) == len(part):
                add_run(kinds, (first + b) * cs, len(part) // 8 * cs, UNALLOCATED)
                continue
            l2 = array("Q", part)
            if sys.byteorder == "little":
                l2.byteswap()
            _l2_kinds(kinds, first + b, l2, cs, segments, starts, file_size)
        if len(kinds) > MAX_RUNS:
            raise NotPlain("more than a million runs")
    end = hdr.size
    if kinds and kinds[-1][0] + kinds[-1][1] > end:
        s, _n, k = kinds.pop()
        add_run(kinds, s, end - s, k)
    return LayerStatus(hdr.size, kinds)


def _l2_kinds(kinds: list, first: int, l2, cs: int, segments, starts, file_size: int) -> None:
    """The runs of one L2 table (its clusters start at cluster ``first``)."""
    one_segment = segments is not None and len(segments) == 1 and segments[0] == (0, file_size)
    run_kind, run_start = None, first
    for j, e in enumerate(l2):
        if e == 0:
            kind = UNALLOCATED
        elif e & OFLAG_COMPRESSED:
            kind = DATA
        else:
            if e & L2_RESERVED:
                raise NotPlain(f"reserved bits in the L2 entry of cluster {first + j}")
            host = e & OFFSET_MASK
            if host % cs:
                raise NotPlain(f"unaligned offset in the L2 entry of cluster {first + j}")
            if e & OFLAG_ZERO:
                kind = ZERO
            elif host == 0:
                kind = UNALLOCATED
            else:
                kind = DATA
                if segments is None:
                    pass
                elif not (host + cs <= file_size if one_segment else _in_data(host, cs, segments, starts)):
                    raise NotPlain(f"cluster {first + j} lies in a hole of the file")
        if kind != run_kind:
            if run_kind is not None:
                add_run(kinds, run_start * cs, (first + j - run_start) * cs, run_kind)
            run_kind, run_start = kind, first + j
    add_run(kinds, run_start * cs, (first + len(l2) - run_start) * cs, run_kind)


@functools.lru_cache(maxsize=None)
def _masked(mask: int) -> bytes:
    """A bytes.translate table: 0 where ``byte & mask`` is 0, else 1."""
    return bytes(int(bool(b & mask)) for b in range(256))


def _uniform(table: bytes, n: int, cluster_bits: int) -> int | None:
    """DATA or ZERO when every entry of an L2 table is a plain data cluster,
    resp. a zero cluster (what metadata preallocation writes), else None.

    Checked on columns of bytes, not entry by entry (a large allocated disk
    has millions of entries): byte 0 of each big-endian entry holds bits
    56-63 (COPIED, compressed, reserved), byte 7 bits 0-7 (the zero flag and
    reserved bits), bytes 6 and 5 the offset's low bits, which alignment
    wants zero."""
    if table[0::8].translate(_masked(0x7F)).count(0) != n:  # at most COPIED
        return None
    for byte, lo in ((6, 8), (5, 16)):
        bits = min(8, cluster_bits - lo)
        if bits > 0 and table[byte::8].translate(_masked((1 << bits) - 1)).count(0) != n:
            return None
    low = table[7::8]
    if low.count(1) == n:
        return ZERO  # the zero flag, with or without an offset
    if low.count(0) != n:
        return None
    # No zero flag: data, unless an offset is 0 (unallocated).
    for empty in (bytes(8), b"\x80" + bytes(7)):
        pos = table.find(empty)
        while pos >= 0:
            if pos % 8 == 0:
                return None
            pos = table.find(empty, pos + 1)
    return DATA


_REFCOUNT_ARRAYS = {3: "B", 4: "H", 5: "I", 6: "Q"}


def _preallocated(fd: int, hdr, file_size: int) -> bool:
    """qemu's guess that the image was preallocated with metadata (see above)."""
    cs = hdr.cluster_size
    code = _REFCOUNT_ARRAYS.get(hdr.refcount_order)
    if code is None or array(code).itemsize != 1 << (hdr.refcount_order - 3):
        raise NotPlain(f"refcount order {hdr.refcount_order}")
    real = os.fstat(fd).st_blocks * 512 // cs
    threshold = max(real * 10 // 9, real + 2)
    end_cluster = -(-file_size // cs)
    per_block = cs * 8 >> hdr.refcount_order
    nblocks = min(-(-end_cluster // per_block), hdr.refcount_table_clusters * cs // 8)
    table = array("Q", _pread(fd, nblocks * 8, hdr.refcount_table_offset))
    if sys.byteorder == "little":
        table.byteswap()
    used = 0
    for k, entry in enumerate(table):
        off = entry & 0xFFFFFFFFFFFFFE00
        if off == 0:
            continue
        if off % cs or off + cs > file_size:
            raise NotPlain(f"refcount block {k} is outside the file")
        n = min(per_block, end_cluster - k * per_block)
        block = array(code, _pread(fd, n << hdr.refcount_order >> 3, off))
        used += n - block.count(0)
        if used >= threshold:
            return True
    return False


def _in_data(host: int, length: int, segments, starts) -> bool:
    i = bisect.bisect_right(starts, host) - 1
    return i >= 0 and segments[i][1] >= host + length


def compose(top: LayerStatus, below: list[tuple[int, int, int, int]] | None, level: int
            ) -> list[tuple[int, int, int, int]]:
    """``top`` laid over the composed layers ``below`` (None: nothing beneath):
    ``(start, length, kind, level)`` runs, level being the layer each area
    comes from, counted from the lowest (1); UNALLOCATED areas have level 0.
    ``level`` is top's own. Linear in both lists' runs, so a chain composed
    one layer at a time costs its depth times its runs, not its depth squared.
    """
    out: list[tuple[int, int, int, int]] = []

    def add(start, length, kind, lvl):
        if out and out[-1][2] == kind and out[-1][3] == lvl and out[-1][0] + out[-1][1] == start:
            last = out[-1]
            out[-1] = (last[0], last[1] + length, kind, lvl)
        else:
            out.append((start, length, kind, lvl))

    if below is None:
        for start, length, kind in top.kinds:
            add(start, length, kind, level if kind != UNALLOCATED else 0)
        return out
    j = 0
    for start, length, kind in top.kinds:
        end = start + length
        if kind != UNALLOCATED:
            add(start, length, kind, level)
            continue
        pos = start
        while pos < end:
            while below[j][0] + below[j][1] <= pos:
                j += 1
            b_start, b_len, b_kind, b_level = below[j]
            stop = min(end, b_start + b_len)
            add(pos, stop - pos, b_kind, b_level)
            pos = stop
    return out


def composed_runs(composed: list[tuple[int, int, int, int]], depth: int) -> tuple[list[Run], list[Run]]:
    """base:allocation and qemu:allocation-depth runs of a composed chain of
    ``depth`` layers (``compose``)."""
    alloc: list[Run] = []
    depths: list[Run] = []
    hole = STATE_HOLE | STATE_ZERO
    for start, length, kind, level in composed:
        add_run(alloc, start, length, 0 if kind == DATA else hole)
        add_run(depths, start, length, depth - level + 1 if kind != UNALLOCATED else 0)
    return alloc, depths
