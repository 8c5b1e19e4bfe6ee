"""Tier 2: the FUSE handlers, called directly under trio, over a fake NBD side.

No mount, no qemu. A mount's parts are wired as ``fs.mount.Mount`` wires
them, over one unit as the image-directory source makes it (``disk_unit`` of
a two-layer qcow2 disk whose top holds bitmap ``b1``; the image files exist
in tmp_path, empty, because ``attrs.py`` stats them), on a fake host
(``FakeBackend``: a ``LocalHost`` whose qemu-nbd and libnbd are fakes).
Everything above the host is production code: the pool's start, idle stop
and restart, the chunk cache, ``contexts.read_block_status`` (the fake's
``block_status`` calls it with a fake ``request``), views, extent maps.

The fake serves every export as an ``Image``: areas ``(length, kind, dirty)``,
kind ``data`` (random bytes), ``zero`` (allocated, reads as zeros) or ``hole``
(not allocated in the top layer)::

    content          | random |  0 0 0 0  |  0 0 0 0  | random |
    base:allocation  |   0    |   ZERO    | ZERO|HOLE |   0    |
    allocation-depth |   1    |    1      |    0      |   1    |
    dirty-bitmap:b1  |  the area's dirty flag                  |

Its block status replies can be split the ways servers do (NBD spec,
"BLOCK_STATUS"): runs cut every ``split`` bytes, at most ``limit[ctx]``
extents per reply (so contexts answer different lengths, and the next request
repeats what the longer ones covered), the last run ``past_end`` bytes past
the end of the export (requests always run to the end, so that is the only
way past the requested range); from ``stall_at`` on it answers nothing.
Its "processes" can die: each serves ``die_after`` preads, then resets the
connection; ``deaths`` times (None: forever). Connection methods are plain
sync functions: the pool runs them in worker threads.
"""

import errno
import json
import logging
import os
import random
import re
import threading
import types
from contextlib import asynccontextmanager

import pyfuse3
import pytest
import trio
import trio.testing
from trio.testing import wait_all_tasks_blocked

from snapfs.config import MountConfig
from snapfs.errors import TransportError, Unavailable
from snapfs.extents import STATE_HOLE, STATE_ZERO
from snapfs.formats import Layer, qcow2
from snapfs.formats.chain import Disk
from snapfs.fs import mount as fsmount
from snapfs.fs.tree import ROOT_INODE, STATUS_NAME
from snapfs.hosts.local import LocalHost
from snapfs.nbd import contexts
from snapfs.nbd.chunks import CHUNK, READAHEAD
from snapfs.sources.base import Scan
from snapfs.sources.imagedir import disk_unit

KiB, MiB = 1 << 10, 1 << 20
ALLOC, DEPTH, DIRTY = contexts.BASE_ALLOCATION, contexts.ALLOCATION_DEPTH, contexts.dirty_context("b1")
# base:allocation and qemu:allocation-depth flags of each kind of area.
KINDS = {"data": (0, 1), "zero": (STATE_ZERO, 1), "hole": (STATE_ZERO | STATE_HOLE, 0)}

LAYER = "vm/top.qcow2/layers/01-top"  # the top layer alone: ALLOC + DEPTH
CHAIN = "vm/top.qcow2/chain/01-top"  # the whole chain: ALLOC + DEPTH
DIRTYV = "vm/top.qcow2/dirty/b1"  # the whole chain with b1: ALLOC + DEPTH + DIRTY


@pytest.fixture
def autojump_clock():
    """A clock that jumps once nothing has happened for 50 ms of real time:
    a fake server's reply in a worker thread is never taken for a hung one
    (pytest-trio's jumps at once, while a thread runs)."""
    return trio.testing.MockClock(autojump_threshold=0.05)


class Image:
    """One export as the fake serves it: content, runs per context, misbehaviour."""

    def __init__(self, areas, limit=None, split=None, past_end=0, stall_at=None, die_after=None, deaths=None):
        self.size = sum(n for n, _, _ in areas)
        self.limit = limit or {}
        self.split = split
        self.past_end = past_end
        self.stall_at = stall_at
        self.die_after = die_after
        self.deaths = deaths
        self.lock = threading.Lock()
        self.preads: list[tuple[int, int]] = []  # (offset, length) of every pread served
        self.status_requests = 0
        self.runs = {ALLOC: [], DEPTH: [], DIRTY: []}
        rnd = random.Random(self.size)
        content, dirty_content, pos = bytearray(), bytearray(), 0
        for length, kind, dirty in areas:
            data = rnd.randbytes(length) if kind == "data" else bytes(length)
            content += data
            dirty_content += data if dirty else bytes(length)
            for ctx, flags in zip((ALLOC, DEPTH, DIRTY), (*KINDS[kind], int(dirty)), strict=True):
                runs = self.runs[ctx]
                if runs and runs[-1][2] == flags:
                    runs[-1] = (runs[-1][0], runs[-1][1] + length, flags)
                else:
                    runs.append((pos, length, flags))
            pos += length
        self.content = bytes(content)
        self.dirty_content = bytes(dirty_content)  # a dirty view reads zeros where not dirty

    def _pieces(self, ctx):
        for start, length, flags in self.runs[ctx]:
            step = self.split or length
            for s in range(start, start + length, step):
                yield s, min(s + step, start + length), flags

    def reply(self, ctx, offset, length):
        """Entries ``[length, flags, ...]`` of one context for one request."""
        if self.stall_at is not None and offset >= self.stall_at:
            return []
        out = []
        for start, end, flags in self._pieces(ctx):
            if end <= offset or start >= offset + length:
                continue
            if self.limit.get(ctx) is not None and len(out) == self.limit[ctx]:
                break
            out.append((max(start, offset), min(end, offset + length), flags))
        if out and out[-1][1] == self.size:
            out[-1] = (out[-1][0], self.size + self.past_end, out[-1][2])
        return [x for start, end, flags in out for x in (end - start, flags)]


class FakeProcess:
    """Stands for a QemuNBD: start/stop/alive/failure()/ended()/socket."""

    def __init__(self, image, spec, socket):
        self.image, self.spec, self.socket = image, spec, socket
        self.running = self.dead = self.serving = False
        # Its socket is gone but its exit not yet seen (a killed qemu-nbd not reaped yet).
        self.unreachable = False
        self.preads = 0
        self.stops: list[float] = []  # trio.current_time() of each stop

    async def start(self):
        self.running = self.serving = True

    async def stop(self):
        self.running = False
        self.stops.append(trio.current_time())

    @property
    def alive(self):
        return self.running and not self.dead

    async def hung_up(self):
        return None  # it dies instead (as by SIGKILL): asked again

    def kill(self):
        self.dead = True

    def failure(self):
        return Unavailable("fake qemu-nbd died")

    def ended(self):
        return "exited with status 1 (fake qemu-nbd died)"


class FakeAio:
    """Stands for nbd.client.AioConnection: the same reads, awaited in trio's thread."""

    def __init__(self, conn):
        self.conn = conn

    async def pread(self, length, offset):
        await trio.sleep(0)
        return self.conn.pread(length, offset)

    def close(self):
        self.conn.close()


class FakeConnection:
    """Stands for nbd.client.Connection: size, pread, block_status, close."""

    def __init__(self, process, ctxs):
        if not process.alive or process.unreachable:
            raise TransportError("connection refused", errno.ECONNREFUSED)
        self.process, self.image, self.contexts = process, process.image, ctxs
        self.size = self.image.size
        self.closed = False

    def close(self, idle=True):
        self.closed = True

    def aio(self, spawn):
        return FakeAio(self)

    def pread(self, length, offset):
        img, proc = self.image, self.process
        with img.lock:
            if self.closed or not proc.alive:
                raise TransportError("not connected", errno.ENOTCONN)
            if offset < 0 or length <= 0 or offset + length > img.size:
                raise TransportError(f"bad read of {length} at {offset}", errno.EINVAL)
            if img.die_after is not None and proc.preads >= img.die_after and img.deaths != 0:
                proc.dead = True
                img.deaths = None if img.deaths is None else img.deaths - 1
                raise TransportError("connection reset by peer", errno.ECONNRESET)
            proc.preads += 1
            img.preads.append((offset, length))
        return img.content[offset:offset + length]

    def block_status(self, size, start=0, end=None):
        assert size == self.size
        end = size if end is None else end

        def request(length, offset, callback):
            assert 0 <= offset < end and 0 < length <= size - offset
            with self.image.lock:
                self.image.status_requests += 1
                # A client that never stops asking fails the test instead of hanging it.
                assert self.image.status_requests < 200, "block status requests never end"
            for ctx in self.contexts:
                callback(ctx, offset, self.image.reply(ctx, offset, length), 0)

        return contexts.read_block_status(end, self.contexts, request, start)


class FakeBackend(LocalHost):
    """The images' host, its qemu-nbd and libnbd faked: an Image per spec (``images``),
    ``default`` for the rest."""

    def __init__(self, default):
        self.default = default
        self.images = {}
        self.processes: list[FakeProcess] = []

    def nbd_server(self, spec, rundir, ident, connections):
        p = FakeProcess(self.images.get(spec, self.default), spec, os.path.join(rundir, f"{ident}.sock"))
        self.processes.append(p)
        return p

    def connect(self, socket, ctxs, export):
        return FakeConnection(next(p for p in self.processes if p.socket == socket), ctxs)

    def started(self, spec):
        return [p for p in self.processes if p.spec == spec]


class Mount:
    """A disk ``vm/top.qcow2`` (base <- top, bitmap b1 in top) as an image-directory
    source's unit, laid out in a mount wired as ``fs.mount.Mount`` does, on ``FakeBackend``."""

    def __init__(self, tmp_path, image, idle_timeout=2.0, backend=None, writable=False, cache_size=64,
                 retry_timeout=30.0):
        d = tmp_path / "vm"
        d.mkdir()
        base, top = d / "base.qcow2", d / "top.qcow2"
        base.write_bytes(b"")
        top.write_bytes(b"")
        self.backend = backend or FakeBackend(image)
        auto = qcow2.Bitmap("b1", qcow2.BITMAP_AUTO, 64 * KiB)
        layers = [Layer(str(base), "qcow2", size=image.size, mtime_ns=1, host=self.backend),
                  Layer(str(top), "qcow2", size=image.size, backing_path=str(base), backing_format="qcow2",
                        bitmaps=[auto], mtime_ns=2, host=self.backend)]
        unit = disk_unit(str(tmp_path), Disk("vm/top.qcow2", layers, complete=True), writable)
        assert not unit.missing
        self.views = {f"{v.disk.relpath}/{v.folder}/{v.basename}": v for v in unit.views}
        source = types.SimpleNamespace(label=str(tmp_path), host=self.backend)
        config = MountConfig(mountpoint=str(tmp_path), sources=(), writable=writable, connections=2,
                             idle_timeout=idle_timeout, cache_size=cache_size, retry_timeout=retry_timeout)
        self.m = fsmount.Mount(config, str(tmp_path), [source])
        self.m.catalog.lay_out(source, Scan(units={unit.key: unit}))
        # The fake images' maps come from the fake qemu-nbd, not from the (empty) files.
        self.m.block_status.from_files = False
        self.tree, self.pool, self.ops = self.m.tree, self.m.pool, self.m.ops
        self.writes, self.block_status = self.m.writes, self.m.block_status

    @asynccontextmanager
    async def running(self):
        async with trio.open_nursery() as n:
            await n.start(self.pool.run)
            yield self.ops
            n.cancel_scope.cancel()
        # Unmounted: the pool stopped every server it started.
        assert [p for p in self.backend.processes if p.running] == []

    def spec(self, name):
        return self.views[name].spec

    async def lookup(self, path):
        attrs = None
        ino = ROOT_INODE
        for part in path.split("/"):
            attrs = await self.ops.lookup(ino, part.encode(), None)
            ino = attrs.st_ino
        return attrs

    async def open(self, path):
        attrs = await self.lookup(path)
        return (await self.ops.open(attrs.st_ino, os.O_RDONLY, None)).fh

    async def read(self, fh, off, size):
        return bytes(await self.ops.read(fh, off, size))

    async def read_file(self, path):
        fh = await self.open(path)
        try:
            return await self.read(fh, 0, 1 << 20)
        finally:
            await self.ops.release(fh)

    async def seek(self, fh, off, whence):
        try:
            return await self.ops.lseek(fh, off, whence)
        except pyfuse3.FUSEError as e:
            return errno.errorcode[e.errno]

    async def settle(self, name):
        """Let spawned tasks run, then wait for the chunk loads they started:
        wait_all_tasks_blocked cannot see worker threads."""
        await wait_all_tasks_blocked()
        cache = self.pool.servers[self.spec(name)].chunks(self.views[name].size)
        for fetch in list(cache._loading.values()):
            await fetch.event.wait()


@pytest.fixture(autouse=True)
def _logs(request, caplog):
    """As conftest's ``_mount_logs`` for real mounts: an error fails the test, and so
    does a warning other than the status file's (``snapfs.report``) that the test's
    ``log_allows`` marker does not match."""
    yield
    allowed = [p for m in request.node.iter_markers("log_allows") for p in m.args]
    records = caplog.get_records("setup") + caplog.get_records("call")
    assert [f"{r.levelname} {r.name}: {r.getMessage()}" for r in records
            if r.levelno >= logging.ERROR or r.levelno == logging.WARNING and r.name != "snapfs.report"
            and not any(re.search(p, r.getMessage()) for p in allowed)] == []


# -- 1. block status replies, however they are split ---------------------------

LAYOUT = [  # (length, kind, dirty): 676 KiB
    (64 * KiB, "data", True),
    (64 * KiB, "data", False),
    (128 * KiB, "zero", True),
    (64 * KiB, "hole", False),
    (64 * KiB, "hole", True),
    (192 * KiB, "data", True),
    (100 * KiB, "hole", False),
]
K = KiB
LAYER_MAP = [dict(start=s * K, length=n * K, zero=z, hole=h) for s, n, z, h in [
    (0, 128, False, False), (128, 128, True, False), (256, 128, True, True), (384, 192, False, False),
    (576, 100, True, True)]]
DIRTY_MAP = [dict(start=s * K, length=n * K, dirty=d, zero=z) for s, n, d, z in [
    (0, 64, True, False), (64, 64, False, False), (128, 128, True, True), (256, 64, False, True),
    (320, 64, True, True), (384, 192, True, False), (576, 100, False, True)]]
D, H = os.SEEK_DATA, os.SEEK_HOLE
LAYER_SEEKS = {(0, D): 0, (200 * K, D): 200 * K, (256 * K, D): 384 * K, (600 * K, D): "ENXIO",
               (0, H): 256 * K, (384 * K, H): 576 * K, (676 * K - 1, H): 676 * K - 1, (676 * K, H): "ENXIO"}
DIRTY_SEEKS = {(64 * K, D): 128 * K, (256 * K, D): 320 * K, (576 * K, D): "ENXIO",
               (0, H): 64 * K, (128 * K, H): 256 * K, (320 * K, H): 576 * K}

ALL_ONE = {ALLOC: 1, DEPTH: 1, DIRTY: 1}
REPLIES = {
    "whole": {},
    "one-extent-per-reply": dict(limit=ALL_ONE, split=32 * KiB),
    "contexts-answer-different-lengths": dict(limit={ALLOC: 1, DEPTH: 2}, split=64 * KiB),
    "past-the-end-of-the-export": dict(limit={DEPTH: 1}, past_end=MiB),
}


@pytest.mark.parametrize("replies", REPLIES.values(), ids=REPLIES.keys())
async def test_maps_do_not_depend_on_how_the_server_splits_replies(tmp_path, replies):
    image = Image(LAYOUT, **replies)
    mount = Mount(tmp_path, image)
    async with mount.running() as ops:
        for name, emap, seeks, content in ((LAYER, LAYER_MAP, LAYER_SEEKS, image.content),
                                           (DIRTYV, DIRTY_MAP, DIRTY_SEEKS, image.dirty_content)):
            assert json.loads(await mount.read_file(name + ".map.json")) == emap
            attrs = await ops.getattr((await mount.lookup(name + ".raw")).st_ino, None)
            assert (attrs.st_size, attrs.st_blocks) == (676 * K, 448 * K // 512)
            fh = await mount.open(name + ".raw")
            assert {k: await mount.seek(fh, *k) for k in seeks} == seeks
            assert await mount.read(fh, 0, image.size + 4096) == content
            assert await mount.read(fh, 100 * K + 3, 200 * K) == content[100 * K + 3:300 * K + 3]
            await ops.release(fh)
            # The runs behind the map: merged, clipped at the end, nothing twice.
            view = mount.views[name]
            runs = await mount.block_status.runs(view.spec, view.size)  # kept from the map
            assert runs == {ctx: image.runs[ctx] for ctx in view.spec.contexts}
        assert await ops.getxattr((await mount.lookup(DIRTYV + ".raw")).st_ino, b"user.snapfs.bitmap", None) == b"b1"
    # One request per export for a server that answers in full; more for the others.
    assert (image.status_requests == 2) if not replies else (image.status_requests > 2)


async def test_server_making_no_progress_hides_the_view_with_its_reason(tmp_path):
    image = Image(LAYOUT)
    mount = Mount(tmp_path, image)
    # One extent per reply, then nothing from 256 KiB on (both contexts reach it at the 2nd request).
    stuck = mount.backend.images[mount.spec(LAYER)] = Image(LAYOUT, limit=ALL_ONE, stall_at=256 * K)
    async with mount.running() as ops:
        with trio.fail_after(5):
            for name in (LAYER + ".raw", LAYER + ".map.json", LAYER + ".raw"):
                with pytest.raises(pyfuse3.FUSEError) as e:
                    await mount.lookup(name)
                assert e.value.errno == errno.ENOENT
            assert stuck.status_requests == 3  # the failure is kept, not asked again
            status = (await mount.read_file(STATUS_NAME)).decode()
            assert f"{LAYER}.raw: server made no progress in block status at 262144" in status
            # The rest of the mount works.
            fh = await mount.open(CHAIN + ".raw")
            assert await mount.read(fh, 0, image.size) == image.content
            await ops.release(fh)
            await wait_all_tasks_blocked()
            assert [p.running for p in mount.backend.started(mount.spec(LAYER))] == [False]


# -- 2. a server that dies ----------------------------------------------------

@pytest.mark.log_allows(r"died; restarting it")
async def test_server_dying_mid_read_is_restarted_once(tmp_path):
    image = Image([(4 * CHUNK, "data", True)], die_after=1, deaths=1)
    mount = Mount(tmp_path, image)
    spec = mount.spec(LAYER)
    async with mount.running() as ops:
        fh = await mount.open(LAYER + ".raw")
        assert await mount.read(fh, 0, 64 * K) == image.content[:64 * K]
        [first] = [p for p in mount.backend.started(spec) if p.running]
        # Its second pread (a chunk: a large read 6 MiB on goes on with the
        # stream) resets the connection: the pool starts a new server and
        # the reader gets the right bytes.
        off = 3 * CHUNK + 5
        assert await mount.read(fh, off, 300 * K) == image.content[off:off + 300 * K]
        [second] = [p for p in mount.backend.started(spec) if p.running]
        assert second is not first and first.stops and image.deaths == 0
        # The chunks of the dead server were dropped with it: a jump back to
        # chunk 0 asks the server (its own bytes), where the chunk would have answered.
        assert await mount.read(fh, 0, 64 * K) == image.content[:64 * K]
        assert image.preads == [(0, CHUNK), (3 * CHUNK, CHUNK), (0, 64 * K)]
        assert second.preads == 2
        await ops.release(fh)


@pytest.mark.log_allows(r"died; restarting it")
async def test_server_that_dies_again_and_again_is_asked_until_it_answers(tmp_path, autojump_clock):
    image = Image(LAYOUT)
    mount = Mount(tmp_path, image)
    spec = mount.spec(LAYER)
    # Each of its first five processes dies at its first read.
    dying = mount.backend.images[spec] = Image(LAYOUT, die_after=0, deaths=5)
    async with mount.running() as ops:
        fh = await mount.open(LAYER + ".raw")
        started = len(mount.backend.started(spec))
        t = trio.current_time()
        assert await mount.read(fh, 0, 4096) == dying.content[:4096]
        assert len(mount.backend.started(spec)) == started + 5
        assert trio.current_time() - t < 1  # asked again at once, then after short pauses
        assert b"refused or failed" not in await mount.read_file(STATUS_NAME)
        await ops.release(fh)


@pytest.mark.log_allows(r"died; restarting it", r"did not come back within 30 s")
async def test_server_that_keeps_dying_fails_the_read_with_eio_after_the_bound_not_the_mount(
        tmp_path, autojump_clock):
    image = Image(LAYOUT)
    mount = Mount(tmp_path, image)
    spec = mount.spec(LAYER)
    dying = mount.backend.images[spec] = Image(LAYOUT, die_after=0)  # every pread kills it
    async with mount.running() as ops:
        fh = await mount.open(LAYER + ".raw")
        started = len(mount.backend.started(spec))
        t = trio.current_time()
        with pytest.raises(pyfuse3.FUSEError) as e:
            await mount.read(fh, 0, 4096)
        assert e.value.errno == errno.EIO  # never libnbd's ECONNRESET
        assert 30 <= trio.current_time() - t < 31
        assert started + 10 < len(mount.backend.started(spec)) < started + 50  # paced, not a loop
        status = await mount.read_file(STATUS_NAME)
        assert f"{LAYER}.raw: a read at 0 failed: qemu-nbd for ".encode() in status
        assert b"did not come back within 30 s: connection reset by peer" in status
        # Zero areas need no server; other views are fine.
        assert await mount.read(fh, 128 * K, 4096) == bytes(4096)
        fh2 = await mount.open(CHAIN + ".raw")
        assert await mount.read(fh2, 0, image.size) == image.content
        assert image.preads == [(0, image.size)] and dying.preads == []
        # Once its server behaves, the same open file reads again.
        dying.deaths = 0
        assert await mount.read(fh, 0, 4096) == dying.content[:4096]
        await ops.release(fh)
        await ops.release(fh2)


# -- 3. idle servers ----------------------------------------------------------

async def test_idle_server_stops_after_the_timeout_and_restarts_on_open(tmp_path, autojump_clock):
    # One chunk (no readahead), size not a multiple of the chunk.
    image = Image([(MiB, "data", False), (MiB - 512, "hole", False)])
    mount = Mount(tmp_path, image, idle_timeout=10)
    spec = mount.spec(LAYER)
    async with mount.running() as ops:
        t0 = trio.current_time()
        await mount.lookup(LAYER + ".raw")  # reads the map
        await wait_all_tasks_blocked()
        [status_only] = mount.backend.started(spec)
        assert status_only.stops == [t0]  # stopped at once, not after idle_timeout

        fh = await mount.open(LAYER + ".raw")
        [_, server] = mount.backend.started(spec)
        assert await mount.read(fh, 0, image.size) == image.content
        await ops.release(fh)
        await trio.sleep(9)
        assert server.alive

        fh = await mount.open(LAYER + ".raw")  # within the timeout: the same server
        assert await mount.read(fh, 4096, 8192) == image.content[4096:12288]
        await ops.release(fh)
        closed = trio.current_time()
        await trio.sleep(9)  # 18 s after the first close: its timer was cancelled
        assert server.alive and mount.backend.started(spec) == [status_only, server]
        await trio.sleep(1)
        await wait_all_tasks_blocked()
        assert server.stops == [closed + 10]

        fh = await mount.open(LAYER + ".raw")  # after the timeout: a new server
        assert await mount.read(fh, 0, image.size) == image.content
        [_, _, third] = mount.backend.started(spec)
        assert third.alive and image.preads == [(0, image.size)] * 2
        await ops.release(fh)
    assert len(third.stops) == 1  # unmount did not wait for the timeout


# -- 4. the chunk cache at extent edges -------------------------------------

EDGES = [  # 4 chunks + 12345 bytes: neither whole chunks nor whole sectors
    (MiB, "data", False),
    (64 * K, "zero", False),  # chunk 0: data, zero, data
    (CHUNK + 512 * K - MiB - 64 * K, "data", False),  # across the chunk 0/1 edge
    (3 * MiB + 512 * K, "hole", False),  # the rest of chunk 1, all of chunk 2
    (CHUNK + 12345, "data", False),  # chunks 3 and 4, the last one short
]


async def test_close_and_reopen_at_once_then_close_keeps_server_for_the_full_timeout(tmp_path, autojump_clock):
    # cp's pattern: open, close, open again at once; the last close counts.
    image = Image([(MiB, "data", False)])
    mount = Mount(tmp_path, image, idle_timeout=10)
    spec = mount.spec(LAYER)
    async with mount.running() as ops:
        fh = await mount.open(LAYER + ".raw")
        await ops.release(fh)
        fh = await mount.open(LAYER + ".raw")  # before the idle task got to run
        await trio.sleep(5)
        await ops.release(fh)
        closed = trio.current_time()
        server = [p for p in mount.backend.started(spec) if p.running][-1]
        await trio.sleep(20)
        assert server.stops == [closed + 10]



async def test_chunk_cache_at_extent_edges(tmp_path):
    image = Image(EDGES)
    size, content = image.size, image.content
    mount = Mount(tmp_path, image)
    async with mount.running() as ops:
        fh = await mount.open(LAYER + ".raw")
        # Zero and hole areas come from the map: the server sees nothing.
        for off, n in ((MiB, 64 * K), (CHUNK + 512 * K, 3 * MiB), (2 * CHUNK, CHUNK)):
            assert await mount.read(fh, off, n) == bytes(n)
        await mount.settle(LAYER)
        assert image.preads == []

        # A jump (far from the file's last read), across a data/zero edge:
        # its own data bytes only, no chunk, nothing ahead.
        assert await mount.read(fh, MiB - 4096, 8192) == content[MiB - 4096:MiB + 4096]
        await mount.settle(LAYER)
        assert image.preads == [(MiB - 4096, 4096)]
        image.preads.clear()

        # A reader starting at 0 goes on: its first read, across the same
        # edge, is one chunk, and fetches nothing ahead.
        fh2 = await mount.open(LAYER + ".raw")
        assert await mount.read(fh2, 0, MiB + 4096) == content[:MiB + 4096]
        await mount.settle(LAYER)
        assert image.preads == [(0, CHUNK)]

        # On across the chunk 0/1 edge, sequential: chunks 3 and 4 are fetched
        # ahead, chunk 2 (all hole) is not; the last one only up to the end.
        assert await mount.read(fh2, MiB + 4096, CHUNK - MiB) == content[MiB + 4096:CHUNK + 4096]
        await mount.settle(LAYER)
        fetched = [(0, CHUNK), (CHUNK, CHUNK), (3 * CHUNK, CHUNK), (4 * CHUNK, 12345)]
        assert sorted(image.preads) == fetched

        # Everything else comes from the cache, jumps too, clipped at the end of the export.
        for f in (fh2, fh):
            assert await mount.read(f, size - 100, 4096) == content[-100:]
            assert await mount.read(f, size, 4096) == b""
            assert await mount.read(f, 3 * CHUNK - 10, 20) == bytes(10) + content[3 * CHUNK:3 * CHUNK + 10]
            assert await mount.read(f, CHUNK + 512 * K - 7, 14) == content[CHUNK + 512 * K - 7:CHUNK + 512 * K + 7]
            assert await mount.read(f, 0, size) == content
        await mount.settle(LAYER)
        assert sorted(image.preads) == fetched
        await ops.release(fh)
        await ops.release(fh2)


# -- 5. one budget for the chunk caches of every export -------------------------

def watch_budget(mount):
    """Check the mount's budget after every change to it: within its limit, readahead
    within half of it, and counting exactly what the caches hold. The figures of
    ``used`` it saw."""
    budget = mount.m.budget
    seen = []

    def check():
        caches = [s._cache for s in mount.pool.servers.values() if s._cache is not None]
        assert budget.held == sum(len(d) for c in caches for d in c._chunks.values())
        assert budget.used <= budget.limit and budget.ahead <= budget.limit // 2
        seen.append(budget.used)

    def checked(call):
        def method(*args, **kwargs):
            result = call(*args, **kwargs)
            check()
            return result
        return method

    for name in ("reserve", "fetched", "unreserve", "touch", "give_up", "forget", "drop"):
        setattr(budget, name, checked(getattr(budget, name)))
    return seen


async def test_exports_read_at_once_share_one_budget(tmp_path):
    image = Image([(12 * CHUNK, "data", True)])
    # 6 chunks for three exports of 12 chunks, each read by a sequential reader.
    mount = Mount(tmp_path, image, cache_size=12)
    seen = watch_budget(mount)
    async with mount.running() as ops:
        async def reader(name):
            fh = await mount.open(name + ".raw")
            for off in range(0, image.size, MiB):
                assert await mount.read(fh, off, MiB) == image.content[off:off + MiB]
            await ops.release(fh)

        async with trio.open_nursery() as n:
            for name in (LAYER, CHAIN, DIRTYV):
                n.start_soon(reader, name)
        assert len({mount.spec(name) for name in (LAYER, CHAIN, DIRTYV)}) == 3
        assert max(seen) == 12 * MiB  # all of it used, never more
        assert len(image.preads) >= 3 * 12
    assert mount.m.budget.used == 0


async def test_a_stopped_exports_chunks_are_freed_at_once(tmp_path, autojump_clock):
    image = Image([(4 * CHUNK, "data", True)])
    mount = Mount(tmp_path, image, idle_timeout=10)
    watch_budget(mount)
    budget = mount.m.budget
    async with mount.running() as ops:
        fh = await mount.open(LAYER + ".raw")
        fh2 = await mount.open(CHAIN + ".raw")
        reply = await ops.read(fh, 0, 4096)  # as FUSE gets it: a view of chunk 0
        assert isinstance(reply, memoryview)
        assert await mount.read(fh2, 0, MiB) == image.content[:MiB]
        layer = mount.pool.servers[mount.spec(LAYER)]
        assert budget.used == budget.held == 2 * CHUNK
        await ops.release(fh)
        await trio.sleep(10)
        await wait_all_tasks_blocked()
        # The layer's server stopped: its chunk left the budget with it; the chain's stays.
        assert not layer.process and layer._cache is None
        assert budget.used == budget.held == CHUNK
        # The reply still reads right: the cache let go of the chunk, the reply did not.
        assert bytes(reply) == image.content[:4096]
        await ops.release(fh2)
    assert budget.used == 0


@pytest.mark.parametrize("cache_size, ahead", [(64, READAHEAD), (4, 1)])
async def test_a_sequential_reader_gets_readahead_within_the_budget(tmp_path, cache_size, ahead):
    image = Image([(16 * CHUNK, "data", True)])
    mount = Mount(tmp_path, image, cache_size=cache_size)
    watch_budget(mount)
    async with mount.running() as ops:
        fh = await mount.open(LAYER + ".raw")
        assert await mount.read(fh, 0, MiB) == image.content[:MiB]
        assert await mount.read(fh, MiB, MiB) == image.content[MiB:2 * MiB]
        await mount.settle(LAYER)
        # Sequential: the next chunks were fetched ahead, as many as half the budget holds.
        assert sorted(image.preads) == [(i * CHUNK, CHUNK) for i in range(1 + ahead)]
        for off in range(2 * MiB, image.size, MiB):
            assert await mount.read(fh, off, MiB) == image.content[off:off + MiB]
        await mount.settle(LAYER)
        # Each chunk fetched once: nothing fetched ahead was evicted before it was read.
        assert sorted(image.preads) == [(i * CHUNK, CHUNK) for i in range(16)]
        await ops.release(fh)


async def test_a_stream_read_out_of_order_fetches_each_chunk_once(tmp_path):
    """qemu-img convert reads eight 2 MiB buffers at once, each two 1 MiB FUSE
    requests in flight together, a reader taking the next buffer as it is
    done: one stream all the same, each chunk fetched once."""
    image = Image([(40 * CHUNK, "data", True)])
    mount = Mount(tmp_path, image)
    watch_budget(mount)
    async with mount.running() as ops:
        fh = await mount.open(LAYER + ".raw")
        front = [0]

        async def half(off):
            assert await mount.read(fh, off, MiB) == image.content[off:off + MiB]

        async def reader():
            while front[0] < image.size:
                off = front[0]
                front[0] += CHUNK
                async with trio.open_nursery() as halves:
                    halves.start_soon(half, off)
                    halves.start_soon(half, off + MiB)

        async with trio.open_nursery() as readers:
            for _ in range(8):
                readers.start_soon(reader)
        await mount.settle(LAYER)
        chunks = sorted(p for p in image.preads if p[1] == CHUNK)
        assert chunks == [(i * CHUNK, CHUNK) for i in range(40)]
        # Besides, at most the file's first read, when it did not come first at 0: read alone.
        assert len(image.preads) - len(chunks) <= 1
        await ops.release(fh)


async def test_scattered_reads_ask_their_own_bytes_and_leave_a_streams_chunks(tmp_path):
    """A random reader (a VM's 4 KiB I/O) costs one small request per read,
    not a chunk each, and takes nothing from a sequential reader of the same
    export: its chunks and readahead stay as they were."""
    image = Image([(16 * CHUNK, "data", True)])
    mount = Mount(tmp_path, image)
    watch_budget(mount)
    budget = mount.m.budget
    async with mount.running() as ops:
        stream = await mount.open(LAYER + ".raw")
        assert await mount.read(stream, 0, MiB) == image.content[:MiB]
        assert await mount.read(stream, MiB, MiB) == image.content[MiB:2 * MiB]
        await mount.settle(LAYER)
        ahead = sorted(image.preads)
        assert ahead == [(i * CHUNK, CHUNK) for i in range(1 + READAHEAD)]
        held = budget.used
        image.preads.clear()

        scattered = await mount.open(LAYER + ".raw")
        jumps = [(11 * CHUNK + 4096 * 7, 4096), (13 * CHUNK + 512, 512), (7 * CHUNK - 4096, 8192),
                 (9 * CHUNK + 4096, 4096)]
        for off, n in jumps:
            assert await mount.read(scattered, off, n) == image.content[off:off + n]
        await mount.settle(LAYER)
        # Each asked its own bytes (one across a chunk edge: in two), none a chunk.
        assert sorted(image.preads) == sorted([(11 * CHUNK + 4096 * 7, 4096), (13 * CHUNK + 512, 512),
                                               (7 * CHUNK - 4096, 4096), (7 * CHUNK, 4096),
                                               (9 * CHUNK + 4096, 4096)])
        assert budget.used == held
        image.preads.clear()
        # A small read that goes on from the last one starts a stream: chunks.
        assert await mount.read(scattered, 9 * CHUNK + 8192, 4096) == image.content[9 * CHUNK + 8192:9 * CHUNK + 12288]
        await mount.settle(LAYER)
        assert image.preads == [(9 * CHUNK, CHUNK)]
        image.preads.clear()
        # A jump onto a chunk the stream holds is answered from it.
        assert await mount.read(scattered, 3 * CHUNK + 100, 4096) == image.content[3 * CHUNK + 100:3 * CHUNK + 4196]
        assert image.preads == []
        # The stream goes on from its chunks, fetched once.
        for off in range(2 * MiB, 8 * MiB, MiB):
            assert await mount.read(stream, off, MiB) == image.content[off:off + MiB]
        await mount.settle(LAYER)
        assert all(length == CHUNK for _, length in image.preads)
        assert not {o for o, _ in image.preads} & {o for o, _ in ahead}
        await ops.release(stream)
        await ops.release(scattered)


# -- ownership ----------------------------------------------------------------

@pytest.mark.parametrize("modes", [(0o644, 0o644, 0), (0o640, 0o600, 65534), (0o604, 0o644, 0)])
async def test_ownership_built_chain_by_chain_is_every_needs_answer(tmp_path, modes):
    """``view_access`` (each chain's items built from the chain beneath, kept
    for the facts' second) gives what ``access`` of its needs spelled out gives, asked
    in any order."""
    from snapfs.fs.access import READ, SEARCH, WRITE, Facts, access, view_access
    from snapfs.fs.tree import Qcow2File, ViewFile, ViewNode

    def needs(node, facts):
        """What reading a view's node needs, spelled out (docs/views.md): every
        file it reads, write on the top of a writable view, and the directories
        above the files that its disk's folder does not gate."""
        view = node.view
        gated = {p for p, need in (node.parent.paths or ()) if need == SEARCH}
        files = {}
        for spec in view.qcow2_specs() if isinstance(node, Qcow2File) else view.specs():
            for path, _ in spec.layers:
                files.setdefault(path)
        dirs = {d: None for f in files for d in facts.parents(f, node.host) if d not in gated}
        writes = ((view.spec.image, WRITE),) if isinstance(node, ViewFile) and view.writable else ()
        return tuple((f, READ) for f in files) + writes + tuple((d, SEARCH) for d in dirs)

    mount = Mount(tmp_path, Image(LAYOUT))
    base_mode, top_mode, base_owner = modes
    os.chmod(tmp_path / "vm/base.qcow2", base_mode)
    os.chmod(tmp_path / "vm/top.qcow2", top_mode)
    os.chown(tmp_path / "vm/base.qcow2", base_owner, base_owner)
    nodes = [n for n in mount.tree.nodes.values() if isinstance(n, ViewNode)]
    assert len(nodes) > 10
    random.Random(sum(modes)).shuffle(nodes)
    shared = Facts(ttl=60)
    for node in nodes:
        assert view_access(node, shared) == access(needs(node, Facts(ttl=0)), Facts(ttl=0), node.host), \
            node.path
