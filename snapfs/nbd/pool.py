"""The server pool: every export of a mount, started when needed, stopped when idle.

Each distinct export (an ``ExportSpec``) gets at most one qemu-nbd (``qemu.py``),
or a connection to somebody else's NBD server (a libvirt backup job), shared by
every open of every view that needs it, started when first needed and stopped
when idle, on unmount, or restarted when it died. The ``ServerPool`` is the
one owner of all of them.

Writers (``--rw`` mounts): an image has at most one writable export at a
time, claimed in ``writers`` before it starts. qemu's image locking lets no
reader beside a writer, so the claim first stops the idle read-only servers
of that image (or answers EBUSY while a file keeps one in use), and every
read-only export of the image answers EBUSY until the writer's last file is
closed. A writable qemu-nbd that dies is never restarted under its files:
what it acknowledged but had not flushed may be lost, so every later request
of those files fails with EIO; the next open starts a new one.
"""

from __future__ import annotations

import errno
import itertools
import logging
from typing import TYPE_CHECKING

import trio

from ..errors import Busy, TransportError, Unavailable
from ..extents import Run
from ..formats import status as local
from .chunks import ChunkCache
from .contexts import ALLOCATION_DEPTH, BASE_ALLOCATION
from .qemu import START_TIMEOUT, QemuNBD
from .spec import ExportSpec

if TYPE_CHECKING:
    from .client import Connection

log = logging.getLogger(__name__)

# How long an open waits for files of other views of its image to be
# released (the kernel sends RELEASE after close() returns).
RELEASE_WAIT = 1.0
# How long an open waits for a writer whose files are closed to stop (it flushes).
WRITER_STOP_WAIT = 30.0


def _layer_keys(spec: ExportSpec) -> list[tuple]:
    """``(path, format, pin)`` of each layer of an export, top first."""
    pins = spec.pins or (None,) * len(spec.layers)
    return [(path, fmt, pin) for (path, fmt), pin in zip(spec.layers, pins, strict=True)]


class QemuBackend:
    """How the pool starts servers and connects: qemu-nbd and libnbd.

    In-process tests hand the pool a fake with the same two methods.
    """

    def process(self, spec: ExportSpec, rundir: str, ident: int, connections: int) -> QemuNBD:
        return QemuNBD(spec, rundir, ident, connections)

    def connect(self, socket: str, contexts: tuple[str, ...], export: str) -> Connection:
        from .client import Connection  # the one importer of libnbd
        return Connection(socket, contexts, export)


class Server:
    """A running export: the qemu-nbd process and a pool of connections.

    Reads run in worker threads, one per connection in use, so up to
    ``connections`` requests are in flight. ``users`` counts open files.
    """

    def __init__(self, pool: ServerPool, spec: ExportSpec):
        self.pool = pool
        self.spec = spec
        self.process: QemuNBD | None = None
        self.users = 0
        self.lock = trio.Lock()
        self._free: list[Connection] = []
        self._all: list[Connection] = []
        self._limiter = trio.CapacityLimiter(pool.connections)
        self._idle_scope: trio.CancelScope | None = None
        self._cache: ChunkCache | None = None
        self.broken: str | None = None  # a writable server that died under its files
        # A writer's file was flushed (close() sends FLUSH) and nothing written
        # since: its RELEASE is probably on its way.
        self.closing = False
        self.changed = False  # a writable server took writes since it started

    def chunks(self, size: int) -> ChunkCache:
        """The export's chunk cache (dropped when the server stops)."""
        if self._cache is None:
            self._cache = ChunkCache(self.pread, self._spawn, size)
        return self._cache

    def _spawn(self, fn, *args) -> None:
        # Readahead only while files are open: never restart an idle server.
        if self.users > 0:
            self.pool.spawn(fn, *args)

    async def ensure_running(self) -> None:
        if self.spec.socket is not None:
            await self._ensure_connected()
            return
        async with self.lock:
            if self.broken is not None:
                raise TransportError(self.broken, errno.EIO)
            if self.process is not None and self.process.alive:
                return
            if not self.spec.writable and self.pool.writers.get(self.spec.image) is not None:
                # Its files are moving to the writer (or the image is written).
                raise Busy(f"{self.spec.image} is open for writing")
            if self.process is not None and self.spec.writable:
                self.broken = (f"qemu-nbd writing {self.spec.image} {self.process.ended()}; writes not "
                               "yet flushed may be lost: close the file, open it again and write again")
                log.error("%s", self.broken)
                raise TransportError(self.broken, errno.EIO)
            if self.process is not None:
                log.warning("qemu-nbd for %s died; restarting it", self.spec.describe())
                await self._shutdown()
            self.process = self.pool.backend.process(self.spec, self.pool.rundir, next(self.pool.ids),
                                                     self.pool.connections)
            try:
                await self.process.start()
                conn = await self._first_connection()
            except TransportError as e:
                await self._shutdown()
                raise Unavailable(str(e), e.errno) from None
            except BaseException:
                await self._shutdown()
                raise
            self._all.append(conn)
            self._free.append(conn)

    async def _ensure_connected(self) -> None:
        """An export served by someone else: nothing to start, only to reach."""
        async with self.lock:
            if self._all:
                return
            try:
                conn = await self._connect()
            except TransportError as e:
                raise Unavailable(f"the backup job's NBD server does not answer: {e}", e.errno) from None
            self._all.append(conn)
            self._free.append(conn)

    def _socket(self) -> str:
        if self.spec.socket is not None:
            return self.spec.socket
        if self.process is None:
            raise TransportError("the server was stopped", errno.ENOTCONN)
        return self.process.socket

    async def _connect(self) -> Connection:
        return await trio.to_thread.run_sync(
            self.pool.backend.connect, self._socket(), self.spec.contexts, self.spec.export)

    async def _first_connection(self) -> Connection:
        """Connect as soon as the server listens.

        The socket file appears at bind(), before listen(): until then a
        connect fails with ECONNREFUSED, which is no error of the server's.
        The first connection also keeps the non-persistent server up.
        """
        deadline = trio.current_time() + START_TIMEOUT
        delay = 0.001
        while True:
            try:
                return await self._connect()
            except TransportError as e:
                if (e.errno not in (errno.ECONNREFUSED, errno.ENOENT) or not self.process.alive
                        or trio.current_time() > deadline):
                    if not self.process.alive:
                        raise self.process.failure() from None
                    raise
            await trio.sleep(delay)
            delay = min(delay * 2, 0.05)

    async def _connection(self) -> Connection:
        if self._free:
            return self._free.pop()
        conn = await self._connect()
        self._all.append(conn)
        return conn

    async def call(self, fn_name: str, *args):
        """Run a Connection method in a worker thread; restart a dead server once."""
        for attempt in (1, 2):
            await self.ensure_running()
            async with self._limiter:
                try:
                    conn = await self._connection()
                except TransportError as e:
                    raise Unavailable(str(e), e.errno) from None
                try:
                    result = await trio.to_thread.run_sync(getattr(conn, fn_name), *args)
                except TransportError as e:
                    if not e.disconnected:
                        self._free.append(conn)  # the request failed, not the connection (ENOSPC)
                        raise
                    self._drop(conn)
                    if self.spec.writable:
                        # Never retried: a write acknowledged before may be lost.
                        await self.ensure_running()  # raises: the server is gone
                        raise TransportError(f"{e} (qemu-nbd writing {self.spec.image} is gone)",
                                             errno.EIO) from None
                    if attempt == 1 and e.disconnected:
                        continue  # ensure_running restarts a dead server
                    raise
                self._free.append(conn)
                return result

    def _drop(self, conn: Connection) -> None:
        if conn in self._all:
            self._all.remove(conn)
        conn.close()

    async def pread(self, length: int, offset: int) -> bytes:
        return await self.call("pread", length, offset)

    async def block_status(self, size: int, start: int = 0, end: int | None = None) -> dict[str, list[Run]]:
        return await self.call("block_status", size, start, end)

    async def pwrite(self, buf: bytes, offset: int) -> None:
        self.changed = True
        await self.call("pwrite", buf, offset)

    async def zero(self, length: int, offset: int) -> None:
        self.changed = True
        await self.call("zero", length, offset)

    async def flush(self) -> None:
        await self.call("flush")

    async def _shutdown(self) -> None:
        self._cache = None
        self.broken = None
        conns, self._all, self._free = self._all, [], []
        for c in conns:
            c.close()
        if self.process is not None:
            await self.process.stop()
            self.process = None

    async def stop(self) -> None:
        async with self.lock:
            await self._shutdown()


class ServerPool:
    """Owns every qemu-nbd of a mount.

    A server lives while files using it are open, plus ``idle_timeout``
    seconds after the last close (so ``cp`` opening a file twice does not
    restart it). Servers started only to read block status stop as soon as
    the extents are read, so listing a large tree never leaves a crowd of
    idle servers.
    """

    def __init__(self, rundir: str, connections: int = 4, idle_timeout: float = 2.0, backend=None,
                 local_status: bool = False):
        self.rundir = rundir
        # Read the block status of plain qcow2 and raw images from the files
        # (formats/status.py) instead of starting qemu-nbd; not in --rw
        # mounts, where a writer's qemu-nbd may hold tables not yet written.
        self.local_status = local_status
        self._layer_status: dict[tuple, local.LayerStatus | None] = {}
        self._forgotten = 0  # forget_runs calls so far
        self.backend = backend or QemuBackend()
        self.connections = connections
        self.idle_timeout = idle_timeout
        self.ids = itertools.count(1)
        self.servers: dict[ExportSpec, Server] = {}
        self._runs: dict[ExportSpec, dict[str, list[Run]]] = {}
        self._runs_locks: dict[ExportSpec, trio.Lock] = {}
        self._nursery: trio.Nursery | None = None
        # image path -> the writable export that has it (see the module's docstring)
        self.writers: dict[str, ExportSpec] = {}
        # called with an image's path once its writer's last file closed
        self.on_written = None

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Own the idle timers; returns (stopping every server) when cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                await self.stop_all()

    def spawn(self, fn, *args) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(fn, *args)

    def server(self, spec: ExportSpec) -> Server:
        srv = self.servers.get(spec)
        if srv is None:
            srv = self.servers[spec] = Server(self, spec)
        return srv

    async def _writer_closing(self, image: str, spec: ExportSpec) -> ExportSpec | None:
        """The export writing ``image`` other than ``spec``, once one whose files
        are all closed has stopped.

        The kernel sends RELEASE after close() returns, so a reader opening
        right after ``cp`` finished may find the writer's files still open:
        it gets RELEASE_WAIT for them to close (once the writer's files were
        flushed and nothing was written since: ``Server.closing``).
        """
        deadline = trio.current_time() + WRITER_STOP_WAIT
        grace = trio.current_time() + RELEASE_WAIT
        while True:
            writer = self.writers.get(image)
            if writer is None or writer == spec:
                return None
            srv = self.servers.get(writer)
            now = trio.current_time()
            if srv is not None and srv.users and (now > grace or not srv.closing) or now > deadline:
                return writer
            await trio.sleep(0.01)  # _stop_writer is on its way

    async def check_readable(self, spec: ExportSpec) -> None:
        """Busy while the image this export reads is being written through another export."""
        if spec.socket is None and await self._writer_closing(spec.image, spec) is not None:
            raise Busy(f"{spec.image} is open for writing; try again once it is closed")

    async def acquire_writer(self, spec: ExportSpec, adopt: ExportSpec | None = None) -> Server:
        """The writable export of ``spec.image``: claim the image, then start it.

        adopt: the read-only export of the same view, whose open files the
        caller moves to the writer (they do not make the image busy).
        """
        image = spec.image
        if await self._writer_closing(image, spec) is not None:
            raise Busy(f"{image} is open for writing through another view")
        if self.writers.get(image) is None:
            self.writers[image] = spec
            try:
                await self._evict(image, adopt)
            except BaseException:
                del self.writers[image]
                raise
        return await self.acquire(spec)

    async def _evict(self, image: str, adopt: ExportSpec | None) -> None:
        """Stop every read-only server of ``image``; Busy if one stays in use."""
        def readers():
            return [s for s in self.servers.values()
                    if not s.spec.writable and s.spec.socket is None and s.spec.image == image]
        with trio.move_on_after(RELEASE_WAIT):
            while any(s.users for s in readers() if s.spec != adopt):
                await trio.sleep(0.02)
        busy = [s for s in readers() if s.users and s.spec != adopt]
        if busy:
            raise Busy(f"{image} is open for reading ({busy[0].spec.describe()}); close it first")
        for s in readers():
            if s._idle_scope is not None:
                s._idle_scope.cancel()
                s._idle_scope = None
            await s.stop()

    async def acquire(self, spec: ExportSpec) -> Server:
        await self.check_readable(spec)
        srv = self.server(spec)
        if srv.broken is not None and srv.users == 0:
            await srv.stop()  # a writer that died under files now all closed: start anew
        srv.users += 1
        if srv._idle_scope is not None:
            srv._idle_scope.cancel()
            srv._idle_scope = None
        try:
            await srv.ensure_running()
        except BaseException:
            self.release(srv, linger=False)
            raise
        return srv

    def release(self, srv: Server, linger: bool = True) -> None:
        srv.users -= 1
        if srv.users > 0:
            return
        if srv.spec.writable:
            # At once: readers of the image wait for it, and its data is flushed on exit.
            if self._nursery is not None:
                self._nursery.start_soon(self._stop_writer, srv)
            return
        if linger and self.idle_timeout > 0 and self._nursery is not None:
            # The timer's scope exists before its task runs: an open right
            # after this close (cp opens a file twice) must find it to cancel.
            scope = srv._idle_scope = trio.CancelScope()
            self._nursery.start_soon(self._stop_when_idle, srv, scope)
        elif self._nursery is not None:
            self._nursery.start_soon(self._stop_if_unused, srv)

    async def _stop_when_idle(self, srv: Server, scope: trio.CancelScope) -> None:
        with scope:
            await trio.sleep(self.idle_timeout)
            await self._stop_if_unused(srv)
        if srv._idle_scope is scope:
            srv._idle_scope = None

    async def _stop_if_unused(self, srv: Server) -> None:
        # A background task: a failure here must not end the mount.
        if srv.users == 0:
            try:
                await srv.stop()
            except Exception:
                log.exception("stopping qemu-nbd for %s failed", srv.spec.describe())

    async def _stop_writer(self, srv: Server) -> None:
        """The writer's last file closed: stop it, free the image, tell who cares."""
        image = srv.spec.image
        async with srv.lock:
            if srv.users:
                return  # opened again meanwhile: it goes on serving
            try:
                await srv._shutdown()
            except Exception:
                log.exception("stopping qemu-nbd for %s failed", srv.spec.describe())
            changed, srv.changed = srv.changed, False
        if srv.users == 0 and self.writers.get(image) == srv.spec:
            del self.writers[image]
            if changed:
                self.forget_runs(image)
                if self.on_written is not None:
                    self.on_written(image, srv.spec)

    def forget_runs(self, image: str) -> None:
        """Block status read before ``image`` was written is stale."""
        for spec in [s for s in self._runs if s.socket is None and s.image == image]:
            del self._runs[spec]
        for key in [k for k in self._layer_status if k[0] == image]:
            del self._layer_status[key]
        self._forgotten += 1

    async def block_status(self, spec: ExportSpec, size: int) -> dict[str, list[Run]]:
        """Block status of a whole export, read once per mount.

        Views of the same export (a base's chain and layer views, the shared
        layers of two branches) share it.
        """
        await self.check_readable(spec)
        runs = self._runs.get(spec)
        if runs is not None:
            return runs
        async with self._runs_locks.setdefault(spec, trio.Lock()):
            runs = self._runs.get(spec)
            if runs is None and self.local_status and spec.socket is None:
                # The cache is only touched here, in trio's thread; what a
                # refresh forgot meanwhile (forget_runs) is not kept.
                generation = self._forgotten
                known = {k: self._layer_status[k] for k in _layer_keys(spec) if k in self._layer_status}
                runs, new = await trio.to_thread.run_sync(self._local_runs, spec, size, known)
                if generation == self._forgotten:
                    self._layer_status.update(new)
                    if runs is not None:
                        self._runs[spec] = runs
            if runs is None:
                srv = await self.acquire(spec)
                try:
                    runs = self._runs[spec] = await srv.block_status(size)
                finally:
                    self.release(srv, linger=False)
        return runs

    def _local_runs(self, spec: ExportSpec, size: int, known: dict) -> tuple[dict | None, dict]:
        """The runs qemu-nbd would report for ``spec``, read from the image files
        (None when qemu must be asked: formats/status.py says when), and the
        layers' statuses read for it. In a worker thread: ``known`` is a copy of
        what was read before, and the caller keeps what is new."""
        if spec.snapshot is not None or spec.bitmap is not None or spec.writable:
            return None, {}
        layers, new = [], {}
        for key in _layer_keys(spec):
            path, fmt, pin = key
            if key in known:
                status = known[key]
            else:
                try:
                    status = local.layer_status(path, fmt, pin)
                except local.NotPlain as e:
                    log.debug("block status of %s: asking qemu (%s)", path, e)
                    status = None
                new[key] = status
            if status is None:
                return None, new
            layers.append(status)
        try:
            alloc, depth = local.export_runs(layers, size)
        except local.NotPlain as e:
            log.debug("block status of %s: asking qemu (%s)", spec.describe(), e)
            return None, new
        runs = {BASE_ALLOCATION: alloc}
        if ALLOCATION_DEPTH in spec.contexts:
            runs[ALLOCATION_DEPTH] = depth
        return runs, new

    async def discard(self, specs) -> None:
        """Stop the servers of exports that are gone (a finished backup job)."""
        for spec in specs:
            self._runs.pop(spec, None)
            srv = self.servers.pop(spec, None)
            if srv is not None:
                await srv.stop()

    async def stop_all(self) -> None:
        for srv in list(self.servers.values()):
            await srv.stop()
