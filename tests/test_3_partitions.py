"""Tier 3: partitions as files, at every snapshot point.

Disks are made as an examiner finds them: a GPT disk (ext4, FAT, ext4) and an
MBR disk (an ext4 primary, an extended partition holding an ext4 and a FAT
logical one), each with two snapshots over it that change files. Every
``partitions/NN-NAME/pK.raw`` must read exactly the original partition's
bytes at that point, map and seek as the chain view does over that range,
carry the partition's xattrs, and list its files with Sleuth Kit, without
an offset. Damaged tables show what can be trusted and say the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess

import pytest
from conftest import MiB, data_ranges, poke, qemu_img, run, seek_walk

SIZE = 64 * MiB
SECTOR = 512

# (label, sfdisk script, filesystems: partition number -> (start sector, sectors, kind))
GPT = ("gpt", "label: gpt\n,16M,L\n,8M,EBD0A0A2-B9E5-4433-87C0-68B9B7D0C699\n,16M,L\n",
       {1: (2048, 32768, "ext4"), 2: (34816, 16384, "fat"), 3: (51200, 32768, "ext4")})
MBR = ("dos", "label: dos\n,16M,83\n,,5\n,8M,83\n,8M,c\n",
       {1: (2048, 32768, "ext4"), 5: (36864, 16384, "ext4"), 6: (55296, 16384, "fat")})
TYPES = {"gpt": {1: "0fc63daf-8483-4772-8e79-3d69d8477de4", 2: "ebd0a0a2-b9e5-4433-87c0-68b9b7d0c699",
                 3: "0fc63daf-8483-4772-8e79-3d69d8477de4"},
         "dos": {1: "0x83", 5: "0x83", 6: "0x0c"}}


def fill(raw, parts, point, tmp):
    """Write each partition's file system as it is at ``point`` (0, 1, 2)."""
    for number, (start, sectors, kind) in parts.items():
        files = {f"note{number}.txt": f"partition {number} at point {point}\n".encode(),
                 "same.bin": bytes(range(256)) * 1024}
        if point >= 1:
            files[f"added{point}.bin"] = os.urandom(200_000)
        if kind == "ext4":
            d = tmp / f"fs{number}-{point}"
            d.mkdir()
            for name, data in files.items():
                (d / name).write_bytes(data)
            run("mke2fs", "-q", "-F", "-t", "ext4", "-E", f"offset={start * SECTOR}", "-U",
                f"00000000-0000-0000-0000-00000000000{number}", "-d", d, raw, f"{sectors // 2}k")
        else:
            run("mkfs.vfat", "-i", f"0000000{number}", "--offset", str(start), raw, str(sectors // 2))
            for name, data in files.items():
                src = tmp / f"{number}-{point}-{name}"
                src.write_bytes(data)
                run("mcopy", "-i", f"{raw}@@{start * SECTOR}", src, f"::/{name}")


def make_disk(tmp, kind):
    """An image directory ``disk.qcow2`` <- ``s1.qcow2`` <- ``s2.qcow2``, and the raw disk at each point."""
    label, script, parts = kind
    work = tmp / f"work-{label}"
    work.mkdir()
    images = tmp / f"images-{label}"
    images.mkdir()
    raws = []
    for point, name in enumerate(("disk", "s1", "s2")):
        raw = work / f"{point}.raw"
        if point == 0:
            with open(raw, "wb") as f:
                f.truncate(SIZE)
            subprocess.run(["sfdisk", "-q", raw], input=script.encode(), check=True, capture_output=True)
        else:
            shutil.copy(raws[-1], raw)
        fill(raw, parts, point, work)
        raws.append(raw)
        img = images / f"{name}.qcow2"
        qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", raw, img)
        if point:
            # Only what changed since the point before stays in the overlay.
            qemu_img("rebase", "-q", "-f", "qcow2", "-b", f"{('disk', 's1')[point - 1]}.qcow2", "-F", "qcow2",
                     img)
    return images, raws


def sha(data):
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("kind", [GPT, MBR], ids=["gpt", "mbr"])
def test_every_partition_at_every_point_reads_as_the_original(kind, tmp_path, mount):
    label, _, parts = kind
    images, raws = make_disk(tmp_path, kind)
    m = mount(images)
    disk = m / "s2.qcow2"
    assert sorted(os.listdir(f"{disk}/partitions")) == ["00-disk", "01-s1", "02-s2"]
    for point, name in enumerate(("00-disk", "01-s1", "02-s2")):
        folder = f"{disk}/partitions/{name}"
        want = sorted(f"p{n}.{ext}" for n in parts for ext in ("raw", "map.json"))
        assert sorted(os.listdir(folder)) == want, folder
        with open(raws[point], "rb") as f:
            original = f.read()
        for number, (start, sectors, _) in parts.items():
            view = f"{folder}/p{number}.raw"
            lo, n = start * SECTOR, sectors * SECTOR
            assert os.stat(view).st_size == n
            with open(view, "rb") as f:
                assert sha(f.read()) == sha(original[lo:lo + n]), view
            x = {k.removeprefix("user.snapfs."): os.getxattr(view, k).decode() for k in os.listxattr(view)}
            chain = f"{disk}/chain/{name}.raw"
            assert x == {"view": "partition", "partition.number": str(number), "partition.start": str(lo),
                         "partition.type": TYPES[label][number], "image": os.getxattr(chain, "user.snapfs.image")
                         .decode(), "format": "qcow2",
                         **({"backing": os.getxattr(chain, "user.snapfs.backing").decode()} if point else {})}
            # The map is the chain view's over that range; SEEK_DATA/SEEK_HOLE follow it.
            with open(view[:-4] + ".map.json") as f:
                pmap = json.load(f)
            with open(chain[:-4] + ".map.json") as f:
                cmap = json.load(f)
            clipped = [(max(e["start"], lo) - lo, min(e["start"] + e["length"], lo + n) - max(e["start"], lo))
                       for e in cmap if not e["zero"] and e["start"] < lo + n and e["start"] + e["length"] > lo]
            assert data_ranges(pmap, lambda e: not e["zero"]) == data_ranges(
                [{"start": s, "length": ln} for s, ln in clipped], lambda e: True)
            assert seek_walk(view) == data_ranges(pmap, lambda e: not e["zero"])
            # Sleuth Kit reads it without an offset.
            listing = run("fls", "-r", view).stdout
            assert f"note{number}.txt" in listing and "same.bin" in listing, listing
            assert (f"added{point}.bin" in listing) == (point >= 1)
            inode = next(line.split()[1].rstrip(":") for line in listing.splitlines()
                         if line.endswith(f"note{number}.txt"))
            assert run("icat", view, inode).stdout == f"partition {number} at point {point}\n"
    assert "every view is available" in m.status()


def test_a_disk_without_a_table_has_empty_folders_and_listing_reads_no_table(tmp_path, mount):
    images = tmp_path / "images"
    images.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", images / "blank.qcow2", "16M")
    m = mount(images)
    run("ls", "-lR", m.path)
    assert os.listdir(m / "blank.qcow2/partitions/00-blank") == []
    assert "every view is available" in m.status()


def test_damaged_tables_show_what_can_be_trusted_and_say_the_rest(tmp_path, mount):
    images = tmp_path / "images"
    images.mkdir()
    # MBR: partition 1 fine, 2 overlapping it, 3 past the end of the disk.
    raw = tmp_path / "mbr.raw"
    with open(raw, "wb") as f:
        f.truncate(16 * MiB)
    subprocess.run(["sfdisk", "-q", raw], input=b"label: dos\n,4M,83\n", check=True, capture_output=True)
    entry = 446 + 16
    poke(raw, entry, "<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", 4096, 8192)  # 2 MiB in: inside p1
    poke(raw, entry + 16, "<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", 16384, 65536)  # ends at 40 MiB
    qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", raw, images / "mbr.qcow2")
    # GPT whose primary header is damaged: sfdisk reads the backup, and says so.
    raw = tmp_path / "gpt.raw"
    with open(raw, "wb") as f:
        f.truncate(16 * MiB)
    subprocess.run(["sfdisk", "-q", raw], input=b"label: gpt\n,4M,L\n", check=True, capture_output=True)
    poke(raw, 512 + 16, "<I", 0xDEADBEEF)  # the header's CRC32
    qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", raw, images / "gpt.qcow2")
    m = mount(images)
    assert sorted(os.listdir(m / "mbr.qcow2/partitions/00-mbr")) == ["p1.map.json", "p1.raw"]
    assert sorted(os.listdir(m / "gpt.qcow2/partitions/00-gpt")) == ["p1.map.json", "p1.raw"]
    status = m.status()
    assert "mbr.qcow2/partitions/00-mbr/p2.raw: it overlaps partition 1: left out" in status
    assert "mbr.qcow2/partitions/00-mbr/p3.raw: it runs past the end of the disk" in status
    assert "gpt.qcow2/partitions/00-gpt: sfdisk: " in status and "primary GPT" in status, status
    # The disks' other views are untouched.
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", m / "mbr.qcow2/chain/00-mbr.raw", images / "mbr.qcow2")
