"""Image formats: which file is which format, what backs it, how qemu opens it.

Everything snapfs knows about image formats is here (``qcow2.py`` reads the
qcow2 header, ``vmdk.py`` a VMDK sparse extent and its descriptor,
``single.py`` the VDI, VHDX and VHD headers). What can be trusted is decided
before qemu sees any file (see "Safety" in docs/views.md):

- the format of a file found in a directory comes from its name and header:
  ``.raw`` is raw; ``.vmdk``, ``.vdi``, ``.vhdx``/``.avhdx`` and
  ``.vhd``/``.vpc`` are that format, and need its header (``read_layer``
  says what is wrong with one that has none); a qcow2 header makes qcow2;
  ``.img`` without one is raw. No other format is ever taken from content
  (a ``.img`` holding a VMDK header stays raw). Anything else is not an
  image (``format_by_name`` returns None).
- the format of a backing file comes only from the image that names it
  (the qcow2 backing format header extension; a VMDK's parent is a VMDK);
  ``chain.py`` follows backing files.
- protocol names (``nbd:``, ``json:``...) and external data files are refused,
  and so are VMDK files whose data is in extent files their descriptor names.
- a file is looked at before it is opened: only a regular file or a block
  device is ever opened (``not_an_image_file``; a FIFO would block the
  scan), through its host's ``open``, without blocking. A virtual size no
  file can have, or a path qemu cannot be handed (not UTF-8), is refused.
- qemu opens every image through a ``json:`` filename that spells out each
  node (``json_node``): the format (never probed), the protocol driver
  (``host_device`` for block devices; no name is ever parsed as an option
  string), and ``"backing": null`` where a view must stop.

Pure: no pyfuse3, no libnbd.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import stat
import struct
from dataclasses import dataclass, field

from . import qcow2, single, vmdk

log = logging.getLogger(__name__)

# The formats of libvirt domains' disks snapfs serves (sources/libvirt*.py).
FORMATS = ("qcow2", "raw")
# Formats a file can have in an image directory, or as a backing file.
IMAGE_FORMATS = ("qcow2", "raw", "vmdk", "vdi", "vhdx", "vpc")
# Formats that can have a backing file: their json: node says "backing", and
# their exports offer qemu:allocation-depth.
BACKED_FORMATS = ("qcow2", "vmdk")
RAW_SUFFIXES = (".raw", ".img")
QCOW2_SUFFIXES = (".qcow2", ".qcow")
# Formats known by name alone (their header must then be there).
NAMED_SUFFIXES = {".vmdk": "vmdk", ".vdi": "vdi", ".vhdx": "vhdx", ".avhdx": "vhdx",
                  ".vhd": "vpc", ".vpc": "vpc"}
IMAGE_SUFFIXES = QCOW2_SUFFIXES + RAW_SUFFIXES + tuple(NAMED_SUFFIXES)

# Prefixes qemu would take as a protocol rather than a file name.
_PROTOCOL = re.compile(r"^(json|nbd|nbds|http|https|ftp|ftps|ssh|iscsi|rbd|gluster|nfs|"
                       r"null-co|null-aio|blkdebug|blkverify|host_device|host_cdrom|vvfat|"
                       r"file)[+:]", re.IGNORECASE)

# The largest virtual size qemu serves (BDRV_MAX_LENGTH: INT64_MAX rounded
# down to 1 GiB); a view file's size is an off_t, signed 64 bits, too.
MAX_VIRTUAL_SIZE = (2**63 - 1) // (1 << 30) * (1 << 30)

# qemu's image locking (block/file-posix.c): a process holding permission N
# has a shared lock on byte 100 + N. Permission 1 is BLK_PERM_WRITE.
_LOCK_BYTE_WRITE = 101


@dataclass
class Layer:
    """One image file of a chain.

    path: absolute path (as found, not resolved: the path users know).
    format: one of IMAGE_FORMATS (qemu's driver name: a VHD is "vpc").
    size: virtual size in bytes.
    backing_path: absolute path of the backing file, None for a base.
    bitmaps: persistent dirty bitmaps stored in this image (qcow2 only).
    snapshots: its internal snapshots (qcow2 only); snapshots_problem: why
    its snapshot table was not read (qemu judges it when it opens the image).
    problem: why this layer cannot be served (None when it can).
    cid, parent_cid: a VMDK's content id and the one its parent had when
    the VMDK was made from it (qemu reads through a parent whose CID is
    still that one only).
    extent_paths: the files a (refused) VMDK descriptor file names: parts
    of it, not disks of their own.
    host: the machine the file is on (``hosts/``); paths are paths there.
    """

    path: str
    format: str
    size: int = 0
    backing_path: str | None = None
    backing_format: str | None = None
    bitmaps: list[qcow2.Bitmap] = field(default_factory=list)
    snapshots: list[qcow2.Snapshot] = field(default_factory=list)
    snapshots_problem: str | None = None
    problem: str | None = None
    mtime_ns: int = 0
    ctime_ns: int = 0  # changed by any write, and no tool sets it back
    real: str = ""  # the file it resolved to when read: what qemu opens
    pin: tuple[int, int] | None = None  # (st_dev, st_ino) of that file when read
    cid: int | None = None
    parent_cid: int | None = None
    extent_paths: tuple[str, ...] = ()
    host: object = field(default=None, compare=False, repr=False)

    @property
    def node(self) -> tuple[str, str]:
        """``(file, format)`` for an export: the file as resolved at scan time,
        so a symlink pointed elsewhere later does not change what is read."""
        return (self.real or self.path, self.format)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def format_by_name(path: str, by_name_only: bool = False, host=None) -> str | None:
    """The format of a file found in the directory, or None if it is no image.

    by_name_only: never open the file (a name without an image suffix is
    then no image). host: where the file is (``hosts/``), to read its header.
    """
    lower = path.lower()
    if lower.endswith(".raw"):
        return "raw"
    for suffix, fmt in NAMED_SUFFIXES.items():
        if lower.endswith(suffix):
            return fmt  # read_layer reports a missing header
    if not by_name_only and qcow2.is_qcow2(path, opener=host.open if host else qcow2.READ_BINARY):
        return "qcow2"
    if lower.endswith(".img"):
        return "raw"
    if lower.endswith(QCOW2_SUFFIXES):
        return "qcow2"  # read_layer reports the missing header
    return None


def not_an_image_file(mode: int) -> str | None:
    """Why a file of this type (``st_mode``) is never read as an image, or None
    for a regular file or a block device."""
    if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
        return None
    kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a character device" if stat.S_ISCHR(mode) else "a directory" if stat.S_ISDIR(mode)
            else "not a regular file")
    return f"{kind}: only regular files (and block devices) are read as images"


def locked_for_write(path: str) -> bool:
    """True if a qemu process holds the image open for writing (a running VM).

    Opened without blocking: a FIFO swapped in must not hang the caller."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return not_an_image_file(os.fstat(fd).st_mode) is None and fd_locked_for_write(fd)
    finally:
        os.close(fd)


def fd_locked_for_write(fd: int) -> bool:
    """``locked_for_write`` of an open file."""
    try:
        # struct flock on Linux x86_64/aarch64: short, short, off_t, off_t, pid_t.
        req = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, _LOCK_BYTE_WRITE, 1, 0)
        res = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, req)
        return struct.unpack("hhqqi4x", res)[0] != fcntl.F_UNLCK
    except OSError:
        return False


def _read_header(layer: Layer, path: str, fmt: str, st, host) -> bool:
    """Fill ``layer`` from the image's header; True when it turned out unusable."""
    opener = host.open
    if fmt == "raw":
        # qemu serves a raw file in whole sectors: a partial last sector
        # reads as zeros up to the next multiple of 512.
        size = st.st_size
        if stat.S_ISBLK(st.st_mode):
            try:
                with opener(path) as f:
                    size = f.seek(0, os.SEEK_END)
            except OSError as e:
                layer.problem = f"cannot open: {e.strerror}"
                return True
        layer.size = (size + 511) // 512 * 512
    elif fmt == "vmdk":
        try:
            hdr = vmdk.read_header(path, opener=opener)
        except vmdk.VmdkError as e:
            layer.problem = f"not a usable vmdk image: {e}"
            layer.extent_paths = tuple(os.path.normpath(os.path.join(os.path.dirname(path), x))
                                       for x in e.extents)
            return True
        layer.size = hdr.size
        layer.cid, layer.parent_cid = hdr.cid, hdr.parent_cid
        if hdr.parent:
            layer.backing_path = os.path.normpath(os.path.join(os.path.dirname(path), hdr.parent))
            if not_a_file_name(hdr.parent):
                layer.problem = f"parent file {hdr.parent!r} names a directory, not a file"
            layer.backing_format = "vmdk"  # as qemu takes it
            if _PROTOCOL.match(hdr.parent):
                layer.problem = f"parent file {hdr.parent!r} is not a plain file name"
    elif fmt in _SINGLE:
        try:
            hdr = _SINGLE[fmt](path, opener)
        except single.HeaderError as e:
            layer.problem = f"not a usable {fmt} image: {e}"
            return True
        layer.size = hdr.size
    else:
        try:
            hdr = qcow2.read_header(path, opener=opener)
        except qcow2.Qcow2Error as e:
            layer.problem = f"not a usable qcow2 image: {e}"
            return True
        layer.size = hdr.size
        layer.bitmaps = hdr.bitmaps
        layer.snapshots, layer.snapshots_problem = hdr.snapshots, hdr.snapshots_problem
        for snap in layer.snapshots:
            if snap.problem is None and snap.size > MAX_VIRTUAL_SIZE:
                snap.problem = f"its virtual size {snap.size} is larger than qemu serves"
        if hdr.marked_corrupt:
            layer.problem = "qcow2 image is marked corrupt (run qemu-img check -r all)"
            return True
        if hdr.external_data_file:
            layer.problem = "qcow2 images with an external data file are not supported"
            return True
        if hdr.backing_file:
            layer.backing_path = os.path.normpath(os.path.join(os.path.dirname(path), hdr.backing_file))
            layer.backing_format = hdr.backing_format
            if _PROTOCOL.match(hdr.backing_file):
                layer.problem = f"backing file {hdr.backing_file!r} is not a plain file name"
            elif not_a_file_name(hdr.backing_file):
                # normpath would make "base.qcow2/" base.qcow2; qemu opens it as
                # written, and fails (ENOTDIR).
                layer.problem = f"backing file {hdr.backing_file!r} names a directory, not a file"
    return False


def not_a_file_name(name: str) -> bool:
    """Whether a backing file name can only name a directory (``base.qcow2/``, ``.``)."""
    return name.endswith("/") or os.path.basename(name) in (".", "..")


def read_layer(path: str, fmt: str, host) -> Layer:
    """Read one image's metadata on ``host`` (``hosts/``); problems are recorded, never raised."""
    layer = Layer(path=path, format=fmt, real=host.realpath(path), host=host)
    try:
        st = host.stat(path)
    except OSError as e:
        layer.problem = f"cannot open: {e.strerror}"
        return layer
    layer.mtime_ns = st.st_mtime_ns
    layer.ctime_ns = st.st_ctime_ns
    layer.pin = (st.st_dev, st.st_ino)
    if (why := not_an_image_file(st.st_mode)) is not None:
        layer.problem = why  # never opened: a FIFO would block the scan
        return layer
    if not _utf8(layer.real):
        # qemu is handed every file in a json: filename, and its JSON parser
        # takes UTF-8 only: it could not open this one.
        layer.problem = (f"its path {os.fsencode(layer.real)!r} is not UTF-8: qemu takes file names "
                         "in JSON, which cannot hold it (rename it)")
        return layer
    try:
        if _read_header(layer, path, fmt, st, host):
            return layer
    except Exception as e:  # a parser's oversight on a crafted file: a problem, never a traceback
        log.debug("reading the header of %s failed", path, exc_info=True)
        layer.problem = f"not a usable {fmt} image: cannot read its header ({type(e).__name__}: {e})"
        return layer
    if layer.size > MAX_VIRTUAL_SIZE:
        # Every format's header is checked here: the view's st_size is an off_t.
        layer.problem = (f"not a usable {fmt} image: its virtual size {layer.size} is larger than "
                         f"qemu serves (at most {MAX_VIRTUAL_SIZE})")
        layer.size = 0
        return layer
    if host.locked_for_write(path):
        layer.problem = "in use: a running VM (or another qemu) has it open for writing"
    return layer


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a byte os.fsdecode could not decode
        return False
    return True


_SINGLE = {
    "vdi": lambda path, opener: single.read_vdi(path, opener=opener),
    "vpc": lambda path, opener: single.read_vpc(path, opener=opener),
    "vhdx": lambda path, opener: single.read_vhdx(path, differencing_name=path.lower().endswith(".avhdx"),
                                                  opener=opener),
}


def vmdk_parent_changed(layer: Layer, below: Layer) -> str | None:
    """Why qemu will not read ``layer`` (a VMDK) through ``below``, its parent: the
    parent's CID is no longer the one ``layer`` was made from (or None)."""
    if layer.format != "vmdk" or below.format != "vmdk" or None in (layer.parent_cid, below.cid):
        return None
    if layer.parent_cid == below.cid:
        return None
    return (f"{layer.path} records parentCID {layer.parent_cid:08x}, but its parent {below.path} "
            f"has CID {below.cid:08x}: the parent changed since the snapshot was made, and qemu "
            "refuses to read through it")


def has_allocation_depth(fmt: str) -> bool:
    """qemu-nbd's ``qemu:allocation-depth`` is used for the formats that can have
    a backing file (qcow2, as in ovirt-imageio, and vmdk): a raw, VDI, VHDX or
    VHD image has no backing file to tell apart."""
    return fmt in BACKED_FORMATS


def json_node(layers, protocol_driver, backing: bool = True) -> str:
    """The ``json:`` filename of ``layers`` (``(path, format)``, top first).

    The lowest qcow2 or vmdk layer gets ``"backing": null``, so one layer alone
    is read without anything beneath it. protocol_driver: the qemu driver of
    a path (``file``, ``host_device``), from the host the images are on.
    backing=False: no backing option at all, qemu follows the lowest layer's
    header (``nbd.spec.ExportSpec.headers``).
    """
    node = None
    for path, fmt in reversed(layers):
        new = {"driver": fmt, "file": {"driver": protocol_driver(path), "filename": path}}
        if fmt in BACKED_FORMATS and (backing or node is not None):
            new["backing"] = node
        elif node is not None:
            raise ValueError(f"{fmt} image {path} cannot have a backing file")
        node = new
    return "json:" + json.dumps(node, ensure_ascii=False)


def check_pinned(path: str, pin: tuple[int, int]) -> os.stat_result:
    """OSError unless ``path``, reached without following any symlink, is
    still the file ``pin`` names (as read at scan time); its stat.

    A file swapped for a symlink (to a file its owner may not read) or for
    another file since the scan fails here, before qemu opens anything.
    """
    if not os.path.isabs(path):
        raise OSError(errno.EINVAL, "not an absolute path", path)
    parts = [p for p in path.split("/") if p]
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in parts[:-1]:
            nfd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nfd
        # Looked at, not opened: a FIFO or a device put in its place sees
        # no open, and a symlink is seen as one.
        st = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
    finally:
        os.close(fd)
    if (st.st_dev, st.st_ino) != tuple(pin) or not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise OSError(errno.ESTALE, "not the file found when the mount was made", path)
    return st
