"""File attributes: owner, group and mode (``access.py``), sizes, times.

``Attributes`` answers every node's attributes, reading a view's map first
when its ``st_blocks`` needs it.
"""

from __future__ import annotations

import logging
import stat

import pyfuse3

from ..data.maps import Maps
from ..data.writes import Writes
from ..errors import Busy
from ..hosts.local import LOCAL
from ..views import FOLDERS
from .access import Facts, access, view_access
from .layout import Catalog
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

FILE_MASK = 0o444  # views and files no one writes
WRITABLE_MASK = 0o666  # writable views of --rw mounts


def _ownership(tree: Tree, node: Node, facts: Facts | None) -> tuple[int, int, int]:
    if isinstance(node, StatusFile) or isinstance(node, ContentFile) and node.paths is None:
        # It names what is in directories others may not list: the mounting
        # user's alone (a domain's definition when no disk of it is served).
        return tree.uid, tree.gid, 0o400
    if isinstance(node, ViewNode):
        return view_access(node, facts or Facts(ttl=0))
    if isinstance(node, PartitionFolder) and node.chain_node is not None:
        return view_access(node.chain_node, facts or Facts(ttl=0))  # its listing is the view's bytes
    if node.paths is None:  # the mount's own (a libvirt domain's directory)
        return tree.uid, tree.gid, 0o555
    return access(node.paths, facts, node.host or LOCAL)


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
        writable = isinstance(node, ViewFile) and node.view.writable
        a.st_mode = stat.S_IFREG | bits & (WRITABLE_MASK if writable else FILE_MASK)
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

    def __init__(self, tree: Tree, catalog: Catalog, maps: Maps, writes: Writes, spawn):
        self.tree = tree
        self.catalog = catalog
        self.maps = maps
        self.writes = writes
        self.spawn = spawn  # starts a background task (map prefetch)
        self.facts = Facts()
        self._map_json: dict[object, tuple[object, bytes]] = {}  # view -> (its map, JSON)

    def _content(self, node: Node, data: bytes, mtime_ns=None, timeout=300):
        return entry(self.tree, node, size=len(data), blocks=(len(data) + 511) // 512,
                     mtime_ns=mtime_ns, timeout=timeout, facts=self.facts)

    def _json(self, view) -> bytes | None:
        hit = self._map_json.get(view)
        return hit[1] if hit is not None and hit[0] is view.map and view.map is not None else None

    def known(self, node: Node, fresh: bool = False) -> pyfuse3.EntryAttributes | None:
        """Attributes if they need no server, else None.

        Views of an image a ``--rw`` mount writes are never cached by the
        kernel (timeout 0): their sizes on disk change with every write.
        """
        if isinstance(node, ViewNode) and self.writes.stale(node.view) and not fresh:
            return None  # fresh: the caller just brought the map up to date
        if isinstance(node, ViewFile):
            view = node.view
            if view.map is None:
                return None
            return entry(self.tree, node, size=view.size, blocks=view.data_blocks,
                         mtime_ns=view.layer_mtime_ns, facts=self.facts,
                         timeout=0 if view.mutable else 300)
        if isinstance(node, Qcow2File):
            view = node.view
            if view.map is None:
                return None
            # Dense: every byte of the file is metadata or a data cluster.
            size = view.qcow2_image().file_size
            return entry(self.tree, node, size=size, blocks=size // 512, mtime_ns=view.layer_mtime_ns,
                         facts=self.facts, timeout=0 if view.mutable else 300)
        if isinstance(node, MapFile):
            data = self._json(node.view)
            return None if data is None else self._content(node, data, node.view.layer_mtime_ns,
                                                           timeout=0 if node.view.mutable else 300)
        if isinstance(node, ContentFile):
            return self._content(node, node.content, node.mtime_ns)
        if isinstance(node, StatusFile):
            # Its content changes when views fail: never cache its attributes.
            return self._content(node, self.catalog.status_file(), timeout=0)
        return entry(self.tree, node, facts=self.facts)

    async def get(self, node: Node) -> pyfuse3.EntryAttributes:
        attrs = self.known(node)
        if attrs is None:
            try:
                if isinstance(node, MapFile):
                    await self.map_content(node)
                else:
                    await self.maps.fresh(node.view)
            except Busy:
                # Another view writes the image: what is known until it closes.
                return self.quick(node)
            attrs = self.known(node, fresh=True)
        return attrs if attrs is not None else self.quick(node)

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

    async def map_content(self, node: MapFile) -> bytes:
        view = node.view
        m = await self.maps.fresh(view)
        data = self._json(view)
        if data is None:
            data = m.to_json()
            self._map_json[view] = (m, data)
        return data

    def prefetch_maps(self, node: Directory) -> None:
        """Read the maps of a listed folder's views ahead, a few at a time.

        ``ls -l`` stats every entry next, one after the other; each stat of a
        view needs its map, so reading them while the kernel is busy saves a
        server start's latency per view. Listing a disk's directory reads
        ahead the views of its chain/, layers/ and dirty/ (``ls -lR`` goes
        there next): more of them in flight at once.
        """
        folders = [node] + [c for name, c in node.children.items()
                            if name in FOLDERS and isinstance(c, Directory)]
        views = {id(c.view): c.view for folder in folders for c in folder.children.values()
                 if isinstance(c, ViewFile) and not c.hidden}
        self.maps.prefetch(views.values(), self.spawn)
