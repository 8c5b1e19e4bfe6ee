"""Tier 3: block status read from the image files equals what qemu-nbd reports.

``formats/status.py`` answers for plain qcow2 and raw images so that a
listing does not start a qemu-nbd per export. Here every export of a set of
images is asked both ways, through the block status service
(``data.status.BlockStatus``, once from the files and once from qemu-nbd), and the runs of every
metadata context must be equal, run for run. The images cover each kind of
L2 entry (data, zero with and without an offset, compressed, unallocated,
discarded), cluster sizes from 512 B to 2 MiB, sizes that end inside a
cluster, several L2 tables with gaps in L1, three-layer chains with zeros
over data, raw bases with holes, and a raw file beneath qcow2.

Images qemu must be asked about (``None`` from the file reader) are listed
too, each with the reason it is left to qemu, and are checked to fall back:
the answer is still qemu's.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import trio
from conftest import create, qemu_img, qemu_io, running_writer

from snapfs.data.status import BlockStatus
from snapfs.formats import status as local
from snapfs.hosts.local import LOCAL
from snapfs.nbd.pool import ServerPool
from snapfs.nbd.spec import ExportSpec

MiB = 1 << 20


def pin(path):
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


def spec(*layers):
    """An export of ``(path, format)`` layers, top first, pinned as scanned."""
    return ExportSpec(tuple((str(p), f) for p, f in layers), pins=tuple(pin(p) for p, _ in layers), host=LOCAL)


async def both(tmp_path, specs):
    """For each spec: (runs read from the files or None, runs from qemu-nbd)."""
    out = []
    for s in specs:
        size = qemu_size(s.layers[0])
        pool = ServerPool(str(tmp_path))
        fast = BlockStatus(pool, from_files=True)
        slow = BlockStatus(pool, from_files=False)
        async with trio.open_nursery() as n:
            await n.start(pool.run)
            theirs = await slow.runs(s, size)
            n.cancel_scope.cancel()
        mine, _ = await trio.to_thread.run_sync(fast.from_images, s, size, {})
        out.append((mine, theirs))
    return out


def qemu_size(layer):
    path, fmt = layer
    return json.loads(qemu_img("info", "-f", fmt, "--output=json", path).stdout)["virtual-size"]


@pytest.fixture
def plain(tmp_path):
    """Images the file reader answers for, and the exports to ask about."""
    d = tmp_path / "img"
    d.mkdir()
    exports = []

    # One layer: every kind of L2 entry.
    a = create(d / "kinds.qcow2", 8 * MiB)
    qemu_io(a, "write -P 1 0 256k", "write -z 256k 128k", "write -P 2 1M 64k",
            "write -P 3 2M 1M", "discard 2M 512k", "write -z -u 4M 64k", "write -P 4 7M 1M")
    exports.append(spec((a, "qcow2")))

    # Compressed clusters.
    src = create(d / "src.qcow2", 4 * MiB)
    qemu_io(src, "write -P 5 0 1M", "write -P 0 2M 64k", "write -P 6 3M 64k")
    comp = str(d / "comp.qcow2")
    qemu_img("convert", "-c", "-O", "qcow2", src, comp)
    qemu_io(comp, "write -P 7 512k 64k", "write -z 3M 64k")
    exports.append(spec((comp, "qcow2")))

    # Small and large clusters, sizes that end inside a cluster, several L2
    # tables (4 KiB clusters: one L2 table covers 2 MiB) with gaps in L1.
    for name, cs, size, cmds in [
        ("c512.qcow2", 512, 3 * MiB + 1536, ["write -P 1 0 4k", "write -z 1M 1k", "write -P 2 3M 1536"]),
        ("c4k.qcow2", 4096, 20 * MiB + 4096, ["write -P 1 0 12k", "write -P 2 9M 4k", "write -z 9M 4k",
                                              "write -P 3 20M 4k", "write -P 4 6M 1M",
                                              # whole L2 tables of data, of zeros
                                              "write -P 5 2M 2M", "write -z 12M 2M"]),
        ("c2m.qcow2", 2 * MiB, 9 * MiB, ["write -P 1 512 512", "write -z 4M 2M", "write -P 2 8M 1M"]),
    ]:
        p = str(d / name)
        qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}", p, str(size))
        qemu_io(p, *cmds)
        exports.append(spec((p, "qcow2")))

    # A chain: raw base with holes, qcow2 layers with zeros over data and
    # data over zeros, a 4 KiB-cluster layer over a 64 KiB one.
    raw = d / "base.raw"
    with open(raw, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(MiB)
        f.write(b"r" * (2 * MiB))
        f.seek(6 * MiB)
        f.write(b"s" * 4096)
    mid = create(d / "mid.qcow2", backing="base.raw", backing_fmt="raw")
    qemu_io(mid, "write -z 1M 64k", "write -P 8 4M 1M", "write -z 7M 1M", "discard 4M 64k")
    top = str(d / "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "mid.qcow2", "-F", "qcow2",
             top)
    qemu_io(top, "write -P 9 1M 4k", "write -z 4M 8k", "write -P 10 7M 4k", "write -P 11 6M 4k")
    exports += [spec((raw, "raw")), spec((mid, "qcow2")), spec((top, "qcow2")),
                spec((mid, "qcow2"), (raw, "raw")), spec((top, "qcow2"), (mid, "qcow2")),
                spec((top, "qcow2"), (mid, "qcow2"), (raw, "raw"))]

    # A qcow2 chain with no raw file in it; an empty image; an all-data raw file.
    q0 = create(d / "q0.qcow2", 4 * MiB)
    qemu_io(q0, "write -P 1 0 1M", "write -z 2M 1M")
    q1 = create(d / "q1.qcow2", backing="q0.qcow2")
    qemu_io(q1, "write -z 0 64k", "write -P 2 2M 64k", "write -P 3 3M 64k")
    empty = create(d / "empty.qcow2", 0)
    full = d / "full.raw"
    full.write_bytes(os.urandom(MiB))
    exports += [spec((q1, "qcow2"), (q0, "qcow2")), spec((q0, "qcow2")), spec((empty, "qcow2")),
                spec((full, "raw"))]
    return exports


async def test_plain_images_answer_as_qemu_does(tmp_path, plain):
    for s, (mine, theirs) in zip(plain, await both(tmp_path, plain), strict=True):
        assert mine is not None, f"{s.describe()} was left to qemu"
        assert mine == theirs, s.describe()


@pytest.fixture
def left_to_qemu(tmp_path):
    """Images qemu is asked about, each with what makes it so."""
    d = tmp_path / "img"
    d.mkdir()
    out = {}

    def img(name, *opts, size=4 * MiB, cmds=("write -P 1 0 64k", "write -z 1M 64k")):
        p = str(d / name)
        args = ["create", "-q", "-f", "qcow2"]
        for o in opts:
            args += ["-o", o]
        qemu_img(*args, p, str(size))
        qemu_io(p, *cmds)
        return p

    out["version 2"] = spec((img("v2.qcow2", "compat=0.10"), "qcow2"))
    out["extended L2"] = spec((img("ext.qcow2", "extended_l2=on"), "qcow2"))
    p = img("snap.qcow2")
    qemu_img("snapshot", "-c", "s1", p)
    out["internal snapshot"] = spec((p, "qcow2"))
    out["metadata preallocation"] = spec((img("prealloc.qcow2", "preallocation=metadata"), "qcow2"))
    small = img("small.qcow2", size=MiB, cmds=("write -P 1 0 64k", "write -z 512k 64k"))
    big = str(d / "big.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "small.qcow2", "-F", "qcow2", big, str(4 * MiB))
    out["a shorter backing file"] = spec((big, "qcow2"), (small, "qcow2"))
    odd = d / "odd.raw"
    odd.write_bytes(b"x" * 1000)
    out["raw size no multiple of 512"] = spec((odd, "raw"))
    return out


async def test_images_left_to_qemu(tmp_path, left_to_qemu):
    results = await both(tmp_path, list(left_to_qemu.values()))
    for why, (mine, theirs) in zip(left_to_qemu, results, strict=True):
        assert mine is None, f"{why}: answered from the file"
        assert theirs  # qemu answers


async def test_an_image_locked_for_writing_is_left_to_qemu(tmp_path):
    p = create(tmp_path / "busy.qcow2", 4 * MiB)
    qemu_io(p, "write -P 1 0 64k")
    s = spec((p, "qcow2"))
    status = BlockStatus(ServerPool(str(tmp_path)), from_files=True)
    assert (await trio.to_thread.run_sync(status.from_images, s, 4 * MiB, {}))[0] is not None
    with running_writer(p, tmp_path / "vm.sock"):
        with pytest.raises(local.NotPlain, match="locked for writing"):
            local.layer_status(p, "qcow2", pin(p))


def test_a_replaced_file_is_left_to_qemu(tmp_path):
    p = create(tmp_path / "a.qcow2", MiB)
    old = pin(p)
    os.replace(create(tmp_path / "b.qcow2", MiB), p)  # another inode: both existed at once
    with pytest.raises(local.NotPlain):
        local.layer_status(p, "qcow2", old)
    os.symlink(p, tmp_path / "link.qcow2")
    with pytest.raises(local.NotPlain):
        local.layer_status(str(tmp_path / "link.qcow2"), "qcow2", None)


def punch(path, offset, length):
    subprocess.run(["fallocate", "-p", "-o", str(offset), "-l", str(length), str(path)], check=True)


async def test_guessed_preallocation_at_the_threshold(tmp_path):
    """qemu guesses "preallocated" when the clusters in use reach the file's
    allocation plus a ninth (at least 2): it then reports a data cluster over a
    hole of the file as zeros. Here the count is exactly at the threshold."""
    p = create(tmp_path / "t.qcow2", 16 * MiB)
    qemu_io(p, "write -P 1 0 1M")
    punch(p, 5 * 64 * 1024, 64 * 1024)  # the host cluster of guest cluster 0
    (mine, theirs), = await both(tmp_path, [spec((p, "qcow2"))])
    assert theirs["base:allocation"][0] == (0, 64 * 1024, 2)  # data, reads as zero
    assert mine is None or mine == theirs


def test_headers_qemu_refuses_are_left_to_qemu(tmp_path):
    import struct
    p = create(tmp_path / "a.qcow2", MiB)
    with open(p, "r+b") as f:
        f.seek(88)
        f.write(struct.pack(">Q", 2))  # autoclear: data-file-raw, without a data file
    with pytest.raises(local.NotPlain):
        local.layer_status(p, "qcow2", pin(p))
    p = create(tmp_path / "b.qcow2", MiB)
    with open(p, "r+b") as f:
        f.seek(104)
        f.write(b"\x07")  # an unknown compression type
    with pytest.raises(local.NotPlain):
        local.layer_status(p, "qcow2", pin(p))


def random_chain(d, rng, n):
    """One to three layers of random size, cluster size and content, with
    holes punched into some image files: what a seeded comparison covers."""
    cs = rng.choice([512, 4096, 65536, 2 * MiB])
    size = rng.choice([cs * rng.randint(1, 40), MiB, 3 * MiB]) + rng.choice([0, 0, 512, 1024])
    layers = []
    for i in range(rng.choice([1, 1, 2, 3])):
        p = d / f"r{n}-{i}"
        if i == 0 and rng.random() < 0.3:
            p = p.with_suffix(".raw")
            with open(p, "wb") as f:
                f.truncate(size)
                for _ in range(rng.randint(0, 4)):
                    f.seek(rng.randrange(size))
                    f.write(b"q" * rng.randint(1, 20000))
                f.truncate(size)
            layers.append((p, "raw"))
            continue
        p = p.with_suffix(".qcow2")
        args = ["create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}"]
        if not layers and rng.random() < 0.2:
            args += ["-o", "preallocation=metadata"]
        if layers:
            args += ["-b", str(layers[-1][0]), "-F", layers[-1][1]]
        qemu_img(*args, p, str(size))
        cmds = []
        for _ in range(rng.randint(1, 8)):
            unit = rng.choice([u for u in (512, 4096, cs) if u <= size])
            off = rng.randrange(size // unit) * unit
            length = min(unit * rng.randint(1, 6), size - off)
            kind = rng.choice(["write -P 7", "write -P 0", "write -z", "write -z -u", "discard", "write -c -P 5"])
            if kind.startswith("write -c"):
                off, length = off // cs * cs, cs
                if off + length > size:
                    continue
            cmds.append(f"{kind} {off} {length}")
        args = ["qemu-io", "-f", "qcow2"]
        for c in cmds:
            args += ["-c", c]
        subprocess.run([*args, str(p)], capture_output=True)
        if rng.random() < 0.4:
            for _ in range(rng.randint(1, 3)):
                c = rng.randrange(max(1, os.path.getsize(p) // cs))
                if c >= 4:
                    punch(p, c * cs, cs)
        layers.append((p, "qcow2"))
    chain = list(reversed(layers))
    return [spec(*chain[k:]) for k in range(len(chain))]


async def test_random_images_answer_as_qemu_does(tmp_path):
    import random
    rng = random.Random(11)
    exports = []
    for n in range(24):
        exports += random_chain(tmp_path, rng, n)
    answered = 0
    for s, (mine, theirs) in zip(exports, await both(tmp_path, exports), strict=True):
        if mine is not None:
            answered += 1
            assert mine == theirs, s.describe()
    assert answered >= len(exports) // 2, f"only {answered} of {len(exports)} answered from the files"


def test_a_listing_starts_no_qemu_nbd(tmp_path, mount):
    """The point of reading maps from the files: ``ls -lR`` of plain images
    (sizes, st_blocks, the .qcow2 sizes, the maps) starts no qemu-nbd; the
    first read does."""
    d = tmp_path / "img"
    d.mkdir()
    with open(d / "base.raw", "wb") as f:
        f.truncate(4 * MiB)
        f.seek(MiB)
        f.write(b"r" * MiB)
    mid = create(d / "mid.qcow2", backing="base.raw", backing_fmt="raw")
    qemu_io(mid, "write -P 1 0 64k", "write -z 1M 64k")
    top = create(d / "top.qcow2", backing="mid.qcow2")
    qemu_io(top, "write -P 2 2M 64k")
    m = mount(d, "--debug")
    files = 0
    for root, _dirs, names in os.walk(m.path):
        for name in names:
            os.stat(os.path.join(root, name))
            files += 1
            if name.endswith(".map.json"):
                with open(os.path.join(root, name)) as f:
                    json.load(f)
    assert files >= 3 * 6  # chain/ and layers/ of top.qcow2: 3 views, 3 files each
    assert "starting ['qemu-nbd'" not in m.log
    with open(m / "top.qcow2/chain/02-top.raw", "rb") as f:
        assert f.read(1) == b"\x01"
    assert "starting ['qemu-nbd'" in m.log
