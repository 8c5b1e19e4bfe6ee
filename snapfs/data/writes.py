"""Write sessions: a writer's whole life, from the claim of its image to the last close.

A ``--rw`` mount writes a disk's top image through a writable qemu-nbd
(docs/views.md, "Writable mounts"). One ``WriteSession`` per image being
written owns all of it:

1. *claim*: an image has at most one session; qemu's image locking lets no
   reader beside a writer, so the read-only servers of the image are
   stopped first (an open answers EBUSY while a file of another view keeps
   one in use, or while a ``.qcow2`` file reads the image: its layout must
   stay true until it is closed: ``hold``);
2. *write*: writes, zero requests and flushes go to its server; each marks
   the area it touched on the views the session writes, grown to 2 MiB, the
   largest qcow2 cluster;
3. *refresh*: the next use of such a view's map reads the block status of
   the marked areas from the writer and splices it in (``refresh``);
4. *release*: when its last file closes, the maps are made true, the server
   stops (its exit flushes qcow2's caches and frees the lock), and every
   other view of the image forgets its map and the image's block status is
   forgotten (``_invalidate``).

While a session holds an image, every other export of it answers EBUSY
(``check_readable``), after a short wait for a session whose files were
all flushed (``close()`` sends FLUSH, and RELEASE arrives after ``close()``
returns). Nothing else changes a session's state or its server's.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import weakref
from typing import Callable, Iterable

import trio

from .. import extents as ex
from ..errors import Busy, SnapfsError, TransportError
from ..nbd.pool import Server, ServerPool
from ..nbd.spec import ExportSpec
from ..views import View
from .status import BlockStatus

log = logging.getLogger(__name__)

# How long an open waits for files of other views of its image to be
# released (the kernel sends RELEASE after close() returns).
RELEASE_WAIT = 1.0
# How long an open waits for a writer whose files are closed to stop (it flushes).
WRITER_STOP_WAIT = 30.0
# Areas a writer changed are read again in these steps (the largest qcow2 cluster).
STALE_ALIGN = 2 << 20
# One NBD zero request at most (its length is 32 bits).
ZERO_STEP = 1 << 30
# Writes in flight per image, acknowledged to the writer when sent (each
# waits for its answer on one of the server's connections, 4 by default).
WRITE_BEHIND = 4


class WriteSession:
    """One image being written (see the module's docstring).

    spec: the writable export; server: its server while the session runs.
    files: the open files that read or write through it.
    closing: every file was flushed and nothing written since (their
    RELEASE is probably on its way). changed: the image took writes.
    """

    def __init__(self, writes: Writes, spec: ExportSpec):
        self.spec = spec
        self.image = spec.image
        self.server: Server | None = None
        self.files = 0
        self.closing = False
        self.changed = False
        self.ending = False  # its last file closed: it is stopping
        self.ended = trio.Event()  # set once its server has stopped
        self.views: list[View] = []  # the views it writes: those of its export
        self._writes = writes
        self._stale: dict[View, list[ex.Run]] = {}
        self._refreshing: dict[View, int] = {}
        self._locks: weakref.WeakKeyDictionary[View, trio.Lock] = weakref.WeakKeyDictionary()
        # Writes queued (``pwrite``): their areas by number (in the order
        # queued), room for more, those that failed, to write again.
        self._seq = 0
        self._inflight: dict[int, tuple[int, int]] = {}
        self._answered = trio.Event()  # set (and replaced) as each is answered
        self._room = trio.Semaphore(WRITE_BEHIND)
        self._failed: list[tuple[int, bytes]] = []  # (offset, data)
        self._settling = trio.Lock()

    def join(self) -> None:
        """One more file reads or writes through this session (``release`` when it closes)."""
        self.files += 1

    # -- the writer's requests ----------------------------------------------------

    def _mark(self, start: int, end: int) -> None:
        """``[start, end)`` changed: its block status is read again before a map's next use."""
        a = start - start % STALE_ALIGN
        for view in self.views:
            b = min(view.size, -(-end // STALE_ALIGN) * STALE_ALIGN)
            ex.add_run(self._stale.setdefault(view, []), a, b - a, 1)

    async def pwrite(self, buf, offset: int) -> None:
        """Queue a write: it returns once the write is sent, while up to
        ``WRITE_BEHIND`` are in flight (a writer's next write travels while
        qemu-nbd does the last one). A queued write that failed is kept and
        written again before any later write is queued, and before a zero
        request, a flush or a read beside the writer; while it still fails,
        so do they, with its error (``settle``).
        """
        if self.server is not None and self.server.dead is not None:
            raise TransportError(self.server.dead, errno.EIO)  # a writer that died: never queued
        end = offset + len(buf)
        while True:
            if self._failed:
                await self.settle()
                continue
            if self._overlaps(offset, end):
                await self.drain()  # NBD does not order requests in flight: overlapping ones wait
                continue
            await self._room.acquire()
            # Checked again with no checkpoint before the write is in flight:
            # one that failed, or an overlapping one queued, while this waited.
            if self._failed or self._overlaps(offset, end):
                self._room.release()
                continue
            break
        self.closing = False
        self.changed = True
        self._mark(offset, end)
        self._seq += 1
        token = self._seq
        self._inflight[token] = (offset, end)
        if not self._writes.pool.spawn(self._write, token, buf, offset):
            await self._write(token, buf, offset)  # the pool stops: no background
            await self.settle()

    def _overlaps(self, start: int, end: int) -> bool:
        return any(a < end and start < b for a, b in self._inflight.values())

    async def _write(self, token: int, buf, offset: int) -> None:
        try:
            await self.server.pwrite(buf, offset)
        except SnapfsError:
            # Written again before the writer's next request, which reports
            # (and logs) why it fails while it does.
            self._failed.append((offset, buf))
        except Exception:  # a background task: never ends the mount
            log.exception("%s: a write of %d bytes at %d failed", self.image, len(buf), offset)
            self._failed.append((offset, buf))
        except BaseException:  # cancelled (the mount ends), interrupted: kept, and on its way
            self._failed.append((offset, buf))
            raise
        finally:
            # Marked again once answered: a map refreshed while it was in
            # flight may not have seen it.
            self._mark(offset, offset + len(buf))
            del self._inflight[token]
            self._room.release()
            self._answered.set()
            self._answered = trio.Event()

    async def drain(self) -> None:
        """Wait until the writes queued before this call were answered (before
        what must see them: a read, block status); writes queued later do not
        hold it up."""
        upto = self._seq
        while any(token <= upto for token in self._inflight):
            await self._answered.wait()

    async def settle(self) -> None:
        """The writes queued before answered, and those that failed written
        again, in order: their error (ENOSPC, EIO) if one still fails. Before
        a write is queued, and before a zero request, a flush or a read
        beside the writer: nothing a writer was told is written is lost
        without its next request failing, and a host disk whose space was
        freed takes them (as a block device would)."""
        await self.drain()
        async with self._settling:  # one at a time: each kept write is sent once
            while self._failed:
                item = self._failed[0]
                offset, buf = item
                try:
                    await self.server.pwrite(buf, offset)
                except SnapfsError as e:
                    raise SnapfsError(f"a write of {len(buf)} bytes at {offset} queued before failed: "
                                      f"{e.reason}", e.errno) from None
                finally:
                    self._mark(offset, offset + len(buf))
                self._failed.remove(item)

    async def pread(self, length: int, offset: int):
        """A read beside the writer: after the writes queued before it (and those
        that failed, written again)."""
        await self.settle()
        return await self.server.pread(length, offset)

    async def zero(self, start: int, end: int) -> None:
        await self.settle()
        self.closing = False
        self.changed = True
        try:
            for pos in range(start, end, ZERO_STEP):
                await self.server.zero(min(ZERO_STEP, end - pos), pos)
        finally:
            self._mark(start, end)

    async def flush(self, view: View, wrote: bool) -> None:
        """``fsync``, and ``close()`` (FLUSH): durable; what other views show is true
        from when it returns (RELEASE arrives later)."""
        await self.settle()
        await self.server.flush()
        self.closing = True
        if wrote:
            await self.refresh(view)
            self._invalidate(keep_written=True)

    # -- maps ---------------------------------------------------------------------

    def stale(self, view: View) -> bool:
        """Areas written are not in the view's map yet (or are being read)."""
        return bool(self._stale.get(view)) or self._refreshing.get(view, 0) > 0

    async def refresh(self, view: View) -> ex.ExtentMap | None:
        """Bring the view's map up to date: the block status of what changed, from the writer."""
        self._refreshing[view] = self._refreshing.get(view, 0) + 1
        try:
            await self.drain()  # the writes queued are in the block status
            lock = self._locks.setdefault(view, trio.Lock())
            async with lock:
                areas: list[ex.Run] = []
                for a, n, flags in sorted(self._stale.pop(view, [])):
                    ex.add_run(areas, a, n, flags)
                if areas and view.runs is not None:
                    try:
                        runs = view.runs
                        for a, n, _ in areas:
                            new = await self.server.block_status(view.size, a, a + n)
                            runs = {ctx: ex.splice_runs(r, a, a + n, new[ctx]) for ctx, r in runs.items()}
                        view.set_map(runs)
                    except BaseException:
                        self._stale[view] = areas + self._stale.get(view, [])
                        raise
        finally:
            self._refreshing[view] -= 1
            if not self._refreshing[view]:
                del self._refreshing[view]
        return view.map

    def _invalidate(self, keep_written: bool) -> None:
        """The image changed: every other view reading it forgets its map (and the
        image's block status is forgotten), and takes the image's mtime.

        keep_written: the views this session writes keep theirs, kept true
        write by write. Once the writer has stopped, they forget theirs too:
        qemu reports the allocation of a cluster written in part (its
        copy-on-write zeros) once the image is closed as it does for the
        image at rest, which may differ in detail from what it said while writing.
        """
        self._writes.status.forget(self.image)
        mtime = None
        for view in self._writes.views():
            if not view.mutable or not any(s.socket is None and s.image == self.image for s in view.specs()):
                continue
            if view.layer.path == self.image:
                if mtime is None:
                    try:
                        view.layer.host.forget(self.image)
                        mtime = view.layer.host.stat(self.image).st_mtime_ns
                    except OSError:
                        mtime = view.layer.mtime_ns
                view.layer.mtime_ns = mtime
            if keep_written and view.spec.for_writing() == self.spec and view.map is not None \
                    and not self.stale(view):
                continue
            view.forget_map()
            self._stale.pop(view, None)

    # -- the end ------------------------------------------------------------------

    async def release(self) -> None:
        """One file less; the last one's close ends the session."""
        self.files -= 1
        if self.files:
            return
        await self.drain()
        for view in [v for v in self.views if self.stale(v)]:
            # The last file of the writer: its map is made true before it stops.
            try:
                await self.refresh(view)
            except Exception as e:
                log.warning("%s: map not brought up to date (%s): it is read again", view.filename, e)
                view.forget_map()
        if self.files:
            return  # opened again meanwhile: it goes on serving
        if self._failed:
            # Their error reached the writer's flush (close): they are given up.
            log.info("%s: %d failed write(s) given up (the first: %d bytes at %d): the last file "
                     "writing the image closed", self.image, len(self._failed), len(self._failed[0][1]),
                     self._failed[0][0])
            self._failed.clear()
        # From here on, opens of other views of the image wait for the writer
        # to stop (check_readable); end() then tells every view of it.
        self.ending = True
        await self._writes.end(self)


class Writes:
    """Every write session of a mount, by image.

    views: every view of the mount now (the catalog's), for the views a
    session writes and those it invalidates.
    """

    def __init__(self, pool: ServerPool, status: BlockStatus, views: Callable[[], Iterable[View]]):
        self.pool = pool
        self.status = status
        self.views = views
        self.sessions: dict[str, WriteSession] = {}
        self._held: dict[str, list[str]] = {}  # image -> why its layout must stay (.qcow2 files)

    def session(self, view: View) -> WriteSession | None:
        """The session writing through ``view``'s own export, if any."""
        s = self.sessions.get(view.spec.image)
        return s if s is not None and s.spec == view.spec.for_writing() else None

    def stale(self, view: View) -> bool:
        s = self.sessions.get(view.spec.image)
        return s is not None and s.stale(view)

    async def _other_writer(self, image: str, spec: ExportSpec) -> WriteSession | None:
        """The session writing ``image`` through another export than ``spec``, once
        one whose files are all closed has stopped.

        The kernel sends RELEASE after close() returns, so a reader opening
        right after ``cp`` finished may find the writer's files still open:
        it gets RELEASE_WAIT for them to close (once they were flushed and
        nothing was written since: ``closing``).
        """
        deadline = trio.current_time() + WRITER_STOP_WAIT
        grace = trio.current_time() + RELEASE_WAIT
        while True:
            s = self.sessions.get(image)
            if s is None or s.spec == spec:
                return None
            now = trio.current_time()
            if s.files and (now > grace or not s.closing) or now > deadline:
                return s
            await trio.sleep(0.01)  # it is stopping

    async def check_readable(self, spec: ExportSpec) -> None:
        """Busy while the image this export reads is being written through another export."""
        if self.sessions and spec.socket is None and await self._other_writer(spec.image, spec) is not None:
            raise Busy(f"{spec.image} is open for writing; try again once it is closed")

    def _check_held(self, image: str) -> None:
        held = self._held.get(image)
        if held:
            raise Busy(held[-1])

    @contextlib.contextmanager
    def hold(self, images: Iterable[str], reason: str):
        """Keep writers of ``images`` out while the block runs (a ``.qcow2`` file
        whose layout must stay true); an open for writing answers EBUSY with ``reason``."""
        images = set(images)
        for image in images:
            self._held.setdefault(image, []).append(reason)
        try:
            yield
        finally:
            for image in images:
                self._held[image].remove(reason)
                if not self._held[image]:
                    del self._held[image]

    async def claim(self, view: View) -> WriteSession:
        """The session writing through ``view``, claimed and started, with one file more.

        The read-only servers of the image are stopped (EBUSY while a file of
        another view keeps one in use); files of the view's own export move
        to the writer (``Exports``).
        """
        spec = view.spec.for_writing()
        image = spec.image
        self._check_held(image)
        if await self._other_writer(image, spec) is not None:
            raise Busy(f"{image} is open for writing through another view")
        session = self.sessions.get(image)
        if session is not None and session.ending:
            await session.ended.wait()
            session = self.sessions.get(image)
        if session is None:
            session = self.sessions[image] = WriteSession(self, spec)
            session.views = [v for v in self.views() if v.spec.for_writing() == spec]
            try:
                await self._evict(image, adopt=view.spec)
                session.server = await self.pool.acquire(spec)
                # A .qcow2 open that began while the writer was claimed.
                self._check_held(image)
            except BaseException:
                await self.end(session)
                raise
        else:
            self._check_held(image)
        session.join()
        session.closing = False
        return session

    async def _evict(self, image: str, adopt: ExportSpec) -> None:
        """Stop every read-only server of ``image``, after a moment for those other
        than ``adopt``'s (whose files move to the writer) to be unused; Busy if
        one stays in use."""
        def busy():
            return [s for s in self.pool.reading(image) if s.users and s.spec != adopt]
        with trio.move_on_after(RELEASE_WAIT):
            while busy():
                await trio.sleep(0.02)
        if busy():
            raise Busy(f"{image} is open for reading ({busy()[0].spec.describe()}); close it first")
        for s in self.pool.reading(image):
            await self.pool.stop(s, retire=True)

    async def end(self, session: WriteSession) -> None:
        """Stop the session's server, free the image, and tell every view that reads it."""
        try:
            if session.server is not None:
                self.pool.release(session.server)
                try:
                    await self.pool.stop(session.server)
                except Exception:
                    log.exception("stopping qemu-nbd for %s failed", session.spec.describe())
                session.server = None
        finally:
            if self.sessions.get(session.image) is session:
                del self.sessions[session.image]
            session.ended.set()
        if session.changed:
            session.changed = False
            session._invalidate(keep_written=False)
