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


def build_tree(images: str, allow_outside: bool, writable: bool = False) -> tuple[Tree, Status]:
    """Scan the image directory and lay out the mount (``writable``: a ``--rw`` mount)."""
    scan = ImageDirectory(images, allow_outside=allow_outside).scan()
    tree = Tree(writable)
    status = Status(scan.root)
    status.problems += [(p.path, p.reason) for p in scan.problems]
    tree.add_status()
    # The root needs what listing the image directory needs.
    tree.root.paths = ((scan.root, LIST),) + tuple((d, SEARCH) for d in parents(scan.root))
    for disk in scan.disks:
        views, missing = disk_views(disk)
        status.problems += missing
        # Directories mirror the image directory's: they take its permissions.
        parts = disk.relpath.split("/")[:-1]
        for i in range(len(parts)):
            rel = "/".join(parts[: i + 1])
            tree.directory(rel).paths = ((os.path.join(scan.root, rel), LIST),)
        _disk_dirs(tree, disk)
        link_layers(views)
        if writable:
            mark_writable(views)
        for view in views:
            tree.add_view(view)
        status.views += views
    for path, reason in status.problems:
        report.warning("not available: %s: %s", path, reason)
    log.info("%d disk(s), %d view(s) from %s", len(scan.disks), len(status.views), scan.root)
    return tree, status


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
