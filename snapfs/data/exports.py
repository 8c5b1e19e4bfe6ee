"""Every open file's way to its export: leases on servers, and write sessions.

An open view, map-less ``.raw`` or ``.qcow2``, holds a ``Lease``: the server
its reads go to. A read-only file leases the pool's server of its view's
export; a file opened for writing joins the view's write session
(``writes.py``), and so does every file that reads the view being written
(``rsync --inplace`` reads the file it then writes): their leases move to
the writer. A ``.qcow2`` file also holds its image's layout: no writer may
claim the image until it is closed (``Writes.hold``).

A lease whose server was stopped under it (its export moved to a writer,
or the writer failed to start) is given the server it should use now
(``follow``).
"""

from __future__ import annotations

import contextlib
import errno

import trio

from ..errors import Busy, ImageRefused, Unavailable
from ..nbd.pool import Server, ServerPool
from ..nbd.spec import ExportSpec
from ..views import View
from .maps import Maps
from .writes import Writes, WriteSession

# How long a read waits for its file to move to a writer.
MOVE_WAIT = 5.0


class Lease:
    """An open file's hold on an export.

    server: where its reads (and writes) go; session: the write session it
    reads or writes through (None: a read-only server of the pool).
    writing: opened for writing; wrote: wrote since its last flush.
    qcow2: a ``.qcow2`` file's (it keeps its server: its layout is the image's
    as it was at open); fill: its second server, beneath the view (its FILL
    clusters), if it needs one.
    """

    def __init__(self, view: View, server: Server, session: WriteSession | None = None, writing: bool = False,
                 qcow2: bool = False):
        self.view = view
        self.server = server
        self.session = session
        self.writing = writing
        self.wrote = False
        self.qcow2 = qcow2
        self.fill: Server | None = None
        self._held = contextlib.ExitStack()


class Exports:
    def __init__(self, pool: ServerPool, writes: Writes, maps: Maps):
        self.pool = pool
        self.writes = writes
        self.maps = maps
        self.leases: set[Lease] = set()

    async def _acquire(self, spec: ExportSpec) -> Server:
        await self.writes.check_readable(spec)
        return await self.pool.acquire(spec)

    async def open(self, view: View, writing: bool = False) -> Lease:
        """A lease for a view file: its writer's server, or the pool's read-only one."""
        # The map comes from the read-only export, before a writer claims the image.
        await self.maps.fresh(view)
        if writing:
            session = await self.writes.claim(view)
            lease = Lease(view, session.server, session, writing=True)
            # Files that read this view move to its writer (their server was stopped).
            for other in self.leases:
                if other.session is None and not other.qcow2 and other.server.spec == view.spec:
                    old, other.server, other.session = other.server, session.server, session
                    session.join()
                    self.pool.release(old, linger=False)
        elif (session := self.writes.session(view)) is not None and not session.ending:
            # The view being written is read through its writer.
            session.join()
            lease = Lease(view, session.server, session)
        else:
            lease = Lease(view, await self._first_server(view))
        self.leases.add(lease)
        return lease

    async def _first_server(self, view: View) -> Server:
        """The view's read-only server. When its map came from the files, this may
        be the first time qemu opens its images: if qemu refuses them, the view
        is not servable, and goes (its reason, qemu's, in the status file). A
        server that fails otherwise (a start that timed out, a qemu-nbd killed
        while starting) fails this open only."""
        try:
            return await self._acquire(view.spec)
        except ImageRefused as e:
            raise view.fail(e) from None

    async def open_qcow2(self, view: View, path: str) -> Lease:
        """A lease for a ``.qcow2`` file: its layout is fixed at open, from the view's map then.

        From the first step on, a writer of its image is kept out; once open,
        until it is closed (``path`` says why, to a writer that is refused).
        """
        images = {s.image for s in view.qcow2_specs() if s.socket is None}
        with self.writes.hold(images, f"a .qcow2 file of {view.spec.image} is being opened"):
            m = await self.maps.fresh(view)
            lease = Lease(view, await self._first_server(view), qcow2=True)
            try:
                # A writer that was closing may have stopped meanwhile: its map then was forgotten.
                while view.map is not m or self.writes.stale(view):
                    m = await self.maps.fresh(view)
                if view.qcow2_image().has_fill:
                    spec = view.fill_spec()
                    if spec is None:
                        raise Unavailable(f"{view.layer.path} holds some clusters only in part and the "
                                          "layers beneath it cannot be read: its .qcow2 cannot be composed",
                                          errno.EIO)
                    lease.fill = await self._acquire(spec)
            except BaseException:
                self.pool.release(lease.server)
                raise
            held = {s.spec.image for s in (lease.server, lease.fill) if s is not None and s.spec.socket is None}
            lease._held.enter_context(
                self.writes.hold(held, f"{path} is open: it reads the image as it is until closed"))
        self.leases.add(lease)
        return lease

    async def follow(self, lease: Lease, failed: Server) -> None:
        """``failed`` was stopped under ``lease``: wait for the lease to move to the
        writer of its view; if no writer took the image, lease the read-only server anew."""
        with trio.move_on_after(MOVE_WAIT):
            while lease.server is failed:
                if self.writes.sessions.get(lease.view.spec.image) is None:
                    server = await self._acquire(failed.spec)
                    if lease.server is failed:
                        lease.server = server
                        self.pool.release(failed, linger=False)
                    else:
                        self.pool.release(server)
                    return
                await trio.sleep(0.01)
        if lease.server is failed:
            raise Busy(f"{lease.view.spec.image} is open for writing")

    async def release(self, lease: Lease) -> None:
        self.leases.discard(lease)
        lease._held.close()
        if lease.fill is not None:
            self.pool.release(lease.fill)
        if lease.session is not None:
            await lease.session.release()
        else:
            self.pool.release(lease.server)
