"""Formats qemu reads without backing files: VDI, VHDX, VHD (qemu's ``vpc``).

Each is one layer alone: a disk by itself, or the base of a qcow2 overlay.
Their differencing kinds (a VirtualBox snapshot, a Hyper-V ``.avhdx``, a
differencing VHD) need a parent qemu cannot attach, and are refused here with
that reason. The virtual size is read as qemu computes it (block/vdi.c,
block/vhdx.c, block/vpc.c); the checks are those qemu makes when it opens
the file, so that a file refused by qemu is reported at scan time.

Pure: no qemu, nothing of the guest's data is read.
"""

from __future__ import annotations

import functools
import os
import struct
import uuid
from dataclasses import dataclass

# How a header is read: the image's host's ``open`` (``hosts/``); the local file by default.
READ_BINARY = functools.partial(open, mode="rb")

SECTOR = 512


class HeaderError(Exception):
    """The file is not a usable image of its format."""


@dataclass
class Header:
    size: int  # virtual size in bytes, as qemu serves it
    kind: str = ""  # "dynamic", "static", "fixed", ... for messages


def _read(path, *ranges: tuple[int, int], opener=READ_BINARY) -> tuple[int, list[bytes]]:
    """The file's size and the bytes at each ``(offset, length)``; negative offsets count from the end.

    opener: opens ``path`` for reading in binary (the image's host's ``open``)."""
    try:
        with opener(path) as f:
            size = f.seek(0, os.SEEK_END)
            out = []
            for off, n in ranges:
                if off < 0:
                    off += size
                if not 0 <= off < size:  # nothing there (and no seek past what an off_t holds)
                    out.append(b"")
                    continue
                f.seek(off)
                out.append(f.read(n))
            return size, out
    except OSError as e:
        raise HeaderError(f"cannot read: {e.strerror}") from None


# -- VDI (VirtualBox) ----------------------------------------------------------

VDI_SIGNATURE = 0xBEDA107F
VDI_VERSION_1_1 = 0x00010001
VDI_TYPES = {1: "dynamic", 2: "static"}
VDI_BLOCK_SIZE = 1 << 20
VDI_BLOCKS_MAX = (0x80000000 - SECTOR) // 4
_VDI = struct.Struct("<IIIII256sIIIIIIIQIIII16s16s16s16s")


def is_vdi(path, opener=READ_BINARY) -> bool:
    try:
        _, (buf,) = _read(path, (0, SECTOR), opener=opener)
    except HeaderError:
        return False
    return len(buf) >= SECTOR and struct.unpack_from("<I", buf, 0x40)[0] == VDI_SIGNATURE


def read_vdi(path, opener=READ_BINARY) -> Header:
    _, (buf,) = _read(path, (0, SECTOR), opener=opener)
    if len(buf) < SECTOR or struct.unpack_from("<I", buf, 0x40)[0] != VDI_SIGNATURE:
        raise HeaderError("no VDI header")
    (_sig, version, _hsize, itype, _iflags, _desc, off_bmap, off_data, _c, _h, _s, sector_size, _u,
     disk_size, block_size, _extra, blocks, _allocated, _uuid, _snap, link, parent) = _VDI.unpack_from(buf, 0x40)
    if version != VDI_VERSION_1_1:
        raise HeaderError(f"unsupported VDI version {version >> 16}.{version & 0xffff}")
    if itype not in VDI_TYPES or link != bytes(16) or parent != bytes(16):
        raise HeaderError("a differencing VDI (a VirtualBox snapshot): qemu cannot read it "
                          "with its parent")
    if off_bmap % SECTOR or off_data % SECTOR:
        raise HeaderError("unaligned block map or data offset")
    if sector_size != SECTOR:
        raise HeaderError(f"sector size {sector_size} is not {SECTOR}")
    if block_size != VDI_BLOCK_SIZE:
        raise HeaderError(f"block size {block_size} is not {VDI_BLOCK_SIZE}")
    if blocks > VDI_BLOCKS_MAX or disk_size > VDI_BLOCKS_MAX * VDI_BLOCK_SIZE:
        raise HeaderError("image too large")
    size = -(-disk_size // SECTOR) * SECTOR  # qemu rounds an odd size up
    if size > blocks * block_size:
        raise HeaderError("the block map is smaller than the disk")
    return Header(size, VDI_TYPES[itype])


# -- VHDX (Hyper-V) ------------------------------------------------------------

VHDX_SIGNATURE = b"vhdxfile"
VHDX_REGION_TABLE = 192 << 10
VHDX_REGION_SIGNATURE = b"regi"
VHDX_METADATA_SIGNATURE = b"metadata"
VHDX_METADATA_MAX = 64 << 10
VHDX_BAT = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08").bytes_le
VHDX_METADATA = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E").bytes_le
VHDX_FILE_PARAMETERS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B").bytes_le
VHDX_VIRTUAL_DISK_SIZE = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8").bytes_le
VHDX_LOGICAL_SECTOR_SIZE = uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F").bytes_le
VHDX_PARAMS_HAS_PARENT = 1 << 1
VHDX_BLOCK_MIN, VHDX_BLOCK_MAX = 1 << 20, 256 << 20


def is_vhdx(path, opener=READ_BINARY) -> bool:
    try:
        _, (buf,) = _read(path, (0, 8), opener=opener)
    except HeaderError:
        return False
    return buf == VHDX_SIGNATURE


def read_vhdx(path, differencing_name: bool = False, opener=READ_BINARY) -> Header:
    """The virtual size from the metadata region; a differencing file is refused.

    The headers and the log are not read: a file whose log needs replaying
    (not closed cleanly) is refused by qemu when first opened, with its reason.
    """
    _, (sig, rt) = _read(path, (0, 8), (VHDX_REGION_TABLE, 64 << 10), opener=opener)
    if sig != VHDX_SIGNATURE:
        raise HeaderError("no VHDX signature")
    if differencing_name:
        raise HeaderError("a differencing VHDX (.avhdx, a Hyper-V checkpoint): qemu cannot read "
                          "differencing VHDX files")
    if len(rt) < 16 or rt[:4] != VHDX_REGION_SIGNATURE:
        raise HeaderError("no region table")
    count = struct.unpack_from("<I", rt, 8)[0]
    if count > 2047:
        raise HeaderError("invalid region table")
    metadata = None
    for i in range(count):
        guid, offset, length, _bits = struct.unpack_from("<16sQII", rt, 16 + 32 * i)
        if guid == VHDX_METADATA:
            if metadata is not None:
                raise HeaderError("two metadata regions")
            metadata = offset
    if metadata is None:
        raise HeaderError("no metadata region")
    _, (table,) = _read(path, (metadata, VHDX_METADATA_MAX), opener=opener)
    if len(table) < 32 or table[:8] != VHDX_METADATA_SIGNATURE:
        raise HeaderError("invalid metadata table")
    entries = struct.unpack_from("<H", table, 10)[0]
    if 32 + entries * 32 > len(table):
        raise HeaderError("invalid metadata table")
    items = {}
    for i in range(entries):
        guid, offset, length, _bits = struct.unpack_from("<16sIII", table, 32 + 32 * i)
        if guid in items:
            raise HeaderError("a metadata item given twice")
        items[guid] = offset
    want = (VHDX_FILE_PARAMETERS, VHDX_VIRTUAL_DISK_SIZE, VHDX_LOGICAL_SECTOR_SIZE)
    if any(g not in items for g in want):
        raise HeaderError("required metadata missing")
    _, (params, vsize, lsize) = _read(path, *((metadata + items[g], 8) for g in want), opener=opener)
    if len(params) < 8 or len(vsize) < 8 or len(lsize) < 4:
        raise HeaderError("metadata truncated")
    block_size, bits = struct.unpack_from("<II", params)
    if bits & VHDX_PARAMS_HAS_PARENT:
        raise HeaderError("a differencing VHDX (it has a parent): qemu cannot read differencing "
                          "VHDX files")
    if not VHDX_BLOCK_MIN <= block_size <= VHDX_BLOCK_MAX or block_size & (block_size - 1):
        raise HeaderError(f"invalid block size {block_size}")
    logical = struct.unpack_from("<I", lsize)[0]
    if logical not in (512, 4096):
        raise HeaderError(f"invalid logical sector size {logical}")
    disk_size = struct.unpack_from("<Q", vsize)[0]
    # qemu's total_sectors: the size in logical sectors, counted as 512-byte sectors.
    return Header((disk_size >> (logical.bit_length() - 1)) * SECTOR, "dynamic")


# -- VHD (Virtual PC; qemu's "vpc") --------------------------------------------

VHD_COOKIE = b"conectix"
VHD_FIXED, VHD_DYNAMIC, VHD_DIFFERENCING = 2, 3, 4
VHD_MAX_GEOMETRY = 65535 * 16 * 255
VHD_MAX_SECTORS = 0xFF000000  # 2040 GiB
# Creator applications whose size is current_size, not the CHS geometry (block/vpc.c).
VHD_SIZE_APPS = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")


def _vhd_footer_ok(buf: bytes) -> bool:
    if len(buf) < SECTOR or buf[:8] != VHD_COOKIE:
        return False
    checksum = struct.unpack_from(">I", buf, 64)[0]
    return (~(sum(buf[:64]) + sum(buf[68:SECTOR]))) & 0xFFFFFFFF == checksum


def is_vpc(path, opener=READ_BINARY) -> bool:
    try:
        _, (head, tail) = _read(path, (0, 8), (-SECTOR, 8), opener=opener)
    except HeaderError:
        return False
    return VHD_COOKIE in (head, tail)


def read_vpc(path, opener=READ_BINARY) -> Header:
    """The footer at the start (dynamic) or the end (fixed), and qemu's idea of the size."""
    file_size, (head, tail) = _read(path, (0, SECTOR), (-SECTOR, SECTOR), opener=opener)
    fixed = head[:8] != VHD_COOKIE
    footer = tail if fixed else head
    if footer[:8] != VHD_COOKIE:
        raise HeaderError("no VHD footer")
    if not _vhd_footer_ok(footer):
        raise HeaderError("incorrect footer checksum")
    (data_offset,) = struct.unpack_from(">Q", footer, 16)
    app = footer[28:32]
    (current_size,) = struct.unpack_from(">Q", footer, 48)
    cyls, heads, secs, dtype = struct.unpack_from(">HBBI", footer, 56)
    if dtype == VHD_DIFFERENCING:
        raise HeaderError("a differencing VHD: qemu cannot read it with its parent")
    if not fixed and _vhd_footer_ok(tail) and struct.unpack_from(">I", tail, 60)[0] == VHD_FIXED:
        # qemu takes the footer at the start: a fixed VHD whose guest wrote one there.
        raise HeaderError("a fixed VHD whose data starts with a VHD footer: qemu would read it as "
                          "a dynamic one")
    if dtype != (VHD_FIXED if fixed else VHD_DYNAMIC):
        raise HeaderError(f"disk type {dtype} does not match where its footer is")
    # Virtual PC (and qemu's "qemu") size a disk by its CHS geometry, the
    # others by current_size; a maximal geometry means the size is larger.
    sectors = cyls * heads * secs
    if app in VHD_SIZE_APPS or sectors == VHD_MAX_GEOMETRY:
        sectors = current_size // SECTOR
    if sectors > VHD_MAX_SECTORS:
        raise HeaderError("image too large")
    if fixed:
        return Header(sectors * SECTOR, "fixed")
    _, (dyn,) = _read(path, (data_offset, 1024), opener=opener)
    if len(dyn) < 40 or dyn[:8] != b"cxsparse":
        raise HeaderError("invalid dynamic disk header")
    (table_offset,) = struct.unpack_from(">Q", dyn, 16)
    entries, block_size = struct.unpack_from(">II", dyn, 28)
    if block_size < SECTOR or block_size & (block_size - 1):
        raise HeaderError(f"invalid block size {block_size}")
    if sectors * SECTOR // block_size > 0xFFFFFFFF or entries * block_size < sectors * SECTOR:
        raise HeaderError("block allocation table too small for the disk")
    if entries > 0x7FFFFFFF // 4 or table_offset + entries * 4 > file_size:
        raise HeaderError("block allocation table outside the file")
    return Header(sectors * SECTOR, "dynamic")
