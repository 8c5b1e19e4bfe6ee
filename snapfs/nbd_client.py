"""The only module that speaks NBD (through libnbd's Python bindings).

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

import nbd

from .extents import Run

log = logging.getLogger(__name__)

BASE_ALLOCATION = "base:allocation"
ALLOCATION_DEPTH = "qemu:allocation-depth"
DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"

# The NBD block status length is 32 bits; ask for 4 GiB less 1 MiB at most,
# a multiple of every cluster and block size qemu uses.
MAX_STATUS_REQUEST = (1 << 32) - (1 << 20)


def dirty_context(bitmap: str) -> str:
    return DIRTY_BITMAP_PREFIX + bitmap


class NBDError(Exception):
    """A failed NBD operation; errno is what the file system should return."""

    def __init__(self, message: str, err: int | str | None = None):
        super().__init__(message)
        # libnbd's Python errors carry the errno as a name ("ENOTCONN").
        if isinstance(err, str):
            err = getattr(errno, err, None)
        self.errno = err or errno.EIO

    @property
    def disconnected(self) -> bool:
        """The connection is gone (the server died or dropped it): retry elsewhere."""
        return self.errno in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ESHUTDOWN,
                              errno.ECONNREFUSED)


class Connection:
    """One blocking libnbd connection to an export on a UNIX socket."""

    def __init__(self, socket_path: str, contexts: tuple[str, ...] = (), export: str = ""):
        self.contexts = contexts
        self._h = nbd.NBD()
        try:
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

    def pread(self, length: int, offset: int) -> bytes:
        try:
            return self._h.pread(length, offset)
        except nbd.Error as e:
            raise NBDError(f"read of {length} bytes at {offset} failed: {e.string}", e.errno) from None

    def block_status(self, size: int) -> dict[str, list[Run]]:
        """Runs of every context this connection asked for, over ``[0, size)``.

        ``size`` is what the caller expects the export to be; a server that
        reports another size (the image changed since it was scanned) fails.

        Contexts may answer with different lengths (NBD spec, "BLOCK_STATUS"):
        each keeps its own high-water mark, the next request starts at the
        lowest one, and what a context repeats is dropped. Neighbouring runs
        with equal flags are merged as they arrive.
        """
        if size != self.size:
            raise NBDError(f"image size changed: expected {size} bytes, server has {self.size}",
                           errno.ESTALE)
        covered = {ctx: 0 for ctx in self.contexts}
        runs: dict[str, list[Run]] = {ctx: [] for ctx in self.contexts}

        def extent(metacontext, offset, entries, err):
            if metacontext not in runs:
                return 0
            out = runs[metacontext]
            pos = offset
            for i in range(0, len(entries), 2):
                length, flags = entries[i], entries[i + 1]
                start, end = max(pos, covered[metacontext]), min(pos + length, size)
                pos += length
                if end <= start:
                    continue
                if out and out[-1][2] == flags and out[-1][0] + out[-1][1] == start:
                    s, n, _ = out[-1]
                    out[-1] = (s, n + end - start, flags)
                else:
                    out.append((start, end - start, flags))
                covered[metacontext] = end
            return 0

        while True:
            pos = min(covered.values(), default=size)
            if pos >= size:
                break
            try:
                self._h.block_status(min(size - pos, MAX_STATUS_REQUEST), pos, extent)
            except nbd.Error as e:
                raise NBDError(f"block status at {pos} failed: {e.string}", e.errno) from None
            if min(covered.values()) <= pos:
                raise NBDError(f"server made no progress in block status at {pos}", errno.EPROTO)
        return runs
