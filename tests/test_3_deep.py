"""Tier 3: a deep chain (more layers than ``nbd.spec.DEEP_CHAIN``).

qemu is handed the top image only and follows the headers down (a nested
``json:`` of every layer takes it the cube of the depth to open); what it
reads is still pinned: qemu-nbd must hold open exactly the files scanned.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time

import pytest
from conftest import MiB, create, expected_allocation_map, qemu_img, qemu_io, run
from test_5_lifecycle import children

from snapfs.nbd.spec import DEEP_CHAIN

DEPTH = 60


def deep_chain(d, depth):
    """m00 <- m01 <- ... each layer writing 4 KiB of its own (made standalone, then rebased:
    writing through a chain opens all of it, the square of the depth)."""
    for i in range(depth):
        img = create(d / f"m{i:02d}.qcow2", 8 * MiB)
        qemu_io(img, f"write -P {i + 1} {i * 64}k 4k", *(["write -z 4M 4k"] if i == depth // 2 else []))
        if i:
            qemu_img("rebase", "-u", "-f", "qcow2", "-b", f"m{i - 1:02d}.qcow2", "-F", "qcow2", img)
    return d / f"m{depth - 1:02d}.qcow2"


def settle(folder):
    """``ls -l``: every map of the folder read (none is being read from the files
    while a test rewrites a header), before anything is opened."""
    for name in os.listdir(folder):
        os.stat(os.path.join(folder, name))


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    d = tmp_path_factory.mktemp("deep") / "images"
    d.mkdir()
    top = deep_chain(d, DEPTH)
    return d, top


def test_a_deep_chain_reads_as_qemu_reads_it_and_opens_by_its_top(deep, mount, tmp_path):
    assert DEPTH > DEEP_CHAIN
    d, top = deep
    m = mount(d, "--idle-timeout", "60")
    chain = m / f"{top.name}/chain"
    t = time.monotonic()
    names = os.listdir(chain)
    assert len(names) == 3 * DEPTH
    view = f"{chain}/{DEPTH - 1:02d}-{top.stem}.raw"
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", view, top)
    print(f"\n{DEPTH} layers: listing and reading the top in {time.monotonic() - t:.2f} s")
    with open(view[:-4] + ".map.json") as f:
        assert json.load(f) == expected_allocation_map(top, True)
    # qemu-nbd got the top alone: one file name in its command line.
    cmdlines = []
    for pid in children(m.pid):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdlines.append(f.read().split(b"\0"))
    spec = next(json.loads(a[5:]) for c in cmdlines for a in c if a.startswith(b"json:") and top.name.encode() in a)
    assert "backing" not in spec and spec["file"]["filename"] == str(top)
    # A middle chain view, as deep as DEEP_CHAIN: nested as always.
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", f"{chain}/{DEEP_CHAIN - 1:02d}-m{DEEP_CHAIN - 1:02d}.raw",
        d / f"m{DEEP_CHAIN - 1:02d}.qcow2")


def test_a_header_changed_after_the_scan_is_never_followed(deep, mount, tmp_path):
    src, _ = deep
    d = tmp_path / "images"
    shutil.copytree(src, d)
    top = d / f"m{DEPTH - 1:02d}.qcow2"
    m = mount(d)
    settle(m / f"{top.name}/chain")
    # Layer 30 now names a copy of layer 29 (same length of name: the header
    # is rewritten in place): qemu would read the copy, which was never scanned.
    shutil.copy(d / "m29.qcow2", d / "x29.qcow2")
    qemu_io(d / "x29.qcow2", "write -P 0xee 0 1M")
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", "x29.qcow2", "-F", "qcow2", d / "m30.qcow2")
    with pytest.raises(OSError) as e:
        with open(m / f"{top.name}/chain/{DEPTH - 1:02d}-{top.stem}.raw", "rb") as f:
            f.read(4096)
    assert e.value.errno == errno.ESTALE
    assert f"{top.name}/chain/{DEPTH - 1:02d}-{top.stem}.raw: {d / 'm30.qcow2'} changed since the mount was " \
           "made, and qemu would follow its header" in m.status()


def test_a_header_rewritten_to_name_what_is_no_file_is_never_followed(deep, mount, tmp_path):
    """A backing name qemu takes as a protocol (``fat:``, a directory read as a
    disk) opens no file qemu-nbd would show: the pin of the rewritten layer
    (its ctime) refuses it before qemu starts."""
    src, _ = deep
    d = tmp_path / "images"
    shutil.copytree(src, d)
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key").write_bytes(b"secret" * 1000)
    top = d / f"m{DEPTH - 1:02d}.qcow2"
    m = mount(d)
    settle(m / f"{top.name}/chain")
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", f"fat:{secret}", "-F", "raw", d / "m00.qcow2")
    with pytest.raises(OSError) as e:
        with open(m / f"{top.name}/chain/{DEPTH - 1:02d}-{top.stem}.raw", "rb") as f:
            f.read()
    assert e.value.errno == errno.ESTALE
    assert f"{d / 'm00.qcow2'} changed since the mount was made" in m.status()
