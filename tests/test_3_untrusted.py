"""Tier 3: no file in an image directory stops, hangs or crashes a mount.

Each case is a file anyone who may write in the directory could make: a
FIFO, a socket, a character device or a symlink loop where a backing file
should be; names holding a newline or bytes that are not UTF-8; a NUL in a
backing file's or a bitmap's name; a virtual size no file can have; images
that back themselves or each other; single images snapfs refuses. The mount
must return within a bound, the good disks beside them must read as qemu
reads them, the status file must name every refused file with its reason,
one item per line, and the log must hold no traceback (``conftest``).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import struct

import pytest
from conftest import (
    REPO,
    SNAPFS,
    MiB,
    create,
    expected_dirty_map,
    json_layer,
    poke,
    qemu_img,
    qemu_io,
    replace_all,
    replace_once,
    run,
)

# Seconds ``snapfs mount`` may take here; it takes about one.
BOUND = 60





def overlay(d, name, backing, fmt="qcow2"):
    """A qcow2 naming ``backing`` (not opened: it may not be an image at all)."""
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", fmt, d / name, "32M")
    return str(d / name)


@pytest.fixture
def crafted(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    good = create(d / "good.qcow2", 4 * MiB)
    qemu_io(good, "write -P 0x11 0 1M")

    # Where a backing file should be: a FIFO, a socket, a character device, a symlink loop.
    overlay(d, "on-fifo.qcow2", "fifo.qcow2")
    os.mkfifo(d / "fifo.qcow2")
    overlay(d, "on-socket.qcow2", "sock.raw", "raw")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(d / "sock.raw"))
    s.close()
    overlay(d, "on-device.qcow2", "null.raw", "raw")
    os.mknod(d / "null.raw", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    overlay(d, "on-link-loop.qcow2", "link.qcow2")
    os.symlink("link.qcow2", d / "link.qcow2")

    # A NUL in the backing file's name: qemu reads the name up to it.
    base = create(d / "nul-base.qcow2", 4 * MiB)
    qemu_io(base, "write -P 0x22 0 2M")
    top = create(d / "nul-top.qcow2", backing="nul-base.qcow2")
    qemu_io(top, "write -P 0x33 1M 64k")
    with open(top, "rb") as f:
        off = struct.unpack_from(">Q", f.read(16), 8)[0]
    poke(top, off, "19s", b"nul-base.qcow2\0junk")
    poke(top, 16, ">I", 19)

    # Bitmap names qemu-nbd would be handed wrong: a NUL in one, bytes that are not UTF-8.
    bm = create(d / "bitmaps.qcow2", 4 * MiB)
    for name in ("ok", "nulXjunk", "badYname"):
        qemu_img("bitmap", "--add", bm, name)
    qemu_io(bm, "write -P 0x44 0 64k")
    replace_all(bm, b"nulXjunk", b"nul\0junk")
    replace_all(bm, b"badYname", b"bad\xffname")

    # A virtual size of 2^63: a VMDK of 2^54 sectors in 1 GiB grains (its grain
    # directory stays small enough to pass the header checks).
    huge = d / "huge.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", huge, "4M")
    poke(huge, 12, "<QQ", 2**54, 0x200000)
    with open(huge, "rb") as f:
        gd = struct.unpack_from("<Q", f.read(512), 56)[0]
    os.truncate(huge, gd * 512 + (2**24) * 4)

    # An image naming itself, a VMDK whose parent is itself, two images backing each other.
    me = overlay(d, "self.qcow2", "xelf.qcow2")
    replace_once(me, b"xelf.qcow2", b"self.qcow2")
    run("qemu-io", "-c", "write -P 0x55 0 64k", json_layer(me))
    qemu_img("create", "-q", "-f", "vmdk", d / "zelfv.vmdk", "4M")
    qemu_img("create", "-q", "-f", "vmdk", "-b", "zelfv.vmdk", "-F", "vmdk", d / "selfv.vmdk")
    replace_once(d / "selfv.vmdk", b'"zelfv.vmdk"', b'"selfv.vmdk"')
    os.unlink(d / "zelfv.vmdk")
    overlay(d, "loop-a.qcow2", "loop-b.qcow2")
    overlay(d, "loop-b.qcow2", "loop-a.qcow2")

    # Single images snapfs refuses, each with its own reason.
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={d / 'extdata.bin'}", d / "extdata.qcow2", "4M")
    # An encrypted image: crypt_method 2 (LUKS) in the header. Written by hand, as
    # creating a real one runs qemu's PBKDF benchmark, which fails on some machines.
    poke(create(d / "luks.qcow2", 4 * MiB), 32, ">I", 2)
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", d / "flat.vmdk", "4M")

    # A header qemu refuses that snapfs's reader does not check: its views are
    # listed (their maps come from the files) until qemu is first asked.
    refc = create(d / "refc.qcow2", 4 * MiB)
    qemu_io(refc, "write -P 0x77 0 64k")
    poke(refc, 56, ">I", 0x7FFFFFFF)  # refcount_table_clusters

    # Names: a newline (a good image and a broken one), a byte that is not UTF-8.
    nl = create(os.path.join(d, "new\nline.qcow2"), 4 * MiB)
    qemu_io(nl, "write -P 0x66 0 64k")
    with open(os.path.join(d, "bad\nname.qcow2"), "wb") as f:
        f.write(b"not an image" * 100)
    # qemu takes file names in JSON (UTF-8 only): an image it could not open.
    qemu_img("create", "-q", "-f", "qcow2", os.path.join(d, os.fsdecode(b"disk\xff.qcow2")), "4M")
    yield d
    # A scan left blocked on the FIFO (the bug this guards against) gets its writer.
    try:
        os.close(os.open(d / "fifo.qcow2", os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


def lines_of(status):
    """``{path: reason}`` of the status file's items (each on one line)."""
    out = {}
    for line in status.splitlines():
        path, sep, reason = line.partition(": ")
        if sep:
            out.setdefault(path, []).append(reason)
    return out


def test_no_crafted_file_stops_the_mount(crafted, mount):
    d = crafted
    m = mount(d, timeout=BOUND)

    # The good disks read as qemu reads them.
    run("qemu-img", "compare", "-f", "raw", m / "good.qcow2/chain/00-good.raw", d / "good.qcow2")
    run("qemu-img", "compare", "-f", "raw", m / "new\nline.qcow2/chain/00-new\nline.raw",
        os.path.join(d, "new\nline.qcow2"))
    # A NUL in the backing file's name: the chain qemu reads, base included.
    assert sorted(os.listdir(m / "nul-top.qcow2/chain")) == [
        "00-nul-base.map.json", "00-nul-base.qcow2", "00-nul-base.raw",
        "01-nul-top.map.json", "01-nul-top.qcow2", "01-nul-top.raw"]
    run("qemu-img", "compare", "-f", "raw", m / "nul-top.qcow2/chain/01-nul-top.raw", d / "nul-top.qcow2")

    status = m.status()
    said = lines_of(status)

    def reason(path, *parts):
        got = said.get(path, [])
        assert any(all(p in r for p in parts) for r in got), f"{path}: {got}\n{status}"

    # Special files named as backing files: never opened, each named with its kind.
    for name, kind in (("fifo.qcow2", "a FIFO"), ("sock.raw", "a socket"), ("null.raw", "a character device")):
        reason(str(d / name), kind, "only regular files")
    reason("on-fifo.qcow2/layers/00-fifo.raw", "a FIFO")
    reason("on-fifo.qcow2/chain/", "chain views from fifo.qcow2 up need it", "a FIFO")
    # The overlay alone reads as qemu reads it (its .qcow2 would name the FIFO's, which has none).
    assert sorted(os.listdir(m / "on-fifo.qcow2/layers")) == ["01-on-fifo.map.json", "01-on-fifo.raw"]
    run("qemu-img", "compare", "-f", "raw", m / "on-fifo.qcow2/layers/01-on-fifo.raw",
        json_layer(d / "on-fifo.qcow2"))
    reason("on-fifo.qcow2/layers/01-on-fifo.qcow2", f"{d / 'fifo.qcow2'} has no layer view")
    reason("on-link-loop.qcow2", f"backing file {d / 'link.qcow2'} cannot be reached",
           "symbolic links")

    # Bitmap names qemu would misread: refused, the good bitmap of the same image served.
    assert sorted(os.listdir(m / "bitmaps.qcow2/dirty")) == ["ok.map.json", "ok.qcow2", "ok.raw"]
    with open(m / "bitmaps.qcow2/dirty/ok.map.json") as f:
        assert json.load(f) == expected_dirty_map(d.parent, d / "bitmaps.qcow2", "ok")
    reason("bitmaps.qcow2/dirty/nul\\x00junk.raw", "holds a NUL byte", "b'nul'")
    reason("bitmaps.qcow2/dirty/bad\ufffdname.raw", "is not UTF-8")

    # A size no file can have.
    reason("huge.vmdk/chain/", f"its virtual size {2**63} is larger than qemu serves")
    assert os.listdir(m / "huge.vmdk/layers") == []

    # Loops.
    reason("self.qcow2", "names itself as its backing file")
    run("qemu-img", "compare", "-f", "raw", m / "self.qcow2/layers/00-self.raw", json_layer(d / "self.qcow2"))
    reason("selfv.vmdk", "names itself as its backing file")
    reason("loop-a.qcow2", "backing chain loops (loop-a.qcow2 -> loop-b.qcow2 -> loop-a.qcow2)")
    reason("loop-b.qcow2", "backing chain loops (loop-b.qcow2 -> loop-a.qcow2 -> loop-b.qcow2)")
    assert not os.path.exists(m / "loop-a.qcow2") and not os.path.exists(m / "loop-b.qcow2")

    # Single images refused: their own reason, not a layer above's.
    reason("extdata.qcow2/chain/", "external data file")
    reason("luks.qcow2/chain/", "encrypted images are not supported")
    reason("flat.vmdk/chain/", "a VMDK descriptor file", "separate extent files")
    assert "a layer above" not in status

    # A view qemu refuses to open: the open fails (EIO), the view goes, with qemu's reason.
    assert "00-refc.raw" in os.listdir(m / "refc.qcow2/chain")
    with pytest.raises(OSError) as e:
        open(m / "refc.qcow2/chain/00-refc.raw", "rb").close()
    assert e.value.errno == errno.EIO
    assert os.listdir(m / "refc.qcow2/chain") == []
    status = m.status()
    said = lines_of(status)
    reason("refc.qcow2/chain/00-refc.raw", f"qemu cannot open {d / 'refc.qcow2'}: Reference count table too large")

    # Names: one line per item, escaped.
    reason(f"{d}/bad\\nname.qcow2", "not a usable qcow2 image")
    reason(f"{d}/disk\\xff.qcow2", "\\xff.qcow2' is not UTF-8: qemu takes file names in JSON")
    assert os.listdir(m / os.fsdecode(b"disk\xff.qcow2/layers")) == []
    assert "every view is available" not in status

    # A refresh scans the same files again, as fast, and finds nothing new.
    r = run(*SNAPFS, "refresh", m.path, check=False, cwd=REPO, timeout=BOUND)
    assert r.returncode == 0 and "0 new, 0 changed, 0 gone" in r.stdout, r.stdout + r.stderr
