"""The only module that imports libnbd: connections to one NBD export.

Callers get runs per metadata context and bytes; they never see libnbd
handles or meta-context strings other than the ones named here.

libnbd handles are blocking here and are driven from trio worker threads
(`trio.to_thread.run_sync`): libnbd releases the GIL while it waits for the
server, so several requests are in flight at once, one per connection. That
was measured against libnbd's ``aio_*`` calls driven from the trio loop by
``tests/bench.py --nbd-client``; see docs/design.md for the figures.
"""

from __future__ import annotations

import errno
import logging

import nbd  # libnbd's Python bindings (Debian's python3-libnbd)

from ..errors import TransportError as NBDError
from ..extents import Run
from .contexts import read_block_status

log = logging.getLogger(__name__)


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

    def close(self) -> None:
        h, self._h = self._h, None
        if h is not None:
            try:
                h.shutdown()
            except nbd.Error:
                pass
            # libnbd closes the handle when the last reference goes.
            del h

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
        err = e.errno
        try:
            gone = h.aio_is_dead() or h.aio_is_closed()
        except nbd.Error:
            gone = True
        if gone:
            err = errno.ENOTCONN
        return NBDError(f"{what} failed: {e.string}", err)

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
