"""The server pool: every qemu-nbd of a mount, started when needed, stopped when idle.

Each distinct export (an ``ExportSpec``) gets at most one running server
(``Server``): a qemu-nbd its host starts (``hosts/``, ``qemu.py``), or a
connection to somebody else's NBD server (a libvirt backup job), shared by
every open file that needs it. The pool starts servers, keeps their
connections, restarts a read-only one that died, and stops them when idle,
when told to, or on unmount. It is the one owner of all of them, and knows
nothing of views, maps or writers: who may use a server, and when a
writable one starts and stops, is the write session's business
(``data/writes.py``).

A server lives while files using it are open (``users``: the leases of
``acquire``), plus ``idle_timeout`` seconds after the last is released (so
``cp`` opening a file twice does not restart it). A server released with
``linger=False`` (one started only to read block status) stops at once, so
listing a large tree never leaves a crowd of idle servers. A writable
server is never restarted: a qemu-nbd that dies under writes may have lost
what it acknowledged, so its requests fail with EIO until it is stopped.
"""

from __future__ import annotations

import errno
import itertools
import logging
from typing import TYPE_CHECKING, Callable

import trio

from ..errors import TransportError, Unavailable
from ..extents import Run
from .chunks import DEFAULT_BUDGET_MIB, ChunkBudget, ChunkCache, trim_malloc
from .qemu import START_TIMEOUT
from .spec import ExportSpec

if TYPE_CHECKING:
    from .client import AioConnection, Connection

log = logging.getLogger(__name__)

# How long a request to a read-only export waits for its server to come back (--retry-timeout).
RETRY_TIMEOUT = 30.0
KILL_WAIT = 5.0  # for a hung qemu-nbd to die once killed


class Retired(TransportError):
    """The server was taken out of the pool (its export moved to a writer): ask again."""

    def __init__(self, spec: ExportSpec):
        super().__init__(f"{spec.describe()} was stopped", errno.ENOTCONN)


class Server:
    """A running export: its process (or foreign socket), connections and chunk cache.

    Requests run in worker threads, one per connection in use, so up to
    ``connections`` are in flight. ``users`` counts the leases of open files.
    """

    def __init__(self, pool: ServerPool, spec: ExportSpec):
        self.spec = spec
        self.users = 0
        self.process = None
        self.lock = trio.Lock()
        self._pool = pool
        self._free: list[Connection] = []
        self._all: list[Connection] = []
        self._limiter = trio.CapacityLimiter(pool.connections)
        self._idle_scope: trio.CancelScope | None = None
        self._cache: ChunkCache | None = None
        self.retired = False  # out of the pool: never started again
        self.dead: str | None = None  # a writable server that died: why, for every later request
        self._outage: float | None = None  # when its requests began to fail (read-only: asked again)
        self._answered = 0.0  # when a request last got its answer (``_watch``)
        # Reads waiting, watched: their scope -> (since when, the process asked).
        self._waiting: dict[trio.CancelScope, tuple[float, object]] = {}
        self._watched = None  # the process a ``_watch`` runs for
        self._aio: AioConnection | None = None  # for small reads (``pread_small``)
        # A start that failed: (why, not again before, first failure), for readers asking again.
        self._failed: tuple[Unavailable, float, float] | None = None

    def chunks(self, size: int) -> ChunkCache:
        """The export's chunk cache, in the pool's budget (freed when the server stops)."""
        if self._cache is None:
            self._cache = ChunkCache(self.pread, self._pool.background(lambda: self.users > 0), size,
                                     self._pool.budget, self.spec.host.readahead, self.pread_small)
        return self._cache

    async def ensure_running(self, trusted: bool = False) -> None:
        """Start the server unless it runs (and, read-only, restart one that died).

        trusted: a read-only server's process is taken as alive without a look
        (a request's first try: one that finds it dead is asked again, untrusted).
        """
        if (trusted and self.process is not None and self.dead is None and not self.retired
                and self.spec.socket is None and not self.spec.writable and not self.lock.locked()):
            return  # every read asks: the common case takes no lock and no waitpid()
        async with self.lock:
            if self.retired:
                raise Retired(self.spec)
            if self.dead is not None:
                raise TransportError(self.dead, errno.EIO)
            if self.spec.socket is not None:
                await self._reach()
                return
            if self.process is not None and self.process.alive:
                return
            if self.process is not None and self.spec.writable:
                self.dead = (f"qemu-nbd writing {self.spec.image} {self.process.ended()}; writes not "
                             "yet flushed may be lost: close the file, open it again and write again")
                log.error("%s", self.dead)
                raise TransportError(self.dead, errno.EIO)
            if self.process is not None:
                log.warning("qemu-nbd for %s died; restarting it", self.spec.describe())
                await self._shutdown()
            if self._outage is None:
                await self._start()
                return
            # Readers wait for it to come back (``_request``): a start that
            # failed is tried again after a pause that grows to a second, not
            # once per request.
            now = trio.current_time()
            if self._failed is not None and now < self._failed[1]:
                e = self._failed[0]
                raise type(e)(e.reason, e.errno)
            try:
                await self._start()
            except Unavailable as e:
                first = self._failed[2] if self._failed is not None else now
                self._failed = (e, now + min(1.0, max(0.05, (now - first) / 2)), first)
                raise
            self._failed = None

    async def _start(self) -> None:
        pool = self._pool
        self.process = self.spec.host.nbd_server(self.spec, pool.rundir, next(pool.ids), pool.connections)
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

    async def _reach(self) -> None:
        """An export served by someone else: nothing to start, only to reach."""
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
            try:
                return self.spec.host.reach_socket(self.spec.socket)  # forwarded from another host
            except OSError as e:
                raise TransportError(e.strerror or str(e), errno.ENOTCONN) from None
        if self.process is None or not self.process.serving:
            # Stopped, or (re)starting: what it opened is not checked yet.
            raise TransportError("the server was stopped or is starting", errno.ENOTCONN)
        return self.process.socket

    async def _connect(self) -> Connection:
        # Abandoned when cancelled (a server stuck in the kernel never answers
        # the handshake): the connection the thread makes then is dropped.
        if self.spec.socket is None:
            socket = self._socket()  # checked here, in trio's thread
            return await trio.to_thread.run_sync(
                self.spec.host.connect, socket, self.spec.contexts, self.spec.export, abandon_on_cancel=True)

        def connect():  # another's socket, forwarded from its host in the thread (ssh -O forward)
            return self.spec.host.connect(self._socket(), self.spec.contexts, self.spec.export)
        return await trio.to_thread.run_sync(connect, abandon_on_cancel=True)

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

    async def _request(self, request: Callable[[Connection], object], bounded: bool = False, aio: bool = False):
        """Run ``request(connection)`` in a worker thread (aio: awaited on the
        export's ``AioConnection``, in trio's thread).

        A read-only export is idempotent: a request that meets a dead, dying
        or restarting server waits for it to come back and asks again, for
        up to the pool's ``retry_timeout``; then it fails with EIO and the
        reason (never a network errno). A writable one is never asked
        again: what it acknowledged may be lost (``_write_request``).
        bounded: a qemu-nbd that answers nothing for ``retry_timeout`` while
        the request waits is taken for hung, and killed (``_watch``): reads
        only, as block status of a large image may take long.
        """
        if self.spec.writable:
            return await self._write_request(request)
        since = None
        delay = 0.005
        hangups = 0
        while True:
            sent_to = []  # the process the request went to
            try:
                result = await self._attempt(request, sent_to, bounded, aio, trusted=since is None)
            except Retired:
                raise
            except (TransportError, Unavailable) as e:
                if isinstance(e, TransportError) and not e.disconnected and e.errno != errno.ENOENT:
                    raise  # the server answered: an error of the request itself
                if aio and isinstance(e, TransportError):
                    # The small reads' connection is shared: which of its reads
                    # made qemu-nbd hang up (a damaged cluster) is not known.
                    # Each asks again alone, on a connection of its own, where
                    # a read the server cannot serve is told apart.
                    aio = False
                    if since is None:
                        since = trio.current_time()  # the bound counts from here
                    continue
                # qemu-nbd hangs up on a client whose request it cannot serve
                # (a read of a damaged image) and serves the others on: that
                # is this request's fault, not a server killed under it, and
                # twice is enough to tell.
                why = await sent_to[0].hung_up() if sent_to and isinstance(e, TransportError) else None
                hangups += why is not None
                if hangups >= 2:
                    self._outage = None
                    reason = f"qemu-nbd for {self.spec.describe()} cannot serve this request: {why}"
                    log.warning("%s", reason)
                    raise TransportError(reason, errno.EIO) from None
                now = trio.current_time()
                if since is None:
                    since = now
                    if self._outage is None:
                        self._outage = now
                        log.info("%s lost its server (%s); asking again while it restarts, for up "
                                 "to %g s", self.spec.describe(), e.reason, self._pool.retry_timeout)
                if now - since >= self._pool.retry_timeout:
                    reason = (f"{self._what()} did not come back within {self._pool.retry_timeout:g} s: "
                              f"{e.reason}")
                    self._outage = None
                    log.warning("%s", reason)
                    raise TransportError(reason, errno.EIO) from None
                await trio.sleep(min(delay, since + self._pool.retry_timeout - now))
                delay = min(delay * 2, 1.0)
                continue
            if self._outage is not None:
                log.info("%s answers again after %.2f s", self.spec.describe(),
                         trio.current_time() - self._outage)
                self._outage = self._failed = None
            return result

    def _what(self) -> str:
        if self.spec.socket is not None:
            return f"libvirt's backup job export {self.spec.export!r} (the job may have ended: " \
                   "snapfs refresh MOUNTPOINT DOMAIN starts a new one)"
        return f"qemu-nbd for {self.spec.describe()}"

    async def _attempt(self, request, sent_to: list, bounded: bool = False, aio: bool = False,
                       trusted: bool = False):
        """One try: a running server, a connection, the request. ``sent_to``
        gets the server's process.
        bounded: watched (``_watch``) while it connects and waits.
        aio: ``request`` is a coroutine function of the ``AioConnection``.
        trusted: see ``ensure_running``."""
        await self.ensure_running(trusted)
        process = self.process
        if process is not None:
            sent_to[:] = [process]
        watched = process if bounded else None
        if aio:
            return await self._under_watch(watched, self._send_aio, request)
        async with self._limiter:
            return await self._under_watch(watched, self._send_threaded, request)

    async def _under_watch(self, process, send, request):
        """``send(request, used)``, watched by the watchdog of ``process`` (None: not watched)."""
        if process is None:
            return await send(request, None)
        # One watchdog per process for all its reads, not one task per
        # read: a 4 KiB read's own task and timer cost more than the read.
        if self._watched is not process and self._pool.spawn(self._watch, process):
            self._watched = process
        used: list[Connection] = []
        with trio.CancelScope() as stuck:
            self._waiting[stuck] = (trio.current_time(), process)
            try:
                return await send(request, used)
            finally:
                del self._waiting[stuck]
        # The watchdog gave up on the process: it could not be killed. Its
        # connection is left to the thread still blocked on it (the small
        # reads' one was dropped).
        self._all = [c for c in self._all if c not in used]
        raise TransportError(self.dead, errno.EIO)

    async def _send_threaded(self, request, used: list | None):
        conn = await self._connection()
        if used is None:
            return await self._send(request, conn)
        used.append(conn)
        return await self._send(request, conn, abandon=True)

    async def _send_aio(self, request, used: list | None):
        conn = self._aio
        if conn is None:
            process = self.process
            connected = await self._connect()
            if self._aio is not None or self.process is not process or self.retired:
                # Another read connected meanwhile, or the server stopped.
                connected.close()
                if self._aio is None:
                    raise TransportError("the server was stopped", errno.ENOTCONN)
            else:
                self._aio = connected.aio(self._pool.spawn)
            conn = self._aio
        try:
            result = await request(conn)
        except TransportError as e:
            if e.disconnected:
                if self._aio is conn:
                    self._aio = None
                conn.close()
                if self.retired:
                    raise Retired(self.spec) from None
            raise
        self._answered = trio.current_time()
        return result

    async def _send(self, request: Callable[[Connection], object], conn: Connection, abandon: bool = False):
        try:
            result = await trio.to_thread.run_sync(request, conn, abandon_on_cancel=abandon)
        except TransportError as e:
            if not e.disconnected:
                self._put_back(conn)  # the request failed, not the connection (ENOSPC)
                raise
            self._drop(conn)
            if self.retired:
                raise Retired(self.spec) from None
            raise
        self._answered = trio.current_time()
        self._put_back(conn)
        return result

    async def _watch(self, process) -> None:
        """The reads' watchdog: a qemu-nbd that answers nothing, on any connection,
        for ``retry_timeout`` seconds while a read waits is hung (stopped,
        stuck): it is killed, and its reads fail over to its restart. One that
        cannot be killed (stuck in the kernel) fails its reads with EIO from
        then on. Runs while ``process`` serves (looking every quarter of the
        timeout while no read waits: a hang is seen within 1.25 times it)."""
        timeout = self._pool.retry_timeout
        try:
            while True:
                if self.process is not process or not process.alive:
                    return
                starts = [t for t, p in self._waiting.values() if p is process]
                if not starts:
                    await trio.sleep(timeout / 4)
                    continue
                quiet_since = max(min(starts), self._answered)
                if trio.current_time() >= quiet_since + timeout:
                    break  # nothing answered: hung
                await trio.sleep_until(quiet_since + timeout)
        finally:
            if self._watched is process:
                self._watched = None
        if not process.alive:
            return
        log.warning("qemu-nbd for %s answered nothing for %g s: killing it", self.spec.describe(), timeout)
        process.kill()
        with trio.move_on_after(KILL_WAIT):
            while process.alive:
                await trio.sleep(0.05)
            return  # its sockets closed: the read gets an error and asks its restart
        self.dead = (f"qemu-nbd for {self.spec.describe()} answered nothing for {timeout:g} s and does not "
                     "die when killed (stuck in the kernel)")
        log.error("%s", self.dead)
        for scope, (_, p) in list(self._waiting.items()):
            if p is process:
                scope.cancel()
        aio, self._aio = self._aio, None
        if aio is not None:
            aio.close()  # its reads fail, and ask again: EIO (``dead``)

    async def _write_request(self, request: Callable[[Connection], object]):
        """A writer's request: once. A writer that cannot be reached, or that
        drops the connection, is gone: EIO (its process may not be reaped yet)."""
        await self.ensure_running()
        async with self._limiter:
            try:
                conn = await self._connection()
            except TransportError as e:
                await self._gone(e)
            try:
                return await self._send(request, conn)
            except Retired:
                raise
            except TransportError as e:
                if not e.disconnected:
                    raise
                await self._gone(e)

    async def _gone(self, e: TransportError):
        """A writer that lost its connection, or cannot be connected to, is gone."""
        await self.ensure_running()  # raises once the death is seen
        raise TransportError(f"{e} (qemu-nbd writing {self.spec.image} is gone)", errno.EIO) from None

    def _put_back(self, conn: Connection) -> None:
        """A connection free again; one of a server stopped meanwhile is closed instead."""
        if conn in self._all:
            self._free.append(conn)
        else:
            conn.close()

    def _drop(self, conn: Connection) -> None:
        if conn in self._all:
            self._all.remove(conn)
        conn.close(idle=False)  # lost: nobody to say goodbye to

    async def pread(self, length: int, offset: int) -> bytes:
        return await self._request(lambda c: c.pread(length, offset), bounded=True)

    async def pread_small(self, length: int, offset: int) -> bytes:
        """A read whose round trip costs more than its bytes (a scattered
        4 KiB read): on the export's ``AioConnection``, no worker thread."""
        if not self._pool.running:
            return await self.pread(length, offset)
        return await self._request(lambda c: c.pread(length, offset), bounded=True, aio=True)

    async def block_status(self, size: int, start: int = 0, end: int | None = None) -> dict[str, list[Run]]:
        return await self._request(lambda c: c.block_status(size, start, end))

    async def pwrite(self, buf: bytes, offset: int) -> None:
        await self._request(lambda c: c.pwrite(buf, offset))

    async def zero(self, length: int, offset: int) -> None:
        await self._request(lambda c: c.zero(length, offset))

    async def flush(self) -> None:
        await self._request(lambda c: c.flush())

    async def _shutdown(self) -> None:
        cache, self._cache = self._cache, None
        if cache is not None and cache.close():
            trim_malloc()  # the freed chunks' pages go back to the system now
        self.dead = None
        conns, free, self._all, self._free = self._all, self._free, [], []
        for c in conns:
            c.close(idle=c in free)
        aio, self._aio = self._aio, None
        if aio is not None:
            aio.close()
        if self.process is not None:
            process, self.process = self.process, None
            await process.stop()

    async def stop(self) -> None:
        async with self.lock:
            self._outage = self._failed = None
            await self._shutdown()


class ServerPool:
    """Owns every server of a mount (see the module's docstring).

    budget: the memory all servers' chunk caches share (the mount's; one of
    its own by default).
    """

    def __init__(self, rundir: str, connections: int = 4, idle_timeout: float = 2.0,
                 budget: ChunkBudget | None = None, retry_timeout: float = RETRY_TIMEOUT):
        self.rundir = rundir
        self.retry_timeout = retry_timeout
        self.budget = budget if budget is not None else ChunkBudget(DEFAULT_BUDGET_MIB << 20)
        self.connections = connections
        self.idle_timeout = idle_timeout
        self.ids = itertools.count(1)
        self.servers: dict[ExportSpec, Server] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Own the idle timers and background reads; returns (stopping every server) when cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                await self.stop_all()

    @property
    def running(self) -> bool:
        """Whether background tasks can be started (``spawn``)."""
        return self._nursery is not None

    def spawn(self, fn, *args) -> bool:
        """Run ``fn(*args)`` in the background, for as long as the pool runs;
        False: the pool is not running, nothing was started."""
        if self._nursery is None:
            return False
        self._nursery.start_soon(fn, *args)
        return True

    def background(self, while_: Callable[[], bool]):
        """A ``spawn`` that starts nothing unless ``while_()`` (readahead only
        while files are open: it must never restart an idle server)."""
        def spawn(fn, *args) -> bool:
            return while_() and self.spawn(fn, *args)
        return spawn

    async def acquire(self, spec: ExportSpec) -> Server:
        """The running server of ``spec``, with one more user (a lease: ``release`` it)."""
        srv = self.servers.get(spec)
        if srv is None:
            srv = self.servers[spec] = Server(self, spec)
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
        """One user less; the last one's release stops it, now or after ``idle_timeout``.

        A writable server is left to whoever started it (``stop``).
        """
        srv.users -= 1
        if srv.users > 0 or srv.spec.writable or srv.retired:
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

    def reading(self, image: str) -> list[Server]:
        """The read-only servers of local exports whose top image is ``image``."""
        return [s for s in self.servers.values()
                if not s.spec.writable and s.spec.socket is None and s.spec.image == image]

    async def stop(self, srv: Server, retire: bool = False) -> None:
        """Stop a server now (its users' next requests start it again, unless ``retire``:
        then it leaves the pool, and they get ``Retired``)."""
        if srv._idle_scope is not None:
            srv._idle_scope.cancel()
            srv._idle_scope = None
        if retire or srv.spec.writable:
            srv.retired = retire
            if self.servers.get(srv.spec) is srv:
                del self.servers[srv.spec]
        await srv.stop()

    async def discard(self, specs) -> None:
        """Stop the servers of exports that are gone (a refreshed disk, a finished backup job)."""
        for spec in specs:
            srv = self.servers.get(spec)
            if srv is not None:
                await self.stop(srv, retire=True)

    async def stop_all(self) -> None:
        for srv in list(self.servers.values()):
            await srv.stop()
