"""Tier 1: the qcow2 header reader agrees with qemu-img info."""

import json
import struct

import pytest
from conftest import MiB, create, qemu_img

from snapfs.formats import qcow2


def info(path):
    return json.loads(qemu_img("info", "--output=json", path).stdout)


@pytest.mark.parametrize("size", [MiB, 64 * MiB + 1536, 10 << 30])
@pytest.mark.parametrize("opts", ["compat=1.1", "compat=0.10", "cluster_size=2M", "cluster_size=4k"])
def test_size_and_backing_match_qemu(tmp_path, size, opts):
    base = create(tmp_path / "base.qcow2", MiB)
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, "-b", "base.qcow2", "-F", "qcow2", top, str(size))
    hdr = qcow2.read_header(top)
    want = info(top)
    assert hdr.size == want["virtual-size"]
    assert hdr.cluster_size == want["cluster-size"]
    assert hdr.backing_file == "base.qcow2" == want["backing-filename"]
    assert hdr.backing_format == "qcow2" == want["backing-filename-format"]
    assert qcow2.read_header(base).backing_file is None


def test_bitmaps_match_qemu(tmp_path):
    img = create(tmp_path / "b.qcow2", 16 * MiB)
    qemu_img("bitmap", "--add", "-g", "128k", img, "first")
    qemu_img("bitmap", "--add", "--disable", img, "second, with: odd/name")
    hdr = qcow2.read_header(img)
    want = info(img)["format-specific"]["data"]["bitmaps"]
    assert [(b.name, b.granularity, b.auto) for b in hdr.bitmaps] == [
        (w["name"], w["granularity"], "auto" in w["flags"]) for w in want]
    assert not any(b.in_use for b in hdr.bitmaps)


@pytest.mark.parametrize("offset,value,fmt,reason", [
    (4, 7, ">I", "version"),
    (20, 30, ">I", "cluster size"),
    (40, 1 << 40, ">Q", "L1 table"),
    (48, 1 << 40, ">Q", "refcount table"),
    (32, 1, ">I", "encrypted"),
])
def test_broken_headers_are_refused(tmp_path, offset, value, fmt, reason):
    img = create(tmp_path / "x.qcow2", MiB)
    with open(img, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))
    with pytest.raises(qcow2.Qcow2Error) as e:
        qcow2.read_header(img)
    assert reason in str(e.value)


def test_truncated_file_is_refused(tmp_path):
    img = tmp_path / "t.qcow2"
    img.write_bytes(qcow2.MAGIC + b"\0\0\0\3")
    with pytest.raises(qcow2.Qcow2Error):
        qcow2.read_header(img)
