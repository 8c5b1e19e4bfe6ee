"""The mount's directory tree and inode table.

The tree is laid out from the sources' units (``layout.py``); a view found
unservable later is hidden (its node stays, so inode numbers stay stable),
and a refresh replaces a unit's subtree (old inodes answer ENOENT). Inodes
are never freed: the kernel's lookup counts (``forget``) need no
bookkeeping here. Pure: the FUSE side (``operations.py``) turns nodes into
attributes.
"""

from __future__ import annotations

import itertools
import logging
import os
import time

from ..views import View

# What the status file says, logged as it is found.
report = logging.getLogger("snapfs.report")

STATUS_NAME = ".snapfs-status"
REFUSALS_KEPT = 100
ROOT_INODE = 1  # FUSE_ROOT_ID


class Node:
    """inode: the inode number; parent: the Directory holding it.

    paths: what reading the node needs without the mount, ``(path, need)``
    pairs on ``host`` (``access.py``); None for the mount's own (directories
    of libvirt domains).
    """

    host = None  # the host ``paths`` are on (set with them)

    def __init__(self, inode: int, name: str, parent: Directory | None):
        self.inode = inode
        self.name = name
        self.parent = parent
        self.removed = False  # replaced by a refresh; its inode answers ENOENT
        self.paths: tuple[tuple[str, str], ...] | None = None

    @property
    def hidden(self) -> bool:
        return self.removed

    @property
    def path(self) -> str:
        """The node's path relative to the mount's root."""
        parts = []
        node = self
        while node is not None and node.parent is not None:
            parts.append(node.name)
            node = node.parent
        return "/".join(reversed(parts))


class Directory(Node):
    def __init__(self, inode, name, parent):
        super().__init__(inode, name, parent)
        self.children: dict[str, Node] = {}


class PartitionFolder(Directory):
    """``partitions/NAME/``: the partitions of chain view ``chain``, read from its
    partition table the first time the folder is looked into (``filled``).

    Its listing tells what the chain view's bytes say (where its partitions
    are): it may be listed by whoever may read ``chain_node``, the chain view's
    ``NAME.raw``, and no one else."""

    def __init__(self, inode, name, parent, chain: View):
        super().__init__(inode, name, parent)
        self.chain = chain
        self.chain_node: ViewFile | None = None
        self.filled = False

    @property
    def hidden(self) -> bool:
        return self.removed or self.chain.problem is not None


class ViewNode(Node):
    """A file about a view; hidden once the view turned out unservable."""

    def __init__(self, inode, name, parent, view: View):
        super().__init__(inode, name, parent)
        self.view = view

    @property
    def host(self):
        """The host of the images the view reads."""
        return self.view.layer.host

    @property
    def disk_path(self) -> str:
        """The mount path of the view's disk (a refresh waits for its open files)."""
        return self.path.rsplit("/", 2 + self.view.folder.count("/"))[0]

    @property
    def hidden(self) -> bool:
        return self.removed or self.view.problem is not None


class ViewFile(ViewNode):
    """``NAME.raw``: the view itself."""


class MapFile(ViewNode):
    """``NAME.map.json``: the view's extent map as JSON."""


class Qcow2File(ViewNode):
    """``NAME.qcow2``: the view as a qcow2 image composed from its map (``views/qcow2.py``)."""

    @property
    def hidden(self) -> bool:
        return super().hidden or self.view.qcow2_problem is not None


class ContentFile(Node):
    """A small read-only file a source carries, its content fixed when laid out:
    a libvirt domain's ``domain.xml`` and ``checkpoint-NN.xml``. Its mtime is
    when it was laid out (a refresh's new content is newer). ``paths`` None:
    the mounting user's alone."""

    def __init__(self, inode, name, parent, content: bytes):
        super().__init__(inode, name, parent)
        self.content = content
        self.mtime_ns = time.time_ns()


class StatusFile(Node):
    """``.snapfs-status`` at the root: what the mount could not offer, and why."""


class Status:
    """The status file's own content: the mount's notes and the requests refused.

    refusals: the latest refusal or failure of each file (``--rw`` mounts: a
    write refused or failed, with the reason), at most REFUSALS_KEPT, oldest
    dropped first. What the sources could not offer comes from the catalog
    (``layout.Catalog.status_file``).
    """

    def __init__(self):
        self.started = time.strftime("%Y-%m-%d %H:%M:%S %z")
        self.notes: list[str] = []
        self.refusals: dict[str, tuple[str, str]] = {}
        # Found once the mount runs (a partition table that cannot be trusted): path -> reason.
        self.problems: dict[str, str] = {}

    def problem(self, path: str, reason: str) -> None:
        if self.problems.get(path) != reason:
            report.warning("not available: %s: %s", path, reason)
        self.problems[path] = reason

    def forget_under(self, prefix: str) -> None:
        """A refresh replaced what is under ``prefix``: its problems go with it."""
        for path in [p for p in self.problems if p == prefix or p.startswith(prefix + "/")]:
            del self.problems[path]

    def refuse(self, path: str, reason: str) -> None:
        report.warning("refused: %s: %s", path, reason)
        self.refusals.pop(path, None)
        self.refusals[path] = (time.strftime("%H:%M:%S"), reason)
        while len(self.refusals) > REFUSALS_KEPT:
            del self.refusals[next(iter(self.refusals))]

    def render(self, source: str, notes: list[str], problems: list[tuple[str, str]]) -> bytes:
        lines = [f"snapfs mount of {source}, since {self.started}"]
        lines += [f"note: {n}" for n in notes + self.notes]
        if not problems:
            lines.append("every view is available")
        else:
            lines.append(f"{len(problems)} item(s) not available:")
            lines += [f"{path}: {reason}" for path, reason in problems]
        if self.refusals:
            lines.append(f"{len(self.refusals)} request(s) refused or failed (the latest of each file):")
            lines += [f"{when} {path}: {reason}" for path, (when, reason) in self.refusals.items()]
        return ("\n".join(shown(line) for line in lines) + "\n").encode()


def shown(text: str) -> str:
    """A line of the status file as it can be printed: one line per item, in UTF-8.

    File names may hold anything but '/' and NUL: a newline or another
    control character is written escaped (``\\n``, ``\\x1b``), and so is a
    byte that is not UTF-8 (``os.fsdecode`` made it a lone surrogate: ``\\xff``).
    """
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        elif "\udc80" <= ch <= "\udcff":
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


class Tree:
    """Every node by inode; ``root`` is ROOT_INODE."""

    def __init__(self, writable: bool = False):
        self.writable = writable  # a --rw mount
        self._ids = itertools.count(ROOT_INODE)
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

    def find(self, path: str) -> Node | None:
        """The node at a relative path, or None."""
        node = self.root
        for part in [p for p in path.split("/") if p]:
            node = node.children.get(part) if isinstance(node, Directory) else None
            if node is None:
                return None
        return node

    def remove(self, path: str) -> Directory | None:
        """Take the directory at ``path`` out of the tree; its inodes stay, removed."""
        node = self.find(path)
        if node is None or node is self.root:
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

    def add_file(self, path: str, content: bytes) -> ContentFile:
        """A ``ContentFile`` at a relative path (its directories created)."""
        folder, _, name = path.rpartition("/")
        parent = self.directory(folder)
        if name in parent.children:
            raise ValueError(f"{path} exists")
        return self._add(ContentFile, name, parent, content)

    def add_view(self, view: View, prefix: str = "") -> None:
        """A view's three files, in its folder (under ``prefix``: its source's)."""
        folder = self.directory(f"{prefix}{view.disk.relpath}/{view.folder}")
        self._add(ViewFile, view.filename, folder, view)
        if view.has_qcow2:
            self._add(Qcow2File, view.qcow2_filename, folder, view)
        self._add(MapFile, view.map_filename, folder, view)

    def add_partition_folder(self, chain: View, prefix: str = "") -> PartitionFolder:
        """``partitions/NAME/`` of a chain view: filled when first looked into."""
        parent = self.directory(f"{prefix}{chain.disk.relpath}/partitions")
        node = parent.children.get(chain.basename)
        if node is None:
            node = self._add(PartitionFolder, chain.basename, parent, chain)
        return node
