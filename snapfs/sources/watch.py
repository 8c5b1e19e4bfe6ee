"""``--watch``: an image directory scanned again by itself when images change.

inotify watches every directory under the root (libc through ctypes);
after each burst of events, and again while a changed disk waits for its
files to close, the mount's refresh runs (``fs/control.py``).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os

import trio

from ..errors import ControlError

log = logging.getLogger(__name__)

# inotify(7): what changes an image directory's disks. Opens for reading
# (qemu-nbd's) and writes still going on are not events: a tool's close is.
_IN_ATTRIB, _IN_CLOSE_WRITE, _IN_MOVED_FROM, _IN_MOVED_TO = 0x4, 0x8, 0x40, 0x80
_IN_CREATE, _IN_DELETE, _IN_DELETE_SELF, _IN_MOVE_SELF = 0x100, 0x200, 0x400, 0x800
_IN_ONLYDIR = 0x01000000
WATCH_EVENTS = (_IN_ATTRIB | _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE
                | _IN_DELETE_SELF | _IN_MOVE_SELF)
WATCH_QUIET = 1.0  # seconds without events before a rescan (qemu-img create -b writes twice)
WATCH_RETRY = 2.0  # seconds between rescans while files of changed disks are open


class Inotify:
    """An inotify instance watching every directory under a root (libc through ctypes)."""

    def __init__(self, root: str):
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.root = root
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}"
                          + (" (fs.inotify.max_user_instances reached)" if err == errno.EMFILE else ""))
        self.unwatched: dict[str, str] = {}
        self.add_all()

    def add_all(self) -> None:
        """Watch the root and every directory under it (new ones before each rescan)."""
        self.unwatched = {}
        for dirpath, dirnames, _ in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
            if self._libc.inotify_add_watch(self.fd, os.fsencode(dirpath), WATCH_EVENTS | _IN_ONLYDIR) < 0:
                err = ctypes.get_errno()
                self.unwatched[dirpath] = os.strerror(err) + (
                    " (fs.inotify.max_user_watches reached)" if err == errno.ENOSPC else "")

    def drain(self) -> bool:
        """Read every pending event; True if there was any."""
        got = False
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return got
            got = got or bool(data)
            if not data:
                return got

    async def wait(self) -> None:
        await trio.lowlevel.wait_readable(self.fd)
        self.drain()

    def close(self) -> None:
        os.close(self.fd)


async def watch_images(watch: Inotify, refresh, pending, set_notes) -> None:
    """Scan again after each burst of changes.

    refresh: ``await refresh()`` scans the directory again and lays out what
    changed (``ControlError`` when some disks wait for their files);
    pending: ``pending()`` is true while such disks wait: they are tried
    again every WATCH_RETRY seconds until their files are closed;
    set_notes: ``set_notes(notes)`` puts what is not watched in the status file.
    A rescan waits for WATCH_QUIET seconds without events.
    """
    log.info("watching %s for changes", watch.root)
    last: list[str] = []

    def report():
        nonlocal last
        notes = []
        if watch.unwatched:
            path, why = next(iter(watch.unwatched.items()))
            notes.append(f"--watch: {len(watch.unwatched)} directory(ies) not watched, changes there "
                         f"need snapfs refresh: {path}: {why}")
            if notes != last:
                log.warning("%s", notes[0])
        last = notes
        set_notes(notes)

    report()
    try:
        while True:
            if pending():
                with trio.move_on_after(WATCH_RETRY):
                    await watch.wait()
            else:
                await watch.wait()
            while True:
                with trio.move_on_after(WATCH_QUIET) as quiet:
                    await watch.wait()
                if quiet.cancelled_caught:
                    break
            # New directories are watched before the scan: nothing made in them is missed.
            await trio.to_thread.run_sync(watch.add_all)
            report()
            try:
                await refresh()
            except ControlError as e:
                log.info("%s", e)
            except Exception:
                log.exception("rescan of %s failed", watch.root)
    finally:
        watch.close()
