"""Tier 4: standard tools on a mount stay sparse and get the right bytes."""

import json
import os
import shutil
import tarfile

import pytest
from conftest import MiB, Mount, create, json_layer, qemu_img, qemu_io, run, seek_walk

SIZE = 256 * MiB


@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    d = root / "images"
    d.mkdir()
    base = create(d / "base.qcow2", SIZE)
    qemu_io(base, "write -P 0x71 0 8M", "write -P 0x72 100M 8M")
    top = create(d / "top.qcow2", backing="base.qcow2")
    qemu_io(top, "write -P 0x73 4M 2M", "write -z 100M 4M", "write -P 0x74 200M 1M")
    m = Mount(d, root / "mnt")
    yield root, d, m
    m.close()


def _allocated(path):
    return os.stat(path).st_blocks * 512


def test_cp_sparse_copies_only_data(vm, tmp_path):
    root, d, m = vm
    view = m / "top.qcow2/layers/01-top.raw"
    out = tmp_path / "copy.raw"
    run("cp", "--sparse=auto", view, out)
    run("qemu-img", "compare", "-f", "raw", out, json_layer(d / "top.qcow2"))
    with open(view[:-4] + ".map.json") as f:
        data = sum(e["length"] for e in json.load(f) if not e["zero"])
    # Only the data is allocated (the zeroed area is written as a hole by cp).
    assert _allocated(out) <= data + 1 * MiB
    assert os.stat(out).st_size == SIZE


def test_tar_sparse_round_trip(vm, tmp_path):
    root, d, m = vm
    view = m / "top.qcow2/chain/01-top.raw"
    tar = tmp_path / "v.tar"
    run("tar", "--sparse", "-C", os.path.dirname(view), "-cf", tar, os.path.basename(view))
    assert os.path.getsize(tar) < 32 * MiB   # the archive holds the data only
    with tarfile.open(tar) as t:
        member = t.getmember("01-top.raw")
        assert member.issparse()
    out = tmp_path / "x"
    out.mkdir()
    run("tar", "-C", out, "-xf", tar)
    run("qemu-img", "compare", "-f", "raw", out / "01-top.raw", d / "top.qcow2")


def test_qemu_img_convert_from_a_view(vm, tmp_path):
    root, d, m = vm
    out = tmp_path / "out.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", m / "top.qcow2/chain/01-top.raw", out)
    run("qemu-img", "compare", out, d / "top.qcow2")
    # qemu-img convert found the holes: the copy holds little more than the data.
    assert os.path.getsize(out) < 40 * MiB


def test_rebuild_chain_from_layer_views(vm, tmp_path):
    """Seed 000: download layers with the three-way extent logic, rebuild, compare."""
    root, d, m = vm
    prev = None
    for name in ("00-base", "01-top"):
        layer = tmp_path / f"{name}.qcow2"
        args = ["create", "-q", "-f", "qcow2"]
        if prev:
            args += ["-b", prev, "-F", "qcow2"]
        qemu_img(*args, layer, str(SIZE))
        view = m / f"top.qcow2/layers/{name}.raw"
        with open(view[:-4] + ".map.json") as f:
            extents = json.load(f)
        # Data is written, zeroed areas are zeroed, holes are left alone.
        with open(view, "rb") as src:
            for e in extents:
                if not e["zero"]:
                    src.seek(e["start"])
                    chunk = tmp_path / "chunk"
                    chunk.write_bytes(src.read(e["length"]))
                    qemu_io(str(layer), f"write -s {chunk} {e['start']} {e['length']}")
                elif not e["hole"]:
                    qemu_io(str(layer), f"write -z {e['start']} {e['length']}")
        prev = str(layer)
    run("qemu-img", "compare", prev, d / "top.qcow2")


@pytest.mark.skipif(os.geteuid() != 0, reason="loop devices need root")
def test_read_only_loop_device_over_a_chain_view(vm, tmp_path):
    root, d, m = vm
    if not os.path.exists("/dev/loop-control"):
        run("modprobe", "loop", check=False)
    view = m / "top.qcow2/chain/01-top.raw"
    dev = run("losetup", "--read-only", "--find", "--show", view).stdout.strip()
    try:
        raw = tmp_path / "expected.raw"
        qemu_img("convert", "-O", "raw", d / "top.qcow2", raw)
        run("cmp", dev, raw)
    finally:
        run("losetup", "-d", dev)


def test_rsync_sparse(vm, tmp_path):
    root, d, m = vm
    if shutil.which("rsync") is None:
        pytest.fail("rsync missing: run make setup")
    view = m / "top.qcow2/layers/00-base.raw"
    run("rsync", "--sparse", view, tmp_path / "r.raw")
    run("qemu-img", "compare", "-f", "raw", tmp_path / "r.raw", json_layer(d / "base.qcow2"))
    assert _allocated(tmp_path / "r.raw") <= 17 * MiB
    assert seek_walk(view) == [(0, 8 * MiB), (100 * MiB, 8 * MiB)]
