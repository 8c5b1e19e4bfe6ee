"""Tier 1: VMDK, VDI, VHDX and VHD headers, read without qemu, agree with qemu-img info;
crafted bad files and VMDK chains are refused with their reason.

Real files come from ``qemu-img create``; bad ones are real files with a
field rewritten. The chain rules are checked through the image-directory
scan (``ImageDirectory``), which is pure.
"""

from __future__ import annotations

import json
import os
import re
import struct

import pytest
from conftest import MiB, create, qemu_img, qemu_io, run

from snapfs.formats import format_by_name, json_node, read_layer, single, vmdk
from snapfs.formats.chain import Chains
from snapfs.hosts.local import LOCAL
from snapfs.sources.imagedir import ImageDirectory


def info(path, fmt):
    return json.loads(qemu_img("info", "-f", fmt, "--output=json", path).stdout)


def make(path, fmt, size, *opts, backing=None):
    args = ["create", "-q", "-f", fmt]
    for o in opts:
        args += ["-o", o]
    if backing:
        args += ["-b", backing, "-F", fmt]
    qemu_img(*args, path, *([str(size)] if size is not None else []))
    return str(path)


def edit_descriptor(path, change):
    """Rewrite the descriptor embedded in a sparse VMDK (sector 1, 20 sectors)."""
    with open(path, "r+b") as f:
        f.seek(512)
        raw = f.read(vmdk.DESC_SIZE)
        text = raw.split(b"\0", 1)[0].decode()
        new = change(text).encode()
        assert len(new) < len(raw)
        f.seek(512)
        f.write(new + bytes(len(raw) - len(new)))


def set_field(text, name, value):
    """The descriptor line ``name=value`` replaced, or added after createType."""
    line = f"{name}={value}"
    if re.search(rf"^{name}=", text, re.M):
        return re.sub(rf"^{name}=.*$", lambda _: line, text, count=1, flags=re.M)
    return re.sub(r"^(createType=.*)$", lambda m: m.group(1) + "\n" + line, text, count=1, flags=re.M)


def write(path, data):
    """A file of ``data`` (bytes or text); its path."""
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def cid_of(path):
    return read_layer(str(path), "vmdk", LOCAL).cid


def poke(path, offset, fmt, *values):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


# -- headers agree with qemu ----------------------------------------------------------

@pytest.mark.parametrize("size", [MiB, 64 * MiB + 1536, 10 << 30])
@pytest.mark.parametrize("opts", [(), ("subformat=streamOptimized",), ("zeroed_grain=on",),
                                  ("compat6=on",)])
def test_vmdk_matches_qemu(tmp_path, size, opts):
    base = make(tmp_path / "base.vmdk", "vmdk", size, *opts)
    top = make(tmp_path / "base-000001.vmdk", "vmdk", None, *opts, backing="base.vmdk")
    for path in (base, top):
        hdr = vmdk.read_header(path)
        want = info(path, "vmdk")
        data = want["format-specific"]["data"]
        assert hdr.size == want["virtual-size"] == size
        assert (hdr.cid, hdr.parent_cid, hdr.create_type) == (data["cid"], data["parent-cid"],
                                                             data["create-type"])
        assert hdr.compressed == ("subformat=streamOptimized" in opts)
        assert hdr.zeroed_grain == ("zeroed_grain=on" in opts)
    assert vmdk.read_header(base).parent is None and vmdk.read_header(base).parent_cid == vmdk.NO_PARENT
    assert vmdk.read_header(top).parent == "base.vmdk" == info(top, "vmdk")["backing-filename"]
    assert vmdk.read_header(top).parent_cid == vmdk.read_header(base).cid
    layer = read_layer(top, "vmdk", LOCAL)
    assert layer.problem is None
    assert (layer.backing_path, layer.backing_format) == (str(tmp_path / "base.vmdk"), "vmdk")


def test_vmdk_written_and_stream_converted(tmp_path):
    """A written VMDK keeps its header readable; a streamOptimized one made by
    qemu-img convert (compressed grains) too."""
    base = make(tmp_path / "base.vmdk", "vmdk", 8 * MiB)
    qemu_io(base, "write -P 0xa1 0 1M", fmt="vmdk")
    conv = tmp_path / "conv.vmdk"
    qemu_img("convert", "-f", "vmdk", "-O", "vmdk", "-o", "subformat=streamOptimized", base, conv)
    for path in (base, str(conv)):
        assert read_layer(path, "vmdk", LOCAL).problem is None
        assert read_layer(path, "vmdk", LOCAL).size == info(path, "vmdk")["virtual-size"]
    assert vmdk.read_header(conv).compressed


SINGLES = [
    ("vdi", ()), ("vdi", ("static=on",)),
    ("vhdx", ()), ("vhdx", ("subformat=fixed",)), ("vhdx", ("block_size=1M",)),
    ("vpc", ()), ("vpc", ("subformat=fixed",)), ("vpc", ("force_size=on",)),
    ("vpc", ("subformat=fixed", "force_size=on")),
]


@pytest.mark.parametrize("size", [MiB, 10000 * 1024, 100 * MiB + 512])
@pytest.mark.parametrize("fmt,opts", SINGLES)
def test_single_layer_formats_match_qemu(tmp_path, fmt, opts, size):
    path = make(tmp_path / f"d.{fmt}", fmt, size, *opts)
    layer = read_layer(path, fmt, LOCAL)
    assert layer.problem is None
    assert layer.size == info(path, fmt)["virtual-size"]
    assert layer.backing_path is None and layer.bitmaps == []


@pytest.mark.parametrize("size", [20 << 30, 130 << 30])
def test_large_vpc_sizes(tmp_path, size):
    for opts in ((), ("force_size=on",)):
        path = make(tmp_path / "d.vhd", "vpc", size, *opts)
        assert read_layer(path, "vpc", LOCAL).size == info(path, "vpc")["virtual-size"]


# -- which file is which format ------------------------------------------------------

def test_format_by_name_and_header(tmp_path):
    sparse = make(tmp_path / "s.vmdk", "vmdk", MiB)
    with open(sparse, "rb") as f:
        header = f.read()
    qcow = create(tmp_path / "q.qcow2", MiB)
    with open(qcow, "rb") as f:
        qheader = f.read()
    files = {
        "a.vmdk": header, "B.VMDK": header, "c.vdi": b"", "d.vhdx": b"", "e.avhdx": b"", "f.vhd": b"",
        "g.vpc": b"",
        "vmdk-in.img": header,   # content never makes a format but qcow2
        "vmdk-in.raw": header,
        "vmdk-no-suffix": header,
        "qcow2-in.vmdk": qheader,  # the name says vmdk: its missing header is reported
        "qcow2-in.img": qheader,
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    got = {name: format_by_name(str(tmp_path / name)) for name in files}
    assert got == {"a.vmdk": "vmdk", "B.VMDK": "vmdk", "c.vdi": "vdi", "d.vhdx": "vhdx", "e.avhdx": "vhdx",
                   "f.vhd": "vpc", "g.vpc": "vpc", "vmdk-in.img": "raw", "vmdk-in.raw": "raw",
                   "vmdk-no-suffix": None, "qcow2-in.vmdk": "vmdk", "qcow2-in.img": "qcow2"}
    assert format_by_name(str(tmp_path / "x.vmdk"), by_name_only=True) == "vmdk"
    assert "no VMDK sparse extent header" in read_layer(str(tmp_path / "qcow2-in.vmdk"), "vmdk", LOCAL).problem
    assert read_layer(str(tmp_path / "vmdk-in.img"), "raw", LOCAL).problem is None


def test_json_node_spells_vmdk_backing():
    node = json.loads(json_node([("/d/top.vmdk", "vmdk"), ("/d/base.vmdk", "vmdk")], LOCAL.protocol_driver)[5:])
    assert node["driver"] == "vmdk" and node["backing"]["driver"] == "vmdk"
    assert node["backing"]["backing"] is None
    alone = json.loads(json_node([("/d/top.vmdk", "vmdk")], LOCAL.protocol_driver)[5:])
    assert alone["backing"] is None
    mixed = json.loads(json_node([("/d/top.qcow2", "qcow2"), ("/d/base.vdi", "vdi")], LOCAL.protocol_driver)[5:])
    assert mixed["backing"] == {"driver": "vdi", "file": {"driver": "file", "filename": "/d/base.vdi"}}
    with pytest.raises(ValueError):
        json_node([("/d/top.vhdx", "vhdx"), ("/d/base.vmdk", "vmdk")], LOCAL.protocol_driver)


# -- refused VMDK files ----------------------------------------------------------------

def _descriptor_file(d, subformat):
    make(d / f"{subformat}.vmdk", "vmdk", MiB, f"subformat={subformat}")
    return d / f"{subformat}.vmdk"


def _crafted(d, name, change=None, header=None):
    path = make(d / name, "vmdk", 4 * MiB)
    if change:
        edit_descriptor(path, change)
    if header:
        poke(path, *header)
    return path


BAD_VMDK = {
    "garbage": (lambda d: write(d / "g.vmdk", b"not a vmdk" * 100),
                "no VMDK sparse extent header"),
    "monolithicFlat": (lambda d: _descriptor_file(d, "monolithicFlat"),
                       "a VMDK descriptor file (createType 'monolithicFlat') whose data is in separate "
                       "extent files ('monolithicFlat-flat.vmdk')"),
    "flat extent": (lambda d: _descriptor_file(d, "monolithicFlat").with_name("monolithicFlat-flat.vmdk"),
                    "no VMDK sparse extent header (the data file of a flat VMDK"),
    "twoGbMaxExtentSparse": (lambda d: _descriptor_file(d, "twoGbMaxExtentSparse"),
                             "createType 'twoGbMaxExtentSparse'"),
    "twoGb sparse extent": (lambda d: _descriptor_file(d, "twoGbMaxExtentSparse").with_name(
        "twoGbMaxExtentSparse-s001.vmdk"), "a sparse extent without a descriptor of its own"),
    "twoGbMaxExtentFlat": (lambda d: _descriptor_file(d, "twoGbMaxExtentFlat"),
                           "createType 'twoGbMaxExtentFlat'"),
    "vmfs descriptor": (lambda d: write(d / "v.vmdk",
        '# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="vmfs"\n'
        'RW 2048 VMFS "/etc/passwd"\n'), "createType 'vmfs'"),
    "wrong createType": (lambda d: _crafted(d, "w.vmdk", lambda t: t.replace(
        '"monolithicSparse"', '"twoGbMaxExtentSparse"')), "createType 'twoGbMaxExtentSparse': a disk made "
        "of several files"),
    "no createType": (lambda d: _crafted(d, "n.vmdk", lambda t: t.replace("createType", "kind")),
                      "no createType"),
    "no CID": (lambda d: _crafted(d, "c.vmdk", lambda t: re.sub(r"^CID=.*\n", "", t, flags=re.M).replace(
        "parentCID", "parentXID")), "no valid CID"),
    "unterminated hint": (lambda d: _crafted(d, "u.vmdk", lambda t: t + 'parentFileNameHint="base.vmdk\n'),
                          "not terminated"),
    "descriptor elsewhere": (lambda d: _crafted(d, "e.vmdk", header=(4 + 24, "<Q", 5)),
                             "descriptor at sector 5"),
    "capacity 0 with descriptor": (lambda d: _crafted(d, "z.vmdk", header=(4 + 8, "<Q", 0)),
                                   "a sparse header pointing to a descriptor with separate extent files"),
    "version 4": (lambda d: _crafted(d, "v4.vmdk", header=(4, "<I", 4)), "unsupported VMDK version 4"),
    "grain table too big": (lambda d: _crafted(d, "gt.vmdk", header=(4 + 40, "<I", 4096)),
                            "grain table size too big"),
    "COWD": (lambda d: write(d / "cowd.vmdk", b"COWD" + bytes(2044)),
             "vmfsSparse (COWD)"),
    "seSparse": (lambda d: write(d / "se.vmdk", struct.pack("<Q", 0xCAFEBABE) + bytes(2040)), "seSparse extent"),
    "truncated": (lambda d: write(d / "t.vmdk", vmdk.MAGIC + bytes(20)),
                  "truncated header"),
}


@pytest.mark.parametrize("case", sorted(BAD_VMDK))
def test_bad_vmdk_is_refused(tmp_path, case):
    build, reason = BAD_VMDK[case]
    path = str(build(tmp_path))
    assert format_by_name(path) == "vmdk"
    layer = read_layer(path, "vmdk", LOCAL)
    assert layer.problem is not None and layer.problem.startswith("not a usable vmdk image: ")
    assert reason in layer.problem, layer.problem


def test_descriptor_file_names_its_extents(tmp_path):
    """A refused descriptor file records the extent files it names (parts of it, not disks)."""
    for sub, ext in (("monolithicFlat", "-flat"), ("twoGbMaxExtentSparse", "-s001")):
        layer = read_layer(str(_descriptor_file(tmp_path, sub)), "vmdk", LOCAL)
        assert layer.extent_paths == (str(tmp_path / f"{sub}{ext}.vmdk"),)
    assert read_layer(make(tmp_path / "one.vmdk", "vmdk", MiB), "vmdk", LOCAL).extent_paths == ()


def test_qemu_refuses_what_is_refused_here(tmp_path):
    """The refusals of files qemu would open alone: qemu fails to open them too.
    (The others are policy: files qemu reads together with extent files it
    opens by name, or a createType qemu ignores.)"""
    for case in ("garbage", "no CID", "unterminated hint", "capacity 0 with descriptor", "version 4",
                 "grain table too big", "twoGb sparse extent", "COWD", "seSparse", "truncated"):
        d = tmp_path / case.replace(" ", "_")
        d.mkdir()
        path = str(BAD_VMDK[case][0](d))
        r = run("qemu-img", "info", "-f", "vmdk", path, check=False)
        assert r.returncode != 0, (case, r.stdout)


# -- refused VDI, VHDX, VHD files --------------------------------------------------------

def _vhd_checksum(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        footer = bytearray(f.read(512))
        footer[64:68] = bytes(4)
        f.seek(offset + 64)
        f.write(struct.pack(">I", ~sum(footer) & 0xFFFFFFFF))


def _vhd_type(path, dtype):
    size = os.path.getsize(path)
    for off in (0, size - 512):
        poke(path, off + 60, ">I", dtype)
        _vhd_checksum(path, off)
    return path


def _vhdx_has_parent(path):
    with open(path, "rb") as f:
        f.seek(single.VHDX_REGION_TABLE)
        rt = f.read(65536)
        meta = next(off for guid, off, _, _ in (struct.unpack_from("<16sQII", rt, 16 + 32 * i)
                                                for i in range(struct.unpack_from("<I", rt, 8)[0]))
                    if guid == single.VHDX_METADATA)
        f.seek(meta)
        table = f.read(65536)
        params = next(off for guid, off, _, _ in (struct.unpack_from("<16sIII", table, 32 + 32 * i)
                                                  for i in range(struct.unpack_from("<H", table, 10)[0]))
                      if guid == single.VHDX_FILE_PARAMETERS)
    poke(path, meta + params + 4, "<I", 2)
    return path


def _fixed_vhd_with_footer_in_data(d):
    """A fixed VHD whose guest wrote a copy of the footer at offset 0."""
    path = make(d / "x.vhd", "vpc", MiB, "subformat=fixed")
    with open(path, "r+b") as f:
        f.seek(-512, os.SEEK_END)
        footer = f.read(512)
        f.seek(0)
        f.write(footer)
    return path


BAD_SINGLE = {
    "differencing vdi": ("vdi", lambda d: poke(make(d / "x.vdi", "vdi", MiB), 0x1B8, "<I", 1) or d / "x.vdi",
                         "a differencing VDI"),
    "vdi diff type": ("vdi", lambda d: poke(make(d / "x.vdi", "vdi", MiB), 0x4C, "<I", 4) or d / "x.vdi",
                      "a differencing VDI"),
    "vdi version": ("vdi", lambda d: poke(make(d / "x.vdi", "vdi", MiB), 0x44, "<I", 0x20000) or d / "x.vdi",
                    "unsupported VDI version 2.0"),
    "not a vdi": ("vdi", lambda d: write(d / "x.vdi", bytes(4096)), "no VDI header"),
    "avhdx": ("vhdx", lambda d: os.rename(make(d / "x.vhdx", "vhdx", MiB), d / "x.avhdx") or d / "x.avhdx",
              "a differencing VHDX (.avhdx"),
    "vhdx with parent": ("vhdx", lambda d: _vhdx_has_parent(make(d / "x.vhdx", "vhdx", MiB)),
                         "a differencing VHDX (it has a parent)"),
    "not a vhdx": ("vhdx", lambda d: write(d / "x.vhdx", bytes(4096)),
                   "no VHDX signature"),
    "differencing vhd": ("vpc", lambda d: _vhd_type(make(d / "x.vhd", "vpc", MiB), 4), "a differencing VHD"),
    "vhd checksum": ("vpc", lambda d: poke(make(d / "x.vhd", "vpc", MiB), 40, ">Q", 1) or d / "x.vhd",
                     "incorrect footer checksum"),
    "fixed vhd with a footer in its data": ("vpc", _fixed_vhd_with_footer_in_data,
                                            "a fixed VHD whose data starts with a VHD footer"),
    "not a vhd": ("vpc", lambda d: write(d / "x.vhd", bytes(4096)), "no VHD footer"),
}


@pytest.mark.parametrize("case", sorted(BAD_SINGLE))
def test_bad_single_layer_images_are_refused(tmp_path, case):
    fmt, build, reason = BAD_SINGLE[case]
    path = str(build(tmp_path))
    assert format_by_name(path) == fmt
    layer = read_layer(path, fmt, LOCAL)
    assert layer.problem is not None and layer.problem.startswith(f"not a usable {fmt} image: ")
    assert reason in layer.problem, layer.problem


# -- VMDK chains under the image directory's rules -----------------------------------------

def _chain_dir(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    out = tmp_path / "outside"
    out.mkdir()
    # A good chain: base <- base-000001 <- base-000002.
    make(d / "base.vmdk", "vmdk", 4 * MiB)
    qemu_io(str(d / "base.vmdk"), "write -P 0x11 0 1M", fmt="vmdk")
    make(d / "base-000001.vmdk", "vmdk", None, backing="base.vmdk")
    make(d / "base-000002.vmdk", "vmdk", None, backing="base-000001.vmdk")
    # A qcow2 overlay on a VMDK base.
    make(d / "mixed-base.vmdk", "vmdk", 4 * MiB)
    create(d / "mixed.qcow2", backing="mixed-base.vmdk", backing_fmt="vmdk")
    # Parent missing.
    make(d / "gone.vmdk", "vmdk", 4 * MiB)
    make(d / "orphan.vmdk", "vmdk", None, backing="gone.vmdk")
    os.unlink(d / "gone.vmdk")
    # Parent outside the directory.
    make(out / "secret.vmdk", "vmdk", 4 * MiB)
    make(d / "escape.vmdk", "vmdk", None, backing="../outside/secret.vmdk")
    # A protocol as the parent's name.
    proto = make(d / "proto.vmdk", "vmdk", 4 * MiB)
    edit_descriptor(proto, lambda t: set_field(t, "parentFileNameHint", '"nbd:localhost:10809"'))
    # A loop: loop-top -> loop-a -> loop-b -> loop-a, CIDs matching so only the loop is wrong.
    a, b = make(d / "loop-a.vmdk", "vmdk", 4 * MiB), make(d / "loop-b.vmdk", "vmdk", 4 * MiB)
    ca, cb = cid_of(a), cid_of(b)
    edit_descriptor(a, lambda t: set_field(set_field(t, "parentCID", f"{cb:08x}"), "parentFileNameHint",
                                           '"loop-b.vmdk"'))
    edit_descriptor(b, lambda t: set_field(set_field(t, "parentCID", f"{ca:08x}"), "parentFileNameHint",
                                           '"loop-a.vmdk"'))
    # (qemu-img create would follow the loop: the top is made by hand too.)
    top = make(d / "loop-top.vmdk", "vmdk", 4 * MiB)
    edit_descriptor(top, lambda t: set_field(set_field(t, "parentCID", f"{ca:08x}"), "parentFileNameHint",
                                             '"loop-a.vmdk"'))
    # The parent written after the snapshot was made: its CID changed.
    make(d / "moved.vmdk", "vmdk", 4 * MiB)
    make(d / "moved-000001.vmdk", "vmdk", None, backing="moved.vmdk")
    qemu_io(str(d / "moved.vmdk"), "write -P 0x22 0 64k", fmt="vmdk")
    # A parent that is no VMDK (a qcow2 named in the hint).
    create(d / "notvmdk.qcow2", 4 * MiB)
    top = make(d / "onqcow2.vmdk", "vmdk", 4 * MiB)
    edit_descriptor(top, lambda t: set_field(t, "parentFileNameHint", '"notvmdk.qcow2"'))
    return d


def test_vmdk_chains_follow_the_rules(tmp_path):
    d = _chain_dir(tmp_path)
    scan = ImageDirectory(str(d)).scan()
    disks = {disk.relpath: disk for disk in scan.disks}
    problems: dict[str, list[str]] = {}
    for p in scan.problems:
        problems.setdefault(os.path.relpath(p.path, d) if os.path.isabs(p.path) else p.path, []).append(p.reason)

    good = disks["base-000002.vmdk"]
    assert good.complete and [lay.name for lay in good.chain] == [
        "base.vmdk", "base-000001.vmdk", "base-000002.vmdk"]
    assert all(lay.problem is None and lay.format == "vmdk" for lay in good.chain)
    assert [lay.size for lay in good.chain] == [4 * MiB] * 3

    mixed = disks["mixed.qcow2"]
    assert mixed.complete and [(lay.name, lay.format) for lay in mixed.chain] == [
        ("mixed-base.vmdk", "vmdk"), ("mixed.qcow2", "qcow2")]

    assert not disks["orphan.vmdk"].complete
    assert problems["orphan.vmdk"] == [f"backing file {d / 'gone.vmdk'} is missing"]

    assert not disks["escape.vmdk"].complete
    [why] = problems["escape.vmdk"]
    assert "is outside" in why and "--allow-outside-backing" in why
    allowed = ImageDirectory(str(d), allow_outside=True).scan()
    assert next(x for x in allowed.disks if x.relpath == "escape.vmdk").complete

    assert "parent file 'nbd:localhost:10809' is not a plain file name" in problems["proto.vmdk"]
    assert not disks["proto.vmdk"].complete

    loop = disks["loop-top.vmdk"]
    assert not loop.complete and loop.cut_reason == (
        f"backing chain loops at {d / 'loop-a.vmdk'}: {d / 'loop-b.vmdk'} names it, and it is above in the chain")
    assert [lay.name for lay in loop.chain] == ["loop-b.vmdk", "loop-a.vmdk", "loop-top.vmdk"]

    moved = disks["moved-000001.vmdk"]
    assert not moved.complete and [lay.name for lay in moved.chain] == ["moved-000001.vmdk"]
    assert "parentCID" in moved.cut_reason and "the parent changed since the snapshot was made" in \
        moved.cut_reason

    onq = disks["onqcow2.vmdk"]
    assert onq.chain[0].name == "notvmdk.qcow2" and onq.chain[0].format == "vmdk"
    assert "no VMDK sparse extent header" in onq.chain[0].problem
    assert "notvmdk.qcow2" not in disks  # named as a parent: not a leaf

    # Every leaf is a disk; parents are not.
    assert sorted(disks) == sorted([
        "base-000002.vmdk", "mixed.qcow2", "orphan.vmdk", "escape.vmdk", "proto.vmdk", "loop-top.vmdk",
        "moved-000001.vmdk", "onqcow2.vmdk"])


def test_chains_reads_a_vmdk_parent_as_vmdk(tmp_path):
    """The format of a parent comes from the VMDK naming it, never from the parent's content."""
    make(tmp_path / "p.vmdk", "vmdk", MiB)
    os.rename(tmp_path / "p.vmdk", tmp_path / "p.img")  # a name that would make it raw
    top = make(tmp_path / "t.vmdk", "vmdk", MiB)
    edit_descriptor(top, lambda t: set_field(set_field(t, "parentFileNameHint", '"p.img"'), "parentCID",
                                             f"{cid_of(tmp_path / 'p.img'):08x}"))
    chains = Chains(LOCAL)
    chain, cut = chains.chain(chains.layer(top, "vmdk"))
    assert cut is None
    assert [(lay.name, lay.format) for lay in chain] == [("p.img", "vmdk"), ("t.vmdk", "vmdk")]


@pytest.mark.parametrize("name, cut", [("t.vhdx", 200 * 1024), ("t.vhdx", 64 * 1024 + 40), ("d.vhd", 600),
                                       ("d.vdi", 300), ("s.vmdk", 700), ("q.qcow2", 50)])
def test_truncated_images_are_problems_never_tracebacks(tmp_path, name, cut):
    """A half-copied image (any format) is reported with a reason, and the scan goes on."""
    fmt = {"vhdx": "vhdx", "vhd": "vpc", "vdi": "vdi", "vmdk": "vmdk", "qcow2": "qcow2"}[name.rsplit(".", 1)[1]]
    whole = tmp_path / ("whole-" + name)
    qemu_img("create", "-q", "-f", fmt, whole, "64M")
    with open(whole, "rb") as f:
        data = f.read(cut)
    path = tmp_path / name
    path.write_bytes(data)
    layer = read_layer(str(path), fmt, LOCAL)
    assert layer.problem, layer


def test_crafted_offsets_past_any_file_are_problems(tmp_path):
    """Offsets of 2^63 and more in a VHD footer or a VHDX region table."""
    path = tmp_path / "d.vhd"
    qemu_img("create", "-q", "-f", "vpc", path, "16M")
    data = bytearray(path.read_bytes())
    data[16:24] = (2**64 - 1).to_bytes(8, "big")  # the dynamic header's offset, in the footer copy at 0
    path.write_bytes(bytes(data))
    assert read_layer(str(path), "vpc", LOCAL).problem
