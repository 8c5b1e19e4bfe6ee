"""Read what snapfs needs from a qcow2 header, without starting qemu.

Scanning an image directory must be fast (a hundred VMs with five layers each
mount in well under two seconds), so the backing file, its format, the virtual
size and the persistent dirty bitmaps are read from the header here. qemu
still does every read of guest data; this module only decides what to ask it.

Layout references are to qemu's docs/interop/qcow2.txt. Only the header, its
extensions and the bitmap directory are read; nothing here trusts guest data.
Every value is bounded as qemu bounds it when it opens the image (what qemu
would refuse is refused here, with the reason), and names are read as qemu
reads them: C strings, which a NUL ends.
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

# qemu's bounds (block/qcow2.h, block/qcow2-bitmap.c): what it refuses to open.
MAX_L1_SIZE = 32 << 20  # bytes of the active L1 table (QCOW_MAX_L1_SIZE)
MAX_BACKING_NAME = 1023
MAX_BACKING_FORMAT = 15  # bs->backing_format holds 16 bytes, the NUL included
MAX_SNAPSHOTS = 65536  # QCOW_MAX_SNAPSHOTS
MAX_SNAPSHOTS_SIZE = 64 << 20  # bytes of the snapshot table (QCOW_MAX_SNAPSHOTS_SIZE)
MAX_SNAPSHOT_EXTRA = 1024  # QCOW_MAX_SNAPSHOT_EXTRA_DATA
MAX_BITMAPS = 65535
MAX_BITMAP_DIRECTORY = 1024 * MAX_BITMAPS
MAX_BITMAP_NAME = 1023
MAX_BITMAP_TABLE = 0x8000000
MAX_BITMAP_PHYS = 0x20000000
BITMAP_TYPE_DIRTY = 1
BITMAP_RESERVED_FLAGS = ~(BITMAP_IN_USE | BITMAP_AUTO) & 0xFFFFFFFF


class Qcow2Error(Exception):
    """The file claims to be qcow2 but its header cannot be trusted."""


@dataclass(frozen=True)
class Bitmap:
    """A persistent dirty bitmap.

    name: as stored, decoded (undecodable bytes replaced). problem: why the
    name cannot be handed to qemu-nbd as it is (``--bitmap=NAME``), or None.
    """

    name: str
    flags: int
    granularity: int
    problem: str | None = None

    @property
    def in_use(self) -> bool:
        return bool(self.flags & BITMAP_IN_USE)

    @property
    def auto(self) -> bool:
        return bool(self.flags & BITMAP_AUTO)


@dataclass
class Snapshot:
    """An internal snapshot (``qemu-img snapshot -c``): its name, id, and the
    disk's virtual size when it was taken; ``problem``: why it is not served."""

    name: str
    id: str
    size: int
    problem: str | None = None


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
    snapshots: list[Snapshot] = field(default_factory=list)
    snapshots_problem: str | None = None  # why the snapshot table was not read

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
        file_size = f.seek(0, os.SEEK_END)  # a block device's too; a remote file's
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
    if l1_size * 8 > MAX_L1_SIZE:
        raise Qcow2Error(f"active L1 table too large ({l1_size} entries; qemu reads at most "
                         f"{MAX_L1_SIZE // 8})")
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
    if backing_off > cluster_size:
        raise Qcow2Error("invalid backing file offset")
    if backing_off:
        if (backing_len == 0 or backing_len > min(MAX_BACKING_NAME, cluster_size - backing_off)
                or backing_off + backing_len > len(buf)):
            raise Qcow2Error("invalid backing file name")
        # qemu reads the name as a C string: a NUL ends it, and what follows
        # is never seen (an empty name is no backing file).
        raw = buf[backing_off:backing_off + backing_len].split(b"\0", 1)[0]
        try:
            backing_file = raw.decode("utf-8") or None
        except UnicodeDecodeError:
            raise Qcow2Error(f"backing file name {raw!r} is not UTF-8") from None

    hdr = Qcow2Header(version, size, cluster_size, backing_file, None, incompat, autoclear,
                      l1_size=l1_size, l1_offset=l1_off, nb_snapshots=nb_snapshots,
                      snapshots_offset=snap_off, refcount_order=refcount_order,
                      refcount_table_offset=rc_off, refcount_table_clusters=rc_clusters,
                      compression_type=buf[104] if header_len > 104 else 0)
    bitmaps_ext = None
    pos = header_len
    # qemu reads extensions up to the backing file name, if there is one.
    end = min(len(buf), backing_off or cluster_size)
    while pos + 8 <= end:
        ext_type, ext_len = struct.unpack_from(">II", buf, pos)
        pos += 8
        if ext_type == EXT_END:
            break
        if pos + ext_len > end:
            raise Qcow2Error("header extension runs past the first cluster")
        data = buf[pos:pos + ext_len]
        if ext_type == EXT_BACKING_FORMAT:
            if ext_len > MAX_BACKING_FORMAT:
                raise Qcow2Error(f"backing format name too long ({ext_len} bytes)")
            # A C string to qemu too: a NUL ends it.
            hdr.backing_format = data.split(b"\0", 1)[0].decode("ascii", "replace")
        elif ext_type == EXT_BITMAPS:
            bitmaps_ext = data
        elif ext_type == EXT_DATA_FILE:
            hdr.data_file = data.decode("utf-8", "replace")
        pos += (ext_len + 7) & ~7

    if bitmaps_ext is not None and autoclear & AUTOCLEAR_BITMAPS:
        hdr.bitmaps = _read_bitmaps(f, bitmaps_ext, file_size, cluster_size, size)
    if nb_snapshots:
        try:
            hdr.snapshots = _read_snapshots(f, nb_snapshots, snap_off, file_size, cluster_size, size)
        except Qcow2Error as e:
            # Not the image's problem here: qemu says what it thinks of the
            # table when it opens the image.
            hdr.snapshots_problem = str(e)
    return hdr


_SNAPSHOT = struct.Struct(">QIHHIIQII")  # the fixed part of a snapshot table entry


def _read_snapshots(f, nb: int, off: int, file_size: int, cluster_size: int, size: int) -> list[Snapshot]:
    """The snapshot table (docs/interop/qcow2.txt, "Snapshots"), within qemu's bounds.

    The disk's size at the snapshot is in the entry's extra data (bytes 8-15)
    when it is long enough, else the image's size.
    """
    if nb > MAX_SNAPSHOTS:
        raise Qcow2Error(f"{nb} snapshots: qemu reads at most {MAX_SNAPSHOTS}")
    if off % cluster_size or off >= file_size:
        raise Qcow2Error(f"snapshot table offset {off} is outside the image file")
    f.seek(off)
    table = f.read(min(MAX_SNAPSHOTS_SIZE, file_size - off))
    out: list[Snapshot] = []
    names: set[bytes] = set()
    pos = 0
    for _ in range(nb):
        if pos + _SNAPSHOT.size > len(table):
            raise Qcow2Error("snapshot table truncated")
        (l1_off, l1_size, id_size, name_size, _sec, _nsec, _clock, _vm_state,
         extra) = _SNAPSHOT.unpack_from(table, pos)
        if extra > MAX_SNAPSHOT_EXTRA:
            raise Qcow2Error(f"snapshot extra data too large ({extra} bytes)")
        p = pos + _SNAPSHOT.size
        end = p + extra + id_size + name_size
        if end > len(table):
            raise Qcow2Error("snapshot table truncated")
        disk_size = struct.unpack_from(">Q", table, p + 8)[0] if extra >= 16 else size
        raw_id = table[p + extra:p + extra + id_size]
        raw = table[p + extra + id_size:end]
        problem = None
        if l1_off % cluster_size or l1_size * 8 > MAX_L1_SIZE or l1_off + l1_size * 8 > file_size:
            problem = "its L1 table lies outside the image file"
        elif not raw or b"\0" in raw:
            problem = f"its name {raw!r} cannot be handed to qemu-nbd"
        elif raw in names:
            problem = f"another snapshot of the image is named {raw!r} too"
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            name = raw.decode("utf-8", "replace")
            problem = problem or f"its name {raw!r} is not UTF-8: it cannot be named to qemu-nbd as it is"
        names.add(raw)
        out.append(Snapshot(name, raw_id.decode("ascii", "replace"), disk_size, problem))
        pos = (end + 7) & ~7
    return out


def _read_bitmaps(f, ext: bytes, file_size: int, cluster_size: int, size: int) -> list[Bitmap]:
    """The bitmap directory, checked as qemu checks it when it opens the image
    (qemu then refuses the whole image: so is the layer here)."""
    if len(ext) < 24:
        raise Qcow2Error("bitmaps extension too short")
    nb, reserved, dir_size, dir_off = struct.unpack_from(">IIQQ", ext, 0)
    if reserved or not 0 < nb <= MAX_BITMAPS or dir_off % cluster_size:
        raise Qcow2Error("invalid bitmaps extension")
    if not 0 < dir_size <= MAX_BITMAP_DIRECTORY or dir_off + dir_size > file_size:
        raise Qcow2Error("bitmap directory outside the image file")
    f.seek(dir_off)
    d = f.read(dir_size)
    if len(d) != dir_size:
        raise Qcow2Error("bitmap directory truncated")
    out = []
    seen = set()
    pos = 0
    while pos < len(d):
        if len(out) == nb:
            raise Qcow2Error("more bitmaps in the directory than the header says")
        if pos + 24 > len(d):
            raise Qcow2Error("bitmap directory entry truncated")
        table_off, table_size, flags, btype, gran_bits, name_size, extra = struct.unpack_from(">QIIBBHI", d, pos)
        name_pos = pos + 24 + extra
        if name_pos + name_size > len(d):
            raise Qcow2Error("bitmap directory entry truncated")
        raw = d[name_pos:name_pos + name_size]
        phys = table_size * cluster_size
        if (extra or table_size == 0 or table_off == 0 or table_off % cluster_size
                or table_size > MAX_BITMAP_TABLE or not 9 <= gran_bits <= 31
                or flags & BITMAP_RESERVED_FLAGS or name_size > MAX_BITMAP_NAME
                or btype != BITMAP_TYPE_DIRTY or phys > MAX_BITMAP_PHYS
                or (not flags & BITMAP_IN_USE and size > (phys * 8) << gran_bits)):
            raise Qcow2Error(f"bitmap {raw!r} does not satisfy qemu's constraints")
        # qemu's name for it: a C string, cut at the first NUL.
        qemu_name = raw.split(b"\0", 1)[0]
        if qemu_name in seen:
            raise Qcow2Error(f"two bitmaps named {qemu_name!r}")
        seen.add(qemu_name)
        out.append(Bitmap(raw.decode("utf-8", "replace"), flags, 1 << gran_bits, _name_problem(raw)))
        pos = (name_pos + name_size + 7) & ~7
    if len(out) != nb:
        raise Qcow2Error("fewer bitmaps in the directory than the header says")
    return out


def _name_problem(raw: bytes) -> str | None:
    """Why a bitmap's stored name cannot be handed to qemu-nbd (``--bitmap=NAME``
    and the NBD context name), or None."""
    if not raw:
        return "the bitmap has an empty name"
    if b"\0" in raw:
        cut = raw.split(b"\0", 1)[0]
        return (f"its name {raw!r} holds a NUL byte: qemu reads only the part before it "
                f"({cut!r}), so it is not handed to qemu-nbd")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return f"its name {raw!r} is not UTF-8: it cannot be named to qemu-nbd as it is"
    return None
