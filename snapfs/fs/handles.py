"""Open files, by kind: each with its own read, lseek and (views) write.

- ``ContentHandle``: a file whose content is known at open (a map's JSON,
  the status file, a libvirt domain's definition): dense, read from memory;
- ``Qcow2Handle``: a composed ``.qcow2`` (``views/qcow2.py``): its layout is
  fixed at open, its metadata generated, its data read from the view;
- ``ViewHandle``: a view ``.raw``: zeros from the map, data from its lease's
  server (through the chunk cache, or directly beside a writer), and, opened
  for writing, writes through its write session (``data/writes.py``).

``Files`` is the table of open files and what they need (``data/``). Errors
are snapfs's own (``errors.py``) or ``pyfuse3.FUSEError``; a refused request
says why in the status file (``refuse``).
"""

from __future__ import annotations

import contextlib
import errno
import itertools

import pyfuse3

from ..data.exports import Exports, Lease
from ..data.maps import Maps
from ..errors import SnapfsError
from ..extents import ExtentMap
from ..nbd.chunks import SMALL
from ..nbd.pool import Retired
from .tree import Node, Status

# fallocate(2) modes (linux/falloc.h).
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
ZEROING = (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE,
           FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)

# A read within this distance of the end of the file's previous one
# continues a sequential stream (several requests of one reader arrive out
# of order: four 1 MiB requests of a 4 MiB read, qemu-img convert's
# coroutines, 8 x 2 MiB); for small reads, within SMALL (a VM's random
# 4 KiB reads land that near by chance once in thousands of reads of a disk).
NEAR = 16 << 20

# Zero replies share one buffer: FUSE takes any buffer, and most zero
# requests are a whole 1 MiB request (or less).
_ZEROS = memoryview(bytes(1 << 20))


def zeros(length: int):
    return _ZEROS[:length] if length <= len(_ZEROS) else bytes(length)


def _joined(parts: list):
    return parts[0] if len(parts) == 1 else b"".join(parts)  # join takes memoryviews too


class Files:
    """The open files of a mount, and what they read and write through.

    opening: opens under way, by disk (a refresh waits for them as for open files).
    """

    def __init__(self, exports: Exports, maps: Maps, status: Status):
        self.exports = exports
        self.maps = maps
        self.status = status
        self.handles: dict[int, Handle] = {}
        self.opening: dict[str, int] = {}
        self._fh = itertools.count(1)

    def add(self, handle: Handle) -> int:
        fh = next(self._fh)
        self.handles[fh] = handle
        return fh

    def refuse(self, node: Node, err: int, reason: str):
        """Refuse a request: the reason to the log and the status file, the errno to the caller."""
        self.status.refuse(node.path, reason)
        raise pyfuse3.FUSEError(err)

    @contextlib.contextmanager
    def counted(self, disk: str | None):
        """Count an open of a file of ``disk`` while the block runs."""
        if disk is None:
            yield
            return
        self.opening[disk] = self.opening.get(disk, 0) + 1
        try:
            yield
        finally:
            self.opening[disk] -= 1
            if not self.opening[disk]:
                del self.opening[disk]

    def in_use(self) -> list[dict]:
        """Every open file: its path in the mount, and who opened it."""
        out = []
        for h in self.handles.values():
            pid, name = h.opener or (0, "")
            out.append({"path": h.node.path, "pid": pid, "process": name})
        return sorted(out, key=lambda x: (x["path"], x["pid"]))

    def open_files(self, prefix: str) -> int:
        """How many files of the disk at mount path ``prefix``, or of disks under it,
        are open (or being opened)."""
        def under(rel):
            return rel == prefix or rel.startswith(prefix + "/")
        return (sum(1 for h in self.handles.values() if h.disk is not None and under(h.disk))
                + sum(n for rel, n in self.opening.items() if under(rel)))


def opener(tid: int) -> tuple[int, str]:
    """``(pid, command name)`` of the process of thread ``tid`` (FUSE gives the
    caller's thread id); ``(tid, "")`` once it is gone, ``(0, "")`` for 0."""
    if not tid:
        return 0, ""
    try:
        with open(f"/proc/{tid}/status", errors="replace") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["Tgid"]), fields["Name"].strip()
    except (OSError, KeyError, ValueError):
        return tid, ""


class Handle:
    """An open file: ``disk`` is its disk's mount path (None: not a view's file).

    opener: ``(pid, command name)`` of the process that opened it (``snapfs
    umount`` names who would lose it).
    """

    disk: str | None = None
    opener: tuple[int, str] | None = None

    def __init__(self, files: Files, node: Node):
        self.files = files
        self.node = node

    async def read(self, off: int, size: int):
        raise NotImplementedError

    async def lseek(self, off: int, want_data: bool) -> int:
        """Dense files: data up to the end."""
        size = self.size
        if off < 0 or off >= size:
            raise pyfuse3.FUSEError(errno.ENXIO)
        return off if want_data else size

    async def write(self, off: int, buf) -> int:
        raise pyfuse3.FUSEError(errno.EBADF)

    async def fallocate(self, mode: int, off: int, length: int) -> None:
        raise pyfuse3.FUSEError(errno.EBADF)

    async def flush(self) -> None:
        pass

    async def release(self) -> None:
        pass


class ContentHandle(Handle):
    """A map's JSON or the status file, as it was at open."""

    def __init__(self, files: Files, node: Node, data: bytes):
        super().__init__(files, node)
        self.data = data
        self.size = len(data)

    async def read(self, off, size):
        return self.data[off:off + size]


class _ViewFileHandle(Handle):
    """A file that reads a view through a lease (``data/exports.py``)."""

    def __init__(self, files: Files, node: Node, lease: Lease):
        super().__init__(files, node)
        self.lease = lease
        self.view = lease.view
        self.disk = node.disk_path
        self._next: int | None = None  # the end of this file's latest read

    async def _read_data(self, start: int, length: int, m: ExtentMap, scattered: bool):
        """Data bytes of the view: through the chunk cache, or, beside a writer,
        straight from the image."""
        view = self.view
        if view.offset:
            # A partition: its bytes at its offset in the chain view's export,
            # through that export's chunks (readahead skips the chain's holes).
            start += view.offset
            m = view.export_map or m
        while True:
            srv = self.lease.server
            try:
                if srv.spec.writable:
                    return await self.lease.session.pread(length, start)
                return await srv.chunks(view.export_size).read(start, length, m, scattered)
            except Retired:
                # Its export moved to a writer, or its server was stopped for one.
                await self.files.exports.follow(self.lease, srv)
            except SnapfsError as e:
                self._failed(e, f"a read at {start} failed")

    def _failed(self, e: SnapfsError, what: str):
        """A request that failed (its server did not come back...): why, in the status file."""
        self.files.status.refuse(self.node.path, f"{what}: {e.reason}")
        raise e

    async def _read_view(self, off: int, size: int, m: ExtentMap):
        # Where this file's reads go next: near the last one, or elsewhere
        # (random I/O, which the chunk cache does not fetch whole chunks for).
        last, self._next = self._next, off + size
        if last is None:
            scattered = off != 0  # a reader starting at the beginning goes on (cp, cat, qemu-img)
        else:
            scattered = abs(off - last) > (NEAR if size > SMALL else SMALL)
        # Zero and hole areas come from the extent map, not the server.
        return _joined([zeros(length) if zero else await self._read_data(start, length, m, scattered)
                        for start, length, zero in m.pieces(off, size)])

    async def release(self):
        await self.files.exports.release(self.lease)


class Qcow2Handle(_ViewFileHandle):
    """A composed ``.qcow2``: the layout and map of the view as they were at open."""

    def __init__(self, files: Files, node: Node, lease: Lease):
        super().__init__(files, node, lease)
        self.map = self.view.map
        self.image = self.view.qcow2_image()
        self.size = self.image.file_size

    async def read(self, off, size):
        view = self.view
        parts = []
        for p in self.image.pieces(off, size):
            if p.meta is not None:
                parts.append(p.meta)
                continue
            n = max(0, min(p.length, view.size - p.start))
            if n and p.fill:
                try:
                    parts.append(await self.lease.fill.pread(n, p.start))
                except SnapfsError as e:
                    self._failed(e, f"a read at {p.start} beneath the layer failed")
            elif n:
                parts.append(await self._read_view(p.start, n, self.map))
            if n < p.length:
                parts.append(zeros(p.length - n))  # the last cluster, past the guest's end
        return _joined(parts)


class ViewHandle(_ViewFileHandle):
    """A view ``.raw``; opened for writing, a writer of its image."""

    async def map(self) -> ExtentMap:
        """The view's map, up to date with what its writer changed."""
        return await self.files.maps.fresh(self.view)

    async def read(self, off, size):
        return await self._read_view(off, size, await self.map())

    async def lseek(self, off, want_data):
        return (await self.map()).seek(off, want_data)  # SeekError: ENXIO

    async def write(self, off, buf):
        if not self.lease.writing:
            raise pyfuse3.FUSEError(errno.EBADF)
        view = self.view
        if off >= view.size:
            # As a block device: nothing is written past the end.
            self.files.refuse(self.node, errno.ENOSPC, f"a write at {off} is past the end of the disk "
                              f"({view.size} bytes; resize it with qemu-img resize)")
        n = min(len(buf), view.size - off)
        self.lease.wrote = True
        try:
            await self.lease.session.pwrite(buf if n == len(buf) else bytes(buf[:n]), off)
        except SnapfsError as e:
            self.files.status.refuse(self.node.path, f"a write at {off} failed: {e.reason}")
            raise
        return n

    async def zero(self, start: int, end: int) -> None:
        self.lease.wrote = True
        try:
            await self.lease.session.zero(start, end)
        except SnapfsError as e:
            self.files.status.refuse(self.node.path, f"zeroing at {start} failed: {e.reason}")
            raise

    async def fallocate(self, mode, off, length):
        if not self.lease.writing:
            raise pyfuse3.FUSEError(errno.EBADF)
        view = self.view
        if mode not in ZEROING:
            # Like a block device: a disk's space is not allocated ahead, nor moved.
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        end = off + length
        if end > view.size and not mode & FALLOC_FL_KEEP_SIZE:
            self.files.refuse(self.node, errno.ENOSPC, f"fallocate up to {end} is past the end of the disk "
                              f"({view.size} bytes)")
        end = min(end, view.size)
        if off < end:
            # A layer keeps zeroed areas as allocated zeros: it cannot hand an
            # area back to the layers beneath it (docs/views.md).
            await self.zero(off, end)

    async def truncate(self) -> None:
        """``O_TRUNC``, ``truncate(0)``: the disk reads as zero; a layer must be empty."""
        view = self.view
        # Writes that failed are written again first: zeroing goes after them.
        await self.lease.session.settle()
        m = await self.lease.session.refresh(view) or await self.map()
        if view.kind == "layer":
            held = next((e for e in m.extents if not e.hole), None)
            if held is not None:
                self.files.refuse(self.node, errno.EPERM, (
                    f"truncating a layer that holds data ({m.data_bytes} bytes, the first at "
                    f"{held.start}) would leave the layers beneath showing through where it is "
                    "emptied: restore a layer into a fresh one (qemu-img create -b)"))
            return
        for e in m.extents:
            if not e.zero:
                await self.zero(e.start, e.end)

    async def flush(self):
        if not self.lease.writing:
            return
        wrote, self.lease.wrote = self.lease.wrote, False
        try:
            await self.lease.session.flush(self.view, wrote)
        except SnapfsError as e:
            self.lease.wrote = wrote
            self.files.status.refuse(self.node.path, f"flush failed: {e.reason}")
            raise

