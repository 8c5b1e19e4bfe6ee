"""``snapfs refresh MOUNTPOINT`` and ``--watch`` on an image directory changed under the mount.

A new snapshot (``qemu-img create -b``), a new bitmap, a deleted branch and a
``qemu-img commit`` each change what the mount must show; after a refresh,
every view of every disk must match qemu's ground truth for the directory
as it is now (``qemu-img map``, ``qemu-img compare``), exactly as a fresh
mount would. A disk whose files are open is left as it was until they are
closed.
"""

from __future__ import annotations

import json
import os
import time

import pytest
from conftest import REPO, SNAPFS, MiB, create, expected_allocation_map, json_layer, processes, qemu_img, qemu_io, run

SIZE = 16 * MiB


def refresh(m, *extra, ok=True):
    r = run(*SNAPFS, "refresh", m.path, *extra, check=False, cwd=REPO)
    assert (r.returncode == 0) == ok, r.stdout + r.stderr
    return (r.stdout + r.stderr).strip()


def listing(m) -> dict[str, list[str]]:
    """{disk: sorted view files} of the mount (maps and .qcow2 left out)."""
    out = {}
    for dirpath, _, names in os.walk(m.path):
        rel = os.path.relpath(dirpath, m.path)
        for folder in ("chain", "layers", "dirty"):
            if rel.endswith("/" + folder):
                out.setdefault(rel[: -len(folder) - 1], []).extend(
                    f"{folder}/{n}" for n in names if n.endswith(".raw"))
    return {k: sorted(v) for k, v in sorted(out.items())}


def assert_views_match(m, images, disk, chain):
    """Every chain and layer view of ``disk`` (images ``chain``, base first) against qemu."""
    for i, name in enumerate(chain):
        path = str(images / name)
        stem = name.rsplit(".", 1)[0]
        chain_view = m / f"{disk}/chain/{i:02d}-{stem}.raw"
        layer_view = m / f"{disk}/layers/{i:02d}-{stem}.raw"
        with open(chain_view[:-4] + ".map.json") as f:
            assert json.load(f) == expected_allocation_map(path, i > 0), chain_view
        with open(layer_view[:-4] + ".map.json") as f:
            assert json.load(f) == expected_allocation_map(json_layer(path), i > 0), layer_view
        qemu_img("compare", "-f", "raw", chain_view, path)
        qemu_img("compare", "-f", "raw", layer_view, json_layer(path))


def wait_idle(images, timeout=10):
    """No qemu-nbd of the mount holds an image of ``images`` (for qemu-img's write lock)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = [pid for pid, argv in processes().items()
                if argv[0].startswith("qemu-nbd") and any(str(images) in a for a in argv)]
        if not busy:
            return
        time.sleep(0.05)
    raise AssertionError(f"qemu-nbd still holds images of {images}")


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    base = create(d / "base.qcow2", SIZE)
    qemu_io(base, "write -P 0x11 0 4M")
    top = create(d / "top.qcow2", backing="base.qcow2")
    qemu_io(top, "write -P 0x21 1M 1M", "write -z 2M 1M")
    branch = create(d / "branch.qcow2", backing="base.qcow2")
    qemu_io(branch, "write -P 0x31 8M 1M")
    return d


def test_refresh_sees_snapshots_bitmaps_deletions_and_commits(images, mount):
    m = mount(images, "--idle-timeout", "0.2")
    assert listing(m) == {
        "branch.qcow2": ["chain/00-base.raw", "chain/01-branch.raw", "layers/00-base.raw",
                         "layers/01-branch.raw"],
        "top.qcow2": ["chain/00-base.raw", "chain/01-top.raw", "layers/00-base.raw", "layers/01-top.raw"],
    }
    assert_views_match(m, images, "top.qcow2", ["base.qcow2", "top.qcow2"])
    unchanged = os.stat(m / "branch.qcow2/chain/01-branch.raw").st_ino

    # A new snapshot over top, with a bitmap; the old leaf is now a layer of the new disk.
    wait_idle(images)
    snap = create(images / "snap.qcow2", backing="top.qcow2")
    qemu_img("bitmap", "--add", snap, "b1")
    qemu_io(snap, "write -P 0x41 3M 1M")
    assert refresh(m) == "snapfs: 2 disk(s): 1 new, 0 changed, 1 gone"
    assert listing(m)["snap.qcow2"] == [
        "chain/00-base.raw", "chain/01-top.raw", "chain/02-snap.raw", "dirty/b1.raw",
        "layers/00-base.raw", "layers/01-top.raw", "layers/02-snap.raw"]
    assert "top.qcow2" not in listing(m) and not os.path.exists(m / "top.qcow2")
    assert_views_match(m, images, "snap.qcow2", ["base.qcow2", "top.qcow2", "snap.qcow2"])
    # A disk whose images did not change keeps its views (and their inodes).
    assert os.stat(m / "branch.qcow2/chain/01-branch.raw").st_ino == unchanged

    # A second bitmap in a layer already shown: the disk is laid out anew.
    wait_idle(images)
    qemu_img("bitmap", "--add", snap, "b2")
    assert refresh(m) == "snapfs: 2 disk(s): 0 new, 1 changed, 0 gone"
    assert "dirty/b2.raw" in listing(m)["snap.qcow2"]

    # The branch is deleted.
    os.unlink(images / "branch.qcow2")
    assert refresh(m) == "snapfs: 1 disk(s): 0 new, 0 changed, 1 gone"
    assert list(listing(m)) == ["snap.qcow2"]

    # snap is committed into top: top's content and map change under the same names.
    wait_idle(images)
    qemu_img("commit", "-d", snap)
    assert refresh(m) == "snapfs: 1 disk(s): 0 new, 1 changed, 0 gone"
    assert_views_match(m, images, "snap.qcow2", ["base.qcow2", "top.qcow2", "snap.qcow2"])
    with open(m / "snap.qcow2/layers/01-top.raw", "rb") as f:
        f.seek(3 * MiB)
        assert f.read(MiB) == b"\x41" * MiB

    # Nothing changed: nothing is redone.
    assert refresh(m) == "snapfs: 1 disk(s): 0 new, 0 changed, 0 gone"
    status = m.status()
    assert "every view is available" in status and "branch" not in status


def test_a_disk_with_open_files_waits_until_they_close(images, mount):
    m = mount(images, "--idle-timeout", "0.2")
    view = m / "top.qcow2/chain/01-top.raw"
    with open(view, "rb") as f:
        before = f.read(MiB)
        # (qemu's image locking lets no one write an image snapfs reads: a new
        # snapshot over it takes the disk's name away instead.)
        create(images / "snap.qcow2", backing="top.qcow2")
        out = refresh(m, ok=False)
        assert out == ("snapfs: 3 disk(s): 1 new, 0 changed, 0 gone; left as they were, files open: "
                       "top.qcow2 (1 file(s) open)"), out
        # The open file reads on, as the disk was; its views take no new opens.
        f.seek(0)
        assert f.read(MiB) == before
        assert not os.path.exists(m / "top.qcow2/chain/01-top.raw")
        assert ("top.qcow2/chain/01-top.raw: changed since the mount (or the last refresh): laid out "
                "anew once its open files are closed") in m.status()
    assert refresh(m) == "snapfs: 2 disk(s): 0 new, 0 changed, 1 gone"
    assert not os.path.exists(m / "top.qcow2")


def test_refresh_arguments_are_checked(images, mount):
    m = mount(images)
    assert "scanned again whole" in refresh(m, "somedomain", ok=False)
    r = run(*SNAPFS, "mount", "--connect", "--watch", str(images / "x"), check=False, cwd=REPO)
    assert r.returncode != 0 and "--watch goes with --images" in r.stderr


def wait_for(predicate, timeout=15.0, what=""):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.1)


def test_watch_rescans_by_itself(images, mount):
    m = mount(images, "--watch", "--idle-timeout", "0.2")
    (images / "vm2").mkdir()
    create(images / "vm2" / "disk.qcow2", SIZE)
    wait_for(lambda: os.path.exists(m / "vm2/disk.qcow2/chain/00-disk.raw"), what="a new disk in a new directory")
    snap = create(images / "vm2" / "snap.qcow2", backing="disk.qcow2")
    qemu_io(snap, "write -P 0x51 0 1M")
    wait_for(lambda: os.path.exists(m / "vm2/snap.qcow2/chain/01-snap.raw"), what="a new snapshot")
    assert not os.path.exists(m / "vm2/disk.qcow2")
    assert_views_match(m, images / "vm2", "vm2/snap.qcow2", ["disk.qcow2", "snap.qcow2"])
    wait_idle(images)
    # A file open over a change: the disk follows once it is closed.
    with open(m / "top.qcow2/chain/01-top.raw", "rb") as f:
        f.read(4096)
        create(images / "snap.qcow2", backing="top.qcow2")
        wait_for(lambda: os.path.exists(m / "snap.qcow2/chain/02-snap.raw"), what="the new snapshot")
        f.seek(0)
        assert len(f.read(4096)) == 4096  # reads on
    wait_for(lambda: not os.path.exists(m / "top.qcow2"), what="the old leaf after its file closed")
    os.unlink(images / "vm2" / "snap.qcow2")
    os.unlink(images / "vm2" / "disk.qcow2")
    wait_for(lambda: not os.path.exists(m / "vm2"), what="an emptied directory vanishing")
