"""Tier 8: docs/libvirt.md's backup walk-through, run as written, on a real VM.

The shell blocks of the walk-through are taken from the document itself, so
the docs cannot drift from what works. Between the steps the guest writes, a
disk is attached (seed 002) and a bitmap is removed behind libvirt's back
(seed 004); every restored point must equal the disk as it was recorded at
that backup.
"""

from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET

import libvirt_qemu
from conftest import REPO, MiB, json_layer, run
from libvirt_env import DiskSpec, TestDomain

DOC = os.path.join(REPO, "docs", "libvirt.md")


def walkthrough_blocks():
    with open(DOC) as f:
        text = f.read()
    section = text[text.index("## Walk-through"):]
    section = section[:section.index("\n## ", 1)]
    return re.findall(r"```sh\n(.*?)```", section, re.S)


def remove_bitmap_live(dom, target, bitmap):
    """Drop a bitmap from a running disk through QMP, behind libvirt's back."""
    disk = next(x for x in ET.fromstring(dom.dom.XMLDesc(0)).iterfind("devices/disk")
                if x.find("target").get("dev") == target)
    node = f"libvirt-{disk.find('source').get('index')}-format"
    cmd = {"execute": "block-dirty-bitmap-remove", "arguments": {"node": node, "name": bitmap}}
    out = json.loads(libvirt_qemu.qemuMonitorCommand(dom.dom, json.dumps(cmd), 0))
    assert "error" not in out, out


def test_walkthrough_backups_and_restores(conn, d, tmp_path):
    helpers, step1, step2, step3, restore_fn, example = walkthrough_blocks()
    assert "restore vda 3" in example
    backup = tmp_path / "backup"
    backup.mkdir()
    disks = [DiskSpec("vda", f"{d}/vda.qcow2", size=48 * MiB),
             DiskSpec("vdb", f"{d}/vdb.qcow2", size=32 * MiB)]
    with TestDomain.define(conn, "walk", disks) as dom:
        env = dict(os.environ, DOMAIN=dom.name, MNT=str(tmp_path / "mnt"), BACKUP=str(backup),
                   PATH=os.path.join(REPO, ".venv", "bin") + ":" + os.environ["PATH"])
        os.makedirs(env["MNT"])

        def sh(*blocks):
            r = run("bash", "-euo", "pipefail", "-c", "\n".join([helpers, *blocks]), env=env, check=False)
            assert r.returncode == 0, r.stdout + r.stderr
            return r.stdout

        rec = {}

        def record(point, targets):
            rec[point] = {t: dom.record(t, str(tmp_path / f"{t}.{point}.raw")) for t in targets}

        dom.start()
        dom.write("vda", 0, 4 * MiB, 0x11)
        dom.write("vdb", 1 * MiB, 2 * MiB, 0x21)
        record(1, ("vda", "vdb"))
        sh(step1)

        # A new disk, changes everywhere, a trimmed area.
        dom.attach_disk("vdc", f"{d}/vdc.qcow2", size=16 * MiB)
        dom.write("vda", 8 * MiB, 1 * MiB, 0x12)
        dom.zero("vda", 0, 1 * MiB)
        dom.write("vdb", 0, 1 * MiB, 0x22)
        dom.write("vdc", 2 * MiB, 2 * MiB, 0x31)
        record(2, ("vda", "vdb", "vdc"))
        out = sh(step2)
        assert "vdc was attached after checkpoint 'ck1'" in out
        modes = {t: (backup / f"{t}.2.mode").read_text() for t in ("vda", "vdb", "vdc")}
        assert modes == {"vda": "incremental", "vdb": "incremental", "vdc": "full"}

        # vdb loses ck2 behind libvirt's back: its next backup must be full.
        remove_bitmap_live(dom, "vdb", "ck2")
        dom.write("vda", 16 * MiB, 1 * MiB, 0x13)
        dom.write("vdb", 4 * MiB, 1 * MiB, 0x23)
        dom.write("vdc", 0, 1 * MiB, 0x32)
        record(3, ("vda", "vdb", "vdc"))
        sh(step3)
        modes = {t: (backup / f"{t}.3.mode").read_text() for t in ("vda", "vdb", "vdc")}
        assert modes == {"vda": "incremental", "vdb": "full", "vdc": "incremental"}

    for point, disks_then in rec.items():
        for t, truth in disks_then.items():
            out = tmp_path / f"restored-{t}-{point}.qcow2"
            sh(restore_fn, f"restore {t} {point} {out}")
            r = run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", out, truth, check=False)
            assert r.returncode == 0, f"{t} at backup {point}: {r.stdout}{r.stderr}"
    # The incrementals carry only what changed: vda's second backup holds
    # 1 MiB of data and 1 MiB of zero clusters, not the disk.
    alone = json_layer(backup / "vda.2.qcow2")
    mapped = json.loads(run("qemu-img", "map", "--output=json", alone).stdout)
    assert sum(e["length"] for e in mapped if e["data"]) == 1 * MiB
    assert sum(e["length"] for e in mapped if e["zero"] and e["present"]) == 1 * MiB
