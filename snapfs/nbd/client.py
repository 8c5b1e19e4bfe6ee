"""The only module that imports libnbd: connections to one NBD export.

Callers get runs per metadata context and bytes; they never see libnbd
handles or meta-context strings other than the ones named here.

Chunks (2 MiB) are read on blocking handles driven from trio worker
threads (`trio.to_thread.run_sync`): libnbd releases the GIL while it
waits for the server, so several requests are in flight at once, one per
connection, and large replies were faster that way than with libnbd's
``aio_*`` calls driven from the trio loop (docs/design.md, "Reads").
Small scattered reads (a VM's random 4 KiB I/O) are the other way round: a
worker thread's hop costs more than the read, so they go through one
``AioConnection`` per export, many in flight on one socket, driven from the
trio loop.
"""

from __future__ import annotations

import errno
import logging
import os

import nbd  # libnbd's Python bindings (Debian's python3-libnbd)
import trio

from ..errors import TransportError as NBDError
from ..extents import Run
from .contexts import read_block_status

log = logging.getLogger(__name__)


def _handle_lost(h) -> bool:
    """Whether a handle's connection is gone (its server died or closed it)."""
    try:
        return h.aio_is_dead() or h.aio_is_closed()
    except nbd.Error:
        return True


class Connection:
    """One blocking libnbd connection to an export on a UNIX socket."""

    def __init__(self, socket_path: str, contexts: tuple[str, ...] = (), export: str = ""):
        self.contexts = contexts
        self._h = nbd.NBD()
        try:
            # libnbd zeroes each read buffer before the server fills it, in
            # case a reply is short; a short reply fails the read anyway, and
            # the memset cost 5% of snapfs's CPU in a copy.
            self._h.set_pread_initialize(False)
            for ctx in contexts:
                self._h.add_meta_context(ctx)
            self._h.set_export_name(export)
            self._h.connect_unix(socket_path)
            self.size = self._h.get_size()
            for ctx in contexts:
                if not self._h.can_meta_context(ctx):
                    raise NBDError(f"server does not offer {ctx}")
        except nbd.Error as e:
            self.close()
            raise NBDError(f"cannot connect to {socket_path}: {e.string}", e.errno) from None
        except BaseException:
            self.close()
            raise

    def close(self, idle: bool = True) -> None:
        """Close the connection, never waiting for the server: libnbd's
        ``shutdown`` waits for its answer, forever for a server stuck in the
        kernel, in the caller's thread (trio's).

        idle: no other thread uses it now; it then says goodbye first (an NBD
        disconnect, sent without waiting), so qemu-nbd logs no dropped
        client. A connection a worker thread may still be blocked on is only
        let go: every call on it would wait for that thread.
        """
        h, self._h = self._h, None
        if h is None:
            return
        if idle:
            try:
                if h.aio_is_ready():
                    h.aio_disconnect(0)
            except nbd.Error:
                pass
        # libnbd closes the socket when the last reference goes (a thread's,
        # if one still uses it).
        del h

    def aio(self, spawn) -> AioConnection:
        """This connection, to be driven from the trio loop from now on (``AioConnection``)."""
        return AioConnection(self, spawn)

    def _handle(self):
        """The libnbd handle; a connection closed under a request (its server
        was stopped or restarted meanwhile) is a lost connection, retried."""
        h = self._h
        if h is None:
            raise NBDError("connection closed", errno.ENOTCONN)
        return h

    def _failed(self, h, what: str, e: nbd.Error) -> NBDError:
        """The error for a failed request; one whose connection is gone (the
        server died: "server disconnected unexpectedly", EIO or none from
        libnbd, then "invalid state: DEAD", EINVAL) is ENOTCONN, asked again."""
        return NBDError(f"{what} failed: {e.string}", errno.ENOTCONN if _handle_lost(h) else e.errno)

    def pread(self, length: int, offset: int) -> bytes:
        h = self._handle()
        try:
            return h.pread(length, offset)
        except nbd.Error as e:
            raise self._failed(h, f"read of {length} bytes at {offset}", e) from None

    def pwrite(self, buf: bytes, offset: int) -> None:
        h = self._handle()
        try:
            h.pwrite(buf, offset)
        except nbd.Error as e:
            raise self._failed(h, f"write of {len(buf)} bytes at {offset}", e) from None

    def zero(self, length: int, offset: int) -> None:
        """Make ``[offset, offset + length)`` read as zero; the server may
        deallocate it (qcow2 then keeps zero clusters, which hide what is beneath)."""
        h = self._handle()
        try:
            h.zero(length, offset)
        except nbd.Error as e:
            raise self._failed(h, f"zeroing {length} bytes at {offset}", e) from None

    def flush(self) -> None:
        h = self._handle()
        try:
            h.flush()
        except nbd.Error as e:
            raise self._failed(h, "flush", e) from None

    def block_status(self, size: int, start: int = 0, end: int | None = None) -> dict[str, list[Run]]:
        """Runs of every context this connection asked for, over ``[0, size)``.

        ``size`` is what the caller expects the export to be; a server that
        reports another size (the image changed since it was scanned) fails.
        ``start``/``end`` limit the runs to an area (what a writer changed).

        How replies become runs: ``contexts.read_block_status``.
        """
        if size != self.size:
            raise NBDError(f"image size changed: expected {size} bytes, server has {self.size}",
                           errno.ESTALE)

        def request(length, offset, callback):
            h = self._handle()
            try:
                h.block_status(length, offset, callback)
            except nbd.Error as e:
                raise self._failed(h, f"block status at {offset}", e) from None

        return read_block_status(size if end is None else end, self.contexts, request, start)


# aio_pread's buffers come from a fixed set, reused: python3-libnbd 1.14
# keeps a reference to every buffer an ``aio_pread`` was given, for good
# (30000 reads of 4 KiB, each into a buffer of its own, grew a process by
# 117 MiB; one buffer reused for 100000 reads grew it by nothing). A read is
# widened to 4 KiB boundaries and done into the smallest size that holds it.
# 4 KiB steps up to 32 KiB, then 32 KiB steps up to 256 KiB.
_SIZES = tuple(range(4096, 32768 + 1, 4096)) + tuple(range(65536, 262144 + 1, 32768))
_free: dict[int, list[tuple[bytearray, nbd.Buffer]]] = {n: [] for n in _SIZES}
# Reads in flight on one AioConnection: what bounds the buffers made.
AIO_READS = 32


def _take(size: int) -> tuple[bytearray, nbd.Buffer]:
    free = _free[size]
    if free:
        return free.pop()
    data = bytearray(size)
    return data, nbd.Buffer.from_buffer(data)


class AioConnection:
    """A connected ``Connection`` driven from the trio loop: reads in flight
    together on one socket, no worker thread.

    spawn: ``spawn(fn) -> bool`` starts a background task (the server pool's
    nursery): the one task that moves the connection's I/O while reads wait
    (``_pump``). ``gone``: why the connection is lost, once it is; every
    read then fails with ENOTCONN (asked again on a new connection).
    """

    def __init__(self, conn: Connection, spawn):
        self._conn = conn
        self._h = conn._h
        self._fd = self._h.aio_get_fd()
        self._spawn = spawn
        self._pumping = False  # a ``_pump`` runs
        self._parked = False  # it waits on the fd
        self._slots = trio.Semaphore(AIO_READS)  # reads in flight: bounds the buffers made
        self._work = trio.Event()  # set: reads are waiting for the pump
        self._waiting: set[trio.Event] = set()  # of the reads in flight
        self.gone: str | None = None

    def close(self) -> None:
        """Drop the connection at once: no NBD disconnect and no wait for the
        server (libnbd's shutdown waits for it, and a server stuck in the
        kernel would hang trio's thread); its reads fail with ENOTCONN."""
        h, self._h = self._h, None
        if h is None:
            return
        self._lost("connection closed")
        self._unpark()
        self._conn._h = None
        del h  # the last reference: libnbd closes the socket

    def _unpark(self) -> None:
        """Wake a pump waiting on the fd, and take its registration out of trio.

        Whenever it waits, libnbd may have closed the fd meanwhile (a dead
        connection: it closes the socket itself), and the number may be
        given to a new socket: trio must forget the old wait first. While
        the pump waits on the number, no other task of trio can be.
        """
        if self._parked:
            self._parked = False
            trio.lowlevel.notify_closing(self._fd)

    def _lost(self, why: str) -> None:
        if self.gone is None:
            self.gone = why
        waiting, self._waiting = self._waiting, set()
        for event in waiting:
            event.set()
        self._work.set()  # the pump ends

    async def pread(self, length: int, offset: int) -> bytes:
        async with self._slots:
            return await self._pread(length, offset)

    async def _pread(self, length: int, offset: int) -> bytes:
        what = f"read of {length} bytes at {offset}"
        h = self._h
        if self.gone is not None or h is None:
            raise NBDError(f"{what} failed: {self.gone}", errno.ENOTCONN)
        start = offset - offset % 4096
        size = next((n for n in _SIZES if n >= offset + length - start), None)
        pooled = size is not None and start + size <= self._conn.size
        if pooled:
            item = _take(size)
        else:
            # Larger than the set holds, or near the end of the export (the
            # chunk cache sends neither): exactly the read, into a buffer of
            # its own (past the end, the server's error).
            start, size = offset, length
            data = bytearray(length)
            item = (data, nbd.Buffer.from_buffer(data))
        data, buf = item
        event = trio.Event()
        outcome = []  # the errno of the reply, once it came (0: data)
        abandoned = []  # the reader went (cancelled) before the reply came

        def give_back() -> None:
            """The buffer to the set, once libnbd is done with it and nobody reads it."""
            if pooled:
                _free[size].append(item)

        def done(err) -> int:
            # Called by libnbd in aio_notify_*, in the pump: trio's thread.
            outcome.append(err.value)
            self._waiting.discard(event)
            event.set()
            if abandoned:
                give_back()
            return 1  # the command is retired

        try:
            h.aio_pread(buf, start, completion=done)
        except nbd.Error as e:
            give_back()
            error = self._conn._failed(h, what, e)
            if error.errno == errno.ENOTCONN:
                # libnbd closed the fd (a dead connection): the pump forgets it now.
                self._lost(error.reason)
                self._unpark()
            raise error from None
        if not outcome:
            self._waiting.add(event)
            if not self._pumping:
                self._pumping = self._spawn(self._pump)
                if not self._pumping:
                    self._lost("no task to drive the connection")
            self._work.set()
        try:
            await event.wait()
        except BaseException:
            if not outcome:
                abandoned.append(True)  # given back by ``done``, once libnbd is done with it
            else:
                give_back()
            raise
        if not outcome:
            # The connection was lost: libnbd may still fill the buffer (its
            # ``done`` then finds it abandoned and gives it back).
            abandoned.append(True)
            raise NBDError(f"{what} failed: {self.gone}", errno.ENOTCONN)
        lo = offset - start
        result = bytes(memoryview(data)[lo:lo + length])  # copied: the buffer is used again
        give_back()
        if outcome[0]:
            gone = self._h is None or _handle_lost(h)
            raise NBDError(f"{what} failed: {os.strerror(outcome[0])}", errno.ENOTCONN if gone else outcome[0])
        return result

    async def _pump(self) -> None:
        """Move the connection's I/O while reads are in flight, until it is
        closed; a lost connection fails every read still waiting."""
        try:
            while self._h is not None and self.gone is None:
                if not self._waiting:
                    # One task for the connection's life, woken by reads: a
                    # task started per read cost more than its reply.
                    self._work = trio.Event()
                    await self._work.wait()
                    continue
                h = self._h
                direction = h.aio_get_direction()
                if not direction & (nbd.AIO_DIRECTION_READ | nbd.AIO_DIRECTION_WRITE):
                    self._lost("the server closed the connection")
                    break
                self._parked = True
                try:
                    if direction & nbd.AIO_DIRECTION_WRITE:
                        await trio.lowlevel.wait_writable(self._fd)
                    else:
                        await trio.lowlevel.wait_readable(self._fd)
                finally:
                    self._parked = False
                if self._h is h:
                    if direction & nbd.AIO_DIRECTION_WRITE:
                        h.aio_notify_write()
                    else:
                        h.aio_notify_read()
                    if _handle_lost(h):
                        self._lost("the server closed the connection")
        except nbd.Error as e:
            self._lost(e.string)
        except (trio.ClosedResourceError, trio.BusyResourceError, OSError) as e:
            self._lost(str(e) or "connection closed")
        finally:
            self._pumping = False
