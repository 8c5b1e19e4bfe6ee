"""Tier 4: writable mounts (``snapfs mount --rw``): restore by writing files back.

What is tested is the table of docs/views.md "Writable mounts", on the chain
and the layer view of three kinds of top image (a qcow2 with a backing file, a
qcow2 alone, a raw image), then restores with standard tools, the layer round
trip of seed 000's upload flow, and the refusals. Ground truth is qemu's:
``qemu-img compare`` against a shadow copy that the test writes the same way,
``qemu-img map`` of the image (a layer alone with ``"backing": null``),
``qemu-img check`` and ``qemu-img info``.

While a view is open for writing, qemu's image lock is held by snapfs's
writer: the test's qemu-img then opens the image with ``-U`` (force-share),
after an ``fsync`` so that what qemu-nbd acknowledged is in the file.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import random
import shutil
import stat
import time

import pytest
from conftest import (
    MiB,
    create,
    data_ranges,
    expected_allocation_map,
    expected_dirty_map,
    json_layer,
    merge_dicts,
    nbdinfo_map,
    qemu_img,
    qemu_io,
    qemu_map,
    run,
    seek_walk,
)

SIZE = 64 * MiB + 1536  # qemu-img keeps it (a 512 multiple), not a 64 KiB cluster multiple
CLUSTER = 64 << 10

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd, mode, offset, length):
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def rnd(seed, n):
    return random.Random(seed).randbytes(n)


def aligned(data: bytes) -> memoryview:
    """A page-aligned buffer, as cp and dd hand to write(2)."""
    buf = mmap.mmap(-1, max(len(data), 1))
    buf[:len(data)] = data
    return memoryview(buf)[:len(data)]


def errno_of(fn, *args):
    """The errno ``fn(*args)`` fails with (None if it succeeds)."""
    try:
        r = fn(*args)
    except OSError as e:
        return e.errno
    if isinstance(r, int) and fn is os.open:
        os.close(r)
    return None


def covering(entries, start, end):
    """The qemu-img map entries over ``[start, end)``."""
    return [e for e in entries if e["start"] < end and start < e["start"] + e["length"]]


def full_clusters(start, end):
    a = -(-start // CLUSTER) * CLUSTER
    return a, end - end % CLUSTER


def info(image, fmt, shared=False):
    """qemu-img info less what legitimately changes with the data (sizes on the host)."""
    out = json.loads(qemu_img("info", "--output=json", *(["-U"] if shared else []), "-f", fmt,
                              image).stdout)
    out.pop("actual-size", None)
    return out


def wait_released(image, fmt, timeout=10):
    """Once the writer's last file closed, snapfs's qemu-nbd lets go of the image."""
    deadline = time.monotonic() + timeout
    while True:
        r = run("qemu-img", "info", "-f", fmt, image, check=False)
        if r.returncode == 0:
            return
        assert time.monotonic() < deadline, f"{image} still locked after the writer closed: {r.stderr}"
        time.sleep(0.02)


def assert_clean(image, fmt):
    if fmt != "qcow2":
        return  # qemu-img check has nothing to check in a raw image
    r = run("qemu-img", "check", "--output=json", image, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(r.stdout)
    for k in ("corruptions", "leaks", "check-errors", "corruptions-fixed", "leaks-fixed"):
        assert res.get(k, 0) == 0, res


def compare(a, b, *args, shared=False):
    r = run("qemu-img", "compare", *(["-U"] if shared else []), *args, a, b, check=False)
    assert r.returncode == 0, f"qemu-img compare {a} {b}: {r.stdout}{r.stderr}"


def forget_reads(image):
    """Drop the page cache that reading a raw image brought in.

    qemu's block status of a raw file is the host's SEEK_DATA: on ext4 an area
    zeroed with FALLOC_FL_ZERO_RANGE (unwritten extents; qemu-nbd's zero
    writes) is a hole until something reads it into the page cache (the
    test's qemu-img compare, or readahead behind a read of the data next to
    it), and data after. The test's reads must not change what qemu reports
    next, while the view keeps the map it read before.
    """
    fd = os.open(image, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# -- the three kinds of top image ----------------------------------------------------

KINDS = ("backed", "alone", "raw")


def build(d, kind):
    """A disk whose top image holds data, in image directory ``d``.

    Returns ``(disk dir in the mount, image path, format, has_backing, top view
    name)``. Every kind has data at 1M..2M, 20M, 33M..34M and 40M..44M, and
    the last 4 KiB; the qcow2 kinds zeroed 4M..5M.
    """
    if kind == "backed":
        base = create(d / "base.qcow2", SIZE)
        qemu_io(base, "write -P 0x11 0 8M", "write -P 0x12 40M 4M", f"write -P 0x13 {SIZE - 4096} 4096")
        top = create(d / "top.qcow2", backing="base.qcow2")
        qemu_img("bitmap", "--add", top, "b0")
        qemu_io(top, "write -P 0x21 1M 1M", "write -z 4M 1M", "write -P 0x22 20M 64k",
                "write -P 0x23 33M 1M")
        return "top.qcow2", top, "qcow2", True, "01-top.raw"
    if kind == "alone":
        img = create(d / "disk.qcow2", SIZE)
        qemu_io(img, "write -P 0x31 0 8M", "write -z 4M 1M", "write -P 0x32 20M 64k",
                "write -P 0x33 33M 1M", "write -P 0x34 40M 4M", f"write -P 0x35 {SIZE - 4096} 4096")
        return "disk.qcow2", img, "qcow2", False, "00-disk.raw"
    img = create(d / "disk.raw", SIZE, fmt="raw")
    qemu_io(img, "write -P 0x41 0 8M", "write -P 0x42 20M 64k", "write -P 0x43 33M 1M",
            "write -P 0x44 40M 4M", f"write -P 0x45 {SIZE - 4096} 4096", fmt="raw")
    return "disk.raw", img, "raw", False, "00-disk.raw"


class Target:
    """A writable view under test and a shadow file written the same way.

    The shadow holds what the view must read: the disk (chain) or the layer
    alone (layers). ``check`` compares the image with it and the view's map,
    SEEK_DATA/SEEK_HOLE and st_blocks with ``qemu-img map`` of the image.
    """

    def __init__(self, m, tmp_path, disk, image, fmt, has_backing, name, folder):
        self.m, self.tmp, self.disk, self.image, self.fmt = m, tmp_path, disk, image, fmt
        self.has_backing, self.folder = has_backing, folder
        self.rel = f"{disk}/{folder}/{name}"
        self.view = m / self.rel
        self.chain = folder == "chain"
        # What qemu opens: the chain, or the layer alone; a raw image is never probed.
        self.truth = image if self.chain and fmt == "qcow2" else json_layer(image, fmt)
        self.shadow = str(tmp_path / f"shadow-{folder}.raw")
        qemu_img("convert", "-U", "-O", "raw", self.truth, self.shadow)
        assert os.path.getsize(self.shadow) == SIZE
        if fmt == "raw":
            forget_reads(image)

    def is_data(self, e):
        return not e["zero"] if self.chain else not e["hole"]

    def put(self, off, data):
        with open(self.shadow, "r+b") as f:
            f.seek(off)
            f.write(data)

    def zero(self, off, length):
        self.put(off, bytes(length))

    def check(self, fd=None, where=""):
        """The image and the view against the shadow and qemu-img map.

        With ``fd`` (the view is open for writing) the view's map, seek
        walk and st_blocks are read first, right after the write returned;
        then fsync, and qemu reads the image beside the writer (-U).
        """
        with open(self.view[:-4] + ".map.json") as f:
            got = json.load(f)
        walk = seek_walk(self.view)
        blocks = os.stat(self.view).st_blocks
        size = os.stat(self.view).st_size
        shared = fd is not None
        if shared:
            os.fsync(fd)
        expected = expected_allocation_map(self.truth, self.has_backing, shared)
        assert got == expected, f"{self.rel} map {where}"
        assert walk == data_ranges(got, self.is_data), f"{self.rel} SEEK_DATA/SEEK_HOLE {where}"
        data = sum(e["length"] for e in got if self.is_data(e))
        assert blocks == (data + 511) // 512, f"{self.rel} st_blocks {where}"
        assert size == SIZE, where
        compare(self.shadow, self.truth, "-f", "raw", shared=shared)
        r = run("cmp", self.view, self.shadow, check=False)
        assert r.returncode == 0, f"{self.rel} reads {where}: {r.stdout}{r.stderr}"
        if self.fmt == "raw":
            forget_reads(self.image)
        return got


@pytest.fixture
def disk(tmp_path, mount):
    """disk(kind, folder) -> Target on a fresh image directory mounted --rw."""
    def _disk(kind, folder):
        d = tmp_path / f"images-{kind}"
        d.mkdir()
        name, image, fmt, has_backing, view = build(d, kind)
        m = mount(d, "--rw", name=f"mnt-{kind}")
        return Target(m, tmp_path, name, image, fmt, has_backing, view, folder)
    return _disk


# -- 1. the table, row by row --------------------------------------------------------

@pytest.mark.parametrize("folder", ["chain", "layers"])
@pytest.mark.parametrize("kind", KINDS)
def test_write_rows(disk, kind, folder):
    t = disk(kind, folder)
    before = info(t.image, t.fmt)
    t.check(where="as mounted")
    layer_backed = folder == "layers" and t.has_backing

    fd = os.open(t.view, os.O_RDWR)
    try:
        # write: data, across partial clusters at both ends, over the base's data too.
        for off, data in ((10 * MiB + 12345, rnd(1, 300_000)), (40 * MiB - 5000, rnd(2, 70_000))):
            assert os.pwrite(fd, data, off) == len(data)
            t.put(off, data)
            t.check(fd, f"after writing {len(data)} bytes at {off} (still open)")

        # Writing buffers of zeros, over the top's and the base's data.
        zeros = (512 << 10, 2 * MiB)
        assert os.pwrite(fd, aligned(bytes(zeros[1])), zeros[0]) == zeros[1]
        t.zero(*zeros)
        assert os.pwrite(fd, bytes(100), 33 * MiB + 7) == 100
        t.zero(33 * MiB + 7, 100)
        t.check(fd, "after writing zeros")
        entries = covering(qemu_map(t.truth, shared=True), zeros[0], zeros[0] + zeros[1])
        # Reads as zero (the shadow says so); a qcow2 stores zero clusters; in a layer,
        # allocated zeros, never a hole (a raw image holds every area).
        if t.fmt == "qcow2":
            assert all(e["zero"] for e in entries), entries
        if folder == "layers":
            assert all(e["present"] for e in entries), entries

        # fallocate: ZERO_RANGE (partial clusters), PUNCH_HOLE|KEEP_SIZE (whole clusters).
        zr, ph = (3 * MiB + 1000, MiB), (42 * MiB, MiB)
        fallocate(fd, FALLOC_FL_ZERO_RANGE, *zr)
        t.zero(*zr)
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, *ph)
        t.zero(*ph)
        t.check(fd, "after fallocate")
        now = qemu_map(t.truth, shared=True)
        for start, length in (zr, ph):
            entries = covering(now, *full_clusters(start, start + length))
            if t.fmt == "qcow2":
                assert all(e["zero"] for e in entries), (start, entries)
            if folder == "layers" and t.fmt == "qcow2":
                # A qcow2 layer keeps allocated zeros: they hide the layers beneath.
                assert all(e["present"] for e in entries), (start, entries)

        # truncate to the virtual size: nothing.
        os.ftruncate(fd, SIZE)
        t.check(fd, "after truncate to the virtual size")

        # truncate to another size: EINVAL, nothing changes.
        assert errno_of(os.ftruncate, fd, SIZE - 512) == errno.EINVAL
        assert errno_of(os.ftruncate, fd, 1) == errno.EINVAL
        assert errno_of(os.truncate, t.view, SIZE + CLUSTER) == errno.EINVAL
        assert info(t.image, t.fmt, shared=True)["virtual-size"] == SIZE
        t.check(fd, "after truncates to other sizes")

        # A write past the end: ENOSPC, nothing written; one that crosses the end is cut there.
        assert errno_of(os.pwrite, fd, b"x" * 4096, SIZE) == errno.ENOSPC
        assert errno_of(os.pwrite, fd, b"x" * 4096, SIZE + MiB) == errno.ENOSPC
        tail = rnd(3, 1024)
        assert os.pwrite(fd, tail, SIZE - 512) == 512
        t.put(SIZE - 512, tail[:512])
        assert info(t.image, t.fmt, shared=True)["virtual-size"] == SIZE
        t.check(fd, "after writes past the end")
        # The status file names the file and the reason (the latest refusal of each file).
        assert f"{t.rel}: a write at {SIZE + MiB} is past the end of the disk" in t.m.status()

        os.fsync(fd)
    finally:
        os.close(fd)

    wait_released(t.image, t.fmt)
    assert_clean(t.image, t.fmt)
    assert info(t.image, t.fmt) == before  # header, backing file and format, bitmaps
    t.check(where="after close")
    # The other view of the image serves the new content once the writer closed.
    other = Target(t.m, t.tmp, t.disk, t.image, t.fmt, t.has_backing, os.path.basename(t.view),
                   "layers" if t.chain else "chain")
    other.check(where="(the other view) after the writer closed")
    if layer_backed:
        # Zeroed in the layer: the base's data there is hidden in the chain.
        with open(other.view, "rb") as f:
            f.seek(42 * MiB)
            assert f.read(MiB) == bytes(MiB)
    if kind == "backed":
        # The enabled bitmap recorded the writes, as it records a VM's.
        with open(t.m / f"{t.disk}/dirty/b0.map.json") as f:
            got = json.load(f)
        assert got == expected_dirty_map(t.tmp, t.image, "b0")
        for off in (10 * MiB + 12345, 40 * MiB - 5000, 512 << 10, 3 * MiB + 1000, 42 * MiB, SIZE - 512):
            assert any(e["dirty"] and e["start"] <= off < e["start"] + e["length"] for e in got), off

    # open(O_TRUNC), truncate(0).
    if t.chain:
        os.truncate(t.view, 0)
        t.zero(0, SIZE)
        t.check(where="after truncate(0)")
        wait_released(t.image, t.fmt)
        for how in ("O_TRUNC", "ftruncate"):
            with open(t.view, "r+b") as f:
                f.seek(5 * MiB)
                f.write(rnd(4, MiB))
            t.put(5 * MiB, rnd(4, MiB))
            wait_released(t.image, t.fmt)
            t.check(where=f"before {how}")
            t.zero(0, SIZE)
            fd = os.open(t.view, os.O_WRONLY | (os.O_TRUNC if how == "O_TRUNC" else 0))
            try:
                if how == "ftruncate":
                    os.ftruncate(fd, 0)
                t.check(fd, f"after {how} (still open)")
                assert os.fstat(fd).st_size == SIZE
            finally:
                os.close(fd)
            wait_released(t.image, t.fmt)
            t.check(where=f"after {how}, closed")
    else:
        assert errno_of(os.truncate, t.view, 0) == errno.EPERM
        assert errno_of(os.open, t.view, os.O_WRONLY | os.O_TRUNC) == errno.EPERM
        fd = os.open(t.view, os.O_RDWR)
        try:
            assert errno_of(os.ftruncate, fd, 0) == errno.EPERM
        finally:
            os.close(fd)
        status = t.m.status()
        lines = [x for x in status.splitlines() if f" {t.rel}: " in x]
        assert len(lines) == 1 and "qemu-img create -b" in lines[0], status
        wait_released(t.image, t.fmt)
        t.check(where="after refused truncations")
    assert_clean(t.image, t.fmt)
    assert info(t.image, t.fmt) == before


def test_truncating_an_empty_layer_changes_nothing(tmp_path, mount):
    """A layer just made with qemu-img create -b, and images without a backing file
    that hold nothing: O_TRUNC and truncate(0) succeed and change nothing."""
    d = tmp_path / "images"
    (d / "b").mkdir(parents=True)
    (d / "a").mkdir()
    (d / "r").mkdir()
    base = create(d / "b/base.qcow2", SIZE)
    qemu_io(base, "write -P 0x51 0 8M")
    create(d / "b/top.qcow2", backing="base.qcow2")
    create(d / "a/disk.qcow2", SIZE)
    with open(d / "r/disk.raw", "wb") as f:
        f.truncate(SIZE)  # qemu-img create -f raw writes the first 4 KiB: that is data
    disks = [("b/top.qcow2", d / "b/top.qcow2", "qcow2", "01-top.raw"),
             ("a/disk.qcow2", d / "a/disk.qcow2", "qcow2", "00-disk.raw"),
             ("r/disk.raw", d / "r/disk.raw", "raw", "00-disk.raw")]
    before = {str(img): (info(img, fmt), qemu_map(json_layer(img, fmt))) for _, img, fmt, _ in disks}
    m = mount(d, "--rw")
    for rel, img, fmt, name in disks:
        view = m / f"{rel}/layers/{name}"
        assert os.stat(view).st_mode & 0o222
        os.truncate(view, 0)
        wait_released(img, fmt)
        fd = os.open(view, os.O_WRONLY | os.O_TRUNC)
        assert os.fstat(fd).st_size == SIZE
        os.fsync(fd)
        os.close(fd)
        wait_released(img, fmt)
        assert (info(img, fmt), qemu_map(json_layer(img, fmt))) == before[str(img)], rel
        assert_clean(img, fmt)
        with open(view[:-4] + ".map.json") as f:
            assert json.load(f) == [{"start": 0, "length": SIZE, "zero": True, "hole": True}]
        assert seek_walk(view) == []
        assert os.stat(view).st_blocks == 0
    # The chain still shows the base beneath the untouched layer.
    compare(m / "b/top.qcow2/chain/01-top.raw", d / "b/top.qcow2", "-f", "raw")
    assert " refused" not in m.status()


# -- 2. restores with standard tools -------------------------------------------------

def make_backup(path):
    """A raw backup unlike the disk: data where the disk had none, holes and written
    zeros where it had data, data in the last partial cluster."""
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for off, data in ((0, rnd(10, 256 << 10)), (3 * MiB + 777, rnd(11, 200_000)),
                          (30 * MiB, bytes(MiB)), (33 * MiB + 4096, rnd(12, 2 * MiB)),
                          (50 * MiB + 4096, rnd(13, 4096)), (SIZE - 3000, rnd(14, 3000))):
            f.seek(off)
            f.write(data)


def dd_sparse_overlay(old, backup, out):
    """What dd bs=1M conv=notrunc,sparse leaves: the old disk where a 1 MiB block of
    the backup is all zero, the backup elsewhere."""
    shutil.copyfile(old, out)
    with open(backup, "rb") as src, open(out, "r+b") as dst:
        for off in range(0, SIZE, MiB):
            block = src.read(MiB)
            if block.count(0) != len(block):
                dst.seek(off)
                dst.write(block)


RESTORES = {
    "cp-auto": ["cp", "--sparse=auto", "{b}", "{v}"],
    "cp-always": ["cp", "--sparse=always", "{b}", "{v}"],
    "dd-sparse": ["dd", "if={b}", "of={v}", "bs=1M", "conv=sparse", "status=none"],
    "dd-notrunc": ["dd", "if={b}", "of={v}", "bs=1M", "conv=notrunc", "status=none"],
    "dd-notrunc-sparse": ["dd", "if={b}", "of={v}", "bs=1M", "conv=notrunc,sparse", "status=none"],
    "convert": ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", "{b}", "{v}"],
    "rsync": ["rsync", "--inplace", "{b}", "{v}"],
}
CASES = [(tool, "backed") for tool in RESTORES] + [
    ("cp-auto", "alone"), ("convert", "alone"), ("dd-sparse", "alone"),
    ("cp-auto", "raw"), ("convert", "raw"), ("rsync", "raw")]


@pytest.mark.parametrize(("tool", "kind"), CASES, ids=[f"{t}-{k}" for t, k in CASES])
def test_restore_with_standard_tools(tmp_path, mount, tool, kind):
    if tool == "rsync":
        assert shutil.which("rsync"), "rsync missing: run make setup (it installs it)"
    d = tmp_path / "images"
    d.mkdir()
    name, image, fmt, has_backing, view = build(d, kind)
    chain_target = image if fmt == "qcow2" else json_layer(image, fmt)
    backup = tmp_path / "backup.raw"
    make_backup(backup)
    # Taken a day ago: rsync's quick check skips a file whose size and mtime (to the
    # second) are the view's, and the view's mtime is its image's.
    day_ago = time.time() - 86400
    os.utime(backup, (day_ago, day_ago))
    old = tmp_path / "old.raw"
    qemu_img("convert", "-O", "raw", chain_target, old)
    if tool == "dd-notrunc-sparse":
        expected = tmp_path / "expected.raw"
        dd_sparse_overlay(old, backup, expected)
    else:
        expected = backup
    before = info(image, fmt)
    m = mount(d, "--rw")
    v = m / f"{name}/chain/{view}"
    os.stat(v)  # the tool finds the map read

    r = run(*[a.format(b=backup, v=v) for a in RESTORES[tool]], check=False)
    assert r.returncode == 0, f"{tool} failed: {r.stdout}{r.stderr}"
    wait_released(image, fmt)

    # The view's map, SEEK_DATA/SEEK_HOLE and st_blocks, and qemu's map of the
    # image as it now is, before the test reads the image (a raw image's page
    # cache is then as the tool left it, for snapfs and qemu-img alike: see
    # forget_reads).
    truth = expected_allocation_map(chain_target, has_backing)
    # qemu-nbd lets go of the image a moment before snapfs hears that its writer
    # stopped: until then the view keeps the writer's own block status, which
    # may differ in detail (zero runs inside a cluster written in part).
    deadline = time.monotonic() + 5
    while True:
        with open(v[:-4] + ".map.json") as f:
            got = json.load(f)
        if got == truth or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    walk, blocks, size = seek_walk(v), os.stat(v).st_blocks, os.stat(v).st_size

    compare(expected, chain_target, "-f", "raw")
    assert_clean(image, fmt)
    assert info(image, fmt) == before  # header fields, backing file and format, bitmaps
    # The view serves what the image now holds.
    assert size == SIZE
    run("cmp", v, expected)
    if kind == "backed":
        # The enabled bitmap recorded every area the restore changed.
        dirty = nbdinfo_map(tmp_path, image, "qemu:dirty-bitmap:b0", "-f", "qcow2", "-B", "b0")
        with open(old, "rb") as a, open(expected, "rb") as b:
            for off in range(0, SIZE, CLUSTER):
                if a.read(CLUSTER) != b.read(CLUSTER):
                    assert any(t & 1 and s <= off < s + n for s, n, t in dirty), off
    assert " refused" not in m.status()
    assert walk == data_ranges(got, lambda e: not e["zero"])
    assert blocks == (sum(e["length"] for e in got if not e["zero"]) + 511) // 512
    assert got == truth, "the view's map after the restore is not qemu-img map's"


# -- 3. a layer rebuilt into a fresh layer (seed 000's upload flow) ------------------

def test_layer_round_trip_into_a_fresh_layer(tmp_path, mount):
    a = tmp_path / "a"
    a.mkdir()
    base = create(a / "base.qcow2", SIZE)
    qemu_io(base, "write -P 0x11 0 8M", "write -P 0x12 40M 4M", f"write -P 0x13 {SIZE - 4096} 4096")
    orig = create(a / "top.qcow2", backing="base.qcow2")
    # The layer's data, allocated zeros and holes each fill whole 1 MiB blocks
    # (dd bs=1M writes a block holding data whole); no data cluster holds only
    # zeros. Zeros hide the base's data at 4M and 40M..42M.
    qemu_io(orig, "write -P 0x21 1M 1M", "write -z 4M 1M", "write -z 12M 2M",
            "write -P 0x22 20M 2M", "write -P 0 20M 4096", "write -P 0 21M 60000",
            "write -z 40M 2M", "write -P 0x23 42M 1M", f"write -P 0x24 63M {SIZE - 63 * MiB}")
    src = mount(a, name="src")
    layer = src / "top.qcow2/layers/01-top.raw"
    backup, saved = tmp_path / "layer.raw", tmp_path / "layer.map.json"
    run("cp", "--sparse=auto", layer, backup)
    run("cp", layer[:-4] + ".map.json", saved)
    extents = json.loads(saved.read_text())
    assert extents == expected_allocation_map(json_layer(orig), True)
    assert any(e["zero"] and not e["hole"] for e in extents)  # the flow has zeros to keep

    b = tmp_path / "b"
    b.mkdir()
    fresh = create(b / "top.qcow2", backing=base)
    dst = mount(b, "--rw", "--allow-outside-backing", name="dst")
    view = dst / "top.qcow2/layers/01-top.raw"
    for e in extents:
        if not e["hole"]:
            run("fallocate", "--zero-range", "--offset", e["start"], "--length", e["length"], view)
    run("dd", f"if={backup}", f"of={view}", "bs=1M", "conv=notrunc,sparse", "status=none")
    wait_released(fresh, "qcow2")

    def layer_map(img):
        return merge_dicts(qemu_map(json_layer(img)), ("present", "zero", "data"))

    assert layer_map(fresh) == layer_map(orig)
    compare(orig, fresh)
    compare(backup, json_layer(fresh), "-f", "raw")
    assert_clean(fresh, "qcow2")
    assert info(fresh, "qcow2")["backing-filename"] == base
    with open(view[:-4] + ".map.json") as f:
        assert json.load(f) == extents
    run("cmp", dst / "top.qcow2/chain/01-top.raw", src / "top.qcow2/chain/01-top.raw")


# -- 4. refusals ---------------------------------------------------------------------

def _files(root):
    for dirpath, _, names in os.walk(root):
        for n in names:
            yield os.path.relpath(os.path.join(dirpath, n), root)


def _refusal_images(d):
    base = create(d / "base.qcow2", SIZE)
    qemu_io(base, "write -P 0x11 0 8M")
    top = create(d / "top.qcow2", backing="base.qcow2")
    qemu_img("bitmap", "--add", top, "b0")
    qemu_io(top, "write -P 0x21 1M 1M")
    (d / "solo").mkdir()
    create(d / "solo/disk.raw", SIZE, fmt="raw")
    return top


WRITABLE = {"top.qcow2/chain/01-top.raw", "top.qcow2/layers/01-top.raw",
            "solo/disk.raw/chain/00-disk.raw", "solo/disk.raw/layers/00-disk.raw"}


def test_read_only_mount_refuses_every_write_with_erofs(tmp_path, mount):
    d = tmp_path / "images"
    d.mkdir()
    _refusal_images(d)
    m = mount(d)
    files = sorted(_files(m.path))
    assert WRITABLE < set(files) and ".snapfs-status" in files
    for rel in files:
        p = m / rel
        assert os.stat(p).st_mode & 0o222 == 0, rel
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC):
            assert errno_of(os.open, p, flags) == errno.EROFS, (rel, flags)
        assert errno_of(os.truncate, p, 0) == errno.EROFS, rel


def test_rw_mount_refuses_what_is_not_a_top_view_with_eacces(tmp_path, mount):
    d = tmp_path / "images"
    d.mkdir()
    top = _refusal_images(d)
    m = mount(d, "--rw")
    files = sorted(_files(m.path))
    # The mode bits show w exactly on the two views of each disk's top image.
    assert {rel for rel in files if os.stat(m / rel).st_mode & 0o222} == WRITABLE
    for rel in WRITABLE:
        assert stat.S_IMODE(os.stat(m / rel).st_mode) == 0o644, rel
    refused = [rel for rel in files if rel not in WRITABLE]
    assert {"top.qcow2/chain/00-base.raw", "top.qcow2/layers/00-base.raw", "top.qcow2/dirty/b0.raw",
            "top.qcow2/chain/01-top.map.json", "top.qcow2/layers/01-top.map.json",
            ".snapfs-status"} <= set(refused)
    # As root too (the tests run as root): the kernel lets root by the mode bits, snapfs must not.
    for rel in refused:
        p = m / rel
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC):
            assert errno_of(os.open, p, flags) == errno.EACCES, (rel, flags)
        assert errno_of(os.truncate, p, 0) == errno.EACCES, rel
    status = m.status()
    for rel in refused:
        if rel.endswith(".raw"):
            assert f" {rel}: " in status, (rel, status)
    assert "top.qcow2/chain/00-base.raw: " + str(d / "base.qcow2") + " is not the top image" in status
    # Nothing was written, the chain is as it was.
    assert_clean(top, "qcow2")
    compare(m / "top.qcow2/chain/01-top.raw", top, "-f", "raw")


def test_one_writer_per_image_others_busy(tmp_path, mount):
    d = tmp_path / "images"
    d.mkdir()
    top = _refusal_images(d)
    m = mount(d, "--rw")
    chain, layer = m / "top.qcow2/chain/01-top.raw", m / "top.qcow2/layers/01-top.raw"
    dirty = m / "top.qcow2/dirty/b0.raw"
    data = rnd(20, 3 * CLUSTER)

    fd = os.open(chain, os.O_WRONLY)
    try:
        for p, flags in ((layer, os.O_RDONLY), (layer, os.O_RDWR), (dirty, os.O_RDONLY)):
            assert errno_of(os.open, p, flags) == errno.EBUSY, (p, flags)
        busy_status = m.status()
        # The view being written reads through its writer; another image is not busy.
        with open(chain, "rb") as f:
            f.seek(1 * MiB)
            assert f.read(MiB) == b"\x21" * MiB
        run("cmp", m / "top.qcow2/layers/00-base.raw", m / "top.qcow2/chain/00-base.raw")
        assert os.pwrite(fd, data, 30 * MiB) == len(data)
    finally:
        os.close(fd)

    # Once the writer closed, the other views open and serve the new content. (The
    # kernel sends the release after close() returned: opening at once is the next test.)
    wait_released(top, "qcow2")
    with open(layer, "rb") as f:
        f.seek(30 * MiB)
        assert f.read(len(data)) == data
    compare(layer, json_layer(top), "-f", "raw")
    with open(dirty[:-4] + ".map.json") as f:
        assert any(e["dirty"] and e["start"] <= 30 * MiB < e["start"] + e["length"] for e in json.load(f))
    with open(dirty, "rb") as f:
        f.seek(30 * MiB)
        assert f.read(len(data)) == data
    fd = os.open(layer, os.O_RDWR)
    os.close(fd)

    # A reader of the image keeps the writer out the same way.
    with open(layer, "rb") as f:
        f.read(4096)
        assert errno_of(os.open, chain, os.O_WRONLY) == errno.EBUSY
    fd = os.open(chain, os.O_WRONLY)
    os.close(fd)
    wait_released(top, "qcow2")
    assert_clean(top, "qcow2")
    # The refusals while the image was written are in the status file, with the reason.
    for rel in ("top.qcow2/layers/01-top.raw", "top.qcow2/dirty/b0.raw"):
        assert f" {rel}: {top} is open for writing" in busy_status, (rel, busy_status)


def test_other_views_open_as_soon_as_the_writer_closed(tmp_path, mount):
    """``cp BACKUP chain/NN-top.raw && cmp BACKUP layers/NN-top.raw``: the second
    open comes right after the writer's close() returned."""
    d = tmp_path / "images"
    d.mkdir()
    top = _refusal_images(d)
    m = mount(d, "--rw")
    chain, layer = m / "top.qcow2/chain/01-top.raw", m / "top.qcow2/layers/01-top.raw"
    busy = []
    for i in range(5):
        data = rnd(30 + i, CLUSTER)
        fd = os.open(chain, os.O_WRONLY)
        assert os.pwrite(fd, data, 30 * MiB) == len(data)
        os.close(fd)
        try:
            with open(layer, "rb") as f:
                f.seek(30 * MiB)
                assert f.read(len(data)) == data
        except OSError as e:
            busy.append(e.errno)
    wait_released(top, "qcow2")
    assert_clean(top, "qcow2")
    assert busy == [], f"opening the layer view right after the writer closed failed: {busy}"


def test_qcow2_files_of_a_written_image(tmp_path, mount):
    """A ``.qcow2`` is never written, keeps its layout while open (the writer
    waits: EBUSY), cannot be opened while its image is written, and shows the
    written content after the writer closed."""
    d = tmp_path / "images"
    d.mkdir()
    top = _refusal_images(d)
    m = mount(d, "--rw")
    chain_raw = m / "top.qcow2/chain/01-top.raw"
    chain_q, layer_q = m / "top.qcow2/chain/01-top.qcow2", m / "top.qcow2/layers/01-top.qcow2"
    for p in (chain_q, layer_q):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o444, p
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC):
            assert errno_of(os.open, p, flags) == errno.EACCES, (p, flags)
    assert ("top.qcow2/chain/01-top.qcow2: maps, .qcow2 files, domain definitions and the status file are "
            "read-only") in m.status()
    before = os.stat(chain_q).st_size

    # An open .qcow2 keeps the writer out.
    with open(chain_q, "rb") as f:
        head = f.read(65536)
        assert errno_of(os.open, chain_raw, os.O_WRONLY) == errno.EBUSY
        f.seek(0)
        assert f.read(65536) == head
    assert "top.qcow2/chain/01-top.raw: top.qcow2/chain/01-top.qcow2 is open" in m.status()

    data = rnd(40, 2 * MiB)
    fd = os.open(chain_raw, os.O_WRONLY)
    try:
        # A .qcow2 of the image being written does not open.
        assert errno_of(os.open, chain_q, os.O_RDONLY) == errno.EBUSY
        assert errno_of(os.open, layer_q, os.O_RDONLY) == errno.EBUSY
        assert os.pwrite(fd, data, 40 * MiB) == len(data)
    finally:
        os.close(fd)
    wait_released(top, "qcow2")

    # The written clusters are in the .qcow2 files now, and qemu agrees.
    assert os.stat(chain_q).st_size == before + len(data)
    for view, name in ((chain_q, "chain.qcow2"), (layer_q, "layer.qcow2")):
        copy = tmp_path / name
        shutil.copyfile(view, copy)
        qemu_img("check", json_layer(copy))  # the layer's backing file is not copied
        assert os.path.getsize(copy) == os.stat(view).st_size
    compare(tmp_path / "chain.qcow2", top)
    compare(json_layer(tmp_path / "layer.qcow2"), json_layer(top))
    assert_clean(top, "qcow2")
