"""The mount's directory tree and inode table.

The tree is built once at mount time from the disks found and never changes
shape, except that a view found unservable later is hidden (its node stays,
so inode numbers stay stable). Inodes are never freed: the kernel's lookup
counts (``forget``) need no bookkeeping here.
"""

from __future__ import annotations

import itertools
import os
import stat
import time

import pyfuse3

from .views import View

STATUS_NAME = ".snapfs-status"


class Node:
    """inode: the inode number; parent: the Directory holding it."""

    def __init__(self, inode: int, name: str, parent: Directory | None):
        self.inode = inode
        self.name = name
        self.parent = parent
        self.removed = False  # replaced by a refresh; its inode answers ENOENT

    @property
    def hidden(self) -> bool:
        return self.removed


class Directory(Node):
    def __init__(self, inode, name, parent):
        super().__init__(inode, name, parent)
        self.children: dict[str, Node] = {}


class ViewNode(Node):
    """A file about a view; hidden once the view turned out unservable."""

    def __init__(self, inode, name, parent, view: View):
        super().__init__(inode, name, parent)
        self.view = view

    @property
    def hidden(self) -> bool:
        return self.removed or self.view.problem is not None


class ViewFile(ViewNode):
    """``NAME.raw``: the view itself."""


class MapFile(ViewNode):
    """``NAME.map.json``: the view's extent map as JSON."""


class StatusFile(Node):
    """``.snapfs-status`` at the root: what the mount could not offer, and why."""


class Status:
    """Problems found at mount time, plus views that failed later."""

    def __init__(self, source: str):
        self.source = source
        self.started = time.strftime("%Y-%m-%d %H:%M:%S %z")
        self.notes: list[str] = []
        self.problems: list[tuple[str, str]] = []
        self.views: list[View] = []

    def replace(self, prefix: str, problems, notes, views) -> None:
        """Drop what is under ``prefix/`` (a refreshed domain) and add its new state."""
        def keep(text):
            return not (text == prefix or text.startswith((prefix + "/", prefix + ":")))
        self.problems = [p for p in self.problems if keep(p[0])] + list(problems)
        self.notes = [n for n in self.notes if keep(n)] + list(notes)
        self.views = [v for v in self.views if keep(v.disk.relpath)] + list(views)

    def render(self) -> bytes:
        lines = [f"snapfs mount of {self.source}, since {self.started}"]
        lines += [f"note: {n}" for n in self.notes]
        problems = list(self.problems)
        problems += [(f"{v.disk.relpath}/{v.folder}/{v.filename}", v.problem)
                     for v in self.views if v.problem is not None]
        if not problems:
            lines.append("every view is available")
        else:
            lines.append(f"{len(problems)} item(s) not available:")
            lines += [f"{path}: {reason}" for path, reason in problems]
        return ("\n".join(lines) + "\n").encode()


class Tree:
    """Every node by inode; ``root`` is pyfuse3.ROOT_INODE."""

    def __init__(self):
        self._ids = itertools.count(pyfuse3.ROOT_INODE)
        self.nodes: dict[int, Node] = {}
        self.root = self._add(Directory, "", None)
        self.uid = os.getuid()
        self.gid = os.getgid()
        self.mtime_ns = time.time_ns()

    def _add(self, cls, name, parent, *args) -> Node:
        node = cls(next(self._ids), name, parent, *args)
        self.nodes[node.inode] = node
        if parent is not None:
            parent.children[name] = node
        return node

    def directory(self, path: str) -> Directory:
        """The directory at a relative path, created (with its parents) if needed."""
        node = self.root
        for part in [p for p in path.split("/") if p]:
            child = node.children.get(part)
            if child is None:
                child = self._add(Directory, part, node)
            if not isinstance(child, Directory):
                raise ValueError(f"{path}: {part} is not a directory")
            node = child
        return node

    def remove(self, path: str) -> Directory | None:
        """Take the directory at ``path`` out of the tree; its inodes stay, removed."""
        node = self.root
        for part in [p for p in path.split("/") if p]:
            node = node.children.get(part) if isinstance(node, Directory) else None
            if node is None:
                return None
        del node.parent.children[node.name]
        stack = [node]
        while stack:
            n = stack.pop()
            n.removed = True
            if isinstance(n, Directory):
                stack.extend(n.children.values())
        return node

    def add_status(self) -> StatusFile:
        return self._add(StatusFile, STATUS_NAME, self.root)

    def add_view(self, view: View) -> None:
        folder = self.directory(f"{view.disk.relpath}/{view.folder}")
        self._add(ViewFile, view.filename, folder, view)
        self._add(MapFile, view.map_filename, folder, view)

    def attributes(self, node: Node, size: int = 0, blocks: int = 0,
                   mtime_ns: int | None = None, timeout: float = 300) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.inode
        a.generation = 0
        a.entry_timeout = timeout
        a.attr_timeout = timeout
        if isinstance(node, Directory):
            a.st_mode = stat.S_IFDIR | 0o555
            a.st_nlink = 2 + sum(isinstance(c, Directory) for c in node.children.values())
        else:
            a.st_mode = stat.S_IFREG | 0o444
            a.st_nlink = 1
        a.st_size = size
        a.st_blocks = blocks
        a.st_blksize = 4 << 20  # cp, cat, tar read this much at a time
        a.st_uid = self.uid
        a.st_gid = self.gid
        t = mtime_ns if mtime_ns is not None else self.mtime_ns
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = t
        return a
