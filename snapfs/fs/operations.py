"""The FUSE request handlers: thin, over the tree, the views and the server pool.

Every handler goes through ``_boundary``, the one place where errors become
errnos (``errors.fuse_errno``): snapfs's own errors carry theirs (libnbd's
passes through), anything unexpected is logged once with its traceback and
becomes EIO, so one bad image never takes the mount down. Attributes
(owner, group, mode, sizes) come from ``attrs.py``.

Writes (``--rw`` mounts, docs/views.md "Writable mounts"): a writable view's
opens for writing share one writable export of its image (``ServerPool.
acquire_writer``); a write, a zeroing ``fallocate``, ``O_TRUNC`` and
``truncate(0)`` go to it as NBD writes and zero requests, ``fsync`` and
``close`` as an NBD flush. What they changed is marked on the view and its
map is brought up to date before its next use (``View.refresh``). Anything a
view does not allow is refused with the spec's errno, and the reason goes to
the log and the status file (``Status.refuse``).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import logging
import os

import pyfuse3
import trio

from ..errors import Busy, Refused, SnapfsError, Unavailable, fuse_errno
from ..nbd.pool import Server, ServerPool
from .attrs import Attributes
from .tree import Directory, MapFile, Node, Qcow2File, Status, StatusFile, Tree, ViewFile, ViewNode

log = logging.getLogger(__name__)

HAS_LSEEK = hasattr(pyfuse3.Operations, "lseek")

# fallocate(2) modes (linux/falloc.h).
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
# One NBD zero request at most (its length is 32 bits).
ZERO_STEP = 1 << 30
# A read waits this many 10 ms steps for its file to move to a writer.
MOVE_WAIT_STEPS = 500

# Zero replies share one buffer: FUSE takes any buffer, and most zero
# requests are a whole 1 MiB request (or less).
_ZEROS = memoryview(bytes(1 << 20))


def _zeros(length: int):
    return _ZEROS[:length] if length <= len(_ZEROS) else bytes(length)


@contextlib.contextmanager
def _counted(counts: dict, keys):
    """Count ``keys`` in ``counts`` while the block runs (opens under way)."""
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    try:
        yield
    finally:
        for k in keys:
            counts[k] -= 1
            if not counts[k]:
                del counts[k]


def _boundary(fn):
    @functools.wraps(fn)
    async def wrapper(self, *args):
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except Exception as e:
            raise pyfuse3.FUSEError(fuse_errno(e, f"{fn.__name__}{args[:2]!r}")) from None
    return wrapper


class Handle:
    """An open file: the node, and the server (views) or the content (maps, status).

    writing: opened for writing (``server`` is then the writable export).
    qcow2: a ``.qcow2`` file's layout, as it was at open; ``fill`` is the
    server its FILL clusters read from (beneath the view).
    """

    def __init__(self, node: Node, server: Server | None = None, data: bytes | None = None,
                 writing: bool = False, qcow2=None, fill: Server | None = None, qcow2_map=None):
        self.node = node
        self.server = server
        self.data = data
        self.writing = writing
        self.wrote = False  # changed the image since the last flush
        self.qcow2 = qcow2
        self.fill = fill
        self.qcow2_map = qcow2_map  # the map the layout was made from


class Operations(pyfuse3.Operations):
    # Lookups of "." and ".." are for NFS exports, which snapfs does not offer.
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, tree: Tree, pool: ServerPool, status: Status):
        super().__init__()
        self.tree = tree
        self.pool = pool
        self.status = status
        self.attrs = Attributes(tree, pool, status)
        self._handles: dict[int, Handle] = {}
        self._qcow2_opening: dict[str, int] = {}  # image -> .qcow2 opens on their way
        self._opening: dict[str, int] = {}  # disk relpath -> opens on their way (snapfs refresh)
        self._fh = itertools.count(1)
        pool.on_written = self._written

    def open_files(self, prefix: str) -> int:
        """How many files of the disk ``prefix``, or of disks under ``prefix/``, are open
        (or being opened)."""
        def under(rel):
            return rel == prefix or rel.startswith(prefix + "/")
        return (sum(1 for h in self._handles.values() if isinstance(h.node, ViewNode)
                    and under(h.node.view.disk.relpath))
                + sum(n for rel, n in self._opening.items() if under(rel)))

    # -- attributes -------------------------------------------------------

    def _node(self, inode: int) -> Node:
        node = self.tree.nodes.get(inode)
        if node is None or node.hidden:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    @_boundary
    async def lookup(self, parent_inode, name, ctx=None):
        parent = self._node(parent_inode)
        if not isinstance(parent, Directory):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        node = parent.children.get(os.fsdecode(name))
        if node is None or node.hidden:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.attrs.get(node)

    @_boundary
    async def getattr(self, inode, ctx=None):
        return await self.attrs.get(self._node(inode))

    async def forget(self, inode_list):
        pass  # inodes live as long as the mount

    # -- directories ------------------------------------------------------

    @_boundary
    async def opendir(self, inode, ctx):
        if not isinstance(self._node(inode), Directory):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @_boundary
    async def readdir(self, fh, start_id, token):
        node = self._node(fh)
        if start_id == 0:
            self.attrs.prefetch_maps(node)
        entries = sorted(node.children.items())
        for i, (name, child) in enumerate(entries[start_id:], start_id):
            if child.hidden:
                continue
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self.attrs.quick(child), i + 1):
                break

    async def releasedir(self, fh):
        pass

    # -- files ------------------------------------------------------------

    def _refuse(self, node: Node, err: int, reason: str):
        """Refuse a request: the reason to the log and the status file, the errno to the caller."""
        self.status.refuse(node.path, reason)
        raise pyfuse3.FUSEError(err)

    def _writable_view(self, node: Node):
        """The view of a node opened or truncated for writing, or the refusal."""
        if not self.tree.writable:
            raise pyfuse3.FUSEError(errno.EROFS)
        if not isinstance(node, ViewFile):
            self._refuse(node, errno.EACCES, "maps, .qcow2 files and the status file are read-only "
                         "(restore through the view's .raw file)")
        refusal = node.view.write_refusal()
        if refusal is not None:
            self._refuse(node, *refusal)
        return node.view

    @_boundary
    async def open(self, inode, flags, ctx):
        node = self._node(inode)
        with _counted(self._opening, [node.view.disk.relpath] if isinstance(node, ViewNode) else []):
            return await self._open(node, flags)

    async def _open(self, node: Node, flags: int):
        if isinstance(node, Directory):
            raise pyfuse3.FUSEError(errno.EISDIR)
        writing = flags & os.O_ACCMODE != os.O_RDONLY
        view = self._writable_view(node) if writing else None
        fh = next(self._fh)
        if isinstance(node, MapFile):
            self._handles[fh] = Handle(node, data=await self.attrs.map_content(node))
            return pyfuse3.FileInfo(fh=fh, keep_cache=not node.view.mutable)
        if isinstance(node, StatusFile):
            self._handles[fh] = Handle(node, data=self.status.render())
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        if isinstance(node, Qcow2File):
            return await self._open_qcow2(fh, node)
        view = node.view
        try:
            # The map comes from the read-only export, before a writer claims the image.
            await self.attrs.fresh_map(view)
            if writing:
                self._check_no_qcow2(view.spec.image)
                server = await self.pool.acquire_writer(view.spec.for_writing(), adopt=view.spec)
                try:
                    # A .qcow2 open that began while the writer was claimed.
                    self._check_no_qcow2(view.spec.image)
                except Busy:
                    self.pool.release(server)
                    raise
                # Files that read this view move to its writer (rsync --inplace
                # reads the file it then writes).
                for other in self._handles.values():
                    if other.server is not None and other.qcow2 is None and other.server.spec == view.spec:
                        old, other.server = other.server, server
                        server.users += 1
                        self.pool.release(old, linger=False)
            else:
                # The view being written is read through its writer.
                spec = view.spec.for_writing() if self.pool.writers.get(view.spec.image) \
                    == view.spec.for_writing() else view.spec
                server = await self.pool.acquire(spec)
        except (Refused, Unavailable) as e:
            if e.errno == errno.EBUSY or writing:
                self._refuse(node, e.errno, e.reason)
            raise
        h = self._handles[fh] = Handle(node, server=server, writing=writing)
        if writing:
            server.closing = False
        if writing and flags & os.O_TRUNC:
            h.wrote = True
            # libfuse sends O_TRUNC inside OPEN (atomic_o_trunc), not as a SETATTR.
            try:
                await self._truncate(node, view, server)
            except BaseException:
                del self._handles[fh]
                self.pool.release(h.server)
                raise
        # Direct I/O: reads arrive at the size the reader asks for (cp and
        # cat ask st_blksize, 4 MiB, sent as four 1 MiB requests at once)
        # instead of the page cache's 128 KiB readahead pieces, and copying
        # a mostly empty 8 GiB view does not fill the page cache with zeros.
        # The chunk cache serves repeated reads.
        return pyfuse3.FileInfo(fh=fh, direct_io=True)

    def _check_no_qcow2(self, image: str) -> None:
        """Busy while a ``.qcow2`` reads ``image`` (or is being opened on it):
        its layout must stay true until it is closed."""
        if self._qcow2_opening.get(image):
            raise Busy(f"a .qcow2 file of {image} is being opened")
        for h in self._handles.values():
            if h.qcow2 is not None and any(s is not None and s.spec.socket is None and s.spec.image == image
                                           for s in (h.server, h.fill)):
                raise Busy(f"{h.node.path} is open: it reads the image as it is until closed")

    async def _open_qcow2(self, fh: int, node: Qcow2File):
        """A ``.qcow2`` file: its layout is fixed at open, from the view's map then.

        From the first step on, a writer of its image is kept out (``_check_no_qcow2``).
        """
        view = node.view
        with _counted(self._qcow2_opening, {s.image for s in view.qcow2_specs() if s.socket is None}):
            return await self._open_qcow2_counted(fh, node, view)

    async def _open_qcow2_counted(self, fh: int, node: Qcow2File, view):
        try:
            m = await self.attrs.fresh_map(view)
            server = await self.pool.acquire(view.spec)
            # A writer that was closing may have stopped meanwhile: its map then was forgotten.
            try:
                while view.map is not m or view.stale:
                    m = await self.attrs.fresh_map(view)
            except BaseException:
                self.pool.release(server)
                raise
            image = view.qcow2_image()
            fill = None
            try:
                if image.has_fill:
                    spec = view.fill_spec()
                    if spec is None:
                        raise Unavailable(f"{view.layer.path} holds some clusters only in part and the "
                                          "layers beneath it cannot be read: its .qcow2 cannot be composed",
                                          errno.EIO)
                    fill = await self.pool.acquire(spec)
            except BaseException:
                self.pool.release(server)
                raise
        except (Refused, Unavailable) as e:
            if e.errno in (errno.EBUSY, errno.EIO):
                self._refuse(node, e.errno, e.reason)
            raise
        self._handles[fh] = Handle(node, server=server, qcow2=image, fill=fill, qcow2_map=m)
        # Direct I/O as for the view: cp's 4 MiB reads arrive whole.
        return pyfuse3.FileInfo(fh=fh, direct_io=True)

    async def _read_qcow2(self, h: Handle, off: int, size: int):
        view = h.node.view
        parts = []
        for p in h.qcow2.pieces(off, size):
            if p.meta is not None:
                parts.append(p.meta)
                continue
            n = max(0, min(p.length, view.size - p.start))
            if n and p.fill:
                parts.append(await h.fill.pread(n, p.start))
            elif n:
                parts.append(await self._read(h, h.server, p.start, n, h.qcow2_map))
            if n < p.length:
                parts.append(_zeros(p.length - n))  # the last cluster, past the guest's end
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)

    async def _map(self, h: Handle):
        """The open view's map, up to date with what its writer changed."""
        view = h.node.view
        if view.stale and h.server.spec.writable:
            await view.refresh(h.server)
        if view.map is None or view.stale:
            # Forgotten: the image was written through another view.
            return await self.attrs.fresh_map(view)
        return view.map

    @_boundary
    async def read(self, fh, off, size):
        h = self._handles[fh]
        if h.data is not None:
            return h.data[off:off + size]
        if h.qcow2 is not None:
            return await self._read_qcow2(h, off, size)
        for _ in range(MOVE_WAIT_STEPS):
            srv = h.server
            try:
                return await self._read(h, srv, off, size)
            except Busy:
                # Its view is being opened for writing: the file moves to the writer.
                if h.server is srv and self.pool.writers.get(srv.spec.image) != srv.spec.for_writing():
                    raise
                await trio.sleep(0.01)
        raise pyfuse3.FUSEError(errno.EBUSY)

    async def _read(self, h: Handle, srv: Server, off: int, size: int, m=None):
        view = h.node.view
        if m is None:
            m = await self._map(h)
        if srv.spec.writable:
            # No chunk cache beside a writer: every read asks the image.
            parts = [_zeros(length) if zero else await srv.pread(length, start)
                     for start, length, zero in m.pieces(off, size)]
        else:
            chunks = srv.chunks(view.size)
            parts = []
            for start, length, zero in m.pieces(off, size):
                # Zero and hole areas come from the extent map, not the server.
                parts.append(_zeros(length) if zero else await chunks.read(start, length, m))
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)  # join takes memoryviews too

    @_boundary
    async def write(self, fh, off, buf):
        h = self._handles[fh]
        if not h.writing:
            raise pyfuse3.FUSEError(errno.EBADF)
        view = h.node.view
        if off >= view.size:
            # As a block device: nothing is written past the end.
            self._refuse(h.node, errno.ENOSPC, f"a write at {off} is past the end of the disk "
                         f"({view.size} bytes; resize it with qemu-img resize)")
        n = min(len(buf), view.size - off)
        h.wrote = True
        h.server.closing = False
        try:
            await h.server.pwrite(buf if n == len(buf) else bytes(buf[:n]), off)
        except SnapfsError as e:
            self.status.refuse(h.node.path, f"a write at {off} failed: {e.reason}")
            raise
        finally:
            # Even a failed write may have changed part of the area.
            view.changed(off, off + n)
        return n

    async def _zero(self, view, server: Server, start: int, end: int) -> None:
        try:
            for pos in range(start, end, ZERO_STEP):
                await server.zero(min(ZERO_STEP, end - pos), pos)
        except SnapfsError as e:
            self.status.refuse(f"{view.disk.relpath}/{view.folder}/{view.filename}",
                               f"zeroing at {start} failed: {e.reason}")
            raise
        finally:
            view.changed(start, end)

    async def _truncate(self, node: Node, view, server: Server) -> None:
        """``O_TRUNC``, ``truncate(0)``: the disk reads as zero; a layer must be empty."""
        m = await view.refresh(server)
        if view.kind == "layer":
            held = next((e for e in m.extents if not e.hole), None)
            if held is not None:
                self._refuse(node, errno.EPERM, (
                    f"truncating a layer that holds data ({m.data_bytes} bytes, the first at "
                    f"{held.start}) would leave the layers beneath showing through where it is "
                    "emptied: restore a layer into a fresh one (qemu-img create -b)"))
            return
        for e in m.extents:
            if not e.zero:
                await self._zero(view, server, e.start, e.end)

    @_boundary
    async def setattr(self, inode, attr, fields, fh, ctx):
        node = self._node(inode)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            # Owner and mode come from the images (fs/access.py).
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_size:
            view = self._writable_view(node)
            size = attr.st_size
            if size not in (0, view.size):
                self._refuse(node, errno.EINVAL, f"a view cannot change size ({view.size} bytes, asked "
                             f"{size}): resize the image with qemu-img resize")
            if size == 0:
                h = self._handles.get(fh) if fh else None
                if h is not None and h.writing:
                    await self._truncate(node, view, h.server)
                else:
                    await self.attrs.fresh_map(view)
                    try:
                        server = await self.pool.acquire_writer(view.spec.for_writing())
                    except (Refused, Unavailable) as e:
                        self._refuse(node, e.errno, e.reason)
                    try:
                        await self._truncate(node, view, server)
                        await server.flush()
                    finally:
                        self.pool.release(server)
        elif not (fields.update_atime or fields.update_mtime or fields.update_ctime):
            pass
        elif not (isinstance(node, ViewFile) and node.view.writable):
            raise pyfuse3.FUSEError(errno.EPERM)
        # Times of a view are its image's: setting them (touch, rsync -t) changes nothing.
        return await self.attrs.get(node)

    @_boundary
    async def flush(self, fh):
        h = self._handles.get(fh)
        if h is not None and h.writing:
            try:
                await h.server.flush()
            except SnapfsError as e:
                self.status.refuse(h.node.path, f"flush failed: {e.reason}")
                raise
            h.server.closing = True
            if h.wrote:
                # close() returns after this: what other views show of the
                # image must be true from then on, before RELEASE arrives.
                h.wrote = False
                view = h.node.view
                await self._map(h)
                self._changed(view.spec.image, h.server.spec)

    @_boundary
    async def fsync(self, fh, datasync):
        await self.flush(fh)

    @_boundary
    async def release(self, fh):
        h = self._handles.pop(fh, None)
        if h is None or h.server is None:
            return
        if h.fill is not None:
            self.pool.release(h.fill)
        srv = h.server
        if srv.spec.writable and srv.users == 1 and h.node.view.stale:
            # The last file of the writer: its map is made true before it stops.
            view = h.node.view
            try:
                await view.refresh(srv)
            except Exception as e:
                log.warning("%s: map not brought up to date (%s): it is read again", view.filename, e)
                view.forget_map()
        if srv.spec.writable and srv.users == 1 and srv.changed:
            # What other views knew of the image is stale from now on (their
            # opens wait for the writer to stop).
            self._changed(srv.spec.image, srv.spec)
        self.pool.release(srv)

    def _written(self, image: str, spec) -> None:
        """A writer of ``image`` stopped: every view of the image reads its map again.

        The written view's too: qemu reports the allocation of a cluster
        written in part (its copy-on-write zeros) once the image is closed
        as it does for the image at rest, which may differ in detail from
        what it said while writing.
        """
        self._changed(image, None)

    def _changed(self, image: str, spec) -> None:
        """``image`` changed through the writable export ``spec``: every other view
        reading it forgets its map (and block status), and takes the image's mtime."""
        self.pool.forget_runs(image)
        try:
            mtime = os.stat(image).st_mtime_ns
        except OSError:
            mtime = None
        for view in self.status.views:
            if not view.mutable or not any(s.socket is None and s.image == image for s in view.specs()):
                continue
            if view.layer.path == image and mtime is not None:
                view.layer.mtime_ns = mtime
            if view.spec.for_writing() == spec and view.map is not None and not view.stale:
                continue  # kept true write by write
            view.forget_map()

    @_boundary
    async def lseek(self, fh, off, whence):
        h = self._handles[fh]
        want_data = whence == os.SEEK_DATA
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise pyfuse3.FUSEError(errno.EINVAL)
        if h.data is not None or h.qcow2 is not None:
            # Dense files: data up to the end.
            size = len(h.data) if h.data is not None else h.qcow2.file_size
            if off < 0 or off >= size:
                raise pyfuse3.FUSEError(errno.ENXIO)
            return off if want_data else size
        return (await self._map(h)).seek(off, want_data)  # SeekError: ENXIO

    @_boundary
    async def fallocate(self, fh, mode, off, length):
        h = self._handles[fh]
        if not h.writing:
            raise pyfuse3.FUSEError(errno.EBADF)
        view = h.node.view
        zeroing = mode in (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE,
                           FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)
        if not zeroing:
            # Like a block device: a disk's space is not allocated ahead, nor moved.
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        end = off + length
        if end > view.size and not mode & FALLOC_FL_KEEP_SIZE:
            self._refuse(h.node, errno.ENOSPC, f"fallocate up to {end} is past the end of the disk "
                         f"({view.size} bytes)")
        end = min(end, view.size)
        if off < end:
            h.wrote = True
            h.server.closing = False
            # A layer keeps zeroed areas as allocated zeros: it cannot hand an
            # area back to the layers beneath it (docs/views.md).
            await self._zero(view, h.server, off, end)

    # -- extended attributes, statfs --------------------------------------

    def _xattrs(self, node: Node) -> dict[str, str]:
        if isinstance(node, (ViewFile, Qcow2File)):
            return node.view.xattrs()
        return {}

    @_boundary
    async def getxattr(self, inode, name, ctx):
        value = self._xattrs(self._node(inode)).get(os.fsdecode(name))
        if value is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return os.fsencode(value)

    @_boundary
    async def listxattr(self, inode, ctx):
        return [os.fsencode(k) for k in self._xattrs(self._node(inode))]

    def _no_change(self):
        """What a request to change the tree or xattrs gets: the tree is the images'."""
        raise pyfuse3.FUSEError(errno.EACCES if self.tree.writable else errno.EROFS)

    @_boundary
    async def setxattr(self, inode, name, value, ctx):
        self._no_change()

    @_boundary
    async def removexattr(self, inode, name, ctx):
        self._no_change()

    # Names never change: a --rw mount writes into existing views only (root included).
    @_boundary
    async def create(self, parent_inode, name, mode, flags, ctx):
        self._no_change()

    @_boundary
    async def mkdir(self, parent_inode, name, mode, ctx):
        self._no_change()

    @_boundary
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        self._no_change()

    @_boundary
    async def symlink(self, parent_inode, name, target, ctx):
        self._no_change()

    @_boundary
    async def link(self, inode, new_parent_inode, new_name, ctx):
        self._no_change()

    @_boundary
    async def unlink(self, parent_inode, name, ctx):
        self._no_change()

    @_boundary
    async def rmdir(self, parent_inode, name, ctx):
        self._no_change()

    @_boundary
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        self._no_change()

    @_boundary
    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = 1 << 20
        s.f_frsize = 512
        s.f_blocks = s.f_bfree = s.f_bavail = 0
        s.f_files = len(self.tree.nodes)
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s
