"""Tier 2: the write side of ``--rw`` mounts, the handlers called directly over a fake NBD side.

The disk, tree and handlers are test_2_operations's (``Mount``: ``vm/top.qcow2``,
base <- top, bitmap b1 in top), built as a ``--rw`` mount builds them
(``writable=True``: ``views.mark_writable``). The fake learns to write:

- ``WritableImage``: content and allocation kept per 64 KiB block (a qcow2
  cluster), so block status follows the writes: a write makes its blocks data
  (and dirty), a zero request makes the blocks it covers allocated zeros. It
  records every write, zero request and flush, every block status call
  ``(start, end)`` and every request ``(offset, length)`` behind them.
- ``WritableProcess``: like qemu-nbd without ``--persistent`` (``nbd/qemu.py``),
  it exits once its last client disconnects.
- ``WritableConnection``: ``pwrite``, ``zero``, ``flush``, and ``block_status``
  over an area. ``image.fail_writes = errno.ENOSPC`` makes writes fail as a full
  host disk does (the connection stays up); ``image.die_at_write`` kills the
  server under the next write (the connection is reset).

Everything above the host is production code: the write sessions, the
pool, the handlers.
"""

import errno
import json
import logging
import os
import re
import threading
import types

import pyfuse3
import pytest
import trio
from test_2_operations import (  # noqa: F401 (_logs: the log check, autouse)
    ALLOC,
    CHAIN,
    DEPTH,
    DIRTY,
    DIRTYV,
    KINDS,
    LAYER,
    FakeBackend,
    FakeConnection,
    FakeProcess,
    Image,
    Mount,
    _logs,
)
from trio.testing import wait_all_tasks_blocked

from snapfs.errors import TransportError
from snapfs.fs.handles import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE
from snapfs.fs.tree import STATUS_NAME
from snapfs.nbd import contexts

KiB, MiB = 1 << 10, 1 << 20
BLOCK = 64 * KiB
BASE = "vm/top.qcow2/chain/00-base"  # another image: never busy because of top's writer
DEAD_WRITER = r"qemu-nbd writing .*top\.qcow2 exited"


class WritableImage(Image):
    """An Image whose content, runs and dirty bits follow writes (see the module docstring)."""

    def __init__(self, areas, **kw):
        super().__init__(areas, **kw)
        assert all(n % BLOCK == 0 for n, _, _ in areas)
        self.content = bytearray(self.content)
        self.blocks = [[kind, dirty] for n, kind, dirty in areas for _ in range(n // BLOCK)]
        self.writes: list[tuple[int, int]] = []
        self.zeroes: list[tuple[int, int]] = []
        self.flushes = 0
        self.calls: list[tuple[int, int]] = []  # block status calls: (start, end)
        self.requests: list[tuple[int, int]] = []  # block status requests: (offset, length)
        self.fail_writes: int | None = None
        self.die_at_write = False
        self.gate: threading.Event | None = None
        self._rebuild()

    def _rebuild(self):
        runs = {ALLOC: [], DEPTH: [], DIRTY: []}
        for i, (kind, dirty) in enumerate(self.blocks):
            for ctx, flags in zip((ALLOC, DEPTH, DIRTY), (*KINDS[kind], int(dirty)), strict=True):
                r = runs[ctx]
                if r and r[-1][2] == flags:
                    r[-1] = (r[-1][0], r[-1][1] + BLOCK, flags)
                else:
                    r.append((i * BLOCK, BLOCK, flags))
        self.runs = runs

    def write(self, offset, buf):
        self.content[offset:offset + len(buf)] = buf
        for i in range(offset // BLOCK, -(-(offset + len(buf)) // BLOCK)):
            self.blocks[i] = ["data", True]
        self.writes.append((offset, len(buf)))
        self._rebuild()

    def zero(self, length, offset):
        end = offset + length
        self.content[offset:end] = bytes(length)
        for i in range(offset // BLOCK, -(-end // BLOCK)):
            whole = offset <= i * BLOCK and (i + 1) * BLOCK <= end
            # A block zeroed only in part keeps its other bytes: it stays data.
            self.blocks[i] = ["zero" if whole else "data", True]
        self.zeroes.append((offset, length))
        self._rebuild()

    def blocks_of(self, kind):
        return sum(k == kind for k, _ in self.blocks)


class WritableProcess(FakeProcess):
    """A fake qemu-nbd that, as a real one without --persistent, exits with its last client."""

    def __init__(self, image, spec, socket):
        super().__init__(image, spec, socket)
        self.clients = 0

    def left(self):
        self.clients -= 1
        if self.clients == 0 and not self.unreachable:  # unreachable: its exit is not seen yet
            self.dead = True  # an exit, not a stop: stop() was not called


class WritableConnection(FakeConnection):
    def __init__(self, process, ctxs):
        super().__init__(process, ctxs)
        process.clients += 1

    def close(self, idle=True):
        if not self.closed:
            self.process.left()
        self.closed = True

    def _check(self, offset, length):
        img, proc = self.image, self.process
        if self.closed or not proc.alive:
            raise TransportError("not connected", errno.ENOTCONN)
        if proc.unreachable:
            raise TransportError("connection reset by peer", errno.ECONNRESET)
        assert proc.spec.writable, "a write to a read-only export"
        if offset < 0 or length <= 0 or offset + length > img.size:
            raise TransportError(f"bad request of {length} at {offset}", errno.EINVAL)
        if img.die_at_write:
            img.die_at_write = False
            proc.dead = True
            raise TransportError("connection reset by peer", errno.ECONNRESET)
        if img.fail_writes is not None:
            raise TransportError("command failed: No space left on device", img.fail_writes)

    def pwrite(self, buf, offset):
        with self.image.lock:
            self._check(offset, len(buf))
            self.image.write(offset, bytes(buf))

    def zero(self, length, offset):
        with self.image.lock:
            self._check(offset, length)
            self.image.zero(length, offset)

    def flush(self):
        with self.image.lock:
            if self.closed or not self.process.alive:
                raise TransportError("not connected", errno.ENOTCONN)
            self.image.flushes += 1

    def block_status(self, size, start=0, end=None):
        assert size == self.size
        end = size if end is None else end
        img = self.image
        if img.gate is not None:
            assert img.gate.wait(5), "the test never opened the gate"
        with img.lock:
            if self.closed or not self.process.alive:
                raise TransportError("not connected", errno.ENOTCONN)
            img.calls.append((start, end))

        def request(length, offset, callback):
            # Never past the area asked for: a refresh reads what changed, no more.
            assert start <= offset < end and 0 < length <= end - offset, (offset, length, start, end)
            with img.lock:
                img.requests.append((offset, length))
                runs = {ctx: img.reply(ctx, offset, length) for ctx in self.contexts}
            for ctx in self.contexts:
                callback(ctx, offset, runs[ctx], 0)

        return contexts.read_block_status(end, self.contexts, request, start)


class WritableBackend(FakeBackend):
    def nbd_server(self, spec, rundir, ident, connections):
        p = WritableProcess(self.images.get(spec, self.default), spec, os.path.join(rundir, f"{ident}.sock"))
        self.processes.append(p)
        return p

    def connect(self, socket, ctxs, export):
        return WritableConnection(next(p for p in self.processes if p.socket == socket), ctxs)

    def alive(self, image=None):
        """The servers running (of ``image`` only)."""
        return [p for p in self.processes if p.alive and image in (None, p.spec.image)]


class WriteMount(Mount):
    """test_2_operations's Mount as a ``--rw`` mount."""

    def __init__(self, tmp_path, image, idle_timeout=2.0):
        super().__init__(tmp_path, image, idle_timeout, backend=WritableBackend(image), writable=True)
        self.image = image
        self.top = self.spec(CHAIN).image  # the image the writable views write

    def wspec(self, name):
        return self.spec(name).for_writing()

    async def open(self, path, flags=os.O_RDONLY):
        attrs = await self.lookup(path)
        return (await self.ops.open(attrs.st_ino, flags, None)).fh

    async def attrs(self, path):
        return await self.ops.getattr((await self.lookup(path)).st_ino, None)

    async def truncate(self, path, size, fh=None):
        attr = pyfuse3.EntryAttributes()
        attr.st_size = size
        fields = types.SimpleNamespace(update_size=True, update_mode=False, update_uid=False,
                                       update_gid=False, update_atime=False, update_mtime=False,
                                       update_ctime=False)
        return await self.ops.setattr((await self.lookup(path)).st_ino, attr, fields, fh, None)

    async def read_all(self, path):
        fh = await self.open(path)
        try:
            return await self.read(fh, 0, self.image.size)
        finally:
            await self.ops.release(fh)

    async def status_text(self):
        return (await self.read_file(STATUS_NAME)).decode()

    async def map_of(self, name):
        return json.loads(await self.read_file(name + ".map.json"))

    async def settle(self):
        """Let the pool's tasks (a writer stopping) run."""
        await wait_all_tasks_blocked()

    async def written(self):
        """Wait until the writes queued (``WriteSession.pwrite``) were answered."""
        for session in list(self.writes.sessions.values()):
            await session.drain()


async def fails(coro):
    """The errno name a handler answers, or None if it succeeded."""
    try:
        await coro
    except pyfuse3.FUSEError as e:
        return errno.errorcode[e.errno]
    return None


def take_logged(caplog, level, pattern):
    """Records of ``level`` matching ``pattern``, taken out of the log check (``_logs``):
    the test provoked them and checks them itself. ``caplog.records`` is the live list
    the check reads."""
    records = caplog.records
    taken = [r for r in records if r.levelno == level and re.search(pattern, r.getMessage())]
    records[:] = [r for r in records if r not in taken]
    return [r.getMessage() for r in taken]


def extents(*spec):
    """[(start, length, zero, hole)] in KiB -> chain/layer map entries."""
    return [dict(start=s * KiB, length=n * KiB, zero=z, hole=h) for s, n, z, h in spec]


# -- the end of the disk ----------------------------------------------------------

async def test_write_past_the_end_is_enospc_and_a_write_across_it_is_short(tmp_path):
    image = WritableImage([(MiB, "data", False), (3 * MiB, "hole", False)])
    size = image.size
    mount = WriteMount(tmp_path, image)
    async with mount.running() as ops:
        fh = await mount.open(CHAIN + ".raw", os.O_WRONLY)
        for off in (size, size + 1, size + 5 * MiB):
            assert await fails(ops.write(fh, off, b"x" * 4096)) == "ENOSPC"
        assert image.writes == []
        assert f"{CHAIN}.raw: a write at {size + 5 * MiB} is past the end of the disk" in await mount.status_text()
        # Across the end: what fits is written, the rest is not.
        data = bytes(range(256)) * 32
        assert await ops.write(fh, size - 4096, data) == 4096
        await ops.fsync(fh, False)  # the write was queued: done once fsync returns
        assert image.writes == [(size - 4096, 4096)]
        assert image.content[-4096:] == data[:4096]
        # fallocate past the end without KEEP_SIZE would grow the file: refused the same way.
        assert await fails(ops.fallocate(fh, FALLOC_FL_ZERO_RANGE, size - 4096, 8192)) == "ENOSPC"
        assert image.zeroes == []
        assert await fails(mount.truncate(CHAIN + ".raw", size + 4096, fh)) == "EINVAL"
        assert f"{CHAIN}.raw: a view cannot change size" in await mount.status_text()
        assert (await mount.attrs(CHAIN + ".raw")).st_size == size
        await ops.flush(fh)
        await ops.release(fh)
        await mount.settle()
        assert await mount.read_all(CHAIN + ".raw") == bytes(image.content)


# -- maps after writes -------------------------------------------------------------

async def test_map_seek_and_blocks_after_writes_read_only_the_changed_areas(tmp_path):
    # 16 MiB: data, allocated zeros, not allocated.
    image = WritableImage([(MiB, "data", False), (3 * MiB, "zero", False), (12 * MiB, "hole", False)])
    mount = WriteMount(tmp_path, image)
    D, H = os.SEEK_DATA, os.SEEK_HOLE
    async with mount.running() as ops:
        fh = await mount.open(CHAIN + ".raw", os.O_WRONLY)
        # The map comes from the read-only export, once, before the writer starts.
        assert image.calls == [(0, image.size)]
        assert mount.backend.alive() == mount.backend.started(mount.wspec(CHAIN))
        image.calls.clear()
        image.requests.clear()

        # A write inside a 2 MiB area: that area is read again, nothing else.
        await ops.write(fh, 5 * MiB + 100, b"\1" * 4096)
        a = await mount.attrs(CHAIN + ".raw")
        assert a.st_blocks == (MiB + BLOCK) // 512
        assert image.calls == [(4 * MiB, 6 * MiB)] and image.requests == [(4 * MiB, 2 * MiB)]
        assert await mount.seek(fh, MiB, D) == 5 * MiB
        assert await mount.seek(fh, 5 * MiB, H) == 5 * MiB + BLOCK
        assert await mount.map_of(CHAIN) == extents(
            (0, 1024, False, False), (1024, 3072, True, False), (4096, 1024, True, True),
            (5120, 64, False, False), (5184, 16 * 1024 - 5184, True, True))
        assert image.calls == [(4 * MiB, 6 * MiB)]  # the map is up to date: not read again

        # Two writes far apart: two areas, each read once, in order.
        await ops.write(fh, 14 * MiB, b"\2" * BLOCK)
        await ops.write(fh, 9 * MiB, b"\3" * 100)
        image.calls.clear()
        assert await mount.seek(fh, 6 * MiB, D) == 9 * MiB
        assert image.calls == [(8 * MiB, 10 * MiB), (14 * MiB, 16 * MiB)]
        assert await mount.seek(fh, 9 * MiB + 100, H) == 9 * MiB + BLOCK
        assert await mount.seek(fh, 10 * MiB, D) == 14 * MiB

        # A copy in 1 MiB writes (cp, dd): one area, read once.
        image.calls.clear()
        for off in range(0, 8 * MiB, MiB):
            await ops.write(fh, off, bytes([off // MiB + 1]) * MiB)
        assert (await mount.attrs(CHAIN + ".raw")).st_blocks == (8 * MiB + 2 * BLOCK) // 512
        assert image.calls == [(0, 8 * MiB)]

        # Zeroing: the area reads as zero; only its 2 MiB areas are read again.
        image.calls.clear()
        await ops.fallocate(fh, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 2 * MiB, 4 * MiB)
        assert image.zeroes == [(2 * MiB, 4 * MiB)]
        assert await mount.seek(fh, 2 * MiB, D) == 6 * MiB
        assert image.calls == [(2 * MiB, 6 * MiB)]
        assert (await mount.attrs(CHAIN + ".raw")).st_blocks == (4 * MiB + 2 * BLOCK) // 512

        # Reads through the writer show every write.
        assert await mount.read(fh, 0, image.size) == bytes(image.content)
        before = len(image.calls)
        await ops.flush(fh)
        await ops.release(fh)
        await mount.settle()
        assert len(image.calls) == before  # nothing stale left to read at close
        assert mount.backend.alive() == []
        # Another view of the image reads its map again (whole) and the new content.
        image.calls.clear()
        assert await mount.read_all(LAYER + ".raw") == bytes(image.content)
        assert image.calls == [(0, image.size)]


async def test_close_brings_a_stale_map_up_to_date_and_the_image_at_rest_is_read_again(tmp_path):
    image = WritableImage([(4 * MiB, "hole", False)])
    mount = WriteMount(tmp_path, image)
    async with mount.running() as ops:
        fh = await mount.open(LAYER + ".raw", os.O_WRONLY)
        image.calls.clear()
        await ops.write(fh, 3 * MiB, b"\7" * 4096)
        await ops.release(fh)
        assert image.calls == [(2 * MiB, 4 * MiB)]  # read once, by the writer, at close
        await mount.settle()
        assert mount.backend.alive() == []
        # Once the writer stopped, the map is read again, once, from the image at rest.
        assert (await mount.attrs(LAYER + ".raw")).st_blocks == BLOCK // 512
        assert await mount.map_of(LAYER) == extents(
            (0, 3072, True, True), (3072, 64, False, False), (3136, 4096 - 3136, True, True))
        assert image.calls == [(2 * MiB, 4 * MiB), (0, 4 * MiB)]


# -- one writer per image ----------------------------------------------------------

async def test_other_views_of_the_image_are_busy_while_it_is_written(tmp_path):
    image = WritableImage([(MiB, "data", True), (MiB, "hole", False)])
    mount = WriteMount(tmp_path, image)
    async with mount.running() as ops:
        # The map of the layer view is known before: stat still answers, open does not.
        await mount.attrs(LAYER + ".raw")
        fh = await mount.open(CHAIN + ".raw", os.O_WRONLY)
        await ops.write(fh, MiB, b"\5" * BLOCK)
        for name, flags in ((LAYER, os.O_RDONLY), (LAYER, os.O_WRONLY), (DIRTYV, os.O_RDONLY)):
            with trio.fail_after(5):
                assert await fails(mount.open(name + ".raw", flags)) == "EBUSY", name
        assert (await mount.attrs(LAYER + ".raw")).st_size == image.size
        status = await mount.status_text()
        assert f"{LAYER}.raw: " in status and "open for writing" in status
        # Another image is not busy; the written view itself reads through its writer.
        assert await mount.read_all(BASE + ".raw") == image.content[:image.size]
        reader = await mount.open(CHAIN + ".raw")
        assert await mount.read(reader, MiB, BLOCK) == b"\5" * BLOCK
        assert [p.spec.writable for p in mount.backend.alive(mount.top)] == [True]
        await ops.release(reader)
        await ops.release(fh)
        await mount.settle()  # the writer stopped (right after close: see the next tests)
        assert mount.backend.alive(mount.top) == []
        # Closed: the other views open again and show the new content.
        with trio.fail_after(5):
            assert await mount.read_all(LAYER + ".raw") == bytes(image.content)
        assert (await mount.read_all(DIRTYV + ".raw"))[MiB:MiB + BLOCK] == b"\5" * BLOCK
        fh = await mount.open(LAYER + ".raw", os.O_WRONLY)
        await ops.release(fh)
        await mount.settle()
        assert mount.writes.sessions == {}


# -- right after the writer's last close ---------------------------------------------
# FUSE sends RELEASE once close() has returned, and serves the next requests while
# it runs and while the writer stops (qemu-nbd flushes and exits): for the user the
# file is closed from the moment close() returned.

@pytest.mark.parametrize("flags", [os.O_RDONLY, os.O_WRONLY], ids=["read", "write"])
async def test_the_view_opened_again_right_after_close_works(tmp_path, flags):
    """A tool writing a piece and reading it back, again and again. (Which of the
    close's and the open's tasks runs first is trio's choice: ten rounds try both.)"""
    image = WritableImage([(16 * MiB, "hole", False)])
    mount = WriteMount(tmp_path, image)
    async with mount.running() as ops:
        for i in range(10):
            off = i * MiB
            fh = await mount.open(CHAIN + ".raw", os.O_WRONLY)
            await ops.write(fh, off, bytes([i + 1]) * BLOCK)
            await ops.release(fh)
            # The writer is stopping: no checkpoint between the close and this open.
            fh = await mount.open(CHAIN + ".raw", flags)
            if flags == os.O_WRONLY:
                await ops.write(fh, off + BLOCK, bytes([i + 1]) * BLOCK)
                await ops.flush(fh)
            assert await mount.read(fh, off, BLOCK) == bytes([i + 1]) * BLOCK, i
            await ops.release(fh)
        await mount.settle()
        assert await mount.read_all(CHAIN + ".raw") == bytes(image.content)


@pytest.mark.parametrize("what", ["map", "content"])
async def test_other_views_right_after_the_writer_closed_show_the_write(tmp_path, what):
    image = WritableImage([(4 * MiB, "hole", False)])
    mount = WriteMount(tmp_path, image)
    async with mount.running() as ops:
        assert await mount.map_of(LAYER) == extents((0, 4096, True, True))  # known before the write
        fh = await mount.open(CHAIN + ".raw", os.O_WRONLY)
        await ops.write(fh, MiB, b"\1" * BLOCK)
        await ops.release(fh)
        with trio.fail_after(5):
            if what == "map":
                assert await mount.map_of(LAYER) == extents(
                    (0, 1024, True, True), (1024, 64, False, False), (1088, 4096 - 1088, True, True))
            else:
                assert (await mount.read_all(LAYER + ".raw"))[MiB:MiB + BLOCK] == b"\1" * BLOCK


async def test_a_read_while_the_map_is_being_brought_up_to_date_sees_the_write(tmp_path):
    """A stat (ls -l, du) brings the map up to date with a block status request; a read
    of the view served meanwhile must not use the map from before the write."""
    image = WritableImage([(4 * MiB, "hole", False)])
    mount = WriteMount(tmp_path, image)
    async with mount.running() as ops:
        fh = await mount.open(CHAIN + ".raw", os.O_RDWR)
        await ops.write(fh, MiB, b"\1" * BLOCK)
        image.gate = threading.Event()  # block status waits for it
        got = []

        async def read():
            got.append(await mount.read(fh, MiB, BLOCK))

        with trio.fail_after(5):
            async with trio.open_nursery() as n:
                n.start_soon(mount.attrs, CHAIN + ".raw")
                await wait_all_tasks_blocked()  # the stat waits in block status
                n.start_soon(read)
                await wait_all_tasks_blocked()
                image.gate.set()
        assert got == [b"\1" * BLOCK]
        await ops.release(fh)


async def test_a_qcow2_open_under_way_keeps_the_writer_out(tmp_path):
    """A .qcow2 is laid out from the map when it opens: a writer that came while
    the open waits for the map (block status) must not get the image (EBUSY)."""
    image = WritableImage([(MiB, "data", True), (MiB, "hole", False)])
    mount = WriteMount(tmp_path, image)
    async with mount.running() as ops:
        image.gate = threading.Event()  # block status waits for it
        got, writer = [], []

        async def open_qcow2():
            got.append(await mount.open(CHAIN + ".qcow2"))

        async def open_writer():
            writer.append(await fails(mount.open(CHAIN + ".raw", os.O_WRONLY)))

        with trio.fail_after(5):
            async with trio.open_nursery() as n:
                n.start_soon(open_qcow2)
                await wait_all_tasks_blocked()  # the open waits in block status
                n.start_soon(open_writer)
                await wait_all_tasks_blocked()
                image.gate.set()
        assert writer == ["EBUSY"]
        fh = got[0]
        with trio.fail_after(5):
            assert await fails(mount.open(LAYER + ".raw", os.O_WRONLY)) == "EBUSY"
        assert "is open: it reads the image as it is until closed" in await mount.status_text()
        head = await mount.read(fh, 0, 4096)
        assert head[:4] == b"QFI\xfb"
        # Its server was never stopped under it (no writer evicted it).
        assert [p.alive for p in mount.backend.started(mount.spec(CHAIN))] == [True]
        await ops.release(fh)
        await mount.settle()
        w = await mount.open(CHAIN + ".raw", os.O_WRONLY)
        await ops.write(w, MiB, b"\6" * BLOCK)
        # While written, the .qcow2 does not open.
        with trio.fail_after(5):
            assert await fails(mount.open(CHAIN + ".qcow2")) == "EBUSY"
        await ops.release(w)
        await mount.settle()
        assert mount.writes.sessions == {}


# -- O_TRUNC, truncate(0) ------------------------------------------------------------

async def test_truncating_a_layer_that_holds_data_is_eperm(tmp_path):
    image = WritableImage([(MiB, "hole", False), (BLOCK, "zero", False), (3 * MiB - BLOCK, "hole", False)])
    mount = WriteMount(tmp_path, image)
    async with mount.running() as ops:
        assert await fails(mount.open(LAYER + ".raw", os.O_WRONLY | os.O_TRUNC)) == "EPERM"
        assert await fails(mount.truncate(LAYER + ".raw", 0)) == "EPERM"
        fh = await mount.open(LAYER + ".raw", os.O_RDWR)
        assert await fails(mount.truncate(LAYER + ".raw", 0, fh)) == "EPERM"
        await ops.release(fh)
        assert image.writes == image.zeroes == []
        status = await mount.status_text()
        assert f"{LAYER}.raw: truncating a layer that holds data ({BLOCK} bytes, the first at {MiB})" in status
        assert "restore a layer into a fresh one" in status
        await mount.settle()
        assert mount.backend.alive() == [] and mount.writes.sessions == {}


async def test_truncating_an_empty_layer_changes_nothing_and_the_chain_view_reads_zero(tmp_path):
    image = WritableImage([(4 * MiB, "hole", False)])
    mount = WriteMount(tmp_path, image)
    async with mount.running() as ops:
        before = await mount.map_of(LAYER)
        fh = await mount.open(LAYER + ".raw", os.O_WRONLY | os.O_TRUNC)
        await ops.write(fh, MiB, b"\1" * 4096)
        await ops.release(fh)
        await mount.settle()
        assert image.zeroes == [] and image.writes == [(MiB, 4096)]
        assert before == extents((0, 4096, True, True))
        # The layer now holds data: it refuses the next truncate.
        assert await fails(mount.truncate(LAYER + ".raw", 0)) == "EPERM"
        # Through the chain view, O_TRUNC zeroes what holds data.
        fh = await mount.open(CHAIN + ".raw", os.O_WRONLY | os.O_TRUNC)
        assert image.zeroes == [(MiB, BLOCK)]
        assert await mount.read(fh, 0, image.size) == bytes(image.size)
        await ops.release(fh)
        await mount.settle()
        assert await mount.map_of(LAYER) == extents(
            (0, 1024, True, True), (1024, 64, True, False), (1088, 4096 - 1088, True, True))
        await mount.truncate(CHAIN + ".raw", 0)  # again: nothing to zero
        assert image.zeroes == [(MiB, BLOCK)]
        await mount.truncate(CHAIN + ".raw", image.size)  # the size it has: nothing
        assert image.zeroes == [(MiB, BLOCK)]


# -- a writer that dies, a write that fails -----------------------------------------

@pytest.mark.log_allows(r"map not brought up to date")
@pytest.mark.parametrize("when", ["between requests", "during a write", "after a stat", "before it is reaped"])
async def test_writer_that_dies_fails_later_requests_with_eio_and_the_next_open_works(tmp_path, caplog, when):
    image = WritableImage([(4 * MiB, "hole", False)])
    mount = WriteMount(tmp_path, image)
    wspec = mount.wspec(CHAIN)
    try:
        async with mount.running() as ops:
            fh = await mount.open(CHAIN + ".raw", os.O_WRONLY)
            await ops.write(fh, 0, b"\1" * BLOCK)
            await mount.written()
            if when == "after a stat":
                await mount.attrs(CHAIN + ".raw")  # the map is up to date: nothing stale at close
            [server] = mount.backend.started(wspec)
            if when == "during a write":
                image.die_at_write = True
            elif when == "before it is reaped":
                # Killed: its connection resets and a new one is refused, while
                # the process does not look ended yet. EIO, never a network errno.
                server.unreachable = True
            else:
                server.dead = True
            if when != "after a stat":
                # Queued, a write returns at once: its failure comes with the
                # writer's next request, EIO, and with every one after it
                # (the writer seen dead, they are not even queued).
                assert await fails(ops.write(fh, MiB, b"\2" * BLOCK)) is None
                await mount.written()
                assert await fails(ops.write(fh, 2 * MiB, b"\2" * BLOCK)) == "EIO"
                status = await mount.status_text()
                if when == "before it is reaped":  # not known dead: the kept write is sent again, and fails
                    assert "a write of 65536 bytes at 1048576 queued before failed" in status
                else:
                    assert "a write at 2097152 failed: qemu-nbd writing" in status
            assert await fails(ops.flush(fh)) == "EIO"
            if when == "before it is reaped":
                server.dead = True  # its exit is seen now
            assert await fails(ops.fsync(fh, False)) == "EIO"
            # Never retried: no new server under the open file, nothing written after the death.
            assert mount.backend.started(wspec) == [server]
            assert image.writes == [(0, BLOCK)] and image.flushes == 0
            await ops.release(fh)
            # The next open starts a new writer, at once (a retrying tool closes and opens again).
            with trio.fail_after(5):
                fh = await mount.open(CHAIN + ".raw", os.O_WRONLY)
            await ops.write(fh, MiB, b"\3" * BLOCK)
            await ops.flush(fh)
            assert len(mount.backend.started(wspec)) == 2 and image.flushes == 1
            await ops.release(fh)
            await mount.settle()
            assert await mount.read_all(CHAIN + ".raw") == bytes(image.content)
    finally:
        dead = take_logged(caplog, logging.ERROR, DEAD_WRITER)
    # The death is an error in the log, once, with the image's name.
    assert len(dead) == 1


async def test_enospc_from_the_host_disk_fails_that_write_and_keeps_the_writer(tmp_path):
    """A host disk that fills up is not a dead server: the write fails ENOSPC, the
    connection stays, and once space is freed the same file writes and flushes again."""
    image = WritableImage([(4 * MiB, "hole", False)])
    mount = WriteMount(tmp_path, image)
    wspec = mount.wspec(CHAIN)
    async with mount.running() as ops:
        fh = await mount.open(CHAIN + ".raw", os.O_WRONLY)
        await ops.write(fh, 0, b"\1" * BLOCK)
        await mount.written()
        image.fail_writes = errno.ENOSPC
        # Queued, the write returns at once; it is written again before the
        # writer's next requests, which fail with its error while it does.
        assert await fails(ops.write(fh, MiB, b"\2" * BLOCK)) is None
        assert await fails(ops.fallocate(fh, FALLOC_FL_ZERO_RANGE, 2 * MiB, BLOCK)) == "ENOSPC"
        assert "a write of 65536 bytes at 1048576 queued before failed" in await mount.status_text()
        assert await fails(ops.flush(fh)) == "ENOSPC"
        assert await fails(ops.write(fh, 3 * MiB, b"\3" * BLOCK)) == "ENOSPC"
        assert image.writes == [(0, BLOCK)] and image.zeroes == [] and image.flushes == 0
        image.fail_writes = None  # space freed: the failed write goes in first
        assert await fails(ops.write(fh, 3 * MiB, b"\3" * BLOCK)) is None
        assert await fails(ops.flush(fh)) is None
        assert [p.alive for p in mount.backend.started(wspec)] == [True]
        await ops.release(fh)
        assert image.writes == [(0, BLOCK), (MiB, BLOCK), (3 * MiB, BLOCK)] and image.flushes == 1
        assert await mount.read_all(CHAIN + ".raw") == bytes(image.content)
