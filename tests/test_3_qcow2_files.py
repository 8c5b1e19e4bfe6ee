"""Tier 3: every view's ``NAME.qcow2`` on a real mount, judged by qemu alone.

Two corpora, each mounted once for the module:

* ``sample``: conftest's sample (64 KiB clusters and bitmaps everywhere), so
  every cluster of every view is of one kind and the composed file's map
  must equal the view's map exactly;
* ``fine``: a layer with 4 KiB clusters over a 64 KiB base written at 4 KiB
  granularity, a 64 KiB layer over it, and a dirty bitmap of 4 KiB
  granularity over partly written clusters, so that FILL clusters exist
  (a 64 KiB cluster a layer, or a bitmap, covers only in part).

Every ``.qcow2`` is copied once with plain ``cp`` (and every ``layers/``
folder with ``cp -r``); the qemu checks of the copies run in a thread pool
(``each``), so the module runs in seconds.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
from conftest import (
    MiB,
    Mount,
    build_sample,
    create,
    json_layer,
    merge_dicts,
    qemu_img,
    qemu_io,
    qemu_map,
    run,
    seek_walk,
)

CLUSTER = 64 * 1024
UNALLOCATED, ZERO, DATA = "unallocated", "zero", "data"
# What qemu-img map says of each kind of cluster of a qcow2 opened alone.
QEMU_KIND = {(False, True, False): UNALLOCATED, (True, True, False): ZERO, (True, False, True): DATA}


def build_fine(root):
    """The 4 KiB corpus: ``fine/top.qcow2`` over ``fine.qcow2`` (4 KiB clusters) over ``base.qcow2``."""
    d = root / "images"
    (d / "fine").mkdir(parents=True)
    base = create(d / "fine/base.qcow2", 4 * MiB)
    qemu_io(base, "write -P 0x11 0 1M", "write -z 2M 64k")
    fine = d / "fine/fine.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "base.qcow2", "-F", "qcow2",
             fine)
    qemu_io(str(fine),
            "write -P 0x21 4k 4k",          # part of a cluster over the base's data
            "write -P 0x22 1032k 4k",       # part of a cluster over nothing
            "write -P 0x23 1536k 64k",      # a whole cluster
            "write -z 2052k 4k",            # zeros in part of the base's zero cluster
            "write -z 3M 64k",              # a whole zero cluster
            "write -z 516k 4k",             # zeros in part of a cluster over the base's data
            "write -P 0x24 3200k 8k",       # data and zeros fill a whole cluster
            "write -z 3208k 56k",
            "discard 64k 4k")               # part of a cluster discarded over the base's data
    top = create(d / "fine/top.qcow2", backing="fine.qcow2")
    qemu_img("bitmap", "--add", "-g", "4096", top, "b4k")
    qemu_io(top,
            "write -P 0x31 8k 4k",          # dirty in part of a cluster (qemu copies the rest)
            "write -P 0x32 2M 64k",         # a whole dirty cluster
            "write -z 2560k 4k",            # dirty zeros in part of a cluster
            "write -P 0x33 1032k 4k",       # over the fine layer's partial cluster
            "write -z 3M 64k",              # a whole dirty zero cluster
            "discard 3328k 64k")
    return d


# Where a dirty view's copy is rebased to become the current disk: the chain
# view at the time its bitmap was added.
BACKUPS = {
    ("sample", "vm1/snap2.qcow2", "since-snap2"): "chain/01-snap1.raw",
    ("sample", "vm1/snap2.qcow2", "since-snap1"): "chain/00-base.raw",
    ("fine", "fine/top.qcow2", "b4k"): "chain/01-fine.raw",
}


@dataclass
class V:
    """One view of a mount, its map and its copies."""

    corpus: str
    mnt: Mount
    disk: str  # relative to the mount
    folder: str  # chain, layers, dirty
    stem: str  # NAME
    map: list = field(repr=False)
    size: int  # the view's size
    copy: str  # the .qcow2 copied with cp
    tree_copy: str | None = None  # layers: the .qcow2 in the cp -r copy of the folder
    image: str = ""  # user.snapfs.image
    fmt: str = ""  # user.snapfs.format
    has_backing: bool = False  # the image has a backing file

    def __str__(self):
        return f"{self.corpus}:{self.disk}/{self.folder}/{self.stem}"

    @property
    def raw(self):
        return self.mnt / f"{self.disk}/{self.folder}/{self.stem}.raw"

    @property
    def qcow2(self):
        return self.mnt / f"{self.disk}/{self.folder}/{self.stem}.qcow2"

    @property
    def backed(self):
        """The .qcow2 lies on something: a layer with a backing file, or a dirty view (rebased)."""
        return self.folder == "dirty" or (self.folder == "layers" and self.has_backing)

    def state(self, e):
        """UNALLOCATED, ZERO or DATA for an extent of the view's map."""
        if self.folder == "dirty":
            return UNALLOCATED if not e["dirty"] else ZERO if e["zero"] else DATA
        return UNALLOCATED if e["hole"] else ZERO if e["zero"] else DATA

    def clusters(self):
        """{cluster: set of the map's states in it}."""
        out: dict[int, set] = {}
        for e in self.map:
            for c in range(e["start"] // CLUSTER, (e["start"] + e["length"] - 1) // CLUSTER + 1):
                out.setdefault(c, set()).add(self.state(e))
        return out

    def expected_kinds(self):
        """{cluster: (kind, fill)} as the spec says for the view's map."""
        out = {}
        for c, states in self.clusters().items():
            if len(states) == 1:
                out[c] = (next(iter(states)), False)
            elif self.backed and UNALLOCATED in states:
                out[c] = (DATA, True)  # FILL: the rest comes from beneath the view
            else:
                out[c] = (DATA if DATA in states else ZERO, False)
        return out

    def fill_clusters(self):
        return sorted(c for c, (_, fill) in self.expected_kinds().items() if fill)


def current(v: V):
    """The disk's chain view with every layer: the disk as it is."""
    folder = v.mnt / f"{v.disk}/chain"
    return os.path.join(folder, sorted(n for n in os.listdir(folder) if n.endswith(".raw"))[-1])


def qemu_kinds(v: V):
    """{cluster: kind} from qemu-img map of the copy opened alone; a cluster of mixed kinds is an error."""
    out: dict[int, str] = {}
    for e in qemu_map(json_layer(v.copy)):
        kind = QEMU_KIND[(e["present"], e["zero"], e["data"])]
        start, end = e["start"], min(e["start"] + e["length"], v.size)
        for c in range(start // CLUSTER, (end - 1) // CLUSTER + 1) if start < end else ():
            assert out.setdefault(c, kind) == kind, f"{v}: cluster {c} is {out[c]} and {kind}"
    return out


def each(views, check):
    """Run ``check(v)`` for every view, in threads; fail with every failure at once."""
    def one(v):
        try:
            check(v)
        except AssertionError as e:
            return f"{v}: {e}"
        return None

    with ThreadPoolExecutor(8) as pool:
        failures = [f for f in pool.map(one, views) if f]
    assert not failures, "\n".join(failures)


def walk(corpus, mnt, copies):
    """Every view of the mount (chain/, layers/, dirty/ of every disk), its .qcow2 copied with cp."""
    out = []
    for dirpath, dirnames, filenames in os.walk(mnt.path):
        dirnames.sort()
        folder = os.path.basename(dirpath)
        if folder not in ("chain", "layers", "dirty"):
            continue
        disk = os.path.relpath(os.path.dirname(dirpath), mnt.path)
        for name in sorted(filenames):
            if not name.endswith(".raw"):
                continue
            stem = name[:-4]
            with open(os.path.join(dirpath, stem + ".map.json")) as f:
                m = json.load(f)
            raw = os.path.join(dirpath, name)
            dest = copies / corpus / disk / folder
            dest.mkdir(parents=True, exist_ok=True)
            run("cp", os.path.join(dirpath, stem + ".qcow2"), dest)
            v = V(corpus, mnt, disk, folder, stem, m, os.stat(raw).st_size, str(dest / (stem + ".qcow2")),
                  image=os.getxattr(raw, "user.snapfs.image").decode(),
                  fmt=os.getxattr(raw, "user.snapfs.format").decode(),
                  has_backing="user.snapfs.backing" in os.listxattr(raw))
            out.append(v)
        if folder == "layers":
            tree = copies / "trees" / corpus / disk
            tree.parent.mkdir(parents=True, exist_ok=True)
            run("cp", "-r", dirpath, tree)
            for v in out:
                if v.corpus == corpus and v.disk == disk and v.folder == "layers":
                    v.tree_copy = str(tree / (v.stem + ".qcow2"))
    return out


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """{corpus: images dir}."""
    return {"sample": build_sample(tmp_path_factory.mktemp("sample")),
            "fine": build_fine(tmp_path_factory.mktemp("fine"))}


@pytest.fixture(scope="module")
def mounts(corpora, tmp_path_factory):
    made = {}
    try:
        for name, images in corpora.items():
            made[name] = Mount(images, tmp_path_factory.mktemp("m") / name)
        yield made
    finally:
        for m in made.values():
            m.close()


@pytest.fixture(scope="module")
def views(mounts, tmp_path_factory):
    copies = tmp_path_factory.mktemp("copies")
    return [v for name, m in mounts.items() for v in walk(name, m, copies)]


def test_every_view_has_its_qcow2(mounts, views):
    for m in mounts.values():
        for dirpath, _, filenames in os.walk(m.path):
            if os.path.basename(dirpath) not in ("chain", "layers", "dirty"):
                continue
            stems = {f.rsplit(".", 1)[0] for f in filenames if f.endswith(".raw")}
            assert sorted(filenames) == sorted(s + ext for s in stems for ext in (".map.json", ".qcow2", ".raw"))
    got = {(v.corpus, v.disk, v.folder) for v in views}
    assert ("sample", "vm1/snap2.qcow2", "dirty") in got and ("fine", "fine/top.qcow2", "dirty") in got
    assert len(views) == 16 + 7
    assert "every view is available" in mounts["sample"].status()
    # The corpora are what they claim: FILL clusters in the fine layer and the 4 KiB bitmap only.
    fill = {str(v) for v in views if v.fill_clusters()}
    assert fill == {"fine:fine/top.qcow2/layers/01-fine", "fine:fine/top.qcow2/dirty/b4k"}


def test_qemu_img_check_finds_nothing(views):
    def check(v):
        r = run("qemu-img", "check", "--output=json", v.copy, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        c = json.loads(r.stdout)
        assert c["check-errors"] == 0, c
        for key in ("corruptions", "leaks", "corruptions-fixed", "leaks-fixed"):
            assert c.get(key, 0) == 0, c
        # Every cluster of the file is used: the image ends where the file does.
        assert c["image-end-offset"] == os.path.getsize(v.copy), c
    each(views, check)


def test_map_of_the_copy_is_the_view_map(views):
    def check(v):
        kinds = qemu_kinds(v)
        expected = {c: kind for c, (kind, _) in v.expected_kinds().items()}
        assert kinds == expected, {c: (kinds.get(c), expected.get(c)) for c in set(kinds) | set(expected)
                                   if kinds.get(c) != expected.get(c)}
        if v.corpus != "sample":
            return
        # 64 KiB everywhere: extent for extent, clipped at the view's size.
        keys = ("present", "zero", "data")
        to_qemu = {UNALLOCATED: (False, True, False), ZERO: (True, True, False), DATA: (True, False, True)}
        want = merge_dicts([{"start": e["start"], "length": e["length"],
                             **dict(zip(keys, to_qemu[v.state(e)], strict=True))} for e in v.map], keys)
        got = []
        for e in qemu_map(json_layer(v.copy)):
            length = min(e["length"], v.size - e["start"])
            if length > 0:
                got.append({**e, "length": length})
        assert merge_dicts(got, keys) == want
    each(views, check)


def test_map_of_the_copy_is_dense_with_cluster_kinds(views):
    """The fine corpus: what every cluster must be, stated directly."""
    def check(v):
        kinds = qemu_kinds(v)
        for c, states in v.clusters().items():
            if DATA in states:
                assert kinds[c] == DATA, (c, states)
            elif states == {UNALLOCATED}:
                assert kinds[c] == UNALLOCATED, (c, states)
            elif states == {ZERO}:
                assert kinds[c] == ZERO, (c, states)
            elif v.backed:
                assert kinds[c] == DATA, (c, states)  # FILL
            else:
                assert kinds[c] == ZERO, (c, states)
    each([v for v in views if v.corpus == "fine"], check)


def _read(path, start, length):
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(length)


def test_content_of_the_copy(views, tmp_path):
    """Chain and dirty copies read as their .raw, a layer's alone as its .raw; FILL clusters as beneath."""
    def check(v):
        fill = v.fill_clusters()
        if not fill:
            r = run("qemu-img", "compare", "-F", "raw", json_layer(v.copy), v.raw, check=False)
            assert r.returncode == 0, r.stdout + r.stderr
            return
        # The copy alone, as raw; every cluster compared on its own.
        out = tmp_path / (str(v).replace("/", "_").replace(":", "_") + ".raw")
        qemu_img("convert", "-O", "raw", json_layer(v.copy), out)
        # A layer's: the chain through that layer; a dirty view's: the disk.
        beneath = v.mnt / f"{v.disk}/chain/{v.stem}.raw" if v.folder == "layers" else current(v)
        with open(out, "rb") as f:
            got = f.read()
        want = _read(v.raw, 0, v.size)
        disk = _read(beneath, 0, v.size)
        bad = []
        for c in range(-(-v.size // CLUSTER)):
            a, b = c * CLUSTER, min((c + 1) * CLUSTER, v.size)
            if got[a:b] != (disk if c in fill else want)[a:b]:
                bad.append((c, "FILL" if c in fill else "view"))
        assert not bad, f"clusters that differ (FILL: from beneath the view): {bad}"
    each(views, check)


def test_chain_beneath_is_named_and_copied_layers_are_the_disk(views):
    def check(v):
        chain = json.loads(qemu_img("info", "--backing-chain", "--output=json", v.copy).stdout)
        # The view's size, in whole sectors as qemu serves the .raw.
        assert chain[0]["virtual-size"] == -(-v.size // 512) * 512 == v.size, chain[0]
        assert chain[0]["cluster-size"] == CLUSTER and chain[0]["format"] == "qcow2", chain[0]
        if v.folder != "layers" or not v.has_backing:
            assert len(chain) == 1 and "backing-filename" not in chain[0], chain[0]
            return
        below = [w for w in views if (w.corpus, w.disk, w.folder) == (v.corpus, v.disk, "layers")
                 and os.getxattr(w.raw, "user.snapfs.image").decode()
                 == os.getxattr(v.raw, "user.snapfs.backing").decode()]
        assert len(below) == 1
        assert chain[0]["backing-filename"] == below[0].stem + ".qcow2", chain[0]
        assert chain[0]["backing-filename-format"] == "qcow2", chain[0]
        # The copied folder: every layer down to the base, all in it.
        chain = json.loads(qemu_img("info", "--backing-chain", "--output=json", v.tree_copy).stdout)
        assert [os.path.dirname(i["filename"]) for i in chain] == [os.path.dirname(v.tree_copy)] * len(chain)
        assert len(chain) == int(v.stem[:2]) + 1
    each(views, check)

    def layer_folder(v):
        # The copied top opened as it is (its backing files resolved in the copy).
        r = run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", v.tree_copy, v.mnt / f"{v.disk}/chain/{v.stem}.raw",
                check=False)
        assert r.returncode == 0, "vs chain view: " + r.stdout + r.stderr
        r = run("qemu-img", "compare", "-f", "qcow2", "-F", v.fmt, v.tree_copy, v.image, check=False)
        assert r.returncode == 0, "vs the original image: " + r.stdout + r.stderr
        r = run("qemu-img", "check", v.tree_copy, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
    each([v for v in views if v.folder == "layers"], layer_folder)


def test_dirty_copy_rebased_onto_the_backup_is_the_disk(views):
    dirty = [v for v in views if v.folder == "dirty"]
    assert {(v.corpus, v.disk, v.stem) for v in dirty} == set(BACKUPS)

    def check(v):
        backup = v.mnt / f"{v.disk}/{BACKUPS[v.corpus, v.disk, v.stem]}"
        rebased = v.copy[:-6] + "-rebased.qcow2"
        run("cp", v.copy, rebased)
        qemu_img("rebase", "-u", "-b", backup, "-F", "raw", rebased)
        r = run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", rebased, current(v), check=False)
        assert r.returncode == 0, r.stdout + r.stderr
    each(dirty, check)


def test_stat_seek_xattrs_and_size(views):
    def check(v):
        st, raw = os.stat(v.qcow2), os.stat(v.raw)
        assert stat.S_ISREG(st.st_mode) and st.st_mode == raw.st_mode, (oct(st.st_mode), oct(raw.st_mode))
        assert (st.st_uid, st.st_gid) == (raw.st_uid, raw.st_gid)
        assert st.st_size == os.path.getsize(v.copy)
        assert st.st_size % CLUSTER == 0, st.st_size
        assert st.st_blocks * 512 == st.st_size, (st.st_blocks, st.st_size)
        assert seek_walk(v.qcow2) == [(0, st.st_size)]
        fd = os.open(v.qcow2, os.O_RDONLY)
        try:
            for off in (0, 1, 4096, CLUSTER + 7, st.st_size // 2, st.st_size - 1):
                assert os.lseek(fd, off, os.SEEK_DATA) == off
                assert os.lseek(fd, off, os.SEEK_HOLE) == st.st_size
            for whence in (os.SEEK_DATA, os.SEEK_HOLE):
                with pytest.raises(OSError) as e:
                    os.lseek(fd, st.st_size, whence)
                assert e.value.errno == errno.ENXIO
        finally:
            os.close(fd)
        assert sorted(os.listxattr(v.qcow2)) == sorted(os.listxattr(v.raw))
        for name in os.listxattr(v.raw):
            assert os.getxattr(v.qcow2, name) == os.getxattr(v.raw, name), name
        # Data clusters and a little metadata: header, refcount table and
        # block, L1 table, one L2 table per 512 MiB of guest (all are smaller).
        data = sum(1 for kind in qemu_kinds(v).values() if kind == DATA)
        overhead = st.st_size - data * CLUSTER
        assert 0 < overhead <= 5 * CLUSTER, (data, st.st_size)
    each(views, check)


def test_reads_are_repeatable(views):
    def check(v):
        size = os.path.getsize(v.copy)
        ranges = [(0, 3 * CLUSTER + 5), (CLUSTER - 100, 200), (size // 3 + 11, 300 * 1024),
                  (size - CLUSTER - 3, CLUSTER + 3), (size - 10, 100)]
        for start, length in ranges:
            first, second = _read(v.qcow2, start, length), _read(v.qcow2, start, length)
            assert first == second, (start, length)
            assert first == _read(v.copy, start, length), (start, length)
        with open(v.qcow2, "rb") as f:
            assert f.read(4) == b"QFI\xfb"
            assert struct.unpack(">I", f.read(4))[0] == 3
        # The whole file read again is the copy.
        r = run("cmp", v.qcow2, v.copy, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
    each(views, check)


def test_qcow2_files_are_read_only(views):
    for v in views[:3] + [v for v in views if v.folder == "dirty"]:
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC):
            with pytest.raises(OSError) as e:
                os.open(v.qcow2, flags)
            assert e.value.errno == errno.EROFS, str(v)
        with pytest.raises(OSError):
            os.setxattr(v.qcow2, "user.snapfs.view", b"x")


def test_first_stat_of_a_fresh_mount(corpora, views, mount):
    """stat of a .qcow2 before anything read its map: the size is already right."""
    for corpus, images in corpora.items():
        m = mount(images, name=f"fresh-{corpus}")
        mine = [v for v in views if v.corpus == corpus]
        first = {str(v): os.stat(m / f"{v.disk}/{v.folder}/{v.stem}.qcow2") for v in mine}
        for v in mine:
            st = first[str(v)]
            assert st.st_size == os.path.getsize(v.copy), str(v)
            assert st.st_blocks * 512 == st.st_size, str(v)
            later = os.stat(m / f"{v.disk}/{v.folder}/{v.stem}.qcow2")
            assert (later.st_size, later.st_blocks) == (st.st_size, st.st_blocks), str(v)
        # Nothing else than those stats: the maps were read by them.
        with open(m / f"{mine[0].disk}/{mine[0].folder}/{mine[0].stem}.qcow2", "rb") as f:
            assert f.read(CLUSTER) == _read(mine[0].copy, 0, CLUSTER)


def _corrupt_l1(path):
    """Make L1 entry 0 point into the middle of a cluster: qemu notices when it reads the L2 table."""
    with open(path, "r+b") as f:
        hdr = f.read(104)
        l1_offset = struct.unpack_from(">Q", hdr, 40)[0]
        f.seek(l1_offset)
        entry = struct.unpack(">Q", f.read(8))[0]
        assert entry
        f.seek(l1_offset)
        f.write(struct.pack(">Q", entry + 512))


@pytest.fixture
def failing(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    good = create(d / "good.qcow2", 4 * MiB)
    qemu_io(good, "write -P 0x11 0 1M")
    # A snapshot table at an offset that is not cluster aligned: qemu refuses to open it.
    late = create(d / "late.qcow2", 4 * MiB)
    with open(late, "r+b") as f:
        f.seek(60)
        f.write(struct.pack(">IQ", 1, 12345))
    # A broken L1 entry: qemu opens the image but cannot read its allocation.
    l1 = create(d / "l1.qcow2", 4 * MiB)
    qemu_io(l1, "write -P 0x22 0 1M")
    _corrupt_l1(l1)
    return d


@pytest.mark.parametrize("first", ["qcow2", "raw"])
def test_a_view_that_fails_hides_its_qcow2(failing, mount, first):
    m = mount(failing)
    for disk in ("late.qcow2", "l1.qcow2"):
        stem = disk.split(".")[0]
        folder = m / f"{disk}/chain"
        assert sorted(os.listdir(folder)) == [f"00-{stem}.map.json", f"00-{stem}.qcow2", f"00-{stem}.raw"]
        try:
            if first == "qcow2":
                os.stat(os.path.join(folder, f"00-{stem}.qcow2"))
            else:
                with open(os.path.join(folder, f"00-{stem}.raw"), "rb") as f:
                    f.read(4096)
        except OSError as e:
            assert e.errno in (errno.ENOENT, errno.EIO), e
        for name in (f"00-{stem}.raw", f"00-{stem}.qcow2"):
            with pytest.raises(OSError) as e:
                os.stat(os.path.join(folder, name))
            assert e.value.errno == errno.ENOENT, f"{disk}: {name}"
        assert os.listdir(folder) == [], disk
        assert f"{disk}/chain/00-{stem}." in m.status(), m.status()
    # The rest works.
    assert "00-good.qcow2" in os.listdir(m / "good.qcow2/chain")
    r = run("qemu-img", "compare", m / "good.qcow2/chain/00-good.qcow2", failing / "good.qcow2", check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_layer_whose_layer_beneath_has_no_view_has_no_qcow2(tmp_path, mount):
    """Its .qcow2 would have to name the image's own backing file, here one outside DIR that
    snapfs refused to follow: it is not offered, with the reason; its .raw is."""
    outside = tmp_path / "outside"
    outside.mkdir()
    base = create(outside / "base.qcow2", 4 * MiB)
    qemu_io(base, "write -P 0x71 0 1M")
    d = tmp_path / "images"
    d.mkdir()
    top = create(d / "top.qcow2", backing=str(base))
    qemu_io(top, "write -P 0x72 1M 1M")
    m = mount(d)
    layers = m / "top.qcow2/layers"
    assert sorted(os.listdir(layers)) == ["00-top.map.json", "00-top.raw"]
    assert errno_of(os.stat, os.path.join(layers, "00-top.qcow2")) == errno.ENOENT
    assert (f"top.qcow2/layers/00-top.qcow2: not offered: a layer's .qcow2 names the .qcow2 of the "
            f"layer beneath it, and {base} has no layer view") in m.status()
    # Followed when allowed: the chain of .qcow2 files is complete again.
    m2 = mount(d, "--allow-outside-backing", name="mnt2")
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("00-base.qcow2", "01-top.qcow2"):
        run("cp", m2 / f"top.qcow2/layers/{name}", copy / name)
    qemu_img("compare", copy / "01-top.qcow2", top)


def errno_of(fn, *args):
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return None
