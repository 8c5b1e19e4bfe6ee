"""Tier 8: docs/qcow2.md's walk-through, run as written, on real VMs.

The shell blocks are taken from the document itself, so the docs cannot
drift from what works. Flow 1 checks every ``.qcow2`` of a domain with
snapshots and a checkpoint, running and shut off; flow 2 copies its
``layers/`` folder and boots a second domain from the copy; flow 3 takes a
full backup and two incrementals from ``.qcow2`` files (a trimmed area,
seed 001; a disk attached after the checkpoint, seed 002), and every backup
point must read as the disk recorded at that time.
"""

from __future__ import annotations

import json
import os
import re

import libvirt
from conftest import LOG_RECORD, REPO, MiB, json_layer, qemu_img, run, walkthrough
from libvirt_env import DiskSpec, TestDomain

DOC = os.path.join(REPO, "docs", "qcow2.md")
CLUSTER = 64 * 1024


class Shell:
    """Runs blocks of the document with ``bash -euo pipefail`` and the walk-through's variables."""

    def __init__(self, mnt, backup, domain, prelude=""):
        self.env = dict(os.environ, MNT=str(mnt), BACKUP=str(backup), DOMAIN=domain,
                        PATH=os.path.join(REPO, ".venv", "bin") + ":" + os.environ["PATH"])
        os.makedirs(mnt, exist_ok=True)
        os.makedirs(backup, exist_ok=True)
        self.prelude = prelude

    def __call__(self, *blocks):
        script = "\n".join([self.prelude, *blocks])
        r = run("bash", "-euo", "pipefail", "-c", script, env=self.env, check=False)
        assert r.returncode == 0, f"block failed ({r.returncode}):\n{script}\n{r.stdout}{r.stderr}"
        for log in re.findall(r"^snapfs: mounted .* \(log: (.*)\)$", r.stdout, re.M):
            assert_quiet_log(log)
        return r.stdout

    def umount(self):
        if os.path.ismount(self.env["MNT"]):
            run(os.path.join(REPO, ".venv", "bin", "snapfs"), "umount", self.env["MNT"], check=False)


def assert_quiet_log(path):
    """No traceback, error or warning in a mount's log but the status file's (snapfs.report)."""
    with open(path) as f:
        bad = [line for line in f if "Traceback" in line or (
            (m := LOG_RECORD.match(line)) and m["level"] in ("WARNING", "ERROR", "CRITICAL")
            and m["logger"] != "snapfs.report")]
    assert not bad, f"{path}:\n" + "".join(bad)


def assert_identical(a, b, fa="qcow2", fb="raw"):
    r = run("qemu-img", "compare", "-f", fa, "-F", fb, a, b, check=False)
    assert r.returncode == 0, f"{a} != {b}: {r.stdout}{r.stderr}"


def assert_clean(image):
    r = run("qemu-img", "check", "--output=json", image, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert not report.get("corruptions") and not report.get("leaks"), report


def info(image, *opts):
    return json.loads(qemu_img("info", "--output=json", *opts, image).stdout)


def alone_map(image):
    """qemu-img map of a qcow2 without its backing file."""
    return json.loads(qemu_img("map", "--output=json", json_layer(image)).stdout)


def checked(out):
    """The files flow 1 said ``ok:`` for, sorted."""
    return sorted(line[4:] for line in out.splitlines() if line.startswith("ok: "))


def total(extents, pred):
    return sum(e["length"] for e in extents if pred(e))


# -- flows 1 and 2: every .qcow2 checked; a copied chain of layers boots ---------------------

def test_check_every_qcow2_then_copy_the_layers_and_boot_them(conn, d, tmp_path):
    steps = walkthrough(DOC)
    assert sorted(steps) == ["1", "2", "3"], steps.keys()
    (helpers, check_blk), (copy_blk, boot_blk) = steps["1"], steps["2"]
    backup = os.path.join(d, "backup")  # flow 2 starts a VM from it: qemu must reach it
    with TestDomain.define(conn, "q2", [DiskSpec("vda", f"{d}/vda.qcow2", size=32 * MiB)]) as dom:
        sh = Shell(tmp_path / "mnt", backup, dom.name, prelude=helpers)
        restored_name = f"{dom.name}-restored"
        try:
            # A chain vda <- vda.s1 <- vda.s2: data, allocated zeros hiding the
            # base's data, 64 KiB pieces; checkpoint ck1 and a write since.
            dom.start()
            dom.write("vda", 0, 4 * MiB, 0x11)
            dom.write("vda", 20 * MiB, 3 * CLUSTER, 0x12)
            dom.snapshot_external("s1", {"vda": f"{d}/vda.s1"})
            dom.zero("vda", 0, 1 * MiB)
            dom.write("vda", 8 * MiB, 2 * MiB, 0x21)
            dom.snapshot_external("s2", {"vda": f"{d}/vda.s2"})
            dom.write("vda", 3200 * 1024, CLUSTER, 0x31)
            dom.checkpoint("ck1")
            dom.write("vda", 12 * MiB, 1 * MiB, 0x32)
            dom.zero("vda", 20 * MiB + CLUSTER, CLUSTER)

            # 1. Running: the snapshots, the backing layers, and the job's views.
            assert checked(sh(check_blk)) == sorted(
                f"{dom.name}/vda/{v}.qcow2"
                for v in ("chain/00-s1", "chain/01-s2", "chain/current", "layers/00-vda",
                          "layers/01-vda.s1", "dirty/ck1"))
            dom.destroy()
            # Shut off: the active layer too, and the checkpoint's bitmap.
            assert checked(sh(check_blk)) == sorted(
                f"{dom.name}/vda/{v}.qcow2"
                for v in ("chain/00-s1", "chain/01-s2", "chain/current", "layers/00-vda",
                          "layers/01-vda.s1", "layers/02-vda.s2", "dirty/ck1"))
            truth = dom.record("vda", str(tmp_path / "vda.raw"))

            # 2. The copied layers are a chain that reads as the disk, and boots.
            out = sh(copy_blk, boot_blk)
            assert "Images are identical." in out, out
            assert "running" in out.split(), out
            top = os.path.join(backup, "layers", "02-vda.s2.qcow2")
            restored = TestDomain(conn, conn.lookupByName(restored_name), [])
            assert restored.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
            assert restored.source("vda") == (top, "qcow2")
            # The VM reads the copied chain: its disk is the original's.
            seen = restored.record("vda", str(tmp_path / "restored.raw"))
            assert_identical(seen, truth, "raw")
            restored.destroy()

            chain = info(top, "--backing-chain")
            assert [os.path.basename(i["filename"]) for i in chain] == [
                "02-vda.s2.qcow2", "01-vda.s1.qcow2", "00-vda.qcow2"], chain
            assert [(i.get("backing-filename"), i.get("backing-filename-format")) for i in chain] == [
                ("01-vda.s1.qcow2", "qcow2"), ("00-vda.qcow2", "qcow2"), (None, None)], chain
            for i in chain:
                assert os.path.dirname(i["filename"]) == os.path.dirname(top), chain
                assert_clean(i["filename"])
            assert_identical(top, truth)
        finally:
            sh.umount()
            try:
                other = conn.lookupByName(restored_name)
            except libvirt.libvirtError:
                pass
            else:
                TestDomain(conn, other, []).cleanup()


# -- flow 3: a full backup and incrementals from .qcow2 files ---------------------------------

def test_full_and_incremental_backups_from_qcow2_files(conn, d, tmp_path):
    helper, full_blk, inc2_blk, inc3_blk, restore_blk = walkthrough(DOC)["3"]
    backup = tmp_path / "backup"
    example = 'qemu-img convert -O qcow2 "$BACKUP/vda.3.qcow2" /var/lib/libvirt/images/vda-restored.qcow2'
    assert restore_blk.strip() == example, restore_blk
    disks = [DiskSpec("vda", f"{d}/vda.qcow2", size=48 * MiB),
             DiskSpec("vdb", f"{d}/vdb.qcow2", size=32 * MiB)]
    with TestDomain.define(conn, "q3", disks) as dom:
        sh = Shell(tmp_path / "mnt", backup, dom.name, prelude=helper)
        rec = {}

        def record(point, targets):
            rec[point] = {t: dom.record(t, str(tmp_path / f"{t}.{point}.raw")) for t in targets}

        try:
            dom.start()
            dom.write("vda", 0, 4 * MiB, 0x11)
            dom.write("vdb", 1 * MiB, 2 * MiB, 0x21)
            record(1, ("vda", "vdb"))
            sh(full_blk)

            # A new disk (seed 002), and changes everywhere.
            dom.attach_disk("vdc", f"{d}/vdc.qcow2", size=16 * MiB)
            dom.write("vda", 8 * MiB, 4 * MiB, 0x12)
            dom.write("vdb", 0, 1 * MiB, 0x22)
            dom.write("vdc", 2 * MiB, 2 * MiB, 0x31)
            record(2, ("vda", "vdb", "vdc"))
            out = sh(inc2_blk)
            assert "vdc was attached after checkpoint 'ck1'" in out, out
            for line in ("vda.2.qcow2: incremental", "vdb.2.qcow2: incremental", "vdc.2.qcow2: full"):
                assert line in out.splitlines(), out

            # The guest trims what it wrote since ck1 (seed 001), and writes on.
            dom.zero("vda", 8 * MiB, 4 * MiB)
            dom.write("vda", 16 * MiB, 1 * MiB, 0x13)
            dom.write("vdb", 4 * MiB, 1 * MiB, 0x23)
            dom.write("vdc", 0, 1 * MiB, 0x32)
            record(3, ("vda", "vdb", "vdc"))
            out = sh(inc3_blk)
            for t in ("vda", "vdb", "vdc"):
                assert f"{t}.3.qcow2: incremental" in out.splitlines(), out
        finally:
            sh.umount()

    # Every backup file is a clean qcow2 on the previous one of its disk (a
    # full one on none), named relative to it.
    lower = {("vda", 2): "vda.1.qcow2", ("vda", 3): "vda.2.qcow2", ("vdb", 2): "vdb.1.qcow2",
             ("vdb", 3): "vdb.2.qcow2", ("vdc", 3): "vdc.2.qcow2"}
    for point, disks_then in rec.items():
        for t in disks_then:
            f = backup / f"{t}.{point}.qcow2"
            assert_clean(f)
            i = info(f)
            assert i.get("backing-filename") == lower.get((t, point)), (f, i)
            if (t, point) in lower:
                assert i["backing-filename-format"] == "qcow2", (f, i)

    # Seed 001: the trimmed area is zero clusters in the incremental, and only
    # there; its data is the 1 MiB written since ck2, and the file is little more.
    inc = alone_map(backup / "vda.3.qcow2")
    trimmed = [e for e in inc if 8 * MiB <= e["start"] < 12 * MiB]
    assert total(trimmed, lambda e: True) == 4 * MiB, inc
    assert all(e["present"] and e["zero"] and not e["data"] for e in trimmed), inc
    assert total(inc, lambda e: e["present"] and e["zero"]) == 4 * MiB, inc
    assert total(inc, lambda e: e["data"]) == 1 * MiB, inc
    assert os.path.getsize(backup / "vda.3.qcow2") <= 1 * MiB + 8 * CLUSTER  # metadata: 5 clusters
    # Seed 002: the disk attached after ck1 came in full, on its own.
    assert total(alone_map(backup / "vdc.2.qcow2"), lambda e: e["data"]) == 2 * MiB

    # Every point, every disk: the example restore, for that file.
    for point, disks_then in rec.items():
        for t, truth in disks_then.items():
            out = tmp_path / f"restored-{t}-{point}.qcow2"
            block = example.replace("vda.3", f"{t}.{point}").replace(
                "/var/lib/libvirt/images/vda-restored.qcow2", str(out))
            sh(block)
            assert not info(out).get("backing-filename"), out
            assert_identical(out, truth)
