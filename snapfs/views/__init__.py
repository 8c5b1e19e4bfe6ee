"""Views: what each file in a disk's chain/, layers/ and dirty/ folders is.

A view knows the export it reads from (an ``ExportSpec``), how to turn that
export's block status into its extent map, and its extended attributes. Its
map is read once, on first need, and kept for the life of the mount: a
read-only mount serves images that do not change under it (an image a
running VM writes is refused as "in use").

One module per kind: ``chain.py``, ``layer.py``, ``dirty.py``. A view speaks
in extents and export specs; the server pool (``nbd/``) does the rest, so
this package is pure (no pyfuse3, no libnbd).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import trio

from .. import extents as ex
from ..errors import SnapfsError, Unavailable
from ..formats import IMAGE_SUFFIXES
from ..formats.chain import Disk, Layer
from ..nbd.spec import ExportSpec

if TYPE_CHECKING:
    from ..nbd.pool import ServerPool

# What the status file says (views not offered, notes), logged as it is found.
report = logging.getLogger("snapfs.report")


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
        """The extent map, read from qemu on first use; Unavailable if unservable."""
        if self.map is not None:
            return self.map
        if self.problem is not None:
            raise Unavailable(self.problem)
        async with self._lock:
            if self.problem is not None:
                # Another open waited on the lock while this view failed.
                raise Unavailable(self.problem)
            if self.map is None:
                try:
                    self.map = self.build_map(await self.read_runs(pool))
                except SnapfsError as e:
                    self.problem = e.reason
                    report.warning("%s/%s/%s is not available: %s", self.disk.relpath,
                                self.folder, self.filename, self.problem)
                    raise Unavailable(self.problem, e.errno) from None
        return self.map

    async def read_runs(self, pool: ServerPool) -> dict[str, list[ex.Run]]:
        return await pool.block_status(self.spec, self.size)

    def build_map(self, runs: dict[str, list[ex.Run]]) -> ex.ExtentMap:
        raise NotImplementedError

    def specs(self) -> list[ExportSpec]:
        """Every export the view reads from."""
        return [self.spec]
