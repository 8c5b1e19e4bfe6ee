"""qemu-nbd servers: what to export, how to start it, who stops it.

Each distinct export (an ``ExportSpec``) gets at most one qemu-nbd, shared by
every open of every view that needs it, started when first needed and stopped
when idle, on unmount, or restarted when it died. The ``ServerPool`` is the
one owner of all of them.

The image is always handed to qemu-nbd as a ``json:`` filename that spells
out every node: the format of each layer (never probed), the file driver
(``host_device`` for a block device; no name is ever parsed as a protocol or
option string), and the backing
of each qcow2 layer, ``null`` where the view must stop (a single layer, as in
ovirt-imageio's snapshot transfers). Servers are read-only without
force-share, so an image a running VM writes cannot be opened ("in use"),
while the backing layers of a running VM open fine.

qemu-nbd runs without ``--persistent``: it exits by itself once its last
client disconnects, so even a snapfs killed with SIGKILL leaves no server
behind once the kernel has closed its sockets.
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import signal
import stat
import subprocess
from dataclasses import dataclass

import trio

from . import nbd_client
from .extents import Run
from .reader import ChunkCache

log = logging.getLogger(__name__)

START_TIMEOUT = 30.0
STOP_TIMEOUT = 1.0


class ServerError(Exception):
    """qemu-nbd could not serve an export; the message says why, for users."""

    def __init__(self, reason: str, err: int | None = errno.EIO):
        super().__init__(reason)
        self.reason = reason
        self.errno = err or errno.EIO


@dataclass(frozen=True)
class ExportSpec:
    """What one qemu-nbd exports.

    layers: ``(path, format)`` from the top layer down; the lowest qcow2 layer
    gets ``"backing": null``, so a one-element spec is a single layer alone.
    bitmap: a dirty bitmap to export as ``qemu:dirty-bitmap:NAME``.
    snapshot: an internal snapshot of the top layer to serve instead of its
    current state (``--load-snapshot``).
    socket, export: set for an export someone else serves (a libvirt backup
    job's NBD server): no qemu-nbd is started, ``layers`` only names the
    images for messages.
    """

    layers: tuple[tuple[str, str], ...]
    bitmap: str | None = None
    snapshot: str | None = None
    socket: str | None = None
    export: str = ""

    @property
    def allocation_depth(self) -> bool:
        # Valid for qcow2 only (ovirt-imageio does the same); raw has no
        # backing. A backup job's export does not offer it.
        return self.socket is None and self.layers[0][1] == "qcow2"

    @property
    def contexts(self) -> tuple[str, ...]:
        ctx = [nbd_client.BASE_ALLOCATION]
        if self.allocation_depth:
            ctx.append(nbd_client.ALLOCATION_DEPTH)
        if self.bitmap is not None:
            ctx.append(nbd_client.dirty_context(self.bitmap))
        return tuple(ctx)

    def json_filename(self) -> str:
        node = None
        for path, fmt in reversed(self.layers):
            new = {"driver": fmt, "file": {"driver": _protocol_driver(path), "filename": path}}
            if fmt == "qcow2":
                new["backing"] = node
            elif node is not None:
                raise ValueError(f"raw image {path} cannot have a backing file")
            node = new
        return "json:" + json.dumps(node, ensure_ascii=False)

    def describe(self) -> str:
        what = " <- ".join(p for p, _ in self.layers)
        if self.socket is not None:
            what = f"backup export {self.export!r} of {what}"
        if self.snapshot is not None:
            what = f"internal snapshot {self.snapshot!r} of {what}"
        return f"{what} (bitmap {self.bitmap})" if self.bitmap else what


def _protocol_driver(path: str) -> str:
    """qemu's driver for a local path: ``host_device`` for block devices."""
    try:
        return "host_device" if stat.S_ISBLK(os.stat(path).st_mode) else "file"
    except OSError:
        return "file"  # qemu reports the missing file


def _reason_from_stderr(text: str) -> ServerError:
    msg = " ".join(line.strip() for line in text.strip().splitlines()[-3:]) or "qemu-nbd failed"
    msg = msg.removeprefix("qemu-nbd: ")
    if "lock" in msg.lower():
        return ServerError(f"in use: {msg}", errno.EBUSY)
    return ServerError(msg)


class QemuNBD:
    """One qemu-nbd process serving one export over a UNIX socket."""

    def __init__(self, spec: ExportSpec, rundir: str, ident: int, connections: int):
        self.spec = spec
        self.socket = os.path.join(rundir, f"{ident}.sock")
        self.pidfile = os.path.join(rundir, f"{ident}.pid")
        self.errfile = os.path.join(rundir, f"{ident}.err")
        self.connections = connections
        self.proc: trio.Process | None = None

    def command(self) -> list[str]:
        cmd = ["qemu-nbd", "--read-only", f"--shared={self.connections + 1}",
               f"--socket={self.socket}", f"--pid-file={self.pidfile}", "--cache=writeback"]
        if self.spec.allocation_depth:
            cmd.append("--allocation-depth")
        if self.spec.bitmap is not None:
            cmd.append(f"--bitmap={self.spec.bitmap}")
        if self.spec.snapshot is not None:
            # An option string: a comma in the name is written twice.
            cmd.append("--load-snapshot=snapshot.name=" + self.spec.snapshot.replace(",", ",,"))
        cmd.append(self.spec.json_filename())
        return cmd

    async def start(self) -> None:
        for p in (self.socket, self.pidfile):
            if os.path.exists(p):
                os.unlink(p)
        cmd = self.command()
        log.debug("starting %s", cmd)
        with open(self.errfile, "wb") as err:
            self.proc = await trio.lowlevel.open_process(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        # qemu-nbd writes its pid file once it listens; the socket file
        # appears earlier, at bind().
        delay = 0.001
        with trio.move_on_after(START_TIMEOUT) as timeout:
            while not os.path.exists(self.pidfile):
                if self.proc.poll() is not None:
                    raise self.failure()
                await trio.sleep(delay)
                delay = min(delay * 2, 0.05)
        if timeout.cancelled_caught:
            await self.stop()
            raise ServerError(f"qemu-nbd did not start within {START_TIMEOUT:.0f} s")
        log.debug("qemu-nbd pid %d serves %s", self.proc.pid, self.spec.describe())

    def failure(self) -> ServerError:
        try:
            with open(self.errfile, errors="replace") as f:
                text = f.read()
        except OSError:
            text = ""
        return _reason_from_stderr(text)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def stop(self) -> None:
        """Wait, terminate, kill; log what the server said if it failed.

        Callers close their connections first, and a non-persistent qemu-nbd
        then exits by itself. SIGTERM comes second: qemu-nbd loses one that
        arrives while it is still starting.
        """
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with trio.CancelScope(shield=True):
            for sig in (None, signal.SIGTERM, signal.SIGKILL):
                if proc.poll() is not None:
                    break
                if sig == signal.SIGKILL:
                    log.warning("qemu-nbd pid %d ignored SIGTERM, killing it", proc.pid)
                if sig is not None:
                    proc.send_signal(sig)
                with trio.move_on_after(STOP_TIMEOUT):
                    await proc.wait()
            if proc.returncode not in (0, -signal.SIGTERM):
                log.warning("qemu-nbd for %s exited with %s: %s", self.spec.describe(),
                            proc.returncode, self.failure().reason)
        for p in (self.socket, self.pidfile, self.errfile):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


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
        self._free: list[nbd_client.Connection] = []
        self._all: list[nbd_client.Connection] = []
        self._limiter = trio.CapacityLimiter(pool.connections)
        self._idle_scope: trio.CancelScope | None = None
        self._cache: ChunkCache | None = None

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
            if self.process is not None and self.process.alive:
                return
            if self.process is not None:
                log.warning("qemu-nbd for %s died; restarting it", self.spec.describe())
                await self._shutdown()
            self.process = QemuNBD(self.spec, self.pool.rundir, next(self.pool.ids), self.pool.connections)
            try:
                await self.process.start()
                conn = await self._first_connection()
            except nbd_client.NBDError as e:
                await self._shutdown()
                raise ServerError(str(e), e.errno) from None
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
            except nbd_client.NBDError as e:
                raise ServerError(f"the backup job's NBD server does not answer: {e}", e.errno) from None
            self._all.append(conn)
            self._free.append(conn)

    def _socket(self) -> str:
        return self.spec.socket if self.spec.socket is not None else self.process.socket

    async def _connect(self) -> nbd_client.Connection:
        return await trio.to_thread.run_sync(
            nbd_client.Connection, self._socket(), self.spec.contexts, self.spec.export)

    async def _first_connection(self) -> nbd_client.Connection:
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
            except nbd_client.NBDError as e:
                if (e.errno not in (errno.ECONNREFUSED, errno.ENOENT) or not self.process.alive
                        or trio.current_time() > deadline):
                    if not self.process.alive:
                        raise self.process.failure() from None
                    raise
            await trio.sleep(delay)
            delay = min(delay * 2, 0.05)

    async def _connection(self) -> nbd_client.Connection:
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
                except nbd_client.NBDError as e:
                    raise ServerError(str(e), e.errno) from None
                try:
                    result = await trio.to_thread.run_sync(getattr(conn, fn_name), *args)
                except nbd_client.NBDError as e:
                    self._drop(conn)
                    if attempt == 1 and e.disconnected:
                        continue  # ensure_running restarts a dead server
                    raise
                self._free.append(conn)
                return result

    def _drop(self, conn: nbd_client.Connection) -> None:
        if conn in self._all:
            self._all.remove(conn)
        conn.close()

    async def pread(self, length: int, offset: int) -> bytes:
        return await self.call("pread", length, offset)

    async def block_status(self, size: int) -> dict[str, list[Run]]:
        return await self.call("block_status", size)

    async def _shutdown(self) -> None:
        self._cache = None
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

    def __init__(self, rundir: str, connections: int = 4, idle_timeout: float = 2.0):
        self.rundir = rundir
        self.connections = connections
        self.idle_timeout = idle_timeout
        self.ids = itertools.count(1)
        self.servers: dict[ExportSpec, Server] = {}
        self._runs: dict[ExportSpec, dict[str, list[Run]]] = {}
        self._runs_locks: dict[ExportSpec, trio.Lock] = {}
        self._nursery: trio.Nursery | None = None

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

    async def acquire(self, spec: ExportSpec) -> Server:
        srv = self.server(spec)
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
        if linger and self.idle_timeout > 0 and self._nursery is not None:
            self._nursery.start_soon(self._stop_when_idle, srv)
        elif self._nursery is not None:
            self._nursery.start_soon(self._stop_if_unused, srv)

    async def _stop_when_idle(self, srv: Server) -> None:
        with trio.CancelScope() as scope:
            srv._idle_scope = scope
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

    async def block_status(self, spec: ExportSpec, size: int) -> dict[str, list[Run]]:
        """Block status of a whole export, read once per mount.

        Views of the same export (a base's chain and layer views, the shared
        layers of two branches) share it.
        """
        runs = self._runs.get(spec)
        if runs is not None:
            return runs
        async with self._runs_locks.setdefault(spec, trio.Lock()):
            runs = self._runs.get(spec)
            if runs is None:
                srv = await self.acquire(spec)
                try:
                    runs = self._runs[spec] = await srv.block_status(size)
                finally:
                    self.release(srv, linger=False)
        return runs

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
