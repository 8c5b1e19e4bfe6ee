"""The local machine: image files read with ``os``, qemu-nbd started here.

The reference implementation of the host protocol (``hosts/__init__.py``).
Tests that must not start qemu subclass it and replace ``nbd_server`` and
``connect`` (``tests/test_2_operations.py``).
"""

from __future__ import annotations

import errno
import logging
import os
import stat

from .. import formats
from ..formats import status

log = logging.getLogger(__name__)


class LocalHost:
    """This machine."""

    name = None
    connected = True
    readahead = 4  # chunks a sequential reader gets fetched ahead (nbd/chunks.py)
    error = None

    def __repr__(self) -> str:
        return "LocalHost()"

    async def reach(self) -> None:
        """Reach the host (nothing to do here)."""

    def close(self) -> None:
        """End what reaching it started."""

    def release(self) -> None:
        """A source that used it is closed (the last one closes it)."""

    # -- files -----------------------------------------------------------------

    def stat(self, path: str) -> os.stat_result:
        return os.stat(path)

    def lstat(self, path: str) -> os.stat_result:
        return os.lstat(path)

    def realpath(self, path: str) -> str:
        return os.path.realpath(path)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def isfile(self, path: str) -> bool:
        return os.path.isfile(path)

    def isdir(self, path: str) -> bool:
        return os.path.isdir(path)

    def islink(self, path: str) -> bool:
        return os.path.islink(path)

    def walk(self, root: str, onerror=None):
        return os.walk(root, onerror=onerror)

    def open(self, path: str):
        """A regular file or a block device, open to read a header; OSError for anything else.

        Looked at before it is opened, so a FIFO, a socket or a character
        device is never opened (a FIFO would block the open until a writer
        came; a tape device would rewind); then opened without blocking and
        looked at again, in case it was swapped in between.
        """
        if (why := formats.not_an_image_file(os.stat(path).st_mode)) is not None:
            raise OSError(errno.EINVAL, why, path)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        try:
            if (why := formats.not_an_image_file(os.fstat(fd).st_mode)) is not None:
                raise OSError(errno.EINVAL, why, path)
            return os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise

    def forget(self, path: str) -> None:
        """What is known of ``path`` is stale (it was written): nothing is kept here."""

    def has_acl(self, path: str) -> bool:
        try:
            os.getxattr(path, "system.posix_acl_access")
            return True
        except OSError:
            return False

    def locked_for_write(self, path: str) -> bool:
        return formats.locked_for_write(path)

    def protocol_driver(self, path: str) -> str:
        """qemu's driver for a path: ``host_device`` for block devices."""
        try:
            return "host_device" if stat.S_ISBLK(os.stat(path).st_mode) else "file"
        except OSError:
            return "file"  # qemu reports the missing file

    # -- block status from the files -------------------------------------------

    def expect(self, keys: list[tuple]) -> None:
        """The layers a scan found (a remote host fetches their status ahead)."""

    def layer_statuses(self, keys: list[tuple]) -> dict[tuple, status.LayerStatus | None]:
        """``(path, fmt, pin)`` -> its status read from the file, or None
        when qemu must be asked (formats/status.py says when)."""
        out = {}
        for key in keys:
            try:
                out[key] = status.layer_status(*key)
            except status.NotPlain as e:
                log.debug("block status of %s: asking qemu (%s)", key[0], e)
                out[key] = None
        return out

    # -- qemu ------------------------------------------------------------------

    def nbd_server(self, spec, rundir: str, ident: int, connections: int):
        from ..nbd.qemu import QemuNBD
        return QemuNBD(spec, rundir, ident, connections)

    def qemu_io(self) -> list[str]:
        """The command that starts a qemu-io reading commands from its stdin
        (unbuffered: ``nbd.heads``)."""
        return ["stdbuf", "-i0", "qemu-io"]

    def reach_socket(self, path: str) -> str:
        """A UNIX socket on the host (a backup job's), as a path here."""
        return path

    def connect(self, socket: str, contexts: tuple[str, ...], export: str):
        from ..nbd.client import Connection  # the one importer of libnbd
        return Connection(socket, contexts, export)


LOCAL = LocalHost()
