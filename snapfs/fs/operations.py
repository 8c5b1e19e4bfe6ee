"""The FUSE request handlers: thin, over the tree, the open files and the attributes.

Every handler goes through ``_boundary``, the one place where errors become
errnos (``errors.fuse_errno``): snapfs's own errors carry theirs (libnbd's
passes through), anything unexpected is logged once with its traceback and
becomes EIO, so one bad image never takes the mount down. Attributes
(owner, group, mode, sizes) come from ``attrs.py``; what an open file does
on read, lseek, write and close, from its kind (``handles.py``).

Writes (``--rw`` mounts, docs/views.md "Writable mounts") go through the
view's write session (``data/writes.py``). Anything a view does not allow is
refused with the spec's errno, and the reason goes to the log and the
status file (``Files.refuse``).
"""

from __future__ import annotations

import errno
import functools
import logging
import os

import pyfuse3

from ..errors import Refused, Unavailable, fuse_errno
from .attrs import Attributes
from .handles import ContentHandle, Files, Qcow2Handle, ViewHandle, opener
from .layout import Catalog
from .partitions import Partitions
from .tree import (
    ContentFile,
    Directory,
    MapFile,
    Node,
    PartitionFolder,
    Qcow2File,
    StatusFile,
    Tree,
    ViewFile,
    ViewNode,
)

log = logging.getLogger(__name__)

HAS_LSEEK = hasattr(pyfuse3.Operations, "lseek")


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


class Operations(pyfuse3.Operations):
    # Lookups of "." and ".." are for NFS exports, which snapfs does not offer.
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, tree: Tree, catalog: Catalog, files: Files, attrs: Attributes, partitions: Partitions):
        super().__init__()
        self.tree = tree
        self.catalog = catalog
        self.files = files
        self.attrs = attrs
        self.partitions = partitions

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
        if isinstance(parent, PartitionFolder):
            await self.partitions.fill(parent)
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
        if isinstance(node, PartitionFolder):
            await self.partitions.fill(node)
        if start_id == 0:
            self.attrs.prefetch_maps(node)
            self.partitions.prefetch(node)
        entries = sorted(node.children.items())
        for i, (name, child) in enumerate(entries[start_id:], start_id):
            if child.hidden:
                continue
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self.attrs.quick(child), i + 1):
                break

    async def releasedir(self, fh):
        pass

    # -- files ------------------------------------------------------------

    def _writable_view(self, node: Node):
        """The view of a node opened or truncated for writing, or the refusal."""
        if not self.tree.writable:
            raise pyfuse3.FUSEError(errno.EROFS)
        if not isinstance(node, ViewFile):
            self.files.refuse(node, errno.EACCES, "maps, .qcow2 files, domain definitions and the status "
                              "file are read-only (restore through the view's .raw file)")
        refusal = node.view.write_refusal()
        if refusal is not None:
            self.files.refuse(node, *refusal)
        return node.view

    @_boundary
    async def open(self, inode, flags, ctx):
        node = self._node(inode)
        with self.files.counted(node.disk_path if isinstance(node, ViewNode) else None):
            info = await self._open(node, flags)
        self.files.handles[info.fh].opener = opener(getattr(ctx, "pid", 0) or 0)
        return info

    async def _open(self, node: Node, flags: int):
        if isinstance(node, Directory):
            raise pyfuse3.FUSEError(errno.EISDIR)
        writing = flags & os.O_ACCMODE != os.O_RDONLY
        if writing:
            self._writable_view(node)
        files = self.files
        if isinstance(node, MapFile):
            fh = files.add(ContentHandle(files, node, await self.attrs.map_content(node)))
            # Map files never change under a read-only mount: their page cache is kept.
            return pyfuse3.FileInfo(fh=fh, keep_cache=not node.view.mutable)
        if isinstance(node, ContentFile):
            return pyfuse3.FileInfo(fh=files.add(ContentHandle(files, node, node.content)), keep_cache=True)
        if isinstance(node, StatusFile):
            fh = files.add(ContentHandle(files, node, self.catalog.status_file()))
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        try:
            if isinstance(node, Qcow2File):
                handle = Qcow2Handle(files, node, await files.exports.open_qcow2(node.view, node.path))
            else:
                handle = ViewHandle(files, node, await files.exports.open(node.view, writing))
        except (Refused, Unavailable) as e:
            if node.view.problem is None:
                # Not the view's own failure (listed among what is not available): this open's.
                files.refuse(node, e.errno, e.reason)
            raise
        fh = files.add(handle)
        if writing and flags & os.O_TRUNC:
            # libfuse sends O_TRUNC inside OPEN (atomic_o_trunc), not as a SETATTR.
            try:
                await handle.truncate()
            except BaseException:
                del files.handles[fh]
                await handle.release()
                raise
        # Direct I/O: reads arrive at the size the reader asks for (cp and
        # cat ask st_blksize, 4 MiB, sent as four 1 MiB requests at once)
        # instead of the page cache's 128 KiB readahead pieces, and copying
        # a mostly empty 8 GiB view does not fill the page cache with zeros.
        # The chunk cache serves repeated reads.
        return pyfuse3.FileInfo(fh=fh, direct_io=True)

    @_boundary
    async def read(self, fh, off, size):
        return await self.files.handles[fh].read(off, size)

    @_boundary
    async def write(self, fh, off, buf):
        return await self.files.handles[fh].write(off, buf)

    @_boundary
    async def setattr(self, inode, attr, fields, fh, ctx):
        node = self._node(inode)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            # Owner and mode come from the images (fs/access.py).
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_size:
            await self._truncate(node, attr.st_size, self.files.handles.get(fh) if fh else None)
        elif not (fields.update_atime or fields.update_mtime or fields.update_ctime):
            pass
        elif not (isinstance(node, ViewFile) and node.view.writable):
            raise pyfuse3.FUSEError(errno.EPERM)
        # Times of a view are its image's: setting them (touch, rsync -t) changes nothing.
        return await self.attrs.get(node)

    async def _truncate(self, node: Node, size: int, handle) -> None:
        view = self._writable_view(node)
        if size not in (0, view.size):
            self.files.refuse(node, errno.EINVAL, f"a view cannot change size ({view.size} bytes, asked "
                              f"{size}): resize the image with qemu-img resize")
        if size != 0:
            return
        if isinstance(handle, ViewHandle) and handle.lease.writing:
            await handle.truncate()
            return
        try:
            handle = ViewHandle(self.files, node, await self.files.exports.open(view, writing=True))
        except (Refused, Unavailable) as e:
            self.files.refuse(node, e.errno, e.reason)
        try:
            await handle.truncate()
            await handle.flush()
        finally:
            await handle.release()

    @_boundary
    async def flush(self, fh):
        h = self.files.handles.get(fh)
        if h is not None:
            await h.flush()

    @_boundary
    async def fsync(self, fh, datasync):
        await self.flush(fh)

    @_boundary
    async def release(self, fh):
        h = self.files.handles.pop(fh, None)
        if h is not None:
            await h.release()

    @_boundary
    async def lseek(self, fh, off, whence):
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return await self.files.handles[fh].lseek(off, whence == os.SEEK_DATA)

    @_boundary
    async def fallocate(self, fh, mode, off, length):
        await self.files.handles[fh].fallocate(mode, off, length)

    # -- extended attributes, statfs --------------------------------------

    def _xattrs(self, node: Node) -> dict[str, str]:
        if isinstance(node, (ViewFile, Qcow2File)):
            return node.view.xattrs()
        return {}

    @_boundary
    async def getxattr(self, inode, name, ctx):
        name = os.fsdecode(name)
        if not name.startswith("user."):
            # No ACLs, no security labels: "not supported" (not "no such
            # attribute") lets ls -l stop asking for every further file of
            # the mount (coreutils remembers it per device).
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        value = self._xattrs(self._node(inode)).get(name)
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
