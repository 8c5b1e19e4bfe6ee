"""File attributes: owner, group and mode (``access.py``), sizes, times.

``Attributes`` answers every node's attributes, reading a view's map first
when its ``st_blocks`` needs it.
"""

from __future__ import annotations

import logging
import os
import stat
from typing import TYPE_CHECKING

import pyfuse3
import trio

from ..errors import Gone, Unavailable
from .access import Facts, access, node_needs
from .tree import Directory, MapFile, Node, Status, StatusFile, Tree, ViewFile

if TYPE_CHECKING:
    from ..nbd.pool import ServerPool

log = logging.getLogger(__name__)

FILE_MASK = 0o444  # read-only mounts


def _ownership(tree: Tree, node: Node, facts: Facts | None) -> tuple[int, int, int]:
    if isinstance(node, StatusFile):
        # It names what is in directories others may not list: the mounting
        # user's alone.
        return tree.uid, tree.gid, 0o400
    needs = node_needs(node, facts)
    if needs is None:
        return tree.uid, tree.gid, 0o555
    return access(needs, facts)


def entry(tree: Tree, node: Node, size: int = 0, blocks: int = 0,
          mtime_ns: int | None = None, timeout: float = 300,
          facts: Facts | None = None) -> pyfuse3.EntryAttributes:
    a = pyfuse3.EntryAttributes()
    a.st_ino = node.inode
    a.generation = 0
    a.entry_timeout = timeout
    a.attr_timeout = timeout
    uid, gid, bits = _ownership(tree, node, facts)
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
        self.facts = Facts()
        self._map_json: dict[int, bytes] = {}
        # Servers started ahead for maps, at once: one per core.
        self._map_limiter = trio.CapacityLimiter(max(2, os.cpu_count() or 2))

    def _content(self, node: Node, data: bytes, mtime_ns=None, timeout=300):
        return entry(self.tree, node, size=len(data), blocks=(len(data) + 511) // 512,
                     mtime_ns=mtime_ns, timeout=timeout, facts=self.facts)

    def known(self, node: Node) -> pyfuse3.EntryAttributes | None:
        """Attributes if they need no server, else None."""
        if isinstance(node, ViewFile):
            view = node.view
            if view.map is None:
                return None
            return entry(self.tree, node, size=view.size, blocks=view.data_blocks,
                         mtime_ns=view.layer_mtime_ns, facts=self.facts)
        if isinstance(node, MapFile):
            data = self._map_json.get(node.inode)
            return None if data is None else self._content(node, data, node.view.layer_mtime_ns)
        if isinstance(node, StatusFile):
            # Its content changes when views fail: never cache its attributes.
            return self._content(node, self.status.render(), timeout=0)
        return entry(self.tree, node, facts=self.facts)

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
            attrs = entry(self.tree, node, size=size, mtime_ns=node.view.layer_mtime_ns, timeout=0,
                          facts=self.facts)
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
