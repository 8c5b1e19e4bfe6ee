"""Every error snapfs raises, grouped by what the caller can do next.

::

    SnapfsError                    message for users, errno for the kernel
    ├── UserError                  the command cannot go on: say why, exit 1
    │   ├── MountError             a mount (or umount) that cannot be made
    │   ├── SourceError            libvirt: unknown domain, bad option...
    │   ├── BackupError            libvirt refused the backup job
    │   └── ControlError           a ``snapfs refresh`` that failed
    ├── Unavailable                this export or view cannot be served: the
    │   │                          view disappears, its reason goes to the
    │   │                          status file
    │   ├── ImageRefused           qemu itself refused to open the image (its
    │   │                          message): the view goes at its first open
    │   └── Gone                   ... and a lookup or open of it: ENOENT
    ├── Refused                    this request is not allowed; nothing else
    │   │                          is wrong (a seek past the data: ENXIO)
    │   └── Busy                   ... not now: the image is open for writing,
    │                              or held by another program (EBUSY)
    └── TransportError             an NBD request failed: libnbd's errno;
                                   to a read-only export, a lost connection,
                                   a socket gone or a server that fails to
                                   restart is asked again within
                                   --retry-timeout, then EIO (a server that
                                   hangs up on the request itself: at once)

Requests a mount never serves (writes to a read-only mount: EROFS, to a
view that is not writable: EACCES) are answered by the handlers themselves.
Anything else reaching the FUSE boundary is a bug: ``fuse_errno`` logs it
once with its traceback and answers EIO, so one bad image never takes the
mount down. This module is pure: it imports neither pyfuse3 nor libnbd.
"""

from __future__ import annotations

import errno
import logging

log = logging.getLogger(__name__)


class SnapfsError(Exception):
    """Base of snapfs's errors: ``str(e)`` is for users, ``errno`` for the kernel."""

    default_errno = errno.EIO

    def __init__(self, message: str, err: int | None = None):
        super().__init__(message)
        self.errno = err or self.default_errno

    @property
    def reason(self) -> str:
        return str(self)


class UserError(SnapfsError):
    """The command cannot go on; the message says why (exit 1, no traceback)."""


class MountError(UserError):
    """A mount that cannot be made (or unmounted)."""


class SourceError(UserError):
    """A libvirt source that cannot be mounted."""


class BackupError(UserError):
    """No backup job could be started."""


class ControlError(UserError):
    """A control request (``snapfs refresh``) that failed."""


class Unavailable(SnapfsError):
    """An export or view that cannot be served (qemu-nbd refused the image...)."""


class ImageRefused(Unavailable):
    """qemu-nbd exited at start with qemu's own refusal of the image."""


class Gone(Unavailable):
    """A view that turned out unservable, looked up again: it is no longer there."""

    default_errno = errno.ENOENT

    def __init__(self, message: str):
        super().__init__(message, errno.ENOENT)


class Refused(SnapfsError):
    """A request the view does not allow (writes to a read-only mount...)."""

    default_errno = errno.EPERM


class Busy(Refused):
    """The image is open for writing through another view, or held by another program."""

    default_errno = errno.EBUSY


class TransportError(SnapfsError):
    """A failed NBD operation; ``errno`` is what the file system returns."""

    def __init__(self, message: str, err: int | str | None = None):
        # libnbd's Python errors carry the errno as a name ("ENOTCONN").
        if isinstance(err, str):
            err = getattr(errno, err, None)
        super().__init__(message, err)

    @property
    def disconnected(self) -> bool:
        """The connection is gone (the server died or dropped it): retry elsewhere."""
        return self.errno in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ESHUTDOWN,
                              errno.ECONNREFUSED)


def fuse_errno(exc: BaseException, what: str) -> int:
    """The errno a FUSE request answers for ``exc``; a bug is logged once, as EIO.

    what: the request, for the log (``read(3, 0)``).
    """
    if isinstance(exc, SnapfsError):
        log.debug("%s: %s", what, exc)
        return exc.errno
    log.error("unexpected error in %s", what, exc_info=exc)
    return errno.EIO
