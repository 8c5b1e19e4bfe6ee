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

import errno
import json
import os
import re

import pytest
import trio
from conftest import data_ranges, poke, qemu_img, run, seek_walk
from partition_disks import GPT, MBR, SECTOR, TYPES, make_disk, partitioned, sha

from snapfs.errors import Unavailable
from snapfs.formats import json_node
from snapfs.fs.partitions import may_hold_label
from snapfs.hosts.local import LOCAL
from snapfs.nbd.heads import HeadError, Heads


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
            data = sum(e["length"] for e in pmap if not e["zero"])
            assert os.stat(view).st_blocks == -(-data // 512), view
            # Sleuth Kit reads it without an offset.
            listing = run("fls", "-r", view).stdout
            assert f"note{number}.txt" in listing and "same.bin" in listing, listing
            assert (f"added{point}.bin" in listing) == (point >= 1)
            inode = next(line.split()[1].rstrip(":") for line in listing.splitlines()
                         if line.endswith(f"note{number}.txt"))
            assert run("icat", view, inode).stdout == f"partition {number} at point {point}\n"
    assert "every view is available" in m.status()


def test_damaged_tables_show_what_can_be_trusted_and_say_the_rest(tmp_path, mount):
    images = tmp_path / "images"
    images.mkdir()
    # MBR: partition 1 fine, 2 overlapping it, 3 past the end of the disk.
    raw = partitioned(tmp_path / "mbr.raw", b"label: dos\n,4M,83\n")
    entry = 446 + 16
    poke(raw, entry, "<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", 4096, 8192)  # 2 MiB in: inside p1
    poke(raw, entry + 16, "<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", 16384, 65536)  # ends at 40 MiB
    qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", raw, images / "mbr.qcow2")
    # GPT whose primary header is damaged: sfdisk reads the backup, and says so.
    raw = partitioned(tmp_path / "gpt.raw")
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


def test_listing_reads_each_first_kilobyte_once_through_qemu_io_and_starts_no_qemu_nbd(tmp_path, mount):
    """A repository of disks without tables: a first ``ls -lR`` reads each
    disk's first KiB through qemu-io, once per layer that holds it, runs no
    sfdisk and starts no qemu-nbd; a disk with a table in the same mount
    lists its partitions (sfdisk through the mount: one qemu-nbd)."""
    images = tmp_path / "images"
    images.mkdir()
    # data: base writes sector 0, l1 overwrites it, l2 and l3 write elsewhere.
    writes = {"base": "0x31 0 64k", "l1": "0x62 0 32k", "l2": "0x33 1M 64k", "l3": "0x34 2M 64k"}
    below = None
    for name, w in writes.items():
        img = images / f"{name}.qcow2"
        if below is None:
            qemu_img("create", "-q", "-f", "qcow2", img, "16M")
        else:
            qemu_img("create", "-q", "-f", "qcow2", "-b", below, "-F", "qcow2", img)
        run("qemu-io", "-f", "qcow2", "-c", f"write -P {w}", img)
        below = f"{name}.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", images / "blank.qcow2", "16M")  # reads as zero: nothing read
    partitioned(tmp_path / "gpt.raw")
    qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", tmp_path / "gpt.raw", images / "gpt.qcow2")
    m = mount(images, "--debug")
    run("ls", "-lR", m.path)
    for point in ("00-base", "01-l1", "02-l2", "03-l3"):
        assert os.listdir(m / f"l3.qcow2/partitions/{point}") == []
    assert os.listdir(m / "blank.qcow2/partitions/00-blank") == []
    assert sorted(os.listdir(m / "gpt.qcow2/partitions/00-gpt")) == ["p1.map.json", "p1.raw"]
    log = m.log
    heads = re.findall(r"first kilobyte of (.*) read by qemu-io: (.*)$", log, re.M)
    assert sorted(heads) == sorted([(str(images / "base.qcow2"), "no label's magic"),
                                    (str(images / "l1.qcow2"), "no label's magic"),
                                    (str(images / "gpt.qcow2"), "a label's magic")]), heads
    assert len(re.findall(r"qemu-nbd pid \d+ serves", log)) == 1, log
    assert "every view is available" in m.status()


@pytest.mark.parametrize("label", ["dos", "gpt", "sun", "sgi"])
def test_every_label_sfdisk_writes_has_its_magic_in_the_first_kilobyte(label, tmp_path):
    raw = tmp_path / "disk.raw"
    partitioned(raw, f"label: {label}\n,4M\n".encode())
    table = json.loads(run("sfdisk", "--json", raw).stdout)["partitiontable"]
    assert table["label"] == label and len(table["partitions"]) >= 1
    with open(raw, "rb") as f:
        assert may_hold_label(f.read(1024))


def test_a_first_kilobyte_without_magic_holds_no_table_sfdisk_reads(tmp_path):
    raw = tmp_path / "disk.raw"
    partitioned(raw, b"label: dos\n,4M,83\n,4M,83\n")
    with open(raw, "rb") as f:
        mbr = f.read(1024)
    near = [mbr[:510] + b"\x55\xab" + mbr[512:],  # the signature off by one bit
            os.urandom(508) + bytes(4) + os.urandom(512)]
    for head in near:
        assert not may_hold_label(head)
        with open(raw, "r+b") as f:
            f.write(head)
        r = run("sfdisk", "--json", raw, check=False)
        assert r.returncode != 0 and "does not contain a recognized partition table" in r.stderr, r


def test_qemu_io_hands_back_the_guests_bytes_whatever_they_say(tmp_path):
    """The hexdump's text column shows the disk's bytes: a guest that writes
    qemu-io's prompt and its messages there changes nothing."""
    data = (b"qemu-io> " * 7 + b"\nread 1024/1024 bytes at offset 0\nqemu-io> \n").ljust(1024, b"q")
    forged = b"qemu-io> 00000000:  55 aa\n"
    data = data[:512] + forged + data[512 + len(forged):]
    assert len(data) == 1024
    img = tmp_path / "guest.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "1M")
    (tmp_path / "head.bin").write_bytes(data)
    run("qemu-io", "-f", "qcow2", "-c", f"write -s {tmp_path / 'head.bin'} 0 1024", img)

    other = tmp_path / "other.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", other, "1M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x77 0 1k", other)
    # Names qemu prints in its errors, made to look like its prompts and answers.
    forged_name = str(tmp_path / "e\nqemu-io> a\nqemu-io> read 1024/1024 bytes at offset 0\nqemu-io> b.qcow2")

    def node(path):
        return json_node([(str(path), "qcow2")], lambda p: "file")

    async def reads():
        heads = Heads(LOCAL.qemu_io(), workers=1)  # one process: every answer below comes through it
        try:
            got = [await heads.read(node(img), 1024)]
            with pytest.raises(HeadError, match="No such file or directory"):
                await heads.read(node(tmp_path / "gone.qcow2"), 1024)
            with pytest.raises(HeadError, match="No such file or directory"):
                await heads.read(node(forged_name), 1024)
            with pytest.raises(HeadError, match="too long for qemu-io's command line"):
                await heads.read(node(tmp_path / ("x" * 1000)), 1024)
            got.append(await heads.read(node(other), 1024))
            got.append(await heads.read(node(img), 1024))
            assert len(heads.procs) == 1
            return got
        finally:
            heads.close()

    assert trio.run(reads) == [data, b"\x77" * 1024, data]


def test_xattrs_outside_user_are_not_supported(tmp_path, mount):
    """No ACLs, no security labels: ``ls -l`` learns it once and asks no more."""
    images = tmp_path / "images"
    images.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", images / "d.qcow2", "1M")
    m = mount(images)
    view = m / "d.qcow2/chain/00-d.raw"
    for name in ("security.selinux", "system.posix_acl_access", "trusted.x"):
        with pytest.raises(OSError) as e:
            os.getxattr(view, name)
        assert e.value.errno == errno.EOPNOTSUPP, name
    assert os.getxattr(view, "user.snapfs.view") == b"chain"
    with pytest.raises(OSError) as e:
        os.getxattr(view, "user.snapfs.nothing")
    assert e.value.errno == errno.ENODATA


def test_a_writable_point_has_no_partition_folder(tmp_path, mount):
    """--rw: the top's table can change with every write; the points beneath keep theirs."""
    images = tmp_path / "images"
    images.mkdir()
    partitioned(tmp_path / "base.raw")
    qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", tmp_path / "base.raw", images / "base.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", images / "top.qcow2")
    m = mount(images, "--rw")
    assert os.listdir(m / "top.qcow2/partitions") == ["00-base"]
    assert sorted(os.listdir(m / "top.qcow2/partitions/00-base")) == ["p1.map.json", "p1.raw"]


def test_qemu_io_takes_a_session_of_its_host_and_gives_it_back_when_idle(tmp_path):
    """On a host whose sessions are few (ssh), each qemu-io holds one, until idle;
    with none free it reads nothing (sfdisk decides)."""
    img = tmp_path / "d.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "1M")

    class Host:  # the session count of an SshHost
        servers, server_sessions = 0, 7

        async def claim_session(self, what, timeout):
            assert timeout == 0  # a qemu-io never waits for one: sfdisk decides at once
            if self.servers >= self.server_sessions:
                raise Unavailable(f"{self.server_sessions} sessions in use")
            self.servers += 1

        def release_session(self):
            self.servers -= 1

    host = Host()

    async def main():
        heads = Heads(LOCAL.qemu_io(), host=host)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(heads.expire, 0.2)
            await heads.read(json_node([(str(img), "qcow2")], lambda p: "file"), 1024)
            assert host.servers == 1 and len(heads.procs) == 1
            await trio.sleep(0.6)
            assert host.servers == 0 and heads.procs == []
            await heads.read(json_node([(str(img), "qcow2")], lambda p: "file"), 1024)  # started again
            assert host.servers == 1
            heads.close()
            assert host.servers == 0
            host.servers = 7  # every session taken (by qemu-nbd servers)
            with pytest.raises(HeadError, match="7 sessions in use"):
                await heads.read(json_node([(str(img), "qcow2")], lambda p: "file"), 1024)
            assert heads.procs == []
            nursery.cancel_scope.cancel()

    trio.run(main)
