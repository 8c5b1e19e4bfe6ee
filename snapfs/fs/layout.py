"""The catalog: every source's units laid out in the mount's tree.

A source hands in units (``sources/base.py``): directories with what reading
them needs, views, what could not be offered. The catalog puts them in the
tree (each source's under its own folder when a mount has several), keeps
them by source and key for ``snapfs refresh``, and says what the status file
lists. Pure: it knows no kind of source, and no FUSE.
"""

from __future__ import annotations

import logging

from ..sources.base import Scan, Unit, folder_name
from ..views import View
from .tree import Directory, Status, Tree

log = logging.getLogger(__name__)
# What the status file says (views not offered, notes), logged as it is found.
report = logging.getLogger("snapfs.report")


class Laid:
    """One source as laid out: its units by key, and what it says of itself."""

    def __init__(self, source, prefix: str):
        self.source = source
        self.prefix = prefix  # "" or "NAME/": where its tree sits in the mount
        self.units: dict[str, Unit] = {}
        self.problems: list[tuple[str, str]] = []
        self.notes: list[str] = []


class Catalog:
    """Every source's units in the tree, and the status file's content."""

    def __init__(self, tree: Tree, status: Status, sources: list):
        self.tree = tree
        self.status = status
        self.laid = [Laid(s, "" if len(sources) == 1 else folder_name(s.label) + "/") for s in sources]

    def of(self, source) -> Laid:
        return next(lay for lay in self.laid if lay.source is source)

    def views(self) -> list[View]:
        """Every view of the mount now."""
        return [v for lay in self.laid for u in lay.units.values() for v in u.views]

    def lay_out(self, source, scan: Scan) -> None:
        """A source's first scan: its root, its units."""
        lay = self.of(source)
        root = self.tree.directory(lay.prefix)
        root.paths, root.host = scan.root_needs, source.host
        self.set_problems(lay, scan.problems, scan.notes)
        for unit in scan.units.values():
            self.add(lay, unit)

    def set_problems(self, lay: Laid, problems, notes) -> None:
        """What a source says of itself, outside its units (logged once, when new)."""
        for path, reason in problems:
            if (path, reason) not in lay.problems:
                report.warning("not available: %s%s: %s", lay.prefix, path, reason)
        for note in notes:
            if note not in lay.notes:
                report.warning("%s", note)
        lay.problems = list(problems)
        lay.notes = list(notes)

    def add(self, lay: Laid, unit: Unit) -> None:
        """Put a unit in the tree."""
        lay.units[unit.key] = unit
        for rel, needs in unit.dirs:
            node = self.tree.directory(lay.prefix + rel)
            if needs is not None:
                node.paths, node.host = needs, lay.source.host
        for view in unit.views:
            self.tree.add_view(view, lay.prefix)
            if view.kind == "chain" and not view.mutable:
                # partitions/NAME/: read as the chain folder is (fs/partitions.py fills it).
                # Not of a point a --rw mount writes: its table can change with any write.
                folder = self.tree.add_partition_folder(view, lay.prefix)
                chain_dir = self.tree.find(f"{lay.prefix}{view.disk.relpath}/{view.folder}")
                folder.chain_node = chain_dir.children[view.filename]
                for node in (folder, folder.parent):
                    node.paths, node.host = chain_dir.paths, chain_dir.host
        for rel, content, needs in unit.files:
            node = self.tree.add_file(lay.prefix + rel, content)
            node.paths, node.host = needs, lay.source.host
        for path, reason in unit.missing:
            report.warning("not available: %s%s: %s", lay.prefix, path, reason)
        for note in unit.notes:
            report.warning("%s", note)

    def remove(self, lay: Laid, key: str) -> list[tuple[Directory, str]]:
        """Take a unit out of the tree, and the directories left empty above it.

        Returns ``(parent, name)`` of every entry removed, for the kernel to forget.
        """
        lay.units.pop(key, None)
        self.status.forget_under(lay.prefix + key)
        removed = []
        node = self.tree.remove(lay.prefix + key)
        while node is not None:
            parent = node.parent
            removed.append((parent, node.name))
            if parent is self.tree.root or parent.children:
                break
            node = self.tree.remove(parent.path)
        return removed

    def status_file(self) -> bytes:
        """What ``.snapfs-status`` says: what is not available, and why."""
        problems, notes = [], []
        for lay in self.laid:
            p = lay.prefix
            problems += [(p + path, reason) for path, reason in lay.problems]
            notes += lay.notes
            for unit in lay.units.values():
                problems += [(p + path, reason) for path, reason in unit.missing]
                notes += unit.notes
        views = [(lay.prefix, v) for lay in self.laid for u in lay.units.values() for v in u.views]
        problems += [(p + v.path, v.problem) for p, v in views if v.problem is not None]
        problems += [(f"{p}{v.disk.relpath}/{v.folder}/{v.qcow2_filename}", v.qcow2_problem)
                     for p, v in views if v.problem is None and v.qcow2_problem is not None]
        problems += list(self.status.problems.items())
        return self.status.render(", ".join(lay.source.label for lay in self.laid), notes, problems)
