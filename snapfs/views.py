"""Views: what each file in a disk's chain/, layers/ and dirty/ folders is.

A view knows the export it reads from (an ``ExportSpec``), how to turn that
export's block status into its extent map, and its extended attributes. Its
map is read once, on first need, and kept for the life of the mount: a
read-only mount serves images that do not change under it (an image a
running VM writes is refused as "in use").
"""

from __future__ import annotations

import logging
import math

import trio

from . import extents as ex
from . import nbd_client
from .bitmaps import bitmap_verdict
from .images import Disk, Layer
from .qemu_nbd import ExportSpec, ServerError, ServerPool

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".qcow2", ".qcow", ".raw", ".img")


def view_basename(index: int, width: int, layer: Layer) -> str:
    """``NN-name``: chain order first (base is 00), then the file name less its suffix."""
    name = layer.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    return f"{index:0{width}d}-{name}"


def escape_name(name: str) -> str:
    """A file name for any bitmap name: '/' and '%' escaped, '.'/'..' avoided."""
    out = name.replace("%", "%25").replace("/", "%2F")
    if out in ("", ".", "..") or out.startswith("."):
        out = "%2E" + out[1:] if out else "%00"
    return out


class View:
    """One view file (``NAME.raw``) and the map beside it (``NAME.map.json``).

    kind: "chain", "layer" or "dirty" (the ``user.snapfs.view`` xattr).
    layer: the image the view is about (xattrs); for a dirty view the image
    holding the bitmap.
    spec: the export reads and block status come from.
    problem: set once the view turned out not to be servable; it then
    disappears from the mount and the reason shows in the status file.
    """

    kind = ""
    folder = ""  # the disk's folder holding views of this kind

    def __init__(self, disk: Disk, basename: str, layer: Layer, spec: ExportSpec, size: int):
        self.disk = disk
        self.basename = basename
        self.layer = layer
        self.spec = spec
        self.size = size
        self.map: ex.ExtentMap | None = None
        self.problem: str | None = None
        self._lock = trio.Lock()

    @property
    def layer_mtime_ns(self) -> int:
        return self.layer.mtime_ns

    @property
    def filename(self) -> str:
        return self.basename + ".raw"

    @property
    def map_filename(self) -> str:
        return self.basename + ".map.json"

    @property
    def data_blocks(self) -> int:
        return math.ceil(self.map.data_bytes / 512)

    def xattrs(self) -> dict[str, str]:
        x = {
            "user.snapfs.view": self.kind,
            "user.snapfs.image": self.layer.path,
            "user.snapfs.format": self.layer.format,
        }
        if self.layer.backing_path:
            x["user.snapfs.backing"] = self.layer.backing_path
        return x

    async def load_map(self, pool: ServerPool) -> ex.ExtentMap:
        """The extent map, read from qemu on first use; ServerError if unservable."""
        if self.map is not None:
            return self.map
        if self.problem is not None:
            raise ServerError(self.problem)
        async with self._lock:
            if self.problem is not None:
                # Another open waited on the lock while this view failed.
                raise ServerError(self.problem)
            if self.map is None:
                try:
                    self.map = self.build_map(await self.read_runs(pool))
                except (ServerError, nbd_client.NBDError) as e:
                    self.problem = getattr(e, "reason", str(e))
                    log.warning("%s/%s/%s is not available: %s", self.disk.relpath,
                                self.folder, self.filename, self.problem)
                    raise ServerError(self.problem, e.errno) from None
        return self.map

    async def read_runs(self, pool: ServerPool) -> dict[str, list[ex.Run]]:
        return await pool.block_status(self.spec, self.size)

    def build_map(self, runs: dict[str, list[ex.Run]]) -> ex.ExtentMap:
        raise NotImplementedError

    def specs(self) -> list[ExportSpec]:
        """Every export the view reads from."""
        return [self.spec]


class ChainView(View):
    """The disk as the guest saw it when ``layer`` was the top of the chain."""

    kind = "chain"
    folder = "chain"

    def build_map(self, runs):
        has_backing = len(self.spec.layers) > 1
        ext = ex.allocation_extents(self.size, runs[nbd_client.BASE_ALLOCATION],
                                    runs.get(nbd_client.ALLOCATION_DEPTH), has_backing)
        return ex.ExtentMap(self.size, ext, is_data=lambda e: not e.zero, reads_zero=lambda e: e.zero)


class LayerView(View):
    """One layer alone (``"backing": null``): only what it holds itself."""

    kind = "layer"
    folder = "layers"

    def build_map(self, runs):
        has_backing = self.layer.backing_path is not None
        ext = ex.allocation_extents(self.size, runs[nbd_client.BASE_ALLOCATION],
                                    runs.get(nbd_client.ALLOCATION_DEPTH), has_backing)
        return ex.ExtentMap(self.size, ext, is_data=lambda e: not e.hole, reads_zero=lambda e: e.zero)


class DirtyView(View):
    """The current disk's data where the bitmap marks changes; zeros elsewhere.

    ``spec`` serves the disk with ``spec.bitmap`` as its dirty context.
    bitmap: the name users know (``user.snapfs.bitmap``): a libvirt backup
    job exports a checkpoint's bitmap under a name of its own.
    backupmode: ``incremental``, or ``full`` for a view that counts every
    area as changed (libvirt mode only; ``reason`` says why).
    """

    kind = "dirty"
    folder = "dirty"
    backupmode: str | None = None
    reason: str | None = None

    def __init__(self, disk, basename, layer, spec, size, bitmap: str | None = None):
        super().__init__(disk, basename, layer, spec, size)
        self.bitmap = bitmap or spec.bitmap

    def xattrs(self):
        x = super().xattrs()
        x["user.snapfs.bitmap"] = self.bitmap
        if self.backupmode is not None:
            x["user.snapfs.backupmode"] = self.backupmode
        return x

    def build_map(self, runs):
        return self._dirty_map(runs[nbd_client.dirty_context(self.spec.bitmap)], runs)

    def _dirty_map(self, bitmap_runs, runs):
        ext = ex.dirty_extents(self.size, bitmap_runs, runs[nbd_client.BASE_ALLOCATION])
        return ex.ExtentMap(self.size, ext, is_data=lambda e: e.dirty,
                            reads_zero=lambda e: e.zero or not e.dirty)


class UnionDirtyView(DirtyView):
    """A checkpoint's bitmap copied into several layers: changed where any copy says so.

    ``spec`` serves the disk (reads and zero status, no bitmap);
    ``bitmap_specs`` each serve one layer alone with its copy of the bitmap.
    """

    backupmode = "incremental"

    def __init__(self, disk, basename, layer, spec, size, bitmap: str,
                 bitmap_specs: list[ExportSpec]):
        super().__init__(disk, basename, layer, spec, size, bitmap)
        self.bitmap_specs = bitmap_specs

    def specs(self):
        return [self.spec, *self.bitmap_specs]

    async def read_runs(self, pool):
        runs = dict(await pool.block_status(self.spec, self.size))
        copies = [(await pool.block_status(s, self.size))[nbd_client.dirty_context(self.bitmap)]
                  for s in self.bitmap_specs]
        runs["union"] = ex.union_runs(self.size, *copies)
        return runs

    def build_map(self, runs):
        return self._dirty_map(runs["union"], runs)


class FullDirtyView(DirtyView):
    """No bitmap can be trusted for this checkpoint: every area counts as changed."""

    backupmode = "full"

    def __init__(self, disk, basename, layer, spec, size, bitmap: str, reason: str):
        super().__init__(disk, basename, layer, spec, size, bitmap)
        self.reason = reason

    def build_map(self, runs):
        ext = ex.full_dirty_extents(self.size, runs[nbd_client.BASE_ALLOCATION])
        return ex.ExtentMap(self.size, ext, is_data=lambda e: e.dirty,
                            reads_zero=lambda e: e.zero or not e.dirty)


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
        views.append(LayerView(disk, base, layer, ExportSpec(((layer.path, layer.format),)), layer.size))
        if chain_ok:
            spec = ExportSpec(tuple((lay.path, lay.format) for lay in reversed(disk.chain[: i + 1])))
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
        chain_layers = tuple((lay.path, lay.format) for lay in reversed(disk.chain))
        if len(holding) == 1:
            spec = ExportSpec(chain_layers, bitmap=bm.name)
            views.append(DirtyView(disk, escape_name(bm.name), top, spec, top.size))
        else:
            # Copies in backing files too (as libvirt makes them): their union.
            specs = [ExportSpec(((lay.path, lay.format),), bitmap=bm.name) for lay in holding]
            views.append(UnionDirtyView(disk, escape_name(bm.name), top, ExportSpec(chain_layers),
                                        top.size, bm.name, specs))
    for layer in disk.chain[:-1]:
        for bm in layer.bitmaps:
            if bm.name not in names:
                missing.append((f"{disk.relpath}/dirty/{escape_name(bm.name)}.raw",
                                f"bitmap {bm.name!r} is only in backing file {layer.path}: it does "
                                "not cover changes made in the layers above it"))
    return views, missing
