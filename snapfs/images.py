"""Find the disks in an image directory: leaves, their chains, their bitmaps.

A *leaf* is a qcow2 or raw image that no other image under the directory uses
as its backing file; each leaf is one disk. Its chain is followed through the
backing files named in the qcow2 headers. What can be trusted is decided here,
before qemu sees any file (see "Safety" in docs/views.md):

- the format of a file found in the directory comes from its name and header:
  ``.raw`` is raw; a qcow2 header makes qcow2; ``.img`` without one is raw.
  Anything else is not an image and is ignored.
- the format of a backing file comes only from the image that names it
  (the backing format header extension); without it the chain is cut.
- a backing file that resolves outside the directory is not followed unless
  the caller allows it; nor are protocol names (``nbd:``, ``json:``...) and
  external data files.

Broken pieces never hide good ones: a layer that cannot be used cuts the chain
above it, but every layer still usable keeps its layer view.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import stat
import struct
from dataclasses import dataclass, field

from . import qcow2

log = logging.getLogger(__name__)

RAW_SUFFIXES = (".raw", ".img")
QCOW2_SUFFIXES = (".qcow2", ".qcow")

# Prefixes qemu would take as a protocol rather than a file name.
_PROTOCOL = re.compile(r"^(json|nbd|nbds|http|https|ftp|ftps|ssh|iscsi|rbd|gluster|nfs|"
                       r"null-co|null-aio|blkdebug|blkverify|host_device|host_cdrom|vvfat|"
                       r"file)[+:]", re.IGNORECASE)

# qemu's image locking (block/file-posix.c): a process holding permission N
# has a shared lock on byte 100 + N. Permission 1 is BLK_PERM_WRITE.
_LOCK_BYTE_WRITE = 101


@dataclass
class Layer:
    """One image file of a chain.

    path: absolute path (as found, not resolved: the path users know).
    format: "qcow2" or "raw".
    size: virtual size in bytes.
    backing_path: absolute path of the backing file, None for a base.
    bitmaps: persistent dirty bitmaps stored in this image.
    problem: why this layer cannot be served (None when it can).
    """

    path: str
    format: str
    size: int = 0
    backing_path: str | None = None
    backing_format: str | None = None
    bitmaps: list[qcow2.Bitmap] = field(default_factory=list)
    problem: str | None = None
    mtime_ns: int = 0

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


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


@dataclass
class Problem:
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def format_by_name(path: str) -> str | None:
    """The format of a file found in the directory, or None if it is no image."""
    lower = path.lower()
    if lower.endswith(".raw"):
        return "raw"
    if qcow2.is_qcow2(path):
        return "qcow2"
    if lower.endswith(".img"):
        return "raw"
    if lower.endswith(QCOW2_SUFFIXES):
        return "qcow2"  # read_layer reports the missing header
    return None


def locked_for_write(path: str) -> bool:
    """True if a qemu process holds the image open for writing (a running VM)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        # struct flock on Linux x86_64/aarch64: short, short, off_t, off_t, pid_t.
        req = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, _LOCK_BYTE_WRITE, 1, 0)
        res = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, req)
        return struct.unpack("hhqqi4x", res)[0] != fcntl.F_UNLCK
    except OSError:
        return False
    finally:
        os.close(fd)


def _device_size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def read_layer(path: str, fmt: str) -> Layer:
    """Read one image's metadata; problems are recorded, never raised."""
    layer = Layer(path=path, format=fmt)
    try:
        st = os.stat(path)
    except OSError as e:
        layer.problem = f"cannot open: {e.strerror}"
        return layer
    layer.mtime_ns = st.st_mtime_ns
    if fmt == "raw":
        # qemu serves a raw file in whole sectors: a partial last sector
        # reads as zeros up to the next multiple of 512.
        size = st.st_size
        if stat.S_ISBLK(st.st_mode):
            try:
                size = _device_size(path)
            except OSError as e:
                layer.problem = f"cannot open: {e.strerror}"
                return layer
        layer.size = (size + 511) // 512 * 512
    else:
        try:
            hdr = qcow2.read_header(path)
        except qcow2.Qcow2Error as e:
            layer.problem = f"not a usable qcow2 image: {e}"
            return layer
        layer.size = hdr.size
        layer.bitmaps = hdr.bitmaps
        if hdr.marked_corrupt:
            layer.problem = "qcow2 image is marked corrupt (run qemu-img check -r all)"
            return layer
        if hdr.external_data_file:
            layer.problem = "qcow2 images with an external data file are not supported"
            return layer
        if hdr.backing_file:
            layer.backing_path = os.path.normpath(os.path.join(os.path.dirname(path), hdr.backing_file))
            layer.backing_format = hdr.backing_format
            if _PROTOCOL.match(hdr.backing_file):
                layer.problem = f"backing file {hdr.backing_file!r} is not a plain file name"
    if locked_for_write(path):
        layer.problem = "in use: a running VM (or another qemu) has it open for writing"
    return layer


class Chains:
    """Reads each image once and follows backing chains.

    outside: called with a backing file's path; returns why it must not be
    followed (a path outside the image directory), or None.
    """

    def __init__(self, outside=None):
        self.outside = outside or (lambda path: None)
        self.layers: dict[str, Layer] = {}

    def layer(self, path: str, fmt: str) -> Layer:
        key = os.path.realpath(path)
        layer = self.layers.get(key)
        if layer is None or layer.format != fmt:
            # Found under another format by name; the naming image decides.
            layer = read_layer(path, fmt)
            self.layers.setdefault(key, layer)
        return layer

    def chain(self, top: Layer) -> tuple[list[Layer], str | None]:
        """The layers from the base up to ``top``, and why the chain was cut (or None)."""
        chain = [top]
        seen = {os.path.realpath(top.path)}
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
            elif layer.backing_format not in ("qcow2", "raw"):
                cut = f"backing file {bpath} has unsupported format {layer.backing_format!r}"
            elif (why := self.outside(bpath)) is not None:
                cut = why
            elif not os.path.exists(bpath):
                cut = f"backing file {bpath} is missing"
            elif os.path.realpath(bpath) in seen:
                cut = f"backing chain loops at {bpath}"
            if cut:
                break
            seen.add(os.path.realpath(bpath))
            below = self.layer(bpath, layer.backing_format)
            if below.format == "qcow2" and below.problem is None and not qcow2.is_qcow2(bpath):
                below.problem = "named as a qcow2 backing file but has no qcow2 header"
            chain.append(below)
            layer = below
        chain.reverse()
        return chain, cut


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
                fmt = format_by_name(path)
                if fmt is None:
                    continue
                found[path] = self._chains.layer(path, fmt)

        used = set()
        for layer in found.values():
            if layer.backing_path:
                used.add(os.path.realpath(layer.backing_path))
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

    def _outside(self, path: str) -> str | None:
        if self.allow_outside:
            return None
        real = os.path.realpath(path)
        if real == self.real_root or real.startswith(self.real_root.rstrip("/") + "/"):
            return None
        return f"backing file {path} is outside {self.root} (mount with --allow-outside-backing to follow it)"

    def _disk(self, path: str, top: Layer) -> Disk:
        chain, cut = self._chains.chain(top)
        rel = os.path.relpath(path, self.root)
        if cut:
            self.problems.append(Problem(rel, cut))
        return Disk(relpath=rel, chain=chain, complete=cut is None, cut_reason=cut)
