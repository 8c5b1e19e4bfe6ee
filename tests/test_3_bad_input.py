"""Tier 3: bad input never breaks the mount; it is reported and the rest works."""

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import time

import pytest
from conftest import MiB, create, json_layer, qemu_img, qemu_io, run, running_writer, seek_walk


def _set_ext_type(path, old, new):
    """Rewrite a qcow2 header extension's type (to hide it from readers)."""
    with open(path, "r+b") as f:
        buf = f.read(4096)
        hdr_len = struct.unpack_from(">I", buf, 100)[0]
        pos = hdr_len
        while True:
            t, n = struct.unpack_from(">II", buf, pos)
            if t == 0:
                raise AssertionError("extension not found")
            if t == old:
                f.seek(pos)
                f.write(struct.pack(">I", new))
                return
            pos += 8 + ((n + 7) & ~7)


@pytest.fixture
def bad_dir(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    good = create(d / "good.qcow2", 4 * MiB)
    qemu_io(good, "write -P 0x11 0 1M")

    (d / "readme.txt").write_text("hello")
    (d / "garbage.qcow2").write_bytes(b"this is not a qcow2 image" * 100)

    # Missing backing file: the top layer alone is still offered.
    lost_base = create(d / "lost-base.qcow2", 4 * MiB)
    orphan = create(d / "orphan.qcow2", backing="lost-base.qcow2")
    qemu_io(orphan, "write -P 0x22 0 64k")
    os.unlink(lost_base)

    # A backing file outside the directory.
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.raw"
    secret.write_bytes(b"SECRET" * 1000)
    escape = d / "escape.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "../outside/secret.raw", "-F", "raw", escape, "64k")

    # No backing format recorded: the format would have to be probed.
    nofmt_base = create(d / "nofmt-base.qcow2", 4 * MiB)
    nofmt = create(d / "nofmt.qcow2", backing="nofmt-base.qcow2")
    _set_ext_type(nofmt, 0xE2792ACA, 0x0BADF00D)
    del nofmt_base

    # Header marked corrupt.
    corrupt = create(d / "corrupt.qcow2", 4 * MiB)
    with open(corrupt, "r+b") as f:
        f.seek(72)
        f.write(struct.pack(">Q", 2))  # incompatible feature: corrupt

    # Corruption only qemu notices when it opens the image: a snapshot
    # table at an offset that is not cluster aligned.
    late = create(d / "late.qcow2", 4 * MiB)
    with open(late, "r+b") as f:
        f.seek(60)
        f.write(struct.pack(">IQ", 1, 12345))

    # A bitmap left "in use" by a qemu that did not close the image.
    inuse_bm = create(d / "crashed.qcow2", 4 * MiB)
    qemu_img("bitmap", "--add", inuse_bm, "b0")
    p = subprocess.Popen(["qemu-io", "-f", "qcow2", inuse_bm], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE)
    time.sleep(0.5)
    p.send_signal(signal.SIGKILL)
    p.wait()
    return d


def test_bad_images_are_reported_and_the_rest_works(bad_dir, mount):
    m = mount(bad_dir)
    disks = sorted(os.listdir(m.path))
    # Every leaf is a disk; nofmt-base is not a leaf only because it is named.
    assert "readme.txt" not in disks
    assert "good.qcow2" in disks
    status = m.status()
    assert "garbage.qcow2: not a usable qcow2 image" in status
    assert "lost-base.qcow2 is missing" in status
    assert "outside" in status and "--allow-outside-backing" in status
    assert "does not record the format of its backing file" in status
    assert "marked corrupt" in status
    assert any("bitmap 'b0' in " in line and "is marked in use" in line for line in status.splitlines())

    run("qemu-img", "compare", "-f", "raw", m / "good.qcow2/chain/00-good.raw",
        bad_dir / "good.qcow2")

    # Missing base: no chain view, but the layer alone works.
    assert os.listdir(m / "orphan.qcow2/chain") == []
    layer = m / "orphan.qcow2/layers/00-orphan.raw"
    r = run("qemu-img", "compare", "-f", "raw", layer, json_layer(bad_dir / "orphan.qcow2"), check=False)
    assert r.returncode == 0, r.stdout + r.stderr

    # The outside backing file is never read.
    assert os.listdir(m / "escape.qcow2/chain") == []
    with open(m / "escape.qcow2/layers/00-escape.raw", "rb") as f:
        assert b"SECRET" not in f.read()

    # A leaf that cannot be read keeps its (empty) directory: it was found.
    for folder in ("chain", "layers", "dirty"):
        assert os.listdir(m / f"corrupt.qcow2/{folder}") == []
    assert os.listdir(m / "crashed.qcow2/dirty") == []
    assert sorted(os.listdir(m / "crashed.qcow2/chain")) == ["00-crashed.map.json", "00-crashed.qcow2",
                                                             "00-crashed.raw"]


def test_image_qemu_refuses_disappears_with_reason(bad_dir, mount):
    m = mount(bad_dir)
    view = m / "late.qcow2/chain/00-late.raw"
    with pytest.raises(OSError) as e:
        os.stat(view)
    assert e.value.errno == errno.ENOENT
    assert "00-late.raw" not in os.listdir(m / "late.qcow2/chain")
    late_line = next(line for line in m.status().splitlines() if "late.qcow2/chain/00-late.raw:" in line)
    assert "napshot" in late_line  # qemu's own reason is passed on
    # The mount carries on.
    run("qemu-img", "compare", "-f", "raw", m / "good.qcow2/chain/00-good.raw",
        bad_dir / "good.qcow2")


def test_outside_backing_followed_when_allowed(bad_dir, mount):
    m = mount(bad_dir, "--allow-outside-backing")
    with open(m / "escape.qcow2/chain/01-escape.raw", "rb") as f:
        assert f.read(6) == b"SECRET"


def test_image_in_use_by_a_writer(tmp_path, mount):
    d = tmp_path / "images"
    d.mkdir()
    base = create(d / "base.qcow2", 4 * MiB)
    qemu_io(base, "write -P 0x33 0 1M")
    top = create(d / "top.qcow2", backing="base.qcow2")
    # A writable qemu-nbd stands in for a running VM writing its active layer.
    with running_writer(top, tmp_path / "vm.sock"):
        m = mount(d)
        assert "top.qcow2: in use" in m.status()
        layers = sorted(os.listdir(m / "top.qcow2/layers"))
        assert layers == ["00-base.map.json", "00-base.qcow2", "00-base.raw"]
        assert sorted(os.listdir(m / "top.qcow2/chain")) == ["00-base.map.json", "00-base.qcow2", "00-base.raw"]
        # The backing layer of the running VM reads fine.
        run("qemu-img", "compare", "-f", "raw", m / "top.qcow2/layers/00-base.raw", base)


NAMES = ['vm "quoted", with: colon é', "disk a,b:c 'q'.qcow2", "base, x:y ü.qcow2"]


def test_names_of_any_kind(tmp_path, mount):
    d = tmp_path / "images"
    vm = d / NAMES[0]
    vm.mkdir(parents=True)
    base = create(vm / NAMES[2], 4 * MiB)
    qemu_io(base, "write -P 0x44 0 1M")
    # qemu needs "./" before a relative name with a colon (else: a protocol).
    top = create(vm / NAMES[1], backing="./" + NAMES[2])
    qemu_io(top, "write -P 0x55 1M 1M")
    qemu_img("bitmap", "--add", top, "bm, with: odd/name")
    qemu_io(top, "write -P 0x66 2M 64k")
    m = mount(d)
    disk = m / f"{NAMES[0]}/{NAMES[1]}"
    assert sorted(os.listdir(os.path.join(disk, "chain"))) == [
        "00-base, x:y ü.map.json", "00-base, x:y ü.qcow2", "00-base, x:y ü.raw",
        "01-disk a,b:c 'q'.map.json", "01-disk a,b:c 'q'.qcow2", "01-disk a,b:c 'q'.raw"]
    run("qemu-img", "compare", "-f", "raw", os.path.join(disk, "chain/01-disk a,b:c 'q'.raw"), top)
    # The copied layers are a chain: the backing name with a colon gets "./".
    shutil.copytree(os.path.join(disk, "layers"), tmp_path / "copy")
    copied = tmp_path / "copy" / "01-disk a,b:c 'q'.qcow2"
    info = json.loads(run("qemu-img", "info", "--output=json", copied).stdout)
    assert info["backing-filename"] == "./00-base, x:y ü.qcow2"
    run("qemu-img", "compare", copied, top)
    dirty = os.path.join(disk, "dirty/bm, with: odd%2Fname.raw")
    assert os.getxattr(dirty, "user.snapfs.bitmap") == "bm, with: odd/name".encode()
    assert seek_walk(dirty) == [(2 * MiB, 64 * 1024)]
    assert "every view is available" in m.status()
