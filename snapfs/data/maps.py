"""A view's extent map, as of now.

A map is read once, on first need, from the export's block status
(``status.py``), and kept for the mount's life; while a write session
writes the view's image, what it changed is spliced in first
(``writes.py``). A view whose map cannot be read is gone: it disappears
from the mount, with its reason in the status file.
"""

from __future__ import annotations

import errno
import logging

import trio

from ..errors import Busy, Gone, SnapfsError, Unavailable
from ..extents import ExtentMap
from ..views import View
from .status import BlockStatus
from .writes import Writes

log = logging.getLogger(__name__)

# Maps read ahead at once. Reading one may start a server, which is mostly
# waiting (for the process, its socket, block status): more than one per
# core (bench-scale: first ls -lR of 1000 disks x 5 layers, 94 s with 2, 68 s with 8).
MAP_PREFETCH = 8


class Maps:
    def __init__(self, status: BlockStatus, writes: Writes):
        self.status = status
        self.writes = writes
        self._locks: dict[View, trio.Lock] = {}  # views whose map is being read
        self._limiter = trio.CapacityLimiter(MAP_PREFETCH)

    async def load(self, view: View) -> ExtentMap:
        """The view's map, read on first use; ``Gone`` (ENOENT) if it cannot be served,
        ``Busy`` while another view writes its image."""
        if view.map is not None:
            return view.map
        if view.problem is not None:
            raise Gone(view.problem)
        lock = self._locks.get(view)
        if lock is None:
            lock = self._locks[view] = trio.Lock()
        try:
            async with lock:
                if view.problem is not None:
                    # Another open waited on the lock while this view failed.
                    raise Gone(view.problem)
                if view.map is None:
                    await self._read(view)
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._locks.pop(view, None)
        return view.map

    async def _read(self, view: View) -> None:
        try:
            for spec in view.specs():
                await self.writes.check_readable(spec)
            view.set_map(await view.read_runs(self.status))
        except Busy:
            raise  # not now: the image is being written
        except Unavailable as e:
            if view.mutable and e.errno == errno.EBUSY:
                # A --rw mount: another program holds the image; not for ever.
                raise Busy(e.reason) from None
            raise Gone(view.fail(e).reason) from None
        except SnapfsError as e:
            raise Gone(view.fail(e).reason) from None

    async def fresh(self, view: View) -> ExtentMap:
        """The view's map, up to date with what its writer changed."""
        if self.writes.stale(view):
            session = self.writes.session(view)
            if session is not None and session.files:
                try:
                    m = await session.refresh(view)
                    if m is not None:
                        return m
                except Unavailable:
                    raise
                except Exception as e:
                    log.warning("%s: map not brought up to date (%s): it is read again", view.filename, e)
            view.forget_map()
        return await self.load(view)

    def prefetch(self, views, spawn) -> None:
        """Read the maps of ``views`` ahead, a few at a time, in tasks ``spawn`` starts.

        ``ls -l`` stats every entry of a folder one after the other, and each
        stat of a view needs its map: reading them while the kernel is busy
        saves a server start's latency per view.
        """
        for view in views:
            if view.map is None and view.problem is None:
                spawn(self._load_quietly, view)

    async def _load_quietly(self, view: View) -> None:
        async with self._limiter:
            try:
                await self.load(view)
            except (Unavailable, Busy):
                pass  # hidden now, its reason in the status file; or being written
            except Exception:
                log.exception("reading the map of %s failed", view.filename)
