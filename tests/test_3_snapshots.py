"""Tier 3: internal snapshots of an image directory's qcow2 images are chain views.

``qemu-img snapshot -c`` keeps a point in time inside the image; the chain
view ``chain/NN-name@SNAPSHOT.raw`` is the disk as it was then, read with the
layers beneath. Ground truth: ``qemu-img convert -l snapshot.name=...`` for
the content, ``nbdinfo --map`` of ``qemu-nbd -l`` for the map.
"""

from __future__ import annotations

import json
import os

from conftest import MiB, QemuNBD, create, data_ranges, qemu_img, qemu_io, run, seek_walk, sha256_of

SIZE = 16 * MiB


def snapshot_raw(tmp_path, image, name) -> str:
    out = str(tmp_path / f"{os.path.basename(image)}@{name}.raw")
    qemu_img("convert", "-l", "snapshot.name=" + name.replace(",", ",,"), "-O", "raw", image, out)
    return out


def data_of_snapshot(tmp_path, image, name):
    """Data ranges (areas not reading as zero) of a snapshot, as qemu-nbd reports them."""
    srv = QemuNBD(tmp_path, image, "-f", "qcow2", "-l", "snapshot.name=" + name.replace(",", ",,"))
    try:
        out = json.loads(run("nbdinfo", "--json", "--map=base:allocation", srv.uri).stdout)
    finally:
        srv.close()
    return data_ranges([{"start": e["offset"], "length": e["length"], "zero": bool(e["type"] & 2)}
                        for e in out], lambda e: not e["zero"])


def test_internal_snapshots_are_chain_views(tmp_path, mount):
    d = tmp_path / "images"
    d.mkdir()
    base = create(d / "base.qcow2", SIZE)
    qemu_io(base, "write -P 0x11 0 1M", "write -P 0x12 4M 1M")
    qemu_img("snapshot", "-c", "before upgrade", base)
    qemu_io(base, "write -P 0x13 0 512k", "write -z 4M 1M", "write -P 0x14 8M 1M")
    top = create(d / "top.qcow2", backing="base.qcow2")
    qemu_io(top, "write -P 0x21 2M 1M")
    qemu_img("snapshot", "-c", "a,b", top)  # a comma: never an option separator for qemu-nbd
    qemu_io(top, "write -P 0x22 2M 512k", "discard 8M 1M")
    m = mount(d)

    chain = m / "top.qcow2/chain"
    names = sorted(os.listdir(chain))
    assert [n for n in names if n.endswith(".raw")] == [
        "00-base.raw", "00-base@before upgrade.raw", "01-top.raw", "01-top@a,b.raw"]
    assert "00-base@before upgrade.qcow2" in names and "01-top@a,b.map.json" in names

    for view, image, snap in ((chain + "/00-base@before upgrade.raw", base, "before upgrade"),
                              (chain + "/01-top@a,b.raw", top, "a,b")):
        assert os.path.getsize(view) == SIZE
        assert sha256_of(view) == sha256_of(snapshot_raw(tmp_path, image, snap))
        assert seek_walk(view) == data_of_snapshot(tmp_path, image, snap)
        assert os.getxattr(view, "user.snapfs.view") == b"chain"
        assert os.getxattr(view, "user.snapfs.image") == os.fsencode(image)
        # The composed .qcow2 is the same disk.
        run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", view[:-4] + ".qcow2", view)

    # The images as they are now are untouched by the snapshots' views.
    assert sha256_of(chain + "/01-top.raw") == sha256_of(snapshot_raw_now(tmp_path, top))
    assert "every view is available" in m.status()


def snapshot_raw_now(tmp_path, image) -> str:
    out = str(tmp_path / "now.raw")
    qemu_img("convert", "-O", "raw", image, out)
    return out


def test_a_snapshot_qemu_cannot_be_handed_is_reported(tmp_path, mount):
    d = tmp_path / "images"
    d.mkdir()
    img = create(d / "vda.qcow2", SIZE)
    qemu_io(img, "write -P 0x31 0 1M")
    qemu_img("snapshot", "-c", "s1", img)
    qemu_img("snapshot", "-c", "s2", img)
    # Rename s2 to s1 in the snapshot table: two snapshots of one name.
    with open(img, "r+b") as f:
        data = f.read()
        pos = data.rindex(b"s2")
        f.seek(pos)
        f.write(b"s1")
    m = mount(d)
    names = os.listdir(m / "vda.qcow2/chain")
    assert "00-vda@s1.raw" in names and names.count("00-vda@s1.raw") == 1
    status = m.status()
    assert "vda.qcow2/chain/00-vda@s1.raw: internal snapshot 2: another snapshot of the image is named" \
        in status, status
    assert sha256_of(m / "vda.qcow2/chain/00-vda@s1.raw") == sha256_of(snapshot_raw(tmp_path, img, "s1"))
