"""The image-directory source: every leaf image under DIR is a disk.

A *leaf* is an image that no other image under the directory uses
as its backing file; each leaf is one disk, its chain followed through the
backing files named in the qcow2 headers (``formats.chain``). A backing file
or a leaf that resolves (after symlinks) outside the directory is not
followed unless the caller allows it: a crafted qcow2 or symlink must not turn
a mount into a reader of arbitrary host files.

``ImageDirectorySource`` is the source (``base.py``) a ``--images`` mount
holds: each disk is a unit, kept by a refresh while its files are as they
were. Pure: no pyfuse3, no libnbd.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import trio

from ..errors import ControlError, MountError, SourceError
from ..formats import format_by_name
from ..formats.chain import Chains, Disk, Layer
from ..hosts.local import LOCAL
from ..nbd.spec import ExportSpec
from ..needs import LIST, SEARCH, file_needs, parents
from ..views import FOLDERS, View, escape_name, link_layers, mark_writable, view_basename
from ..views.chain import ChainView
from ..views.dirty import DirtyView, UnionDirtyView
from ..views.layer import LayerView
from .base import Refresh, RefreshPlan, Scan, Unit
from .bitmaps import bitmap_verdict

log = logging.getLogger(__name__)


@dataclass
class Problem:
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class ImageDirectory:
    """The disks found in one image directory, and what was wrong on the way.

    disks: one Disk per leaf, sorted by relpath.
    problems: everything skipped, with the reason (the mount's status file).
    """

    def __init__(self, root: str, allow_outside: bool = False, host=LOCAL):
        self.host = host
        self.root = os.path.abspath(root)
        self.real_root = host.realpath(root)
        self.allow_outside = allow_outside
        self.disks: list[Disk] = []
        self.problems: list[Problem] = []
        self._chains = Chains(host, self._outside)

    def scan(self) -> ImageDirectory:
        host = self.host
        found: dict[str, Layer] = {}
        for dirpath, dirnames, filenames in host.walk(self.root, onerror=self._walk_error):
            dirnames.sort()
            for fname in sorted(filenames):
                path = os.path.join(dirpath, fname)
                try:
                    layer = self._image(path)
                except Exception as e:  # whatever a file is, it must not end the scan
                    self._unexpected(path, e)
                    continue
                if layer is not None:
                    found[path] = layer

        real = {path: host.realpath(path) for path in found}
        # What other images use (an image naming itself is still a leaf: no
        # other image uses it; its chain stops at once, with the reason).
        used: dict[str, list[str]] = {}
        extents = set()  # parts of a (refused) VMDK descriptor file: its line says why
        for path, layer in found.items():
            if layer.backing_path and host.realpath(layer.backing_path) != real[path]:
                used.setdefault(host.realpath(layer.backing_path), []).append(path)
            extents.update(host.realpath(p) for p in layer.extent_paths)
        for path, layer in found.items():
            if real[path] in used or real[path] in extents:
                continue
            try:
                self.disks.append(self._disk(path, layer))
            except Exception as e:  # a crafted chain must not end the scan
                self._unexpected(path, e)
        for layer in self._chains.layers.values():
            if layer.problem:
                self.problems.append(Problem(layer.path, layer.problem))
        self._unreached(found, real, used, extents)
        self.problems.sort(key=lambda p: p.path)
        return self

    def _image(self, path: str) -> Layer | None:
        """The layer of a file found in the directory, or None when it is no image."""
        host = self.host
        if not host.isfile(path):
            return None  # a FIFO, a socket, a device, a directory, a broken link: never opened
        # Before anything opens it: a link to a device or a hung
        # mount must not be read at all.
        if host.islink(path) and (why := self._outside(path, "image")) is not None:
            if format_by_name(path, by_name_only=True) is not None:
                self.problems.append(Problem(os.path.relpath(path, self.root), why))
            return None
        fmt = format_by_name(path, host=host)
        if fmt is None:
            return None
        return self._chains.layer(path, fmt)

    def _unexpected(self, path: str, e: Exception) -> None:
        log.debug("scanning %s failed", path, exc_info=True)
        self.problems.append(Problem(os.path.relpath(path, self.root),
                                     f"cannot be read ({type(e).__name__}: {e})"))

    def _unreached(self, found: dict[str, Layer], real: dict[str, str], used: dict[str, list[str]],
                   extents: set[str]) -> None:
        """Say why each image that is in no disk's chain is not offered: it is
        used only by images in a backing loop with it, or by an image whose
        chain stops above it (that image's line says why)."""
        reached = {self.host.realpath(lay.path) for d in self.disks for lay in d.chain}
        by_real = {real[p]: (p, lay) for p, lay in found.items()}
        rel = {p: os.path.relpath(p, self.root) for p in found}
        for path, layer in found.items():
            if real[path] in reached or real[path] not in used or real[path] in extents:
                continue
            loop = self._loop(path, layer, by_real)
            if loop is not None:
                names = " -> ".join(rel[p] for p in loop + [path])
                why = (f"backing chain loops ({names}): images that back each other are no image's "
                       "base and no disk of their own")
            else:
                users = ", ".join(rel.get(p, p) for p in sorted(used[real[path]]))
                why = f"no disk of its own: {users} names it as a backing file, but does not reach it (see there)"
            self.problems.append(Problem(rel[path], why))

    def _loop(self, path: str, layer: Layer, by_real: dict) -> list[str] | None:
        """The images from ``path`` round its backing loop back to it, or None."""
        host = self.host
        start = host.realpath(path)
        out, seen = [path], {start}
        while layer.backing_path:
            nxt = host.realpath(layer.backing_path)
            if nxt == start:
                return out
            if nxt in seen or nxt not in by_real:
                return None
            seen.add(nxt)
            path, layer = by_real[nxt]
            out.append(path)
        return None

    def _walk_error(self, err: OSError) -> None:
        self.problems.append(Problem(err.filename or self.root, f"cannot list: {err.strerror}"))

    def _outside(self, path: str, what: str = "backing file") -> str | None:
        """Why ``path`` must not be read: it resolves outside the directory (or None)."""
        if self.allow_outside:
            return None
        real = self.host.realpath(path)
        if real == self.real_root or real.startswith(self.real_root.rstrip("/") + "/"):
            return None
        where = f"{path} is outside {self.root}" if real == path else \
            f"{path} resolves to {real}, outside {self.root}"
        return f"{what} {where} (mount with --allow-outside-backing to follow it)"

    def _disk(self, path: str, top: Layer) -> Disk:
        chain, cut = self._chains.chain(top)
        rel = os.path.relpath(path, self.root)
        if cut:
            self.problems.append(Problem(rel, cut))
        return Disk(relpath=rel, chain=chain, complete=cut is None, cut_reason=cut)


def disk_views(disk: Disk) -> tuple[list[View], list[tuple[str, str]]]:
    """Every view a disk offers, and (path, reason) for each one it cannot.

    A chain view of layer i needs the whole chain below it; a layer view
    needs only its own layer; dirty views are the top layer's bitmaps read
    with the whole chain. A layer's internal snapshots are chain views too,
    ``NN-name@SNAPSHOT``: the disk as it was when the snapshot was taken,
    read with the layers beneath (qemu-nbd ``--load-snapshot``).
    """
    views: list[View] = []
    missing: list[tuple[str, str]] = []
    width = max(2, len(str(len(disk.chain) - 1)))
    chain_ok = disk.complete
    for i, layer in enumerate(disk.chain):
        base = view_basename(i, width, layer)
        if layer.problem is not None:
            chain_ok = False
            missing.append((f"{disk.relpath}/layers/{base}.raw", layer.problem))
            continue
        views.append(LayerView(disk, base, layer, ExportSpec.of([layer]), layer.size))
        if chain_ok:
            spec = ExportSpec.of(reversed(disk.chain[: i + 1]))
            views.append(ChainView(disk, base, layer, spec, layer.size))
            views += _snapshot_views(disk, i, base, missing)
    if not chain_ok:
        missing.append((f"{disk.relpath}/chain/", _no_chain(disk)))

    top = disk.top
    names = set()
    for bm in top.bitmaps:
        fname = f"{disk.relpath}/dirty/{escape_name(bm.name)}.raw"
        names.add(bm.name)
        if not (disk.complete and all(lay.problem is None for lay in disk.chain)):
            missing.append((fname, "dirty views read the whole chain, which is not available"))
            continue
        if bm.problem is not None:
            missing.append((fname, f"bitmap in {top.path}: {bm.problem}"))
            continue
        holding, reason = bitmap_verdict(disk.chain, bm.name, require_enabled=False)
        if reason is not None:
            missing.append((fname, reason))
            continue
        chain_layers = list(reversed(disk.chain))
        if len(holding) == 1:
            spec = ExportSpec.of(chain_layers, bitmap=bm.name)
            views.append(DirtyView(disk, escape_name(bm.name), top, spec, top.size))
        else:
            # Copies in backing files too (as libvirt makes them): their union.
            specs = [ExportSpec.of([lay], bitmap=bm.name) for lay in holding]
            views.append(UnionDirtyView(disk, escape_name(bm.name), top, ExportSpec.of(chain_layers),
                                        top.size, bm.name, specs))
    for layer in disk.chain[:-1]:
        for bm in layer.bitmaps:
            if bm.name not in names:
                missing.append((f"{disk.relpath}/dirty/{escape_name(bm.name)}.raw",
                                f"bitmap {bm.name!r} is only in backing file {layer.path}: it does "
                                "not cover changes made in the layers above it"))
    return views, missing


def _snapshot_views(disk: Disk, i: int, base: str, missing: list) -> list[View]:
    """Chain views of layer ``i``'s internal snapshots; what cannot be served goes to ``missing``."""
    layer = disk.chain[i]
    views: list[View] = []
    if layer.snapshots_problem is not None:
        missing.append((f"{disk.relpath}/chain/{base}@*.raw",
                        f"the internal snapshots of {layer.path} are not read: {layer.snapshots_problem}"))
    for snap in layer.snapshots:
        name = f"{base}@{escape_name(snap.name)}"
        if snap.problem is not None:
            missing.append((f"{disk.relpath}/chain/{name}.raw", f"internal snapshot {snap.id}: {snap.problem}"))
            continue
        spec = ExportSpec.of(reversed(disk.chain[: i + 1]), snapshot=snap.name)
        views.append(ChainView(disk, name, layer, spec, snap.size))
    return views


def _no_chain(disk: Disk) -> str:
    """Why a disk's chain views are (some of them) missing: the chain was cut
    below its base, or a layer cannot be read (a disk of one layer: its own reason)."""
    if disk.cut_reason is not None:
        return f"chain views need every layer down to the base: {disk.cut_reason}"
    bad = next(lay for lay in disk.chain if lay.problem is not None)
    if len(disk.chain) == 1:
        return bad.problem
    return f"chain views from {bad.name} up need it, and it cannot be read: {bad.problem}"


def disk_signature(disk: Disk) -> tuple:
    """What a disk's views depend on: each layer's file (as found and its
    inode), times, size, backing file, bitmaps and problem, and how the chain ends."""
    return (disk.complete, disk.cut_reason, tuple(
        (lay.path, lay.format, lay.pin, lay.mtime_ns, lay.ctime_ns, lay.size, lay.backing_path,
         lay.backing_format, lay.problem, tuple((b.name, b.flags, b.granularity) for b in lay.bitmaps),
         tuple((sn.id, sn.name, sn.size) for sn in lay.snapshots))
        for lay in disk.chain))


def disk_unit(root: str, disk: Disk, writable: bool) -> Unit:
    """One disk of an image directory as a unit: its directories, views and problems.

    Directories above the disk mirror the image directory's and take their
    permissions; the disk's own directory and its folders show the leaf's
    names and take the leaf's (``needs``).
    """
    views, missing = disk_views(disk)
    link_layers(views)
    if writable:
        mark_writable(views)
    parts = disk.relpath.split("/")[:-1]
    dirs: list[tuple[str, tuple | None]] = [
        ("/".join(parts[: i + 1]), ((os.path.join(root, *parts[: i + 1]), LIST),)) for i in range(len(parts))]
    needs = file_needs(disk.top.path, disk.host)
    dirs += [(disk.relpath, needs)] + [(f"{disk.relpath}/{folder}", needs) for folder in FOLDERS]
    return Unit(key=disk.relpath, dirs=dirs, views=views, missing=missing, signature=disk_signature(disk))


class ImageDirectorySource:
    """``--images DIR``: every leaf image under DIR is a disk (a unit)."""

    kind = "images"

    def __init__(self, root: str, allow_outside: bool = False, writable: bool = False, watch: bool = False,
                 host=LOCAL, label: str | None = None):
        self.root = os.path.abspath(root)
        self.label = label or root
        self.host = host
        self.allow_outside = allow_outside
        self.writable = writable
        self.watch = watch  # --watch

    @property
    def where(self) -> str:
        """The directory, and its host when it is not this machine, for messages."""
        return self.root if self.host.name is None else f"{self.root} on {self.host.name}"

    async def open(self) -> None:
        if not self.host.connected:
            await self.host.reach()
        if not await trio.to_thread.run_sync(self.host.isdir, self.root):
            raise MountError(f"image directory {self.where} is not a directory")

    def _scan_now(self) -> Scan:
        found = ImageDirectory(self.root, allow_outside=self.allow_outside, host=self.host).scan()
        units = {disk.relpath: disk_unit(found.root, disk, self.writable) for disk in found.disks}
        self.host.expect([(path, fmt, pin) for u in units.values() for v in u.views for s in v.specs()
                          for (path, fmt), pin in zip(s.layers, s.pins or (None,) * len(s.layers), strict=True)])
        # The root needs what listing the image directory needs.
        root_needs = ((found.root, LIST),) + tuple((d, SEARCH) for d in parents(found.root, self.host))
        return Scan(units=units, root_needs=root_needs,
                    problems=[(p.path, p.reason) for p in found.problems])

    async def scan(self) -> Scan:
        try:
            scan = await trio.to_thread.run_sync(self._scan_now)
        except SourceError as e:
            raise MountError(str(e)) from None
        log.info("%d disk(s), %d view(s) from %s", len(scan.units),
                 sum(len(u.views) for u in scan.units.values()), self.where)
        return scan

    async def plan_refresh(self, request: Refresh, laid: dict[str, Unit]) -> RefreshPlan:
        """Scan again: a disk whose images are as they were keeps its views and
        their maps; a new leaf appears; a disk that is gone, or whose images
        changed, is laid out anew once none of its files is open."""
        if request != Refresh():
            raise ControlError("an image-directory mount is scanned again whole: snapfs refresh MOUNTPOINT")
        if not self.host.connected:
            try:
                await self.open()
            except MountError as e:
                raise SourceError(str(e)) from None
        scan = await trio.to_thread.run_sync(self._scan_now)
        keys = sorted(k for k in set(laid) | set(scan.units)
                      if not (k in scan.units and scan.units[k].same(laid.get(k))))

        async def build(keys):
            return {k: scan.units[k] for k in keys if k in scan.units}

        def answer(done: list[str], busy: dict[str, str]) -> str:
            total = len(set(laid) - set(done) | {k for k in done if k in scan.units})
            added = sum(k not in laid for k in done)
            removed = sum(k not in scan.units for k in done)
            msg = f"{total} disk(s): {added} new, {len(done) - added - removed} changed, {removed} gone"
            log.info("refresh of %s: %s%s", self.root, msg,
                     f"; not now: {', '.join(busy.values())}" if busy else "")
            if busy:
                raise ControlError(f"{msg}; left as they were, files open: {', '.join(busy.values())}")
            return msg

        return RefreshPlan(keys=keys, build=build, answer=answer, retire=True, problems=scan.problems)

    def watcher(self):
        """``--watch``: ``async run(refresh, pending, set_notes)`` over inotify on every
        directory under DIR, or None without ``--watch``; MountError when inotify
        cannot be had (the mount fails at once rather than not watching)."""
        if not self.watch:
            return None
        from .watch import Inotify, watch_images
        try:
            inotify = Inotify(self.root)
        except OSError as e:
            raise MountError(f"--watch: cannot watch {self.root}: {e.strerror or e}") from None

        async def run(refresh, pending, set_notes):
            await watch_images(inotify, refresh, pending, set_notes)
        return run

    def close(self) -> None:
        self.host.release()
