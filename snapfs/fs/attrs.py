"""File attributes, and who may read what (docs/views.md, "Who may read what").

A mount never widens access to the disks it shows. Every node takes its owner,
group and permission bits from the files whose data (or names) it shows:

- a view and its map: the images the view reads (a layer view its layer; a
  chain or dirty view every layer of the chain, top first);
- a disk's directory and its ``chain/``, ``layers/``, ``dirty/``: the leaf
  image; a directory that mirrors one of the image directory's: that
  directory; the root: the image directory.

Owner and group are the first file's. The bits are those that *every* file
grants to whoever holds that class on the node. When a lower file has
another owner or group, snapfs cannot know who is in which group, so it takes
the least that class could get there::

    node class   file with the same owner/group   file with another owner/group
    owner        u                                 g & o       (not the file's owner)
    group        g  (& u if not the same owner)    g & o (& u)
    other        o  (& u, & g likewise)            u & g & o

A mount that is not writable clears the write bits, and execute bits of files
(disk images are not programs); a directory is searchable by a class exactly
when it is readable. The kernel checks these (``default_permissions``), so
with ``--allow-other`` a user who cannot read ``vm1/disk.qcow2`` cannot read
its views either. A file that cannot be stat'ed grants nothing.
"""

from __future__ import annotations

import logging
import os
import stat
from typing import TYPE_CHECKING

import pyfuse3
import trio

from ..errors import Gone, Unavailable
from .tree import Directory, MapFile, Node, Status, StatusFile, Tree, ViewFile, ViewNode

if TYPE_CHECKING:
    from ..nbd.pool import ServerPool

log = logging.getLogger(__name__)

FILE_MASK = 0o444  # read-only mounts


def access(paths) -> tuple[int, int, int]:
    """``(uid, gid, mode bits)`` for a node showing the data of ``paths`` (first decides owner)."""
    sts = []
    for p in paths:
        try:
            sts.append(os.stat(p))
        except OSError:
            return 0, 0, 0
    if not sts:
        return 0, 0, 0
    uid, gid = sts[0].st_uid, sts[0].st_gid
    owner = group = other = 7
    for st in sts:
        m = stat.S_IMODE(st.st_mode)
        u, g, o = m >> 6 & 7, m >> 3 & 7, m & 7
        same_u, same_g = st.st_uid == uid, st.st_gid == gid
        owner &= u if same_u else g & o
        group &= g & (7 if same_u else u) & (7 if same_g else o)
        other &= o & (7 if same_u else u) & (7 if same_g else g)
    return uid, gid, owner << 6 | group << 3 | other


def node_paths(node: Node) -> tuple[str, ...] | None:
    """The files whose permissions ``node`` takes, or None (the mount's owner, 0555/0444)."""
    if isinstance(node, ViewNode):
        view = node.view
        seen: dict[str, None] = {}
        for spec in view.specs():
            for path, _ in spec.layers:
                seen.setdefault(path)
        return tuple(seen)
    return node.paths


def _ownership(tree: Tree, node: Node) -> tuple[int, int, int]:
    cached = node.access
    if cached is None:
        paths = node_paths(node)
        if paths is None:
            cached = (tree.uid, tree.gid, 0o555)
        else:
            cached = access(paths)
        node.access = cached
    return cached


def entry(tree: Tree, node: Node, size: int = 0, blocks: int = 0,
          mtime_ns: int | None = None, timeout: float = 300) -> pyfuse3.EntryAttributes:
    a = pyfuse3.EntryAttributes()
    a.st_ino = node.inode
    a.generation = 0
    a.entry_timeout = timeout
    a.attr_timeout = timeout
    uid, gid, bits = _ownership(tree, node)
    if isinstance(node, Directory):
        readable = bits & 0o444
        a.st_mode = stat.S_IFDIR | readable | readable >> 2
        a.st_nlink = 2 + sum(isinstance(c, Directory) for c in node.children.values())
    else:
        a.st_mode = stat.S_IFREG | bits & FILE_MASK
        a.st_nlink = 1
    a.st_size = size
    a.st_blocks = blocks
    a.st_blksize = 4 << 20  # cp, cat, tar read this much at a time
    a.st_uid = uid
    a.st_gid = gid
    t = mtime_ns if mtime_ns is not None else tree.mtime_ns
    a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = t
    return a


class Attributes:
    """Every node's attributes, and what they need: view maps, map files' JSON.

    A view's size is known from the scan, its ``st_blocks`` only from its
    map, which takes a server start to read; attributes that need no server
    are answered at once (``known``), the others after the map is read.
    """

    def __init__(self, tree: Tree, pool: ServerPool, status: Status):
        self.tree = tree
        self.pool = pool
        self.status = status
        self._map_json: dict[int, bytes] = {}
        # Servers started ahead for maps, at once: one per core.
        self._map_limiter = trio.CapacityLimiter(max(2, os.cpu_count() or 2))

    def _content(self, node: Node, data: bytes, mtime_ns=None, timeout=300):
        return entry(self.tree, node, size=len(data), blocks=(len(data) + 511) // 512,
                     mtime_ns=mtime_ns, timeout=timeout)

    def known(self, node: Node) -> pyfuse3.EntryAttributes | None:
        """Attributes if they need no server, else None."""
        if isinstance(node, ViewFile):
            view = node.view
            if view.map is None:
                return None
            return entry(self.tree, node, size=view.size, blocks=view.data_blocks,
                         mtime_ns=view.layer_mtime_ns)
        if isinstance(node, MapFile):
            data = self._map_json.get(node.inode)
            return None if data is None else self._content(node, data, node.view.layer_mtime_ns)
        if isinstance(node, StatusFile):
            # Its content changes when views fail: never cache its attributes.
            return self._content(node, self.status.render(), timeout=0)
        return entry(self.tree, node)

    async def get(self, node: Node) -> pyfuse3.EntryAttributes:
        attrs = self.known(node)
        if attrs is None:
            if isinstance(node, MapFile):
                await self.map_content(node)
            else:
                await self.load_map(node.view)
            attrs = self.known(node)
        return attrs

    def quick(self, node: Node) -> pyfuse3.EntryAttributes:
        """Attributes for readdirplus without starting a server.

        A view whose map is not known yet gets a zero timeout: the kernel
        asks getattr before anyone sees st_blocks, so a plain ``ls`` stays
        fast and ``ls -ls`` is still right.
        """
        attrs = self.known(node)
        if attrs is None:
            size = node.view.size if isinstance(node, ViewFile) else 0
            attrs = entry(self.tree, node, size=size, mtime_ns=node.view.layer_mtime_ns, timeout=0)
        return attrs

    async def load_map(self, view):
        """The view's map; a view that cannot be served is gone (ENOENT)."""
        try:
            return await view.load_map(self.pool)
        except Unavailable as e:
            raise Gone(e.reason) from None

    async def map_content(self, node: MapFile) -> bytes:
        data = self._map_json.get(node.inode)
        if data is None:
            m = await self.load_map(node.view)
            data = self._map_json[node.inode] = m.to_json()
        return data

    def prefetch_maps(self, node: Directory) -> None:
        """Read the maps of a listed folder's views ahead, a few at a time.

        ``ls -l`` stats every entry next, one after the other; each stat of a
        view needs its map, so reading them while the kernel is busy saves a
        server start's latency per view.
        """
        for child in node.children.values():
            if isinstance(child, ViewFile) and child.view.map is None and not child.hidden:
                self.pool.spawn(self._load_map_quietly, child.view)

    async def _load_map_quietly(self, view) -> None:
        async with self._map_limiter:
            try:
                await view.load_map(self.pool)
            except Unavailable:
                pass  # the view is hidden now, with its reason in the status file
            except Exception:
                log.exception("reading the map of %s failed", view.filename)
