"""The FUSE request handlers: thin, over the tree, the views and the server pool.

Every handler goes through ``_boundary``, the one place where errors become
errnos (``errors.fuse_errno``): snapfs's own errors carry theirs (libnbd's
passes through), anything unexpected is logged once with its traceback and
becomes EIO, so one bad image never takes the mount down. Attributes
(owner, group, mode, sizes) come from ``attrs.py``.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os

import pyfuse3

from ..errors import fuse_errno
from ..nbd.pool import Server, ServerPool
from .attrs import Attributes
from .tree import Directory, MapFile, Node, Status, StatusFile, Tree, ViewFile

log = logging.getLogger(__name__)

HAS_LSEEK = hasattr(pyfuse3.Operations, "lseek")

# Zero replies share one buffer: FUSE takes any buffer, and most zero
# requests are a whole 1 MiB request (or less).
_ZEROS = memoryview(bytes(1 << 20))


def _zeros(length: int):
    return _ZEROS[:length] if length <= len(_ZEROS) else bytes(length)


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
    """An open file: the node, and the server (views) or the content (maps, status)."""

    def __init__(self, node: Node, server: Server | None = None, data: bytes | None = None):
        self.node = node
        self.server = server
        self.data = data


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
        self._fh = itertools.count(1)

    def open_files(self, prefix: str) -> int:
        """How many views under ``prefix/`` are open."""
        return sum(1 for h in self._handles.values() if h.server is not None
                   and h.node.view.disk.relpath.startswith(prefix + "/"))

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

    @_boundary
    async def open(self, inode, flags, ctx):
        node = self._node(inode)
        if isinstance(node, Directory):
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        fh = next(self._fh)
        if isinstance(node, MapFile):
            self._handles[fh] = Handle(node, data=await self.attrs.map_content(node))
            return pyfuse3.FileInfo(fh=fh, keep_cache=True)
        if isinstance(node, StatusFile):
            self._handles[fh] = Handle(node, data=self.status.render())
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        view = node.view
        await self.attrs.load_map(view)
        server = await self.pool.acquire(view.spec)
        self._handles[fh] = Handle(node, server=server)
        # Direct I/O: reads arrive at the size the reader asks for (cp and
        # cat ask st_blksize, 4 MiB, sent as four 1 MiB requests at once)
        # instead of the page cache's 128 KiB readahead pieces, and copying
        # a mostly empty 8 GiB view does not fill the page cache with zeros.
        # The chunk cache serves repeated reads.
        return pyfuse3.FileInfo(fh=fh, direct_io=True)

    @_boundary
    async def read(self, fh, off, size):
        h = self._handles[fh]
        if h.data is not None:
            return h.data[off:off + size]
        view = h.node.view
        m = view.map
        chunks = h.server.chunks(view.size)
        parts = []
        for start, length, zero in m.pieces(off, size):
            # Zero and hole areas come from the extent map, not the server.
            parts.append(_zeros(length) if zero else await chunks.read(start, length, m))
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)  # join takes memoryviews too

    @_boundary
    async def release(self, fh):
        h = self._handles.pop(fh, None)
        if h is not None and h.server is not None:
            self.pool.release(h.server)

    @_boundary
    async def lseek(self, fh, off, whence):
        h = self._handles[fh]
        want_data = whence == os.SEEK_DATA
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise pyfuse3.FUSEError(errno.EINVAL)
        if h.data is not None:
            if off < 0 or off >= len(h.data):
                raise pyfuse3.FUSEError(errno.ENXIO)
            return off if want_data else len(h.data)
        return h.node.view.map.seek(off, want_data)  # SeekError: ENXIO

    @_boundary
    async def fallocate(self, fh, mode, off, length):
        raise pyfuse3.FUSEError(errno.EROFS)

    # -- extended attributes, statfs --------------------------------------

    def _xattrs(self, node: Node) -> dict[str, str]:
        if isinstance(node, ViewFile):
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

    @_boundary
    async def setxattr(self, inode, name, value, ctx):
        raise pyfuse3.FUSEError(errno.EROFS)

    @_boundary
    async def removexattr(self, inode, name, ctx):
        raise pyfuse3.FUSEError(errno.EROFS)

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
