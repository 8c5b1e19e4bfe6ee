"""Tier 3: views on a real mount, against qemu's own ground truth.

The sample covers data, areas zeroed over older data, discarded areas, a raw
base with a size that is not a sector multiple under a qcow2 overlay, a
virtual size that is not a cluster multiple, a branch sharing a base, and a
dirty bitmap with changed and trimmed areas.
"""

import json
import os
import stat
from itertools import pairwise

import pytest
from conftest import (
    SAMPLE_CHAINS,
    SAMPLE_SIZE,
    MiB,
    Mount,
    build_sample,
    data_ranges,
    expected_allocation_map,
    expected_dirty_map,
    json_layer,
    merge_dicts,
    nbdinfo_map,
    qemu_img,
    qemu_map,
    run,
    seek_walk,
)

SIZE = SAMPLE_SIZE  # not a multiple of the 64 KiB cluster


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return build_sample(tmp_path_factory.mktemp("sample"))


@pytest.fixture(scope="module")
def mnt(sample, tmp_path_factory):
    m = Mount(sample, tmp_path_factory.mktemp("m") / "mnt")
    yield m
    m.close()


CHAINS = SAMPLE_CHAINS


def views_of(sample, disk):
    """(folder, view file name, image path, format, has_backing) for every chain/layer view."""
    out = []
    dirname = os.path.dirname(disk)
    for i, name in enumerate(CHAINS[disk]):
        path = str(sample / dirname / name)
        fmt = "raw" if name.endswith(".raw") else "qcow2"
        stem = name.rsplit(".", 1)[0]
        for folder in ("chain", "layers"):
            out.append((folder, f"{i:02d}-{stem}.raw", path, fmt, i > 0))
    return out


def test_layout(mnt):
    top = sorted(os.listdir(mnt.path))
    assert top == [".snapfs-status", "vm1", "vm2"]
    assert sorted(os.listdir(mnt / "vm1")) == ["branch.qcow2", "snap2.qcow2"]
    assert sorted(os.listdir(mnt / "vm2")) == ["top.qcow2"]      # notes.txt ignored
    d = mnt / "vm1/snap2.qcow2"
    assert sorted(os.listdir(d)) == ["chain", "dirty", "layers", "partitions"]
    assert sorted(os.listdir(os.path.join(d, "partitions"))) == ["00-base", "01-snap1", "02-snap2"]
    assert sorted(os.listdir(os.path.join(d, "chain"))) == [
        "00-base.map.json", "00-base.qcow2", "00-base.raw", "01-snap1.map.json", "01-snap1.qcow2",
        "01-snap1.raw", "02-snap2.map.json", "02-snap2.qcow2", "02-snap2.raw"]
    assert sorted(os.listdir(os.path.join(d, "dirty"))) == [
        "since-snap1.map.json", "since-snap1.qcow2", "since-snap1.raw", "since-snap2.map.json",
        "since-snap2.qcow2", "since-snap2.raw"]
    assert os.listdir(mnt / "vm1/branch.qcow2/dirty") == []
    st = os.stat(os.path.join(d, "chain/02-snap2.raw"))
    assert stat.S_ISREG(st.st_mode) and st.st_mode & 0o777 == 0o444
    assert st.st_size == SIZE
    assert "every view is available" in mnt.status()


@pytest.mark.parametrize("disk", sorted(CHAINS))
def test_chain_and_layer_views_match_qemu(sample, mnt, disk, tmp_path):
    for folder, fname, image, fmt, has_backing in views_of(sample, disk):
        view = mnt / f"{disk}/{folder}/{fname}"
        where = f"{disk}/{folder}/{fname}"
        if folder == "chain":
            truth_image = image if fmt == "raw" else image  # opened with its backing chain
            compare_to = ["-F", fmt, image]
        else:
            truth_image = json_layer(image, fmt)
            compare_to = [truth_image]
        expected = expected_allocation_map(truth_image, has_backing)
        with open(view[:-4] + ".map.json") as f:
            got = json.load(f)
        assert got == expected, where

        # SEEK_DATA/SEEK_HOLE agree with the map, per the view's kind.
        is_data = (lambda e: not e["zero"]) if folder == "chain" else (lambda e: not e["hole"])
        assert seek_walk(view) == data_ranges(got, is_data), where

        data = sum(e["length"] for e in got if is_data(e))
        assert os.stat(view).st_blocks == (data + 511) // 512, where

        r = run("qemu-img", "compare", "-f", "raw", view, *compare_to, check=False)
        assert r.returncode == 0, f"{where}: {r.stdout} {r.stderr}"


def test_layer_view_keeps_zeroed_areas_as_data(mnt):
    with open(mnt / "vm1/snap2.qcow2/layers/01-snap1.map.json") as f:
        m = json.load(f)
    # snap1 zeroed 2M..3M over the base's data: it must be kept (hole:false).
    assert {"start": 2 * MiB, "length": MiB, "zero": True, "hole": False} in m
    walk = seek_walk(mnt / "vm1/snap2.qcow2/layers/01-snap1.raw")
    assert any(s <= 2 * MiB and 3 * MiB <= s + n for s, n in walk)


def test_dirty_view_matches_bitmap_and_zero_status(sample, mnt, tmp_path):
    image = str(sample / "vm1/snap2.qcow2")
    view = mnt / "vm1/snap2.qcow2/dirty/since-snap2.raw"
    expected = expected_dirty_map(tmp_path, image, "since-snap2")
    with open(view[:-4] + ".map.json") as f:
        got = json.load(f)
    assert got == expected
    # The trimmed area is dirty and zero (seed 001).
    assert any(e["dirty"] and e["zero"] and e["start"] <= 12 * MiB < e["start"] + e["length"]
               for e in got)
    assert seek_walk(view) == data_ranges(got, lambda e: e["dirty"])
    dirty = sum(e["length"] for e in got if e["dirty"])
    assert os.stat(view).st_blocks == (dirty + 511) // 512

    # Content: the current disk where dirty, zeros elsewhere.
    full = tmp_path / "full.raw"
    qemu_img("convert", "-O", "raw", image, full)
    with open(full, "rb") as f:
        disk = f.read()
    with open(view, "rb") as f:
        content = f.read()
    assert len(content) == len(disk) == SIZE
    for e in got:
        part = content[e["start"]:e["start"] + e["length"]]
        if e["dirty"]:
            assert part == disk[e["start"]:e["start"] + e["length"]], e
        else:
            assert part.count(0) == len(part), e


def test_dirty_view_of_bitmap_copies_is_their_union(sample, mnt, tmp_path):
    """since-snap1 lives in snap1 and (as an empty copy) in snap2: changes in both count."""
    snap1, snap2 = str(sample / "vm1/snap1.qcow2"), str(sample / "vm1/snap2.qcow2")
    view = mnt / "vm1/snap2.qcow2/dirty/since-snap1.raw"
    with open(view[:-4] + ".map.json") as f:
        got = json.load(f)
    # Ground truth: each copy's bitmap from nbdinfo, the chain's zero status from qemu-img map.
    copies = [nbdinfo_map(tmp_path, json_layer(img), "qemu:dirty-bitmap:since-snap1", "-B", "since-snap1")
              for img in (snap1, snap2)]
    zero = [(e["start"], e["length"], bool(e["zero"])) for e in qemu_map(snap2)]
    cuts = sorted({0, SIZE} | {s for r in copies for s, _, _ in r} | {s for s, _, _ in zero})
    expected = []
    for a, b in pairwise(cuts):
        dirty = any(next(t for s, n, t in r if s <= a < s + n) & 1 for r in copies)
        z = next(t for s, n, t in zero if s <= a < s + n)
        expected.append({"start": a, "length": b - a, "dirty": dirty, "zero": z})
    assert got == merge_dicts(expected, ("dirty", "zero"))
    # Both layers' writes are there: snap1's at 1M, snap2's at 30M.
    for off in (1 * MiB, 30 * MiB):
        assert any(e["dirty"] and e["start"] <= off < e["start"] + e["length"] for e in got)
    assert seek_walk(view) == data_ranges(got, lambda e: e["dirty"])


def test_xattrs(sample, mnt):
    view = mnt / "vm1/snap2.qcow2/layers/01-snap1.raw"
    assert sorted(os.listxattr(view)) == sorted(
        ["user.snapfs.view", "user.snapfs.image", "user.snapfs.format", "user.snapfs.backing"])
    assert os.getxattr(view, "user.snapfs.view") == b"layer"
    assert os.getxattr(view, "user.snapfs.image") == os.fsencode(sample / "vm1/snap1.qcow2")
    assert os.getxattr(view, "user.snapfs.format") == b"qcow2"
    assert os.getxattr(view, "user.snapfs.backing") == os.fsencode(sample / "vm1/base.qcow2")
    base = mnt / "vm2/top.qcow2/chain/00-disk.raw"
    assert os.getxattr(base, "user.snapfs.view") == b"chain"
    assert os.getxattr(base, "user.snapfs.format") == b"raw"
    assert "user.snapfs.backing" not in os.listxattr(base)
    dirty = mnt / "vm1/snap2.qcow2/dirty/since-snap2.raw"
    assert os.getxattr(dirty, "user.snapfs.view") == b"dirty"
    assert os.getxattr(dirty, "user.snapfs.bitmap") == b"since-snap2"
    assert os.getxattr(dirty, "user.snapfs.image") == os.fsencode(sample / "vm1/snap2.qcow2")


def test_shared_base_appears_in_both_disks(sample, mnt):
    a = mnt / "vm1/snap2.qcow2/layers/00-base.raw"
    b = mnt / "vm1/branch.qcow2/layers/00-base.raw"
    assert os.getxattr(a, "user.snapfs.image") == os.getxattr(b, "user.snapfs.image")
    run("cmp", a, b)


def test_mount_is_read_only(mnt):
    view = mnt / "vm1/snap2.qcow2/chain/02-snap2.raw"
    for flags in (os.O_WRONLY, os.O_RDWR):
        with pytest.raises(OSError) as e:
            os.open(view, flags)
        assert e.value.errno == 30  # EROFS
    with pytest.raises(OSError):
        os.setxattr(view, "user.snapfs.view", b"x")
