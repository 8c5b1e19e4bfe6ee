"""Tier 8: docs/restore.md's walk-through, run as written, proved with qemu's own tools.

The shell blocks are taken from the document itself, so the docs cannot drift
from what works. Between the blocks the "guest" (qemu-io on the image, or a
real libvirt domain) writes over the disk; after each restore the disk must
equal the backup (``qemu-img compare``), every image must be clean (``qemu-img
check``), a rebuilt layer must allocate what the original did (``qemu-img
map``), and the bitmaps must have recorded the restore (``nbdinfo`` on the
bitmap), so that the next incremental backup contains it. The document's other
promises (other tools, writes seen at once, durable at close, the refusals)
are checked on the same kind of disk, each in a test of its own.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil

import pytest
from conftest import (
    REPO,
    MiB,
    create,
    expected_allocation_map,
    json_layer,
    merge_dicts,
    nbdinfo_map,
    qemu_img,
    qemu_io,
    run,
    seek_walk,
    walkthrough,
)
from libvirt_env import DiskSpec, TestDomain

DOC = os.path.join(REPO, "docs", "restore.md")
LIBVIRT_DOC = os.path.join(REPO, "docs", "libvirt.md")
SIZE = 64 * MiB
CLUSTER = 64 * 1024
LAYERS = ("00-base", "01-snap1", "02-vda")


def libvirt_helpers():
    """docs/libvirt.md's ``full`` and ``changes``, which restore.md's step 4 uses."""
    with open(LIBVIRT_DOC) as f:
        text = f.read()
    section = text[text.index("## Walk-through"):]
    return re.findall(r"```sh\n(.*?)```", section, re.S)[0]


class Shell:
    """Runs blocks of the document with ``bash -euo pipefail`` and the walk-through's variables."""

    def __init__(self, tmp_path, prelude="", **variables):
        self.env = dict(os.environ, MNT=str(tmp_path / "mnt"), BACKUP=str(tmp_path / "backup"),
                        PATH=os.path.join(REPO, ".venv", "bin") + ":" + os.environ["PATH"],
                        **{k: str(v) for k, v in variables.items()})
        os.makedirs(self.env["MNT"])
        os.makedirs(self.env["BACKUP"])
        self.prelude = prelude

    def __call__(self, block, ok=True):
        r = run("bash", "-euo", "pipefail", "-c", self.prelude + "\n" + block, env=self.env, check=False)
        if ok:
            assert r.returncode == 0, f"block failed ({r.returncode}):\n{block}\n{r.stdout}{r.stderr}"
        return r

    def umount(self):
        if os.path.ismount(self.env["MNT"]):
            run(os.path.join(REPO, ".venv", "bin", "snapfs"), "umount", self.env["MNT"])


# -- qemu's ground truth --------------------------------------------------------

def identical(a, b, fmt_a, fmt_b, *opts):
    r = run("qemu-img", "compare", *opts, "-f", fmt_a, "-F", fmt_b, a, b, check=False)
    return r.returncode == 0, r.stdout + r.stderr


def assert_identical(a, b, fmt_a="qcow2", fmt_b="raw", *opts):
    same, why = identical(a, b, fmt_a, fmt_b, *opts)
    assert same, f"{a} != {b}: {why}"


def assert_clean(image):
    r = run("qemu-img", "check", "--output=json", image, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert not report.get("corruptions") and not report.get("leaks"), report


def info(image):
    return json.loads(qemu_img("info", "--output=json", "-U", image).stdout)


def bitmaps(image):
    return {b["name"]: b["flags"] for b in info(image)["format-specific"]["data"].get("bitmaps", [])}


def dirty_runs(tmp_path, image, bitmap):
    """[(start, end)] the bitmap marks dirty, as qemu-nbd reports it."""
    runs = nbdinfo_map(tmp_path, image, f"qemu:dirty-bitmap:{bitmap}", "-f", "qcow2", "-B", bitmap)
    return [(s, s + n) for s, n, t in runs if t & 1]


def assert_dirty(runs, areas):
    for a, b in areas:
        assert any(s <= a and b <= e for s, e in runs), f"[{a}, {b}) is not dirty in {runs}"


def allocated(image):
    """[(start, end)] a qcow2 allocates itself (data or zero clusters), read alone."""
    return [(e["start"], e["start"] + e["length"]) for e in json.loads(
        qemu_img("map", "--output=json", json_layer(image)).stdout) if e["present"]]


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def as_rebuilt(layer_map, raw, has_backing):
    """A layer's map as the layer flow rebuilds it: a data cluster that holds only
    zeros comes back as allocated zeros (a hole in a layer with no backing file)."""
    out = []
    with open(raw, "rb") as f:
        for e in layer_map:
            if e["zero"]:
                out.append(e)
                continue
            end = e["start"] + e["length"]
            for pos in range(e["start"], end, CLUSTER):
                n = min(CLUSTER, end - pos)
                f.seek(pos)
                zero = f.read(n) == bytes(n)
                out.append({"start": pos, "length": n, "zero": zero, "hole": zero and not has_backing})
    return merge_dicts(out, ("zero", "hole"))


# -- image directory mode: steps 0 to 3 ---------------------------------------------

def build_chain(vm):
    """The walk-through's disk: base <- snap1 <- vda, 64 MiB, with 64 KiB-aligned extents
    that are not 1 MiB-aligned, allocated zeros, a data cluster of zeros (snap1 at
    40 MiB), holes everywhere else, and an enabled persistent bitmap b1 in the top."""
    os.makedirs(vm)
    base = create(vm / "base.qcow2", SIZE)
    qemu_io(base, "write -P 0x11 0 4M", "write -P 0x12 16M 2M", "write -P 0x13 40M 1M")
    snap1 = create(vm / "snap1.qcow2", backing="base.qcow2")
    qemu_io(snap1, "write -P 0x21 1M 1M", "write -z 16M 1M", "write -P 0x22 32M 1M", "write -P 0 40M 64k")
    top = create(vm / "vda.qcow2", backing="snap1.qcow2")
    qemu_img("bitmap", "--add", top, "b1")
    qemu_io(top, "write -P 0x31 2M 512k", "write -z 32M 512k", "write -P 0x32 48M 1M",
            "write -P 0x33 3200k 64k")
    return top


@pytest.fixture
def disk(tmp_path):
    """(top image, the disk's content as a raw file) of a fresh walk-through disk."""
    top = build_chain(tmp_path / "images" / "vm1")
    truth = str(tmp_path / "truth.raw")
    qemu_img("convert", "-O", "raw", top, truth)
    return top, truth


def test_restore_walkthrough_image_directory(tmp_path, disk):
    steps = walkthrough(DOC)
    assert sorted(steps) == ["0", "1", "2", "3", "4"], steps.keys()
    (backup_blk,), (raw_blk,), (qcow2_blk,), (rebuild_blk, check_blk) = (steps[s] for s in "0123")
    top, truth = disk
    restore = tmp_path / "restore"
    restore.mkdir()
    sh = Shell(tmp_path, IMAGES=tmp_path / "images", RESTORE=restore)
    backup = tmp_path / "backup"

    # 0. The backups, against the chain as qemu reads it.
    pristine = tmp_path / "pristine"
    shutil.copytree(os.path.dirname(top), pristine)
    sh(backup_blk)
    assert_identical(backup / "vda.raw", truth, "raw")
    assert_identical(backup / "vda.qcow2", truth)
    assert_clean(backup / "vda.qcow2")
    for name in LAYERS:
        layer = pristine / (name[3:] + ".qcow2")
        with open(backup / "layers" / f"{name}.map.json") as f:
            saved = json.load(f)
        assert saved == expected_allocation_map(json_layer(layer), name != "00-base"), name
        assert_identical(json_layer(layer), backup / "layers" / f"{name}.raw")

    # 1. The guest writes over data and holes; the whole disk comes back from the raw backup.
    damage = [(0, 8 * MiB), (56 * MiB, 2 * MiB), (48 * MiB, CLUSTER)]
    qemu_io(top, "write -P 0x66 0 8M", "write -P 0x67 56M 2M", "write -z 48M 64k")
    assert not identical(top, truth, "qcow2", "raw")[0]
    qemu_img("bitmap", "--clear", top, "b1")  # what b1 marks from here on is the restore's
    out = sh(raw_blk).stdout
    assert "refused" not in out, out
    assert_restored_in_place(tmp_path, top, truth, pristine, damage)

    # 2. Again, from the qcow2 backup.
    damage = [(0, 3 * MiB), (48 * MiB, MiB), (60 * MiB, 4 * MiB)]
    qemu_io(top, "write -P 0x68 0 3M", "write -z 48M 1M", "write -P 0x69 60M 4M")
    assert not identical(top, truth, "qcow2", "raw")[0]
    qemu_img("bitmap", "--clear", top, "b1")
    sh(qcow2_blk)
    assert_restored_in_place(tmp_path, top, truth, pristine, damage)

    # 3. The chain, layer by layer, into fresh layers.
    sh(rebuild_blk)
    assert sorted(os.listdir(restore)) == ["base.qcow2", "snap1.qcow2", "vda.qcow2"]
    lower = None
    for name in LAYERS:
        new, orig = restore / (name[3:] + ".qcow2"), pristine / (name[3:] + ".qcow2")
        assert_clean(new)
        i = info(new)
        assert i["format"] == "qcow2" and i.get("backing-filename") == lower, (name, i)
        if lower:
            assert i["backing-filename-format"] == "qcow2"
        rebuilt = expected_allocation_map(json_layer(new), lower is not None)
        wanted = as_rebuilt(expected_allocation_map(json_layer(orig), lower is not None),
                            backup / "layers" / f"{name}.raw", lower is not None)
        assert rebuilt == wanted, name
        assert_identical(json_layer(new), backup / "layers" / f"{name}.raw")
        lower = new.name
    # The data cluster of zeros came back as allocated zeros; the chains read the same.
    assert {"start": 40 * MiB, "length": CLUSTER, "zero": True, "hole": False} in \
        expected_allocation_map(json_layer(restore / "snap1.qcow2"), True)
    assert_identical(restore / "vda.qcow2", pristine / "vda.qcow2", "qcow2", "qcow2")
    sh(check_blk)


def assert_restored_in_place(tmp_path, top, truth, pristine, damage):
    """The disk equals the backup; the top is still a clean qcow2 on snap1 with its
    bitmap, which marks what the restore zeroed (the damage) and wrote (the backup's
    data); the layers beneath are untouched."""
    assert_identical(top, truth)
    assert_clean(top)
    i = info(top)
    assert (i["format"], i["backing-filename"], i["backing-filename-format"]) == ("qcow2", "snap1.qcow2", "qcow2")
    assert bitmaps(top) == {"b1": ["auto"]}  # enabled, and not left in use
    for name in ("base.qcow2", "snap1.qcow2"):
        assert sha256(os.path.join(os.path.dirname(top), name)) == sha256(pristine / name), name
    data = [(e["start"], e["start"] + e["length"]) for e in qemu_map_raw(truth) if e["data"]]
    assert_dirty(dirty_runs(tmp_path, top, "b1"), [(a, a + n) for a, n in damage] + data)


def qemu_map_raw(path):
    return json.loads(qemu_img("map", "--output=json", "-f", "raw", path).stdout)


# -- the rest of what docs/restore.md promises -----------------------------------------

def read_map(path):
    with open(path) as f:
        return json.load(f)


def refused(path, flags, want):
    with pytest.raises(OSError) as e:
        os.close(os.open(path, flags))
    assert e.value.errno == want, (path, e.value)


@pytest.mark.parametrize("tool", [
    ["dd", "if={backup}", "of={view}", "bs=1M", "conv=sparse", "status=none"],
    ["rsync", "--inplace", "--ignore-times", "{backup}", "{view}"],
], ids=["dd", "rsync"])
def test_other_tools_restore_a_disk(tmp_path, mount, disk, tool):
    """"dd conv=sparse and rsync --inplace --ignore-times restore the same way" (step 1)."""
    top, truth = disk
    qemu_io(top, "write -P 0x66 0 8M", "write -P 0x67 56M 2M", "write -z 48M 64k")
    m = mount(tmp_path / "images", "--rw")
    r = run(*(a.format(backup=truth, view=m / "vm1/vda.qcow2/chain/02-vda.raw") for a in tool), check=False)
    assert r.returncode == 0, r.stdout + r.stderr + m.status()
    m.close()
    assert_identical(top, truth)
    assert_clean(top)


# The tests' write: 1 MiB of 0x77 at 56 MiB, a hole of every layer, and its extent.
WRITE = (b"\x77" * MiB, 56 * MiB)
WRITTEN = {"start": 56 * MiB, "length": MiB, "zero": False, "hole": False}


def written(tmp_path, truth):
    """The disk after WRITE, as a raw file."""
    path = str(tmp_path / "written.raw")
    shutil.copyfile(truth, path)
    with open(path, "r+b") as f:
        f.seek(WRITE[1])
        f.write(WRITE[0])
    return path


def test_a_write_shows_at_once_and_is_in_the_image_at_close(tmp_path, mount, disk):
    top, truth = disk
    m = mount(tmp_path / "images", "--rw")
    view = m / "vm1/vda.qcow2"
    chain, layer = f"{view}/chain/02-vda.raw", f"{view}/layers/02-vda.raw"
    assert os.stat(chain).st_mode & 0o777 == os.stat(layer).st_mode & 0o777 == 0o644
    blocks = os.stat(chain).st_blocks  # the map is known before the write
    fd = os.open(chain, os.O_WRONLY)
    try:
        assert os.pwrite(fd, *WRITE) == MiB
        # The view shows it at once: reads, map, SEEK_DATA, st_blocks.
        assert WRITTEN in read_map(f"{view}/chain/02-vda.map.json")
        with open(chain, "rb") as f:
            f.seek(56 * MiB)
            assert f.read(MiB) == b"\x77" * MiB
        assert (56 * MiB, MiB) in seek_walk(chain)
        assert os.stat(chain).st_blocks == blocks + MiB // 512
        # The other views of the image are busy meanwhile.
        refused(layer, os.O_RDONLY, errno.EBUSY)
        refused(f"{view}/dirty/b1.raw", os.O_RDONLY, errno.EBUSY)
    finally:
        os.close(fd)
    # close returned: the write is in the image, which is clean.
    assert_identical(top, written(tmp_path, truth), "qcow2", "raw", "-U")
    r = run("qemu-img", "check", "-U", top, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    m.close()
    ro = mount(tmp_path / "images", name="ro") / "vm1/vda.qcow2"
    assert read_map(f"{ro}/layers/02-vda.map.json") == expected_allocation_map(json_layer(top), True)
    assert read_map(f"{ro}/chain/02-vda.map.json") == expected_allocation_map(top, True)


def test_other_views_serve_the_write_once_it_is_closed(tmp_path, mount, disk):
    """"once the writer is closed they show the new content": right after close(2)."""
    m = mount(tmp_path / "images", "--rw")
    view = m / "vm1/vda.qcow2"
    layer = f"{view}/layers/02-vda.raw"
    assert WRITTEN not in read_map(f"{view}/layers/02-vda.map.json")  # known before the write
    fd = os.open(f"{view}/chain/02-vda.raw", os.O_WRONLY)
    try:
        assert os.pwrite(fd, *WRITE) == MiB
    finally:
        os.close(fd)
    assert WRITTEN in read_map(f"{view}/layers/02-vda.map.json")
    with open(layer, "rb") as f:
        f.seek(56 * MiB)
        assert f.read(MiB) == b"\x77" * MiB


def test_refusals_as_documented(tmp_path, mount, disk):
    """docs/restore.md's table of refusals, and the status file; nothing changes."""
    top, truth = disk
    images = tmp_path / "images"
    m = mount(images, "--rw")
    view = m / "vm1/vda.qcow2"
    chain, layer = f"{view}/chain/02-vda.raw", f"{view}/layers/02-vda.raw"
    for other in ("chain/01-snap1.raw", "layers/00-base.raw", "dirty/b1.raw", "chain/02-vda.map.json",
                  "layers/01-snap1.map.json"):
        assert not os.stat(f"{view}/{other}").st_mode & 0o222, other
        refused(f"{view}/{other}", os.O_WRONLY, errno.EACCES)
    refused(f"{m.path}/.snapfs-status", os.O_WRONLY, errno.EACCES)
    refused(layer, os.O_WRONLY | os.O_TRUNC, errno.EPERM)  # the top layer holds data
    for size in (SIZE - 512, SIZE + 512):
        with pytest.raises(OSError) as e:
            os.truncate(chain, size)
        assert e.value.errno == errno.EINVAL
    os.truncate(chain, SIZE)  # its own size: nothing changes
    with pytest.raises(OSError) as e:
        os.chmod(chain, 0o600)
    assert e.value.errno == errno.EPERM
    fd = os.open(chain, os.O_WRONLY)
    try:
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"x" * 512, SIZE)
        assert e.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    r = run("fallocate", "--offset", str(SIZE - MiB), "--length", "2M", "--zero-range", chain, check=False)
    assert r.returncode != 0 and "No space left on device" in r.stderr, r.stderr
    r = run("fallocate", "--length", "1M", chain, check=False)
    assert r.returncode != 0 and "Operation not supported" in r.stderr, r.stderr
    # A reader of the image is open when a writer comes: the writer is refused.
    fd = os.open(layer, os.O_RDONLY)
    try:
        refused(chain, os.O_WRONLY, errno.EBUSY)
    finally:
        os.close(fd)
    text = m.status()
    for name, why in (("chain/01-snap1.raw", "is not the top image"), ("dirty/b1.raw", "read-only"),
                      ("layers/00-base.raw", "is not the top image"), ("layers/02-vda.raw", "holds data"),
                      ("chain/02-vda.raw", "is open for reading")):
        assert re.search(rf"vm1/vda\.qcow2/{re.escape(name)}: .*{why}", text), (name, text)
    m.close()
    assert_identical(top, truth)
    assert_clean(top)
    assert bitmaps(top) == {"b1": ["auto"]}

    # Without --rw: EROFS, and no write bits.
    ro = mount(images, name="ro")
    refused(ro / "vm1/vda.qcow2/chain/02-vda.raw", os.O_WRONLY, errno.EROFS)
    assert os.stat(ro / "vm1/vda.qcow2/chain/02-vda.raw").st_mode & 0o777 == 0o444
    ro.close()

    # A layer that allocates nothing takes O_TRUNC and truncate(0), and nothing changes.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    base = create(fresh / "base.qcow2", SIZE)
    qemu_io(base, "write -P 0x11 0 1M")
    over = create(fresh / "top.qcow2", backing="base.qcow2")
    f = mount(fresh, "--rw", name="fresh-mnt")
    empty = f / "top.qcow2/layers/01-top.raw"
    os.close(os.open(empty, os.O_WRONLY | os.O_TRUNC))
    os.truncate(empty, 0)
    assert os.stat(empty).st_size == SIZE
    f.close()
    assert allocated(over) == []
    assert_identical(over, base, "qcow2", "qcow2")


# -- libvirt mode: step 4 -------------------------------------------------------------

def test_restore_walkthrough_libvirt(conn, d, tmp_path):
    older, full1, restore, incremental = walkthrough(DOC)["4"]
    backup = tmp_path / "backup"
    with TestDomain.define(conn, "restore", [DiskSpec("vda", f"{d}/vda.qcow2", size=32 * MiB)]) as dom:
        sh = Shell(tmp_path, prelude=libvirt_helpers(), DOMAIN=dom.name)
        image = dom.source("vda")[0]

        def record(name):
            return dom.record("vda", str(tmp_path / f"{name}.raw"))

        dom.start()
        dom.write("vda", 0, 4 * MiB, 0x11)
        dom.write("vda", 8 * MiB, MiB, 0x12)
        point0 = record("point0")
        sh(older)
        assert_identical(backup / "vda.0.raw", point0, "raw")

        # Written before ck1 and never again: only the restore's writes make them dirty.
        restored_only = [(MiB, 2 * MiB), (16 * MiB, 18 * MiB)]
        dom.write("vda", MiB, MiB, 0x21)
        dom.write("vda", 16 * MiB, 2 * MiB, 0x22)
        point1 = record("point1")
        sh(full1)
        assert_identical(backup / "vda.1.qcow2", point1)

        dom.write("vda", 20 * MiB, MiB, 0x31)
        dom.zero("vda", 0, 512 * 1024)
        # While the domain runs, the restore is refused and changes nothing.
        running = record("running")
        try:
            r = sh(restore, ok=False)
            assert r.returncode != 0 and "Device or resource busy" in r.stderr, r.stdout + r.stderr
            with open(os.path.join(sh.env["MNT"], ".snapfs-status")) as f:
                assert "vda/chain/current.raw: the domain is running" in f.read()
        finally:
            sh.umount()
        assert_identical(record("running-after"), running, "raw")

        dom.destroy()
        sh(restore)
        assert_identical(image, backup / "vda.0.raw")
        assert_clean(image)
        assert bitmaps(image) == {"ck1": ["auto"]}
        assert_dirty(dirty_runs(tmp_path, image, "ck1"), restored_only)

        dom.start()
        dom.write("vda", 24 * MiB, MiB, 0x41)
        point2 = record("point2")
        sh(incremental)
        # The replay (vda.2 on vda.1) is the disk; vda.2 holds the restored areas itself.
        assert_identical(backup / "vda.2.qcow2", point2)
        held = allocated(backup / "vda.2.qcow2")
        for a, b in restored_only:
            assert any(s <= a and b <= e for s, e in held), (a, b, held)
