"""Tier 3: VMware snapshot chains, and VDI, VHDX and VHD disks, on a real mount.

The corpus is made by qemu itself: a VMDK base with two snapshot deltas
(``-00000N.vmdk``, one with zeroed grains) and a branch, qcow2 overlays on a
VMDK and on a VDI base, a streamOptimized VMDK, and single-layer VDI
(dynamic, static), VHDX and VHD (dynamic, fixed) disks, written with qemu-io
(data, zeros, parts of grains) before the next layer is made (a VMDK delta
is valid only while its parent is unchanged). Ground truth is qemu's:
``qemu-img map`` of the image with its chain, or of one layer alone
(``"backing": null``), and ``qemu-img compare``; every view's composed ``.qcow2`` must pass ``qemu-img
check`` and read as its ``.raw``. Refused files are mounted on their own and
their reasons read from the status file.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
from conftest import (
    MiB,
    Mount,
    create,
    data_ranges,
    expected_allocation_map,
    nbdinfo_map,
    qemu_img,
    qemu_io,
    run,
    seek_walk,
)

SIZE = 64 * MiB + 1536  # whole sectors, not whole grains
BACKED = ("qcow2", "vmdk")


def node(path, fmt, alone=False):
    """A json: filename of ``path``: with the chain it names, or alone (``"backing": null``)."""
    n = {"driver": fmt, "file": {"driver": "file", "filename": str(path)}}
    if alone and fmt in BACKED:
        n["backing"] = None
    return "json:" + json.dumps(n)


def vmdk(path, size=None, *opts, backing=None):
    args = ["create", "-q", "-f", "vmdk"]
    for o in opts:
        args += ["-o", o]
    if backing:
        args += ["-b", backing, "-F", "vmdk"]
    qemu_img(*args, path, *([str(size)] if size is not None else []))
    return str(path)


def image(path, fmt, size, *opts):
    qemu_img("create", "-q", "-f", fmt, *[a for o in opts for a in ("-o", o)], path, str(size))
    return str(path)


# The corpus's disks (relative to its image directory): their layers, base first, with formats.
CHAINS = {
    "vm1/disk-000002.vmdk": [("disk.vmdk", "vmdk"), ("disk-000001.vmdk", "vmdk"),
                             ("disk-000002.vmdk", "vmdk")],
    "vm1/branch.vmdk": [("disk.vmdk", "vmdk"), ("branch.vmdk", "vmdk")],
    "mixed/top.qcow2": [("base.vmdk", "vmdk"), ("top.qcow2", "qcow2")],
    "mixed/over-vdi.qcow2": [("base.vdi", "vdi"), ("over-vdi.qcow2", "qcow2")],
    "stream/export.vmdk": [("export.vmdk", "vmdk")],
    "single/dyn.vdi": [("dyn.vdi", "vdi")],
    "single/static.vdi": [("static.vdi", "vdi")],
    "single/disk.vhdx": [("disk.vhdx", "vhdx")],
    "single/dyn.vhd": [("dyn.vhd", "vpc")],
    "single/fixed.vpc": [("fixed.vpc", "vpc")],
}


def build_vmware(root):
    d = root / "images"
    for sub in ("vm1", "mixed", "stream", "single"):
        (d / sub).mkdir(parents=True)
    vm1 = d / "vm1"
    base = vmdk(vm1 / "disk.vmdk", SIZE)
    qemu_io(base, "write -P 0xa1 0 4M", "write -z 8M 1M", "write -P 0xa2 12M 2M",
            f"write -P 0xa3 {SIZE - 4096} 4096", fmt="vmdk")
    # Zeroed grains: whole grains written as zeros are allocated zeros.
    s1 = vmdk(vm1 / "disk-000001.vmdk", None, "zeroed_grain=on", backing="disk.vmdk")
    qemu_io(s1, "write -P 0xb1 1M 1M", "write -z 2M 1M", "write -z 12M 128k",
            "write -P 0xb2 20M 5000",  # part of a grain: qemu copies the rest from beneath
            "discard 13M 64k", fmt="vmdk")
    s2 = vmdk(vm1 / "disk-000002.vmdk", None, backing="disk-000001.vmdk")
    qemu_io(s2, "write -P 0xc1 0 512k", "write -z 12M 64k", "write -P 0xc2 30M 3M", fmt="vmdk")
    branch = vmdk(vm1 / "branch.vmdk", None, backing="disk.vmdk")
    qemu_io(branch, "write -P 0xd1 3M 2M", fmt="vmdk")

    mbase = vmdk(d / "mixed/base.vmdk", 16 * MiB)
    qemu_io(mbase, "write -P 0xe1 0 2M", fmt="vmdk")
    top = create(d / "mixed/top.qcow2", backing="base.vmdk", backing_fmt="vmdk")
    qemu_io(top, "write -P 0xe2 1M 64k", "write -z 64k 64k")
    vdi = image(d / "mixed/base.vdi", "vdi", 8 * MiB)
    qemu_io(vdi, "write -P 0xe3 0 3M", fmt="vdi")
    over = create(d / "mixed/over-vdi.qcow2", backing="base.vdi", backing_fmt="vdi")
    qemu_io(over, "write -P 0xe4 1M 64k", "write -z 2M 64k")

    src = vmdk(root / "export-src.vmdk", 16 * MiB)
    qemu_io(src, "write -P 0xf1 1M 1M", "write -P 0xf2 9M 64k", fmt="vmdk")
    qemu_img("convert", "-f", "vmdk", "-O", "vmdk", "-o", "subformat=streamOptimized", src,
             d / "stream/export.vmdk")

    single = d / "single"
    for name, fmt, size, opts in [("dyn.vdi", "vdi", 16 * MiB, ()), ("static.vdi", "vdi", 8 * MiB, ("static=on",)),
                                  ("disk.vhdx", "vhdx", 8 * MiB, ()), ("dyn.vhd", "vpc", 16 * MiB, ()),
                                  ("fixed.vpc", "vpc", 8 * MiB, ("subformat=fixed",))]:
        path = image(single / name, fmt, size, *opts)
        qemu_io(path, "write -P 0x51 1M 1M", "write -z 3M 1M", "write -P 0x52 5M 4k", fmt=fmt)
    return d


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_vmware(tmp_path_factory.mktemp("vmware"))


@pytest.fixture(scope="module")
def mnt(corpus, tmp_path_factory):
    m = Mount(corpus, tmp_path_factory.mktemp("m") / "mnt")
    yield m
    m.close()


def views_of(corpus, disk):
    """(folder, stem, image, format, has_backing) of every chain and layer view of a disk."""
    out = []
    for i, (name, fmt) in enumerate(CHAINS[disk]):
        path = corpus / os.path.dirname(disk) / name
        stem = f"{i:02d}-{name.rsplit('.', 1)[0]}"
        for folder in ("chain", "layers"):
            out.append((folder, stem, path, fmt, i > 0))
    return out


def all_views(corpus):
    return [(disk, *v) for disk in sorted(CHAINS) for v in views_of(corpus, disk)]


def test_layout(corpus, mnt):
    assert sorted(os.listdir(mnt.path)) == [".snapfs-status", "mixed", "single", "stream", "vm1"]
    assert sorted(os.listdir(mnt / "vm1")) == ["branch.vmdk", "disk-000002.vmdk"]
    assert sorted(os.listdir(mnt / "single")) == sorted(os.path.basename(d) for d in CHAINS
                                                        if d.startswith("single/"))
    assert sorted(os.listdir(mnt / "vm1/disk-000002.vmdk/chain")) == sorted(
        f"{stem}{ext}" for stem in ("00-disk", "01-disk-000001", "02-disk-000002")
        for ext in (".raw", ".map.json", ".qcow2"))
    for disk in CHAINS:
        assert os.listdir(mnt / f"{disk}/dirty") == []  # no bitmaps but in qcow2
        top = CHAINS[disk][-1]
        view = mnt / f"{disk}/chain/{len(CHAINS[disk]) - 1:02d}-{top[0].rsplit('.', 1)[0]}.raw"
        assert os.getxattr(view, "user.snapfs.format") == top[1].encode()
        assert os.stat(view).st_size == json.loads(qemu_img(
            "info", "--output=json", node(corpus / disk, top[1])).stdout)["virtual-size"]
    x = mnt / "vm1/disk-000002.vmdk/layers/01-disk-000001.raw"
    assert os.getxattr(x, "user.snapfs.backing") == os.fsencode(corpus / "vm1/disk.vmdk")
    assert os.stat(mnt / "vm1/disk-000002.vmdk/chain/00-disk.raw").st_size == SIZE
    assert "every view is available" in mnt.status()


@pytest.mark.parametrize("disk", sorted(CHAINS))
def test_chain_and_layer_views_match_qemu(corpus, mnt, disk):
    for folder, stem, path, fmt, has_backing in views_of(corpus, disk):
        view = mnt / f"{disk}/{folder}/{stem}.raw"
        where = f"{disk}/{folder}/{stem}"
        truth = node(path, fmt, alone=folder == "layers")
        with open(view[:-4] + ".map.json") as f:
            got = json.load(f)
        assert got == expected_allocation_map(truth, has_backing), where
        is_data = (lambda e: not e["zero"]) if folder == "chain" else (lambda e: not e["hole"])
        assert seek_walk(view) == data_ranges(got, is_data), where
        data = sum(e["length"] for e in got if is_data(e))
        assert os.stat(view).st_blocks == (data + 511) // 512, where
        r = run("qemu-img", "compare", "-f", "raw", view, truth, check=False)
        assert r.returncode == 0, f"{where}: {r.stdout} {r.stderr}"


def test_vmdk_layers_keep_zeroed_grains_and_depth(corpus, mnt, tmp_path):
    """The zeroed grains of a delta are allocated zeros in its layer view (they
    hide the base's data); qemu:allocation-depth, which tells them from holes,
    is served for a VMDK chain (checked with nbdinfo)."""
    with open(mnt / "vm1/disk-000002.vmdk/layers/01-disk-000001.map.json") as f:
        m = json.load(f)
    assert {"start": 2 * MiB, "length": MiB, "zero": True, "hole": False} in m
    assert {"start": 12 * MiB, "length": 128 << 10, "zero": True, "hole": False} in m
    s2 = corpus / "vm1/disk-000002.vmdk"
    depth = nbdinfo_map(tmp_path, node(s2, "vmdk"), "qemu:allocation-depth", "--allocation-depth")
    at = {off: t for off, _, t in depth}
    assert at[0] == 1  # disk-000002's own data
    assert any(s <= 1 * MiB < s + n and t == 2 for s, n, t in depth)  # disk-000001's
    assert any(s <= 4 * MiB < s + n and t == 0 for s, n, t in depth)  # nowhere
    # The chain view of the delta reads the base where the delta has nothing.
    with open(mnt / "vm1/disk-000002.vmdk/chain/01-disk-000001.raw", "rb") as f:
        f.seek(3 * MiB)
        assert f.read(4096) == b"\xa1" * 4096
        f.seek(2 * MiB)
        assert f.read(4096) == bytes(4096)


def test_composed_qcow2_of_every_view(corpus, mnt, tmp_path):
    for disk, folder, stem, _path, _fmt, has_backing in all_views(corpus):
        where = f"{disk}/{folder}/{stem}"
        raw = mnt / f"{disk}/{folder}/{stem}.raw"
        copy = tmp_path / (where.replace("/", "_") + ".qcow2")
        shutil.copyfile(raw[:-4] + ".qcow2", copy)
        r = run("qemu-img", "check", node(copy, "qcow2", alone=True), check=False)
        assert r.returncode == 0, f"{where}: {r.stdout} {r.stderr}"
        # Alone, it reads as its .raw (64 KiB grains: no cluster is held in part).
        r = run("qemu-img", "compare", "-F", "raw", node(copy, "qcow2", alone=True), raw, check=False)
        assert r.returncode == 0, f"{where}: {r.stdout} {r.stderr}"
        if folder == "layers" and has_backing:
            # In place, it lies on the .qcow2 beneath it: the chain at that layer.
            chain = mnt / f"{disk}/chain/{stem}.raw"
            r = run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", raw[:-4] + ".qcow2", chain, check=False)
            assert r.returncode == 0, f"{where}: {r.stdout} {r.stderr}"


# -- refused files ----------------------------------------------------------------------

def _descriptor(path, change):
    with open(path, "r+b") as f:
        f.seek(512)
        raw = f.read(10240)
        new = change(raw.split(b"\0", 1)[0].decode()).encode()
        f.seek(512)
        f.write(new + bytes(len(raw) - len(new)))


@pytest.fixture
def refused(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    vmdk(d / "flat.vmdk", 4 * MiB, "subformat=monolithicFlat")
    vmdk(d / "split.vmdk", 4 * MiB, "subformat=twoGbMaxExtentSparse")
    wrong = vmdk(d / "wrong.vmdk", 4 * MiB)
    _descriptor(wrong, lambda t: t.replace('"monolithicSparse"', '"vmfsSparse"'))
    proto = vmdk(d / "proto.vmdk", 4 * MiB)
    _descriptor(proto, lambda t: t.replace('createType="monolithicSparse"',
                                           'createType="monolithicSparse"\nparentFileNameHint="nbd:x:1"'))
    vmdk(outside / "secret.vmdk", 4 * MiB)
    qemu_io(str(outside / "secret.vmdk"), "write -P 0x5e 0 64k", fmt="vmdk")
    vmdk(d / "escape.vmdk", None, backing="../outside/secret.vmdk")
    vmdk(d / "gone.vmdk", 4 * MiB)
    orphan = vmdk(d / "orphan.vmdk", None, backing="gone.vmdk")
    qemu_io(orphan, "write -P 0x0f 0 64k", fmt="vmdk")
    os.unlink(d / "gone.vmdk")
    moved = vmdk(d / "moved.vmdk", 4 * MiB)
    vmdk(d / "moved-000001.vmdk", None, backing="moved.vmdk")
    qemu_io(moved, "write -P 0x77 0 64k", fmt="vmdk")  # the parent changes: its CID too
    # A loop: loop.vmdk names itself (its own CID as parentCID); loop-top names loop.vmdk.
    loop = vmdk(d / "loop.vmdk", 4 * MiB)
    cid = json.loads(qemu_img("info", "--output=json", loop).stdout)["format-specific"]["data"]["cid"]
    _descriptor(loop, lambda t: t.replace("parentCID=ffffffff", f'parentCID={cid:08x}\n'
                                          'parentFileNameHint="loop.vmdk"'))
    top = vmdk(d / "loop-top.vmdk", 4 * MiB)
    _descriptor(top, lambda t: t.replace("parentCID=ffffffff", f'parentCID={cid:08x}\n'
                                         'parentFileNameHint="loop.vmdk"'))
    os.rename(image(d / "x.vhdx", "vhdx", 4 * MiB), d / "checkpoint.avhdx")
    image(d / "diff.vhd", "vpc", 4 * MiB)
    _vhd_differencing(d / "diff.vhd")
    # A .img holding a VMDK header is raw: the header is guest data.
    shutil.copyfile(vmdk(tmp_path / "plain.vmdk", MiB), d / "looks-like-vmdk.img")
    return d


def _vhd_differencing(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        for off in (0, size - 512):
            f.seek(off)
            footer = bytearray(f.read(512))
            footer[60:64] = (4).to_bytes(4, "big")
            footer[64:68] = bytes(4)
            footer[64:68] = (~sum(footer) & 0xFFFFFFFF).to_bytes(4, "big")
            f.seek(off)
            f.write(footer)


def test_refused_files_are_reported(refused, mount, tmp_path):
    m = mount(refused)
    status = m.status()
    lines = status.splitlines()

    def said(path, *words):
        hits = [ln for ln in lines if path in ln and all(w in ln for w in words)]
        assert hits, f"no line about {path} with {words}:\n{status}"

    said("flat.vmdk", "a VMDK descriptor file (createType 'monolithicFlat')", "flat.vmdk'", "extent files")
    said("flat-flat.vmdk", "no VMDK sparse extent header")
    said("split.vmdk", "createType 'twoGbMaxExtentSparse'", "not supported")
    said("split-s001.vmdk", "a sparse extent without a descriptor of its own")
    said("wrong.vmdk", "createType 'vmfsSparse'")
    said("proto.vmdk", "parent file 'nbd:x:1' is not a plain file name")
    said("escape.vmdk", "outside", "--allow-outside-backing")
    said("orphan.vmdk", "gone.vmdk is missing")
    said("moved-000001.vmdk", "parentCID", "the parent changed since the snapshot was made")
    said("loop-top.vmdk", "backing chain loops at")
    said("checkpoint.avhdx", "a differencing VHDX")
    said("diff.vhd", "a differencing VHD")

    # A disk directory for each leaf, even a refused one; views only where they can be read.
    disks = sorted(os.listdir(m.path))
    for leaf in ("flat.vmdk", "split.vmdk", "wrong.vmdk", "checkpoint.avhdx", "diff.vhd"):
        assert leaf in disks
        assert os.listdir(m / f"{leaf}/chain") == os.listdir(m / f"{leaf}/layers") == []
    # Parents that were cut off: the delta alone is still there.
    for leaf, stem in (("orphan.vmdk", "00-orphan"), ("escape.vmdk", "00-escape"),
                       ("moved-000001.vmdk", "00-moved-000001")):
        assert os.listdir(m / f"{leaf}/chain") == []
        layer = m / f"{leaf}/layers/{stem}.raw"
        r = run("qemu-img", "compare", "-f", "raw", layer, node(refused / leaf, "vmdk", alone=True), check=False)
        assert r.returncode == 0, r.stdout + r.stderr
    with open(m / "escape.vmdk/layers/00-escape.raw", "rb") as f:
        assert b"\x5e" * 64 not in f.read()  # the outside parent is never read
    with open(m / "orphan.vmdk/layers/00-orphan.raw", "rb") as f:
        assert f.read(4) == b"\x0f" * 4

    # The .img is raw: its view is the file's own bytes, VMDK header and all.
    view = m / "looks-like-vmdk.img/chain/00-looks-like-vmdk.raw"
    assert os.getxattr(view, "user.snapfs.format") == b"raw"
    with open(view, "rb") as f, open(refused / "looks-like-vmdk.img", "rb") as g:
        assert f.read() == g.read()


def test_outside_parent_followed_when_allowed(refused, mount):
    m = mount(refused, "--allow-outside-backing")
    with open(m / "escape.vmdk/chain/01-escape.raw", "rb") as f:
        assert f.read(4) == b"\x5e" * 4
    r = run("qemu-img", "compare", "-f", "raw", m / "escape.vmdk/chain/01-escape.raw",
            node(refused / "escape.vmdk", "vmdk"), check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_rw_mount_writes_qcow2_and_raw_tops_only(tmp_path, mount):
    """A --rw mount writes the top image only if it is qcow2 or raw; a qcow2 over a vmdk base is."""
    d = tmp_path / "images"
    d.mkdir()
    base = vmdk(d / "base.vmdk", 8 * MiB)
    qemu_io(base, "write -P 0x61 0 1M", fmt="vmdk")
    vmdk(d / "solo.vmdk", 8 * MiB)
    image(d / "solo.vdi", "vdi", 8 * MiB)
    top = create(d / "top.qcow2", backing="base.vmdk", backing_fmt="vmdk")
    m = mount(d, "--rw")
    for rel in ("solo.vmdk/chain/00-solo.raw", "solo.vmdk/layers/00-solo.raw", "solo.vdi/chain/00-solo.raw",
                "top.qcow2/chain/00-base.raw"):
        assert os.stat(m / rel).st_mode & 0o222 == 0, rel
        with pytest.raises(PermissionError):
            os.open(m / rel, os.O_WRONLY)
    assert "solo.vmdk/chain/00-solo.raw: snapfs writes qcow2 and raw images only, not vmdk" in m.status()
    fd = os.open(m / "top.qcow2/chain/01-top.raw", os.O_WRONLY)
    try:
        assert os.pwrite(fd, b"\x62" * 65536, 2 * MiB) == 65536
    finally:
        os.close(fd)
    deadline = time.monotonic() + 10
    while True:  # the writer stops (and frees qemu's lock) once its file is released
        r = run("qemu-io", "-f", "qcow2", "-c", "read -P 0x62 2M 64k", "-c", "read -P 0x61 0 1M", top,
                check=False)
        if r.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert r.returncode == 0, r.stdout + r.stderr
    qemu_img("compare", "-f", "raw", m / "top.qcow2/chain/01-top.raw", top)
