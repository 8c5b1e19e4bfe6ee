"""Tier 1: what a crafted file in an image directory can make the scan do.

Files of every type are looked at before they are opened, and never opened
when they cannot be an image (a FIFO would block the open); the header
readers bound every value qemu bounds (sizes, name lengths, the bitmap
directory) and read names as qemu reads them (a NUL ends a backing file's
name); images that back themselves or each other are reported; the status
file keeps one item per line whatever the names hold. Real images come from
``qemu-img create``, crafted ones are real images with a field rewritten.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
import threading

import pytest
from conftest import MiB, create, poke, qemu_img, replace_all, replace_once, run

from snapfs.formats import MAX_VIRTUAL_SIZE, locked_for_write, qcow2, read_layer
from snapfs.fs.tree import Status, shown
from snapfs.hosts.local import LOCAL
from snapfs.sources.imagedir import ImageDirectory, disk_views


def set_backing_name(path, name: bytes):
    """A qcow2's backing file name rewritten in place (at its offset; its length updated)."""
    with open(path, "rb") as f:
        off = struct.unpack_from(">Q", f.read(16), 8)[0]
    poke(path, off, f"{len(name)}s", name)
    poke(path, 16, ">I", len(name))


def qemu_info(path):
    return json.loads(qemu_img("info", "-U", "--output=json", path).stdout)


def qemu_img_fails(*args):
    return run("qemu-img", *args, check=False)


def no_block(fn, *args):
    """``fn(*args)``, which must return (or raise) at once rather than block."""
    out = {}

    def call():
        try:
            out["value"] = fn(*args)
        except BaseException as e:  # handed back to the test
            out["error"] = e
    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), f"{fn.__name__}{args} blocked"
    if "error" in out:
        raise out["error"]
    return out["value"]


# -- files that are no regular file ------------------------------------------------------

@pytest.fixture
def specials(tmp_path):
    """A FIFO, a socket and a character device (/dev/null's numbers), each named as an image."""
    os.mkfifo(tmp_path / "fifo.qcow2")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(tmp_path / "sock.qcow2"))
    s.close()
    os.mknod(tmp_path / "null.raw", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    yield {"fifo.qcow2": "a FIFO", "sock.qcow2": "a socket", "null.raw": "a character device"}
    # A reader the code under test left blocked on the FIFO gets its writer.
    try:
        os.close(os.open(tmp_path / "fifo.qcow2", os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


def test_host_open_refuses_what_is_no_image_file_without_blocking(tmp_path, specials):
    for name, kind in specials.items():
        with pytest.raises(OSError) as e:
            no_block(LOCAL.open, str(tmp_path / name))
        assert e.value.strerror.startswith(kind), e.value
        assert not no_block(locked_for_write, str(tmp_path / name))
    img = create(tmp_path / "ok.qcow2", MiB)
    with LOCAL.open(img) as f:
        assert f.read(4) == qcow2.MAGIC


@pytest.mark.parametrize("fmt", ["qcow2", "raw", "vmdk", "vdi"])
def test_read_layer_of_a_special_file_is_a_problem(tmp_path, specials, fmt):
    for name, kind in specials.items():
        layer = no_block(read_layer, str(tmp_path / name), fmt, LOCAL)
        assert layer.problem.startswith(kind + ": only regular files"), layer.problem


# -- qcow2 header bounds -----------------------------------------------------------------

def test_a_nul_ends_the_backing_file_name_as_in_qemu(tmp_path):
    create(tmp_path / "base.qcow2", MiB)
    top = create(tmp_path / "top.qcow2", backing="base.qcow2")
    set_backing_name(top, b"base.qcow2\0junk")
    assert qcow2.read_header(top).backing_file == "base.qcow2"
    assert qemu_info(top)["backing-filename"] == "base.qcow2"
    set_backing_name(top, b"\0base.qcow2")  # qemu: an empty name, no backing file
    assert qcow2.read_header(top).backing_file is None


@pytest.mark.parametrize("field, reason", [
    ("backing offset", "invalid backing file offset"),
    ("backing format", "backing format name too long"),
    ("l1 size", "active L1 table too large"),
])
def test_qcow2_values_qemu_refuses_are_refused(tmp_path, field, reason):
    create(tmp_path / "base.qcow2", MiB)
    top = create(tmp_path / "top.qcow2", backing="base.qcow2")
    if field == "backing offset":
        poke(top, 8, ">Q", 65536 + 8)
    elif field == "backing format":
        # The extension that says "qcow2" claims 16 bytes (qemu holds 15 and the NUL).
        data = open(top, "rb").read(4096)
        pos = data.index(struct.pack(">I", qcow2.EXT_BACKING_FORMAT))
        poke(top, pos + 4, ">I", 16)
    else:
        poke(top, 24, ">Q", 2**63)  # the virtual size
        poke(top, 36, ">I", 2**24)  # 128 MiB of L1 entries
    with pytest.raises(qcow2.Qcow2Error, match=reason):
        qcow2.read_header(top)
    assert reason in read_layer(top, "qcow2", LOCAL).problem
    r = qemu_img_fails("info", "-U", top)
    assert r.returncode != 0, r.stdout


def test_a_nul_in_the_backing_format_ends_it(tmp_path):
    create(tmp_path / "base.qcow2", MiB)
    top = create(tmp_path / "top.qcow2", backing="base.qcow2")
    # "qcow2" is 5 bytes, padded with NULs to 8: claim all 8.
    data = open(top, "rb").read(4096)
    pos = data.index(struct.pack(">II", qcow2.EXT_BACKING_FORMAT, 5))
    poke(top, pos + 4, ">I", 8)
    assert qcow2.read_header(top).backing_format == "qcow2"
    assert qemu_info(top)["backing-filename-format"] == "qcow2"


def bitmap_image(path, *names):
    img = create(path, 4 * MiB)
    for name in names:
        qemu_img("bitmap", "--add", img, name)
    return img


def test_bitmap_names_qemu_would_misread_are_marked(tmp_path):
    img = bitmap_image(tmp_path / "b.qcow2", "good", "nulXjunk", "badYname")
    replace_all(img, b"nulXjunk", b"nul\0junk")
    replace_all(img, b"badYname", b"bad\xffname")
    bitmaps = {b.name: b for b in qcow2.read_header(img).bitmaps}
    assert bitmaps["good"].problem is None
    assert "holds a NUL byte" in bitmaps["nul\0junk"].problem
    assert "b'nul'" in bitmaps["nul\0junk"].problem  # what qemu calls it
    assert "is not UTF-8" in bitmaps["bad\ufffdname"].problem

    [disk] = ImageDirectory(str(tmp_path)).scan().disks
    views, missing = disk_views(disk)
    assert sorted(v.basename for v in views if v.kind == "dirty") == ["good"]
    reasons = dict(missing)
    assert "holds a NUL byte" in reasons["b.qcow2/dirty/nul\0junk.raw"]
    assert "is not UTF-8" in reasons["b.qcow2/dirty/bad\ufffdname.raw"]


def test_two_bitmaps_qemu_names_alike_refuse_the_image(tmp_path):
    img = bitmap_image(tmp_path / "b.qcow2", "b0", "b0Xx")
    replace_all(img, b"b0Xx", b"b0\0x")
    with pytest.raises(qcow2.Qcow2Error, match="two bitmaps named b'b0'"):
        qcow2.read_header(img)
    assert qemu_img_fails("info", "-U", img).returncode != 0


@pytest.mark.parametrize("field, value", [("type", 2), ("granularity bits", 8), ("extra data", 8),
                                          ("name size", 0x7FF)])
def test_bitmap_entries_qemu_refuses_refuse_the_image(tmp_path, field, value):
    img = bitmap_image(tmp_path / "b.qcow2", "bitmap-zero")
    data = open(img, "rb").read()
    assert data.count(b"bitmap-zero") == 1
    entry = data.index(b"bitmap-zero") - 24  # the directory entry holding the name
    offset, fmt = {"type": (16, ">B"), "granularity bits": (17, ">B"), "extra data": (20, ">I"),
                   "name size": (18, ">H")}[field]
    poke(img, entry + offset, fmt, value)
    with pytest.raises(qcow2.Qcow2Error):
        qcow2.read_header(img)
    assert read_layer(img, "qcow2", LOCAL).problem
    assert qemu_img_fails("info", "-U", img).returncode != 0


def test_a_virtual_size_no_file_can_have_is_a_problem(tmp_path):
    """A VMDK whose capacity is 2^54 sectors (2^63 bytes): 1 GiB grains keep its grain
    directory small enough for the header checks, and the file is made long enough."""
    path = tmp_path / "huge.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", path, "4M")
    poke(path, 12, "<QQ", 2**54, 0x200000)  # capacity, granularity (sectors)
    gd = struct.unpack_from("<Q", open(path, "rb").read(512), 56)[0]
    os.truncate(path, gd * 512 + (2**24) * 4)
    layer = read_layer(str(path), "vmdk", LOCAL)
    assert layer.problem == (f"not a usable vmdk image: its virtual size {2**63} is larger than qemu "
                             f"serves (at most {MAX_VIRTUAL_SIZE})")
    assert layer.size == 0


# -- loops and images no disk reaches --------------------------------------------------------

def test_loops_are_reported(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    good = create(d / "good.qcow2", MiB)
    # An image naming itself: a disk of its own (no other image uses it), its chain cut.
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "xelf.qcow2", "-F", "qcow2", d / "self.qcow2", "1M")
    replace_once(d / "self.qcow2", b"xelf.qcow2", b"self.qcow2")
    # Two images backing each other: neither is a leaf.
    for a, b in (("a", "b"), ("b", "a")):
        qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", f"{b}.qcow2", "-F", "qcow2", d / f"{a}.qcow2", "1M")
    # Named without a format: the base is used, and reached by no chain.
    create(d / "nofmt-base.qcow2", MiB)
    nofmt = create(d / "nofmt.qcow2", backing="nofmt-base.qcow2")
    replace_once(nofmt, struct.pack(">I", qcow2.EXT_BACKING_FORMAT), struct.pack(">I", 0x0BADF00D))

    scan = ImageDirectory(str(d)).scan()
    disks = {disk.relpath: disk for disk in scan.disks}
    assert sorted(disks) == ["good.qcow2", "nofmt.qcow2", "self.qcow2"]
    assert disks["good.qcow2"].complete and disks["good.qcow2"].chain[0].path == good
    me = disks["self.qcow2"]
    assert [lay.name for lay in me.chain] == ["self.qcow2"] and not me.complete
    assert me.cut_reason == f"backing chain loops at {d / 'self.qcow2'}: {d / 'self.qcow2'} names itself " \
        "as its backing file"
    views, missing = disk_views(me)
    assert [(v.kind, v.basename) for v in views] == [("layer", "00-self")]
    assert dict(missing)["self.qcow2/chain/"].endswith("names itself as its backing file")

    said = {}
    for p in scan.problems:
        said.setdefault(os.path.relpath(p.path, d) if os.path.isabs(p.path) else p.path, []).append(p.reason)
    assert said["a.qcow2"] == ["backing chain loops (a.qcow2 -> b.qcow2 -> a.qcow2): images that back each "
                               "other are no image's base and no disk of their own"]
    assert said["b.qcow2"] == ["backing chain loops (b.qcow2 -> a.qcow2 -> b.qcow2): images that back each "
                               "other are no image's base and no disk of their own"]
    assert said["nofmt-base.qcow2"] == ["no disk of its own: nofmt.qcow2 names it as a backing file, but "
                                        "does not reach it (see there)"]
    assert "does not record the format of its backing file" in said["nofmt.qcow2"][0]


def test_a_refused_single_layer_says_its_own_reason(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={d / 'ext.data'}", d / "ext.qcow2", "1M")
    [disk] = [x for x in ImageDirectory(str(d)).scan().disks if x.relpath == "ext.qcow2"]
    views, missing = disk_views(disk)
    assert views == []
    assert dict(missing)["ext.qcow2/chain/"] == "qcow2 images with an external data file are not supported"


# -- the status file: one item per line ----------------------------------------------------

def test_status_lines_escape_what_a_name_may_hold():
    assert shown("vm1/disk.qcow2: fine, with spaces and é") == "vm1/disk.qcow2: fine, with spaces and é"
    assert shown("a\nb.qcow2: x") == "a\\nb.qcow2: x"
    assert shown(os.fsdecode(b"bad\xff.qcow2") + "\x1b\0") == "bad\\xff.qcow2\\x1b\\x00"
    text = Status().render("DIR", [], [(os.fsdecode(b"bad\xff\n.qcow2"), "why")]).decode("utf-8")
    assert text.splitlines()[-1] == "bad\\xff\\n.qcow2: why"
