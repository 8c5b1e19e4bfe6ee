"""Tier 3: a seeded fuzz of image stores: no mutant hangs, crashes or lies.

Valid qcow2 chains (a base with data, an allocated-zero cluster, a bitmap and
an internal snapshot; an overlay naming it, with data and a bitmap of its
own) are mutated, one change per disk: a header field set to a boundary or
random value, bytes of a table overwritten (L1, L2, refcounts, bitmap
directory, header extensions, snapshot table), the backing file's name
replaced, the file truncated, a bit flipped. All mutants sit in one image
directory, mounted once. Then:

- the mount returns within a bound, and logs no traceback (``conftest``);
- every ``.raw`` view listed reads exactly what qemu reads (``qemu-img
  convert`` of the image by its own name, a layer alone with ``"backing":
  null``, a snapshot with ``-l``), or fails with EIO and is then listed in
  the status file with a reason; a view of an image qemu cannot open never
  reads;
- a dirty view's data is the chain's bytes (it reads zeros elsewhere);
- a disk with fewer views than its unmutated twin has a line in the status file.

``SNAPFS_FUZZ_SEED`` and ``SNAPFS_FUZZ_MUTANTS`` replay or widen a run; the
seed is printed with every failure.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import struct
import subprocess

import pytest
from conftest import MiB, create, qemu_img, qemu_io

SEED = int(os.environ.get("SNAPFS_FUZZ_SEED", "2026"))
MUTANTS = int(os.environ.get("SNAPFS_FUZZ_MUTANTS", "48"))
SIZE = 4 * MiB
BOUND = 60

# qcow2 header fields: (offset, struct format).
FIELDS = {
    "version": (4, ">I"), "backing_file_offset": (8, ">Q"), "backing_file_size": (16, ">I"),
    "cluster_bits": (20, ">I"), "size": (24, ">Q"), "crypt_method": (32, ">I"), "l1_size": (36, ">I"),
    "l1_table_offset": (40, ">Q"), "refcount_table_offset": (48, ">Q"), "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"), "snapshots_offset": (64, ">Q"), "incompatible_features": (72, ">Q"),
    "compatible_features": (80, ">Q"), "autoclear_features": (88, ">Q"), "refcount_order": (96, ">I"),
    "header_length": (100, ">I"),
}
BACKING_NAMES = [b"", b"\0", b"base.qcow2\0junk", b"../outside.qcow2", b"/etc/passwd", b"missing.qcow2",
                 b"base.qcow2/", b"./base.qcow2", b"json:{\"driver\": \"file\", \"filename\": \"/etc/passwd\"}",
                 b"nbd+unix:///?socket=/nonexistent", b"a" * 1023, b"\xff\xfe.qcow2", b"top.qcow2"]


def seed_disk(d):
    """The valid disk every mutant starts from: base <- top."""
    base = create(d / "base.qcow2", SIZE)
    qemu_io(base, "write -P 0x11 0 1M", "write -z 2M 64k", "write -P 0x12 3M 64k")
    qemu_img("bitmap", "--add", base, "b1")
    qemu_img("snapshot", "-c", "s1", base)
    qemu_io(base, "write -P 0x13 512k 64k")
    top = create(d / "top.qcow2", backing="base.qcow2")
    qemu_img("bitmap", "--add", top, "b2")
    qemu_io(top, "write -P 0x21 64k 128k", "write -z 3M 32k", "write -P 0x22 1536k 4k")


def header(data):
    return {name: struct.unpack_from(fmt, data, off)[0] for name, (off, fmt) in FIELDS.items()}


def extensions(data, h):
    """(magic, offset of its data, length) of each header extension."""
    out, off = [], h["header_length"] if h["version"] >= 3 else 72
    while off + 8 <= min(len(data), 1 << 16):
        magic, length = struct.unpack_from(">II", data, off)
        if magic == 0:
            break
        out.append((magic, off + 8, length))
        off += 8 + ((length + 7) & ~7)
    return out


def regions(data):
    """Where the tables of a qcow2 are: name -> (offset, length)."""
    h = header(data)
    cluster = 1 << h["cluster_bits"]
    out = {"header": (0, 104), "l1": (h["l1_table_offset"], 8 * h["l1_size"]),
           "refcount table": (h["refcount_table_offset"], 64),
           "snapshots": (h["snapshots_offset"], 96)}
    l1 = struct.unpack_from(">Q", data, h["l1_table_offset"])[0] & 0x00FFFFFFFFFFFE00
    if l1:
        out["l2"] = (l1, 256)
    rt = struct.unpack_from(">Q", data, h["refcount_table_offset"])[0]
    if rt:
        out["refcount block"] = (rt, 128)
    for magic, off, length in extensions(data, h):
        out[f"extension {magic:#x}"] = (off, length)
        if magic == 0x23852875 and length >= 24:  # bitmaps: the directory
            _, _, dir_size, dir_off = struct.unpack_from(">IIQQ", data, off)
            out["bitmap directory"] = (dir_off, min(dir_size, cluster))
    return {k: v for k, v in out.items() if v[1] > 0 and v[0] + v[1] <= len(data)}


def mutate(path, rng) -> str:
    """One change to the qcow2 at ``path``; what it was, for messages."""
    with open(path, "rb") as f:
        data = bytearray(f.read())
    kind = rng.choice(["field", "field", "table", "table", "table", "backing", "truncate", "bit"])
    if kind == "field":
        name = rng.choice(list(FIELDS))
        off, fmt = FIELDS[name]
        width = struct.calcsize(fmt)
        old = struct.unpack_from(fmt, data, off)[0]
        top = (1 << (8 * width)) - 1
        value = rng.choice([0, 1, 2, top, top >> 1, (top >> 1) + 1, old + 1, max(old - 1, 0), old * 2 & top,
                            len(data), len(data) - 1, rng.randrange(top + 1), 1 << rng.randrange(8 * width)])
        struct.pack_into(fmt, data, off, value & top)
        what = f"{name} {old} -> {value & top}"
    elif kind == "table":
        name, (off, length) = rng.choice(sorted(regions(data).items()))
        n = rng.randrange(1, min(16, length) + 1)
        at = off + rng.randrange(length - n + 1)
        data[at:at + n] = rng.randbytes(n) if rng.random() < 0.7 else bytes([rng.choice((0, 0xFF))]) * n
        what = f"{name}: {n} byte(s) at {at}"
    elif kind == "backing":
        h = header(data)
        name = rng.choice(BACKING_NAMES)
        off = h["backing_file_offset"] or 0x1F0
        if off + len(name) > 65536 or off < 104:
            off = 0x1F0
        data[off:off + len(name)] = name
        struct.pack_into(">Q", data, 8, off)
        struct.pack_into(">I", data, 16, len(name))
        what = f"backing name {name[:40]!r}"
    elif kind == "truncate":
        n = rng.randrange(len(data))
        del data[n:]
        what = f"truncated to {n}"
    else:
        bit = rng.randrange(min(len(data), 1 << 16) * 8)
        data[bit // 8] ^= 1 << (bit % 8)
        what = f"bit {bit} flipped"
    with open(path, "wb") as f:
        f.write(data)
    return what


def qemu_bytes(view, out):
    """What qemu reads for the view (from its xattrs), or None if qemu cannot open it."""
    x = {k.removeprefix("user.snapfs."): os.getxattr(view, k).decode() for k in os.listxattr(view)}
    image, fmt = x["image"], x["format"]
    args = ["qemu-img", "convert", "-U", "-O", "raw"]
    if x["view"] == "layer":
        src = json.dumps({"driver": fmt, "file": {"driver": "file", "filename": image}, "backing": None})
        args.append("json:" + src)
    elif "snapshot" in x:
        args += ["-f", fmt, "-l", "snapshot.name=" + x["snapshot"], image]
    else:
        args += ["-f", fmt, image]
    r = subprocess.run([*args, out], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        return None
    with open(out, "rb") as f:
        return f.read()


def read_view(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        return e


@pytest.mark.log_allows(r"qemu-nbd .* exited with", r"died; restarting it")
def test_seeded_mutants_never_hang_crash_or_serve_a_wrong_byte(tmp_path, mount):
    rng = random.Random(SEED)
    seed = tmp_path / "seed"
    seed.mkdir()
    seed_disk(seed)
    d = tmp_path / "images"
    d.mkdir()
    shutil.copytree(seed, d / "twin")
    what = {}
    for i in range(MUTANTS):
        sub = d / f"m{i:02d}"
        shutil.copytree(seed, sub)
        victim = rng.choice(["base.qcow2", "top.qcow2"])
        what[sub.name] = f"{victim}: {mutate(sub / victim, rng)}"
    m = mount(d, "--retry-timeout", "2", timeout=BOUND)
    status = m.status()
    twin = {(dp.removeprefix(str(m / "twin")), f) for dp, _, fs in os.walk(m / "twin") for f in fs}
    compared = failed = 0
    problems = []
    for i in range(MUTANTS):
        name = f"m{i:02d}"
        root = m / name
        listed = {(dp.removeprefix(root), f) for dp, _, fs in os.walk(root) for f in fs} \
            if os.path.isdir(root) else set()
        where = f"seed {SEED}, {name} ({what[name]})"
        views = sorted(os.path.join(root + dp, f) for dp, f in listed if f.endswith(".raw"))
        chains = {}
        for view in views:
            got = read_view(view)
            kind = os.getxattr(view, "user.snapfs.view").decode() if not isinstance(got, OSError) else None
            if isinstance(got, OSError):
                failed += 1
                rel = os.path.relpath(view, m.path)
                # EIO: it failed at its first open; ENOENT: its map failed since it was listed.
                if got.errno not in (errno.EIO, errno.ENOENT) or rel not in m.status():
                    problems.append(f"{where}: {rel}: {got} (status: {rel in m.status()})")
                continue
            if kind == "dirty":
                chains.setdefault("dirty", []).append((view, got))
                continue
            want = qemu_bytes(view, str(tmp_path / "want.raw"))
            compared += 1
            if want is None:
                problems.append(f"{where}: {view} read, though qemu cannot open its image")
            elif got != want:
                problems.append(f"{where}: {view} differs from qemu's bytes")
            elif kind == "chain" and "user.snapfs.snapshot" not in os.listxattr(view):
                chains[os.getxattr(view, "user.snapfs.image").decode()] = got
        for view, got in chains.get("dirty", []):
            chain = chains.get(os.getxattr(view, "user.snapfs.image").decode())
            if chain is not None:
                step = 4096
                for off in range(0, len(got), step):
                    piece = got[off:off + step]
                    if piece.strip(b"\0") and piece != chain[off:off + step]:
                        problems.append(f"{where}: {view} at {off} is not the chain's data")
                        break
        if len(listed) < len(twin) and name not in status:
            problems.append(f"{where}: {len(listed)} files of {len(twin)}, and the status file says nothing")
    print(f"\nseed {SEED}: {MUTANTS} mutants, {compared} views compared with qemu, {failed} failed "
          f"opens (each in the status file), {len(problems)} problems")
    assert not problems, "\n".join(problems)
