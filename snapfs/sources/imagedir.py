"""The image-directory source: every leaf image under DIR is a disk.

A *leaf* is an image that no other image under the directory uses
as its backing file; each leaf is one disk, its chain followed through the
backing files named in the qcow2 headers (``formats.chain``). A backing file
or a leaf that resolves (after symlinks) outside the directory is not
followed unless the caller allows it: a crafted qcow2 or symlink must not turn
a mount into a reader of arbitrary host files.

Pure: no pyfuse3, no libnbd.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..formats import format_by_name
from ..formats.chain import Chains, Disk, Layer
from ..nbd.spec import ExportSpec
from ..views import View, escape_name, view_basename
from ..views.chain import ChainView
from ..views.dirty import DirtyView, UnionDirtyView
from ..views.layer import LayerView
from .bitmaps import bitmap_verdict


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

    def __init__(self, root: str, allow_outside: bool = False):
        self.root = os.path.abspath(root)
        self.real_root = os.path.realpath(root)
        self.allow_outside = allow_outside
        self.disks: list[Disk] = []
        self.problems: list[Problem] = []
        self._chains = Chains(self._outside)

    def scan(self) -> ImageDirectory:
        found: dict[str, Layer] = {}
        for dirpath, dirnames, filenames in os.walk(self.root, onerror=self._walk_error):
            dirnames.sort()
            for fname in sorted(filenames):
                path = os.path.join(dirpath, fname)
                if not os.path.isfile(path):
                    continue
                # Before anything opens it: a link to a device or a hung
                # mount must not be read at all.
                if os.path.islink(path) and (why := self._outside(path, "image")) is not None:
                    if format_by_name(path, by_name_only=True) is not None:
                        self.problems.append(Problem(os.path.relpath(path, self.root), why))
                    continue
                fmt = format_by_name(path)
                if fmt is None:
                    continue
                found[path] = self._chains.layer(path, fmt)

        used = set()
        for layer in found.values():
            if layer.backing_path:
                used.add(os.path.realpath(layer.backing_path))
            used.update(os.path.realpath(p) for p in layer.extent_paths)
        for path, layer in found.items():
            if os.path.realpath(path) in used:
                continue
            self.disks.append(self._disk(path, layer))
        for layer in self._chains.layers.values():
            if layer.problem:
                self.problems.append(Problem(layer.path, layer.problem))
        self.problems.sort(key=lambda p: p.path)
        return self

    def _walk_error(self, err: OSError) -> None:
        self.problems.append(Problem(err.filename or self.root, f"cannot list: {err.strerror}"))

    def _outside(self, path: str, what: str = "backing file") -> str | None:
        """Why ``path`` must not be read: it resolves outside the directory (or None)."""
        if self.allow_outside:
            return None
        real = os.path.realpath(path)
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
    with the whole chain.
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
    if not chain_ok:
        missing.append((f"{disk.relpath}/chain/", "chain views need every layer down to the base: "
                        + (disk.cut_reason or "a layer above cannot be read")))

    top = disk.top
    names = set()
    for bm in top.bitmaps:
        fname = f"{disk.relpath}/dirty/{escape_name(bm.name)}.raw"
        names.add(bm.name)
        if not (disk.complete and all(lay.problem is None for lay in disk.chain)):
            missing.append((fname, "dirty views read the whole chain, which is not available"))
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
