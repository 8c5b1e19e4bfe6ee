"""Read what snapfs needs from a qcow2 header, without starting qemu.

Scanning an image directory must be fast (a hundred VMs with five layers each
mount in well under two seconds), so the backing file, its format, the virtual
size and the persistent dirty bitmaps are read from the header here. qemu
still does every read of guest data; this module only decides what to ask it.

Layout references are to qemu's docs/interop/qcow2.txt. Only the header, its
extensions and the bitmap directory are read; nothing here trusts guest data.
"""

from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass, field

# How a header is read: the image's host's ``open`` (``hosts/``); the local file by default.
READ_BINARY = functools.partial(open, mode="rb")

MAGIC = b"QFI\xfb"

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_DATA_FILE = 0x44415441

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2

AUTOCLEAR_BITMAPS = 1 << 0

BITMAP_IN_USE = 1 << 0
BITMAP_AUTO = 1 << 1

# The header, its extensions and the backing file name live in the first
# cluster; read this much first, and the rest of a larger cluster if needed.
HEADER_READ = 64 << 10


class Qcow2Error(Exception):
    """The file claims to be qcow2 but its header cannot be trusted."""


@dataclass(frozen=True)
class Bitmap:
    name: str
    flags: int
    granularity: int

    @property
    def in_use(self) -> bool:
        return bool(self.flags & BITMAP_IN_USE)

    @property
    def auto(self) -> bool:
        return bool(self.flags & BITMAP_AUTO)


@dataclass
class Qcow2Header:
    version: int
    size: int
    cluster_size: int
    backing_file: str | None
    backing_format: str | None
    incompatible: int
    autoclear: int
    bitmaps: list[Bitmap] = field(default_factory=list)
    data_file: str | None = None
    # Where the active tables are (block status read from the file: status.py).
    l1_size: int = 0
    l1_offset: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    refcount_order: int = 4
    refcount_table_offset: int = 0
    refcount_table_clusters: int = 0
    compression_type: int = 0  # 0 zlib, 1 zstd (the byte at 104, in a long enough header)

    @property
    def external_data_file(self) -> bool:
        return bool(self.incompatible & INCOMPAT_DATA_FILE)

    @property
    def marked_corrupt(self) -> bool:
        return bool(self.incompatible & INCOMPAT_CORRUPT)


def is_qcow2(path: str | os.PathLike, opener=READ_BINARY) -> bool:
    """True if the file starts with the qcow2 magic."""
    try:
        with opener(path) as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def read_header(path: str | os.PathLike, opener=READ_BINARY) -> Qcow2Header:
    """Parse a qcow2 header; raise Qcow2Error for anything qemu would refuse.

    opener: opens ``path`` for reading in binary (the image's host's ``open``)."""
    try:
        with opener(path) as f:
            return read_header_from(f)
    except OSError as e:
        raise Qcow2Error(f"cannot read: {e.strerror}") from None


def read_header_from(f) -> Qcow2Header:
    """``read_header`` of a file open for reading in binary mode."""
    try:
        file_size = os.fstat(f.fileno()).st_size
        f.seek(0)
        buf = f.read(HEADER_READ)
        if len(buf) >= 24:
            cluster_bits = struct.unpack_from(">I", buf, 20)[0]
            if 9 <= cluster_bits <= 21 and (1 << cluster_bits) > len(buf):
                buf += f.read((1 << cluster_bits) - len(buf))
        return _parse(f, buf, file_size)
    except OSError as e:
        raise Qcow2Error(f"cannot read: {e.strerror}") from None
    except struct.error:
        raise Qcow2Error("truncated header") from None


def _parse(f, buf: bytes, file_size: int) -> Qcow2Header:
    if len(buf) < 72 or buf[:4] != MAGIC:
        raise Qcow2Error("not a qcow2 header")
    (version, backing_off, backing_len, cluster_bits, size, crypt, l1_size, l1_off,
     rc_off, rc_clusters, nb_snapshots, snap_off) = struct.unpack_from(">IQIIQIIQQIIQ", buf, 4)
    if version not in (2, 3):
        raise Qcow2Error(f"unsupported qcow2 version {version}")
    if not 9 <= cluster_bits <= 21:
        raise Qcow2Error(f"invalid cluster size 2^{cluster_bits}")
    cluster_size = 1 << cluster_bits
    if crypt:
        raise Qcow2Error("encrypted images are not supported")
    for name, off in (("L1 table", l1_off), ("refcount table", rc_off)):
        if off % cluster_size or off >= file_size:
            raise Qcow2Error(f"{name} offset {off} is outside the image file")
    if rc_clusters == 0:
        raise Qcow2Error("refcount table is empty")
    # Each L1 entry maps cluster_size/8 clusters; qemu checks this bound too.
    l2_covers = cluster_size * (cluster_size // 8)
    if l1_size * l2_covers < size:
        raise Qcow2Error("L1 table too small for the virtual size")
    if l1_off + l1_size * 8 > file_size:
        raise Qcow2Error("L1 table extends past the end of the image file")

    incompat = compat = autoclear = 0
    header_len = 72
    refcount_order = 4
    if version == 3:
        incompat, compat, autoclear, refcount_order, header_len = struct.unpack_from(">QQQII", buf, 72)
        if header_len < 104 or header_len > cluster_size:
            raise Qcow2Error(f"invalid header length {header_len}")
    if incompat & ~INCOMPAT_KNOWN:
        raise Qcow2Error(f"unknown incompatible features 0x{incompat & ~INCOMPAT_KNOWN:x}")

    backing_file = None
    if backing_off:
        if backing_len == 0 or backing_len > 1023 or backing_off + backing_len > len(buf):
            raise Qcow2Error("invalid backing file name")
        try:
            backing_file = buf[backing_off:backing_off + backing_len].decode("utf-8")
        except UnicodeDecodeError:
            raise Qcow2Error("backing file name is not UTF-8") from None

    hdr = Qcow2Header(version, size, cluster_size, backing_file, None, incompat, autoclear,
                      l1_size=l1_size, l1_offset=l1_off, nb_snapshots=nb_snapshots,
                      snapshots_offset=snap_off, refcount_order=refcount_order,
                      refcount_table_offset=rc_off, refcount_table_clusters=rc_clusters,
                      compression_type=buf[104] if header_len > 104 else 0)
    bitmaps_ext = None
    pos = header_len
    end = min(len(buf), cluster_size)
    while pos + 8 <= end:
        ext_type, ext_len = struct.unpack_from(">II", buf, pos)
        pos += 8
        if ext_type == EXT_END:
            break
        if pos + ext_len > end:
            raise Qcow2Error("header extension runs past the first cluster")
        data = buf[pos:pos + ext_len]
        if ext_type == EXT_BACKING_FORMAT:
            hdr.backing_format = data.decode("ascii", "replace")
        elif ext_type == EXT_BITMAPS:
            bitmaps_ext = data
        elif ext_type == EXT_DATA_FILE:
            hdr.data_file = data.decode("utf-8", "replace")
        pos += (ext_len + 7) & ~7

    if bitmaps_ext is not None and autoclear & AUTOCLEAR_BITMAPS:
        hdr.bitmaps = _read_bitmaps(f, bitmaps_ext, file_size)
    return hdr


def _read_bitmaps(f, ext: bytes, file_size: int) -> list[Bitmap]:
    if len(ext) < 24:
        raise Qcow2Error("bitmaps extension too short")
    nb, _reserved, dir_size, dir_off = struct.unpack_from(">IIQQ", ext, 0)
    if dir_size > 64 << 20 or dir_off + dir_size > file_size:
        raise Qcow2Error("bitmap directory outside the image file")
    f.seek(dir_off)
    d = f.read(dir_size)
    if len(d) != dir_size:
        raise Qcow2Error("bitmap directory truncated")
    out = []
    pos = 0
    for _ in range(nb):
        _table_off, _table_size, flags, _type, gran_bits, name_size, extra = struct.unpack_from(">QIIBBHI", d, pos)
        name_pos = pos + 24 + extra
        if name_pos + name_size > len(d):
            raise Qcow2Error("bitmap directory entry truncated")
        name = d[name_pos:name_pos + name_size].decode("utf-8", "replace")
        out.append(Bitmap(name, flags, 1 << gran_bits))
        pos = (name_pos + name_size + 7) & ~7
    return out
