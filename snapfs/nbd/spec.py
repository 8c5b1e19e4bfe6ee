"""What one NBD export serves: its layers, bitmap, snapshot, or foreign socket.

Pure: specs are built by the sources and views, and turned into qemu-nbd
processes and connections by the pool.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

from ..formats import has_allocation_depth, json_node
from .contexts import ALLOCATION_DEPTH, BASE_ALLOCATION, dirty_context

# Layers above which a chain is opened by its top's header (``ExportSpec.headers``).
DEEP_CHAIN = 16


def headers_name(layers) -> bool:
    """Whether the headers of ``layers`` (``formats.Layer``, top first) name exactly
    that chain: each qcow2 names the next as its backing file, with its format
    (qemu then probes nothing), and the last has none."""
    for upper, lower in itertools.pairwise(layers):
        if (upper.format != "qcow2" or upper.backing_path != lower.path
                or upper.backing_format != lower.format):
            return False
    # qemu resolves a backing name beside the file it opened: the path
    # scanned must be that file's (no symlink on the way), and pinned.
    return layers[-1].backing_path is None and all(
        lay.pin is not None and lay.real in ("", lay.path) for lay in layers)


@dataclass(frozen=True)
class ExportSpec:
    """What one qemu-nbd exports.

    layers: ``(path, format)`` from the top layer down; the lowest qcow2 or vmdk layer
    gets ``"backing": null``, so a one-element spec is a single layer alone.
    bitmap: a dirty bitmap to export as ``qemu:dirty-bitmap:NAME``.
    snapshot: an internal snapshot of the top layer to serve instead of its
    current state (``--load-snapshot``).
    socket, export: set for an export someone else serves (a libvirt backup
    job's NBD server): no qemu-nbd is started, ``layers`` only names the
    images for messages.
    pins: ``(st_dev, st_ino)`` of each layer as scanned; qemu-nbd serves
    exactly those files or none (``qemu.QemuNBD.start``).
    writable: served for writing into the top layer (``--rw`` mounts); the
    layers beneath stay read-only, as qemu opens backing files.
    headers: qemu is given the top layer only and follows the images' own
    backing names and formats down the chain (set by ``of`` for a chain
    deeper than DEEP_CHAIN whose headers name exactly the scanned layers:
    qemu's time to open a nested ``json:`` grows as the cube of its depth,
    41 s at 500 layers against 2 s). Pinning holds either way: qemu-nbd
    must hold open exactly the pinned files (``qemu.QemuNBD.start``).
    ctimes: with headers, each layer's st_ctime_ns as scanned: a header
    rewritten in place since (a backing name qemu would follow to something
    that is no file: ``fat:``, ``nbd:``) changes it, and the server is refused.
    host: the machine the images are on (``hosts/``): it starts the server
    and connects to it. Exports of the same paths on two hosts differ.
    """

    layers: tuple[tuple[str, str], ...]
    bitmap: str | None = None
    snapshot: str | None = None
    socket: str | None = None
    export: str = ""
    pins: tuple[tuple[int, int] | None, ...] = ()
    writable: bool = False
    headers: bool = False
    ctimes: tuple[int, ...] = ()
    host: object = field(default=None, repr=False)

    @classmethod
    def of(cls, layers, **kw) -> ExportSpec:
        """The export of ``layers`` (``formats.Layer``, top first), on their host."""
        layers = tuple(layers)
        headers = len(layers) > DEEP_CHAIN and headers_name(layers)
        return cls(tuple(lay.node for lay in layers), pins=tuple(lay.pin for lay in layers),
                   host=layers[0].host, headers=headers,
                   ctimes=tuple(lay.ctime_ns for lay in layers) if headers else (), **kw)

    @property
    def image(self) -> str:
        """The top layer's path: the file a writable export writes."""
        return self.layers[0][0]

    def for_writing(self) -> ExportSpec:
        return replace(self, writable=True)

    @property
    def allocation_depth(self) -> bool:
        # A backup job's export does not offer it.
        return self.socket is None and has_allocation_depth(self.layers[0][1])

    @property
    def contexts(self) -> tuple[str, ...]:
        ctx = [BASE_ALLOCATION]
        if self.allocation_depth:
            ctx.append(ALLOCATION_DEPTH)
        if self.bitmap is not None:
            ctx.append(dirty_context(self.bitmap))
        return tuple(ctx)

    def json_filename(self) -> str:
        return json_node(self.layers[:1] if self.headers else self.layers, self.host.protocol_driver,
                         backing=not self.headers)

    def describe(self) -> str:
        paths = [p for p, _ in self.layers]
        # A deep chain is named by its ends (a 500-layer one in one line).
        what = " <- ".join(paths) if len(paths) <= 4 else \
            f"{paths[0]} <- ({len(paths) - 2} more) <- {paths[-1]}"
        if self.socket is not None:
            what = f"backup export {self.export!r} of {what}"
        if self.snapshot is not None:
            what = f"internal snapshot {self.snapshot!r} of {what}"
        if self.writable:
            what = f"{what} (for writing)"
        return f"{what} (bitmap {self.bitmap})" if self.bitmap else what
