"""Views: what each file in a disk's chain/, layers/ and dirty/ folders is.

A view knows the export it reads from (an ``ExportSpec``), how to turn that
export's block status into its extent map, and its extended attributes. Its
map is read once, on first need, and kept for the life of the mount: a
read-only mount serves images that do not change under it (an image a
running VM writes is refused as "in use").

In a ``--rw`` mount, the chain and layer views of a disk's top image are
*writable*, and every view that reads a written image is *mutable*: its
map changes while it is written, and is read again when the writer is done.
The write session (``data/writes.py``) keeps it true; a view only holds it.

Every view is also a composed qcow2 file (``qcow2.py``), laid out from its
map when the map is known.

One module per kind: ``chain.py``, ``layer.py``, ``dirty.py``. A view speaks
in extents and export specs; the block status service (``data/status.py``)
and the server pool (``nbd/``) do the rest, so this package is pure (no
pyfuse3, no libnbd).
"""

from __future__ import annotations

import errno
import logging
import math

from .. import extents as ex
from ..errors import SnapfsError, Unavailable
from ..formats import IMAGE_SUFFIXES
from ..formats.chain import Disk, Layer
from ..nbd.spec import ExportSpec
from .qcow2 import Qcow2Image

# What the status file says (views not offered, notes), logged as it is found.
report = logging.getLogger("snapfs.report")


# The formats a --rw mount writes: what restores are tested on (docs/views.md).
WRITABLE_FORMATS = ("qcow2", "raw")
# A disk directory's folders, one per kind of view; every disk has all three.
FOLDERS = ("chain", "layers", "dirty")


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
    writable: a ``--rw`` mount writes the top image through this view.
    mutable: the view reads an image a writable view writes (its map and
    attributes are never cached by the kernel).
    map, runs: the extent map, and the block status runs it was built from
    (``set_map``); None until read, and again once forgotten.
    """

    kind = ""
    folder = ""  # the disk's folder holding views of this kind
    has_qcow2 = True  # a NAME.qcow2 beside NAME.raw
    offset = 0  # where the view starts in its export (a partition's start)

    def __init__(self, disk: Disk, basename: str, layer: Layer, spec: ExportSpec, size: int):
        self.disk = disk
        self.basename = basename
        self.layer = layer
        self.spec = spec
        self.size = size
        self.map: ex.ExtentMap | None = None
        self.problem: str | None = None
        self.writable = False
        self.mutable = False
        self.runs: dict[str, list[ex.Run]] | None = None
        self.below: View | None = None  # a layer view: the layer view of its backing file
        self._qcow2: tuple[ex.ExtentMap, Qcow2Image] | None = None

    @property
    def layer_mtime_ns(self) -> int:
        return self.layer.mtime_ns

    @property
    def filename(self) -> str:
        return self.basename + ".raw"

    @property
    def export_size(self) -> int:
        """The size of the export the view reads (its own, but for a partition)."""
        return self.size

    @property
    def export_map(self):
        """The map of the whole export, in its offsets (readahead skips its holes)."""
        return self.map

    @property
    def map_filename(self) -> str:
        return self.basename + ".map.json"

    @property
    def qcow2_filename(self) -> str:
        return self.basename + ".qcow2"

    @property
    def data_blocks(self) -> int:
        return math.ceil(self.map.data_bytes / 512)

    # -- the composed qcow2 file ----------------------------------------------

    def qcow2_backing(self) -> tuple[str, str] | None:
        """The backing file the ``.qcow2`` names, as ``(name, format)``; None for none."""
        return None

    @property
    def qcow2_problem(self) -> str | None:
        """Why the view has no ``.qcow2`` (its ``.raw`` is still offered), or None."""
        return None

    @property
    def qcow2_backed(self) -> bool:
        """The ``.qcow2`` lies on something (its backing file, or the backup it is rebased onto)."""
        return self.qcow2_backing() is not None

    def fill_spec(self) -> ExportSpec | None:
        """Where the bytes beneath the view come from (``qcow2.FILL`` clusters), or None."""
        return None

    def qcow2_image(self) -> Qcow2Image:
        """The ``.qcow2`` laid out from the map (which must be loaded), kept while the map is."""
        hit = self._qcow2
        if hit is None or hit[0] is not self.map:
            hit = self._qcow2 = (self.map, Qcow2Image(self.size, self.map.extents, self.qcow2_backing(),
                                                      self.qcow2_backed))
        return hit[1]

    def qcow2_specs(self) -> list[ExportSpec]:
        """Every export the ``.qcow2`` may read from: FILL clusters read beneath the view.

        Until the map is known, whether it has FILL clusters is not: it counts as having them.
        """
        fill = self.fill_spec()
        if fill is None or fill in self.specs():
            return self.specs()
        if self.map is not None and not self.qcow2_image().has_fill:
            return self.specs()
        return [*self.specs(), fill]

    @property
    def path(self) -> str:
        """The view file's path in the source's tree."""
        return f"{self.disk.relpath}/{self.folder}/{self.filename}"

    def xattrs(self) -> dict[str, str]:
        x = {
            "user.snapfs.view": self.kind,
            "user.snapfs.image": self.layer.path,
            "user.snapfs.format": self.layer.format,
        }
        if self.layer.backing_path:
            x["user.snapfs.backing"] = self.layer.backing_path
        if self.spec.snapshot is not None:
            x["user.snapfs.snapshot"] = self.spec.snapshot
        host = getattr(self.layer.host, "name", None)
        if host is not None:
            x["user.snapfs.host"] = host
        return x

    def set_map(self, runs: dict[str, list[ex.Run]]) -> ex.ExtentMap:
        """Build the map from block status runs, and keep both."""
        self.map = self.build_map(runs)
        self.runs = runs
        return self.map

    def fail(self, e: SnapfsError) -> Unavailable:
        """The view turned out not to be servable: it disappears, with the reason."""
        self.problem = e.reason
        report.warning("%s/%s/%s is not available: %s", self.disk.relpath,
                       self.folder, self.filename, self.problem)
        return Unavailable(self.problem, e.errno)

    def forget_map(self) -> None:
        """The image changed under this view: read the map again on next use."""
        self.map = None
        self.runs = None

    def write_refusal(self) -> tuple[int, str] | None:
        """Why this view is not written, as ``(errno, reason)``; None if it is writable."""
        if self.writable:
            return None
        if self.spec.socket is not None:
            return errno.EBUSY, ("the domain is running: its disk is never written "
                                 "(shut the domain off to restore it)")
        if self.kind == "dirty":
            return errno.EACCES, "dirty views are read-only: restore through the chain or layer view"
        if self.spec.snapshot is not None:
            return errno.EACCES, "an internal snapshot is read-only"
        if self.layer.format not in WRITABLE_FORMATS:
            return errno.EACCES, (f"snapfs writes qcow2 and raw images only, not {self.layer.format} "
                                  "(convert the disk with qemu-img convert to restore into it)")
        if self.layer is not self.disk.top:
            return errno.EACCES, (f"{self.layer.path} is not the top image of the disk (the image "
                                  f"above it is based on it); only {self.disk.top.path} is written")
        return errno.EACCES, "this image cannot be written"

    async def read_runs(self, status) -> dict[str, list[ex.Run]]:
        """The block status the map is built from (``data.status.BlockStatus``)."""
        return await status.runs(self.spec, self.size)

    def build_map(self, runs: dict[str, list[ex.Run]]) -> ex.ExtentMap:
        raise NotImplementedError

    def specs(self) -> list[ExportSpec]:
        """Every export the view reads from."""
        return [self.spec]


def link_layers(views: list[View]) -> None:
    """Each layer view learns the layer view of its backing file (``View.below``).

    Its ``.qcow2`` names that view's ``.qcow2`` as its backing file, so a
    copied ``layers/`` folder is a chain qemu opens as it is.
    """
    by_disk: dict[int, dict[str, View]] = {}
    for v in views:
        if v.kind == "layer":
            by_disk.setdefault(id(v.disk), {}).setdefault(v.layer.host.realpath(v.layer.path), v)
    for v in views:
        if v.kind == "layer" and v.layer.backing_path:
            v.below = by_disk[id(v.disk)].get(v.layer.host.realpath(v.layer.backing_path))
    # An image that names itself, or a loop of them (the scan reports it):
    # no layer view names a loop's .qcow2, and nothing walks it for ever.
    for v in views:
        seen = set()
        w = v
        while w is not None and w.kind == "layer" and id(w) not in seen:
            seen.add(id(w))
            w = w.below
        if w is not None and id(w) in seen:
            w.below = None


def mark_writable(views: list[View]) -> None:
    """A ``--rw`` mount: the chain and layer views of each disk's top image are
    writable, and every view reading such an image is mutable.

    The top image is the one no other image uses as its backing file (a leaf;
    a libvirt domain's active image). An internal snapshot, a running
    domain's backup export and dirty views are never written.
    """
    tops = set()
    for v in views:
        if (v.kind in ("chain", "layer") and v.layer is v.disk.top and v.layer.problem is None
                and v.layer.format in WRITABLE_FORMATS
                and v.spec.socket is None and v.spec.snapshot is None):
            v.writable = True
            tops.add(v.spec.image)
    for v in views:
        v.mutable = any(s.socket is None and s.image in tops for s in v.specs())
