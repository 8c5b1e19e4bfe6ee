"""Partitioned disks as an examiner finds them, for the partition tests.

A GPT disk (ext4, FAT, ext4) and an MBR disk (an ext4 primary, an extended
partition holding an ext4 and a FAT logical one), each with two snapshots
over it that add and change files: an image directory ``disk.qcow2`` <-
``s1.qcow2`` <- ``s2.qcow2``, and the raw disk at each point (the ground truth).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess

from conftest import MiB, qemu_img, run

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


def partitioned(path, script: bytes = b"label: gpt\n,4M,L\n", size: int = 16 * MiB):
    """A raw disk of ``size`` bytes at ``path``, with the table sfdisk writes from ``script``."""
    with open(path, "wb") as f:
        f.truncate(size)
    subprocess.run(["sfdisk", "-q", path], input=script, check=True, capture_output=True)
    return path
