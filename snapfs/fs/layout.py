"""Laying a source's disks out in the mount's tree and status file.

Pure: a source hands in disks and views, this decides where they go.
"""

from __future__ import annotations

import logging
import os

from ..sources.imagedir import ImageDirectory, disk_views
from ..views import link_layers, mark_writable
from .access import LIST, READ, SEARCH, parents
from .tree import Status, Tree

log = logging.getLogger(__name__)
# What the status file says (views not offered, notes), logged as it is found.
report = logging.getLogger("snapfs.report")


def build_tree(images: str, allow_outside: bool, writable: bool = False) -> tuple[Tree, Status, dict]:
    """Scan the image directory and lay out the mount (``writable``: a ``--rw`` mount).

    Returns the tree, the status and the disks laid out: ``{relpath: DiskEntry}``
    (``snapfs refresh`` compares a new scan with them).
    """
    scan = ImageDirectory(images, allow_outside=allow_outside).scan()
    tree = Tree(writable)
    status = Status(scan.root)
    tree.add_status()
    # The root needs what listing the image directory needs.
    tree.root.paths = ((scan.root, LIST),) + tuple((d, SEARCH) for d in parents(scan.root))
    disks = {disk.relpath: add_disk(tree, scan.root, disk) for disk in scan.disks}
    set_status(status, scan, disks)
    for path, reason in status.problems:
        report.warning("not available: %s: %s", path, reason)
    log.info("%d disk(s), %d view(s) from %s", len(scan.disks), len(status.views), scan.root)
    return tree, status, disks


class DiskEntry:
    """A disk of an image directory as laid out: its views, what it could not
    offer, and what it was made from (``signature``)."""

    def __init__(self, disk, views, missing):
        self.disk = disk
        self.views = views
        self.missing = missing
        self.signature = disk_signature(disk)


def disk_signature(disk) -> tuple:
    """What a disk's views depend on: each layer's file (as found and its
    inode), times, size, backing file, bitmaps and problem, and how the chain ends."""
    return (disk.complete, disk.cut_reason, tuple(
        (lay.path, lay.format, lay.pin, lay.mtime_ns, lay.ctime_ns, lay.size, lay.backing_path,
         lay.backing_format,
         lay.problem, tuple((b.name, b.flags, b.granularity) for b in lay.bitmaps))
        for lay in disk.chain))


def add_disk(tree: Tree, root: str, disk) -> DiskEntry:
    """Lay out one disk of an image directory: its directory, folders and views."""
    views, missing = disk_views(disk)
    # Directories mirror the image directory's: they take its permissions.
    parts = disk.relpath.split("/")[:-1]
    for i in range(len(parts)):
        rel = "/".join(parts[: i + 1])
        tree.directory(rel).paths = ((os.path.join(root, rel), LIST),)
    _disk_dirs(tree, disk)
    link_layers(views)
    if tree.writable:
        mark_writable(views)
    for view in views:
        tree.add_view(view)
    return DiskEntry(disk, views, missing)


def set_status(status: Status, scan, disks: dict) -> None:
    """The status file's problems and views: the scan's, and each disk's."""
    status.problems = [(p.path, p.reason) for p in scan.problems]
    for entry in disks.values():
        status.problems += entry.missing
    status.views = [v for entry in disks.values() for v in entry.views]


def layout(tree: Tree, status: Status, plan) -> None:
    """Put one libvirt domain's plan into the tree and the status file."""
    tree.directory(plan.dirname)
    for rel in plan.disk_dirs:
        for folder in ("chain", "layers", "dirty"):
            tree.directory(f"{rel}/{folder}")
    for disk in {id(v.disk): v.disk for v in plan.views}.values():
        _disk_dirs(tree, disk)
    link_layers(plan.views)
    if tree.writable:
        mark_writable(plan.views)
    for view in plan.views:
        tree.add_view(view)
    status.replace(plan.dirname, plan.missing, plan.notes, plan.views)
    for path, reason in plan.missing:
        report.warning("not available: %s: %s", path, reason)
    for note in plan.notes:
        report.warning("%s", note)
    log.info("domain %s: %d disk(s), %d view(s)%s", plan.name, len(plan.disk_dirs), len(plan.views),
             " (running: read through a backup job)" if plan.running else "")


def _disk_dirs(tree: Tree, disk) -> None:
    """A disk's directory and folders: they show the leaf's names, and take its permissions."""
    needs = ((disk.top.path, READ),) + tuple((d, SEARCH) for d in parents(disk.top.path))
    tree.directory(disk.relpath).paths = needs
    for folder in ("chain", "layers", "dirty"):
        tree.directory(f"{disk.relpath}/{folder}").paths = needs
