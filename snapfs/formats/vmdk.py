"""Read what snapfs needs from a VMDK sparse extent, without starting qemu.

snapfs serves the VMDK files that are a whole disk in one file: a sparse
extent header (magic ``KDMV``) with the text descriptor embedded in it, of
type ``monolithicSparse`` (what VMware Workstation and ``qemu-img create -f
vmdk`` make, and their ``-00000N.vmdk`` snapshot deltas) or
``streamOptimized`` (compressed, for OVF/OVA export). Every other kind keeps
its data in files its descriptor names (``monolithicFlat``,
``twoGbMaxExtent*``, ``vmfs*``, ``seSparse``): qemu would open those by name,
snapfs does not check them, so they are refused with the reason.

A delta names its parent in the descriptor (``parentFileNameHint``), and
records the parent's content id (``parentCID``); qemu refuses to read through
a parent whose ``CID`` changed since (it was written to). The parent is
always a VMDK (qemu sets its format so).

What is read here is read the way qemu's block/vmdk.c reads it: the header
(little endian, after the magic), the footer of a streamOptimized file whose
grain directory is at its end, and the descriptor as the first 10 KiB at
byte 512, where ``CID``, ``parentCID`` and ``parentFileNameHint`` are the
first occurrences of those words (``strstr``). Nothing here trusts guest
data; qemu still reads every byte of it.
"""

from __future__ import annotations

import functools
import os
import re
import struct
from dataclasses import dataclass

# How a header is read: the image's host's ``open`` (``hosts/``); the local file by default.
READ_BINARY = functools.partial(open, mode="rb")

MAGIC = b"KDMV"
MAGIC_COWD = b"COWD"  # vmfsSparse (ESX 2) extents
SESPARSE_MAGIC = 0xCAFEBABE  # ESXi seSparse extents (8 bytes, little endian)

SECTOR = 512
DESC_OFFSET = 0x200  # where qemu reads the descriptor of a sparse file
DESC_SIZE = 20 * SECTOR  # how much of it qemu reads
GD_AT_END = 0xFFFFFFFFFFFFFFFF
COMPRESSION_DEFLATE = 1
FLAG_RGD = 1 << 1
FLAG_ZERO_GRAIN = 1 << 2
MARKER_FOOTER = 3
MARKER_EOS = 0

# After the magic: version, flags, capacity, granularity, descriptor offset
# and size, grain table entries per table, redundant grain directory, grain
# directory, first grain (all in sectors), filler, check bytes, compression.
_HEADER = struct.Struct("<IIQQQQIQQQc4sH")

# The types a single file holds whole.
SINGLE_FILE_TYPES = ("monolithicSparse", "streamOptimized")
NO_PARENT = 0xFFFFFFFF  # parentCID of a base
PATH_MAX = 4096  # qemu's limit on a backing file name (bs->auto_backing_file)


class VmdkError(Exception):
    """The file is not a VMDK snapfs serves, or its header cannot be trusted.

    extents: for a descriptor file, the extent files it names (as written).
    """

    def __init__(self, message: str, extents: tuple[str, ...] = ()):
        super().__init__(message)
        self.extents = extents


@dataclass
class VmdkHeader:
    version: int
    size: int  # virtual size in bytes: capacity * 512
    grain_size: int  # bytes
    create_type: str
    compressed: bool
    zeroed_grain: bool
    cid: int
    parent_cid: int
    parent: str | None  # parentFileNameHint, as written


def is_vmdk(path: str | os.PathLike, opener=READ_BINARY) -> bool:
    """True if the file starts with the sparse extent magic."""
    try:
        with opener(path) as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def read_header(path: str | os.PathLike, opener=READ_BINARY) -> VmdkHeader:
    """Parse a monolithic VMDK; raise VmdkError for anything snapfs (or qemu) refuses.

    opener: opens ``path`` for reading in binary (the image's host's ``open``)."""
    try:
        with opener(path) as f:
            file_size = f.seek(0, os.SEEK_END)
            f.seek(0)
            head = f.read(SECTOR)
            if head[:4] != MAGIC:
                raise VmdkError(*_not_sparse(head, f))
            return _parse(f, head, file_size)
    except OSError as e:
        raise VmdkError(f"cannot read: {e.strerror}") from None
    except struct.error:
        raise VmdkError("truncated header") from None


def _not_sparse(head: bytes, f) -> tuple[str, tuple[str, ...]]:
    """Why a ``.vmdk`` without the sparse magic is not served, and the extent
    files it names if it is a descriptor file."""
    if head[:4] == MAGIC_COWD:
        return "a vmfsSparse (COWD) extent: only monolithicSparse and streamOptimized VMDK files are read", ()
    if len(head) >= 8 and struct.unpack_from("<Q", head)[0] == SESPARSE_MAGIC:
        return ("an seSparse extent: its descriptor file names it, and snapfs reads only "
                "monolithicSparse and streamOptimized VMDK files"), ()
    data = (head + f.read(DESC_SIZE)).split(b"\0", 1)[0]
    text = data.decode("utf-8", "replace")
    if _looks_like_descriptor(text):
        ct = _description(data, b"createType")
        extents = re.findall(r'^\s*(?:RW|RDONLY|NOACCESS)\s+\d+\s+\w+\s+"([^"\r\n]*)"', text, re.M)
        what = f"createType {ct!r}" if ct is not None else "no createType"
        names = f" ({', '.join(repr(e) for e in extents[:4])}{', ...' if len(extents) > 4 else ''})" \
            if extents else ""
        return (f"a VMDK descriptor file ({what}) whose data is in separate extent files{names}: "
                "not supported (qemu would open the extent files by the names in the descriptor, "
                "which snapfs does not check; qemu-img convert -O vmdk makes one file of it)"), tuple(extents)
    return ("no VMDK sparse extent header (the data file of a flat VMDK is read only through "
            "its descriptor file, which snapfs does not follow)"), ()


def _looks_like_descriptor(text: str) -> bool:
    """A text descriptor, as qemu's vmdk_probe tells one: comments and blank
    lines, then ``version=N``; or the ``# Disk DescriptorFile`` line."""
    if text.lstrip().startswith("# Disk DescriptorFile"):
        return True
    for line in text.split("\n"):
        line = line.rstrip("\r")
        if line.startswith("#") or not line.strip():
            continue
        return line in ("version=1", "version=2", "version=3")
    return False


def _parse(f, head: bytes, file_size: int) -> VmdkHeader:
    (version, flags, capacity, granularity, desc_offset, desc_size, gtes, rgd_offset, gd_offset,
     grain_offset, _filler, _check, compression) = _HEADER.unpack_from(head, 4)
    if capacity == 0 and desc_offset:
        # qemu then reads that descriptor as a descriptor file: extents by name.
        raise VmdkError("a sparse header pointing to a descriptor with separate extent files: "
                        "not supported (qemu would open them by name)")
    if gd_offset == GD_AT_END:
        # streamOptimized: the footer (second to last sector) holds the real header.
        total = -(-file_size // SECTOR) * SECTOR
        if total < 3 * SECTOR:
            raise VmdkError("streamOptimized footer missing")
        f.seek(total - 3 * SECTOR)
        foot = f.read(3 * SECTOR)
        if len(foot) < 3 * SECTOR:
            raise VmdkError("streamOptimized footer truncated")
        _val, size, mtype = struct.unpack_from("<QII", foot, 0)
        eos_val, eos_size, eos_type = struct.unpack_from("<QII", foot, 2 * SECTOR)
        if (foot[SECTOR:SECTOR + 4] != MAGIC or size != 0 or mtype != MARKER_FOOTER
                or eos_val != 0 or eos_size != 0 or eos_type != MARKER_EOS):
            raise VmdkError("invalid streamOptimized footer")
        (version, flags, capacity, granularity, desc_offset, desc_size, gtes, rgd_offset, gd_offset,
         grain_offset, _filler, _check, compression) = _HEADER.unpack_from(foot, SECTOR + 4)
    compressed = compression == COMPRESSION_DEFLATE
    if version > 3:
        raise VmdkError(f"unsupported VMDK version {version}")
    if gtes > 512:
        raise VmdkError("grain table size too big")
    l1_entry_sectors = gtes * granularity
    if l1_entry_sectors == 0:
        raise VmdkError("invalid grain table or grain size")
    if granularity > 0x200000:
        raise VmdkError("invalid grain size")
    l1_size = -(-capacity // l1_entry_sectors)
    if l1_size > 32 << 20:
        raise VmdkError("grain directory too big")
    file_sectors = -(-file_size // SECTOR)
    if grain_offset > file_sectors:
        raise VmdkError(f"file truncated: expected at least {grain_offset * SECTOR} bytes")
    if gd_offset * SECTOR + l1_size * 4 > file_size:
        raise VmdkError("grain directory extends past the end of the file")

    # qemu reads the descriptor of a sparse file at byte 512, whatever the
    # header says: one found elsewhere would not be the one qemu reads.
    f.seek(DESC_OFFSET)
    desc = f.read(DESC_SIZE).split(b"\0", 1)[0]
    if desc_offset == 0 or not desc.strip():
        raise VmdkError("a sparse extent without a descriptor of its own: part of a VMDK made of "
                        "several files (twoGbMaxExtentSparse), whose descriptor file names it")
    if desc_offset != DESC_OFFSET // SECTOR:
        raise VmdkError(f"descriptor at sector {desc_offset}, not at sector 1 where qemu reads it")
    create_type = _description(desc, b"createType")
    if create_type is None:
        raise VmdkError("its descriptor has no createType")
    if create_type not in SINGLE_FILE_TYPES:
        raise VmdkError(f"createType {create_type!r}: a disk made of several files (only "
                        "monolithicSparse and streamOptimized VMDK files are read)")
    cid = _cid(desc, b"CID")
    parent_cid = _cid(desc, b"parentCID")
    parent = _parent(desc)
    return VmdkHeader(version, capacity * SECTOR, granularity * SECTOR, create_type, compressed,
                      bool(flags & FLAG_ZERO_GRAIN), cid, parent_cid, parent)


def _description(desc: bytes, name: bytes) -> str | None:
    """qemu's vmdk_parse_description: the first ``name``, two characters (``="``)
    skipped, up to the next ``"``."""
    pos = desc.find(name)
    if pos < 0:
        return None
    start = pos + len(name) + 2
    end = desc.find(b'"', start)
    if start >= len(desc) or end < 0:
        return None
    return desc[start:end].decode("utf-8", "replace")


_HEX = re.compile(rb"[ \t\n\v\f\r]*(?:0[xX])?([0-9a-fA-F]+)")


def _cid(desc: bytes, name: bytes) -> int:
    """qemu's vmdk_read_cid: the first ``name``, one character (``=``) skipped, in hex."""
    pos = desc.find(name)
    m = _HEX.match(desc, pos + len(name) + 1) if pos >= 0 else None
    if m is None:
        raise VmdkError(f"its descriptor has no valid {name.decode()}")
    return int(m.group(1), 16) & 0xFFFFFFFF


def _parent(desc: bytes) -> str | None:
    """qemu's vmdk_parent_open: the first ``parentFileNameHint``, two characters
    skipped, up to the next ``"``; an empty name is no parent."""
    key = b"parentFileNameHint"
    pos = desc.find(key)
    if pos < 0:
        return None
    start = pos + len(key) + 2
    end = desc.find(b'"', start)
    if end < 0:
        raise VmdkError("parentFileNameHint is not terminated")
    if end - start > PATH_MAX - 1:
        raise VmdkError("parentFileNameHint is too long")
    try:
        return desc[start:end].decode("utf-8") or None
    except UnicodeDecodeError:
        raise VmdkError("parentFileNameHint is not UTF-8") from None
