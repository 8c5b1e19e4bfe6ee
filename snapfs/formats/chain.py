"""Backing chains: from a top image down to its base, and disks made of them.

A layer that cannot be used cuts the chain above it; every layer still
usable keeps its layer view. Pure: no pyfuse3, no libnbd.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import IMAGE_FORMATS, Layer, qcow2, read_layer, vmdk_parent_changed


@dataclass
class Disk:
    """A leaf image and its chain, base first.

    relpath: the leaf's path relative to the image directory (the disk's
    directory in the mount). chain[0] is the lowest layer found: the base
    when ``complete``, else the layer above where the chain was cut.
    cut_reason: why the chain below chain[0] cannot be followed.
    Layers may carry a problem of their own; a chain view of layer i needs
    ``complete`` and no problem in chain[0..i].
    """

    relpath: str
    chain: list[Layer]
    complete: bool
    cut_reason: str | None = None

    @property
    def top(self) -> Layer:
        return self.chain[-1]

    @property
    def host(self):
        """The machine the disk's images are on (``hosts/``)."""
        return self.top.host


class Chains:
    """Reads each image once and follows backing chains, on one host (``hosts/``).

    outside: called with a backing file's path; returns why it must not be
    followed (a path outside the image directory), or None.
    """

    def __init__(self, host, outside=None):
        self.host = host
        self.outside = outside or (lambda path: None)
        self.layers: dict[str, Layer] = {}

    def layer(self, path: str, fmt: str) -> Layer:
        key = self.host.realpath(path)
        layer = self.layers.get(key)
        if layer is None or layer.format != fmt:
            # Found under another format by name; the naming image decides.
            layer = read_layer(path, fmt, self.host)
            self.layers.setdefault(key, layer)
        return layer

    def chain(self, top: Layer) -> tuple[list[Layer], str | None]:
        """The layers from the base up to ``top``, and why the chain was cut (or None)."""
        chain = [top]
        host = self.host
        seen = {host.realpath(top.path)}
        cut = None
        layer = top
        # A layer with a problem still names its backing file when its header
        # was readable (an image in use by a running VM): the layers below it
        # stay available.
        while layer.backing_path:
            bpath = layer.backing_path
            if not layer.backing_format:
                cut = (f"{layer.path} does not record the format of its backing file {bpath} "
                       f"(fix: qemu-img rebase -u -b {bpath} -F qcow2|raw {layer.path})")
            elif layer.backing_format not in IMAGE_FORMATS:
                cut = f"backing file {bpath} has unsupported format {layer.backing_format!r}"
            elif (why := self.outside(bpath)) is not None:
                cut = why
            elif (why := self._unreachable(bpath)) is not None:
                cut = why
            elif host.realpath(bpath) == host.realpath(layer.path):
                cut = f"backing chain loops at {bpath}: {layer.path} names itself as its backing file"
            elif host.realpath(bpath) in seen:
                cut = f"backing chain loops at {bpath}: {layer.path} names it, and it is above in the chain"
            if cut:
                break
            below = self.layer(bpath, layer.backing_format)
            if below.format == "qcow2" and below.problem is None and not qcow2.is_qcow2(bpath, host.open):
                below.problem = "named as a qcow2 backing file but has no qcow2 header"
            if (cut := vmdk_parent_changed(layer, below)) is not None:
                break
            seen.add(host.realpath(bpath))
            chain.append(below)
            layer = below
        chain.reverse()
        return chain, cut

    def _unreachable(self, path: str) -> str | None:
        """Why a backing file cannot even be looked at (missing, a symlink loop), or None."""
        try:
            self.host.stat(path)
        except FileNotFoundError:
            return f"backing file {path} is missing"
        except OSError as e:
            return f"backing file {path} cannot be reached: {e.strerror}"
        return None
