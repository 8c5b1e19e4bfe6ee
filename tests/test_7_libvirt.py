"""Tier 7: libvirt mode against a real libvirtd and real OS-less VMs.

Ground truth: the disk content recorded at each point (the domain paused,
flushed and converted by qemu-img), nbdinfo on the backup job's own NBD
export, and qemu-img map / nbdinfo on the images of shut-off domains. Every
backup is rebuilt into qcow2 chains from the views and proved with
``qemu-img compare``, as in seed 002.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import time
import xml.etree.ElementTree as ET
from itertools import pairwise
from pathlib import Path

import libvirt
import pytest
from conftest import (
    REPO,
    SNAPFS,
    MiB,
    QemuNBD,
    create,
    data_ranges,
    expected_allocation_map,
    expected_dirty_map,
    json_layer,
    merge_dicts,
    processes,
    qemu_img,
    run,
    seek_walk,
)
from libvirt_env import DiskSpec, E, NetworkDiskSpec, TestDomain, new_image_dir, to_xml

from snapfs.runtime import find_mount, pid_alive

URI = "qemu:///system"


def lv_mount(mount, dom, *extra, name="mnt"):
    return mount(["--connect", URI, "--domain", dom.name], *extra, name=name)


def maps(path):
    with open(path[:-4] + ".map.json") as f:
        return json.load(f)


def xattr(path, name):
    return os.getxattr(path, f"user.snapfs.{name}").decode()


def job_socket(dom):
    root = ET.fromstring(dom.dom.backupGetXMLDesc(0))
    return root.find("server").get("socket")


def nbd_runs(dom, export, context):
    uri = f"nbd+unix:///{export}?socket={job_socket(dom)}"
    out = run("nbdinfo", "--json", f"--map={context}", uri).stdout
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]


def zip_maps(a, b):
    """Pairs of flags over the union of both run lists' boundaries."""
    cuts = sorted({s for s, _, _ in a} | {s + n for s, n, _ in a} | {s for s, _, _ in b}
                  | {s + n for s, n, _ in b})
    for lo, hi in pairwise(cuts):
        fa = next(t for s, n, t in a if s <= lo < s + n)
        fb = next(t for s, n, t in b if s <= lo < s + n)
        yield lo, hi - lo, fa, fb


def job_chain_map(dom, export):
    runs = nbd_runs(dom, export, "base:allocation")
    return merge_dicts([{"start": s, "length": n, "zero": bool(t & 2), "hole": bool(t & 1)}
                        for s, n, t in runs], ("zero", "hole"))


def job_dirty_map(dom, export, bitmap):
    dirty = nbd_runs(dom, export, f"qemu:dirty-bitmap:{bitmap}")
    alloc = nbd_runs(dom, export, "base:allocation")
    return merge_dicts([{"start": s, "length": n, "dirty": bool(fd & 1), "zero": bool(fa & 2)}
                        for s, n, fd, fa in zip_maps(dirty, alloc)], ("dirty", "zero"))


def job_full_map(dom, export):
    """A full dirty view: every area dirty, zero status from the job's export."""
    runs = nbd_runs(dom, export, "base:allocation")
    return merge_dicts([{"start": s, "length": n, "dirty": True, "zero": bool(t & 2)}
                        for s, n, t in runs], ("dirty", "zero"))


def backup_from_dirty(view, out, size):
    """Seed 002's copy: a qcow2 holding the view's dirty areas, zeroed ones as zero clusters."""
    create(out, size)
    qemu_img("rebase", "-u", "-F", "raw", "-b", view, out)
    cmds = []
    for e in maps(view):
        if e["dirty"]:
            cmds.append(f"write -z {e['start']} {e['length']}" if e["zero"]
                        else f"read {e['start']} {e['length']}")
    for i in range(0, len(cmds), 100):
        args = []
        for c in cmds[i:i + 100]:
            args += ["-c", c]
        run("qemu-io", "-C", "-f", "qcow2", *args, out)
    qemu_img("rebase", "-u", "-b", "", out)
    return out


def chain_onto(upper, lower):
    qemu_img("rebase", "-u", "-F", "qcow2", "-b", lower, upper)


def identical(a, b, fa="qcow2", fb="raw"):
    r = run("qemu-img", "compare", "-f", fa, "-F", fb, a, b, check=False)
    assert r.returncode == 0, f"{a} differs from {b}: {r.stdout}{r.stderr}"


def check_running_view_against_job(dom, view, export):
    """A running domain's current view: map = the job's export, SEEK agrees."""
    assert maps(view) == job_chain_map(dom, export)
    assert seek_walk(view) == data_ranges(maps(view), lambda e: not e["zero"])


# -- seed 002: full, new disk, incrementals, every point rebuilt ------------------------


def test_seed_002_backups_with_a_disk_added_later(conn, d, mount, tmp_path):
    sizes = {"vda": 64 * MiB, "vdb": 32 * MiB, "vdc": 48 * MiB}
    disks = [DiskSpec(t, f"{d}/{t}.qcow2", size=sizes[t]) for t in ("vda", "vdb")]
    with TestDomain.define(conn, "seed2", disks) as dom:
        dom.start()
        dom.write("vda", 0, 4 * MiB, 0x11)
        dom.write("vda", 20 * MiB, 1 * MiB, 0x12)
        dom.write("vdb", 0, 2 * MiB, 0x21)
        rec = {0: {t: dom.record(t, str(tmp_path / f"{t}.0.raw")) for t in ("vda", "vdb")}}

        # Round 1: full backup, checkpoint ck1 made with it.
        m = lv_mount(mount, dom, "--checkpoint", "ck1", name="m1")
        backups = {}
        for t in ("vda", "vdb"):
            view = m / f"{dom.name}/{t}/chain/current.raw"
            check_running_view_against_job(dom, view, t)
            identical(view, rec[0][t], fa="raw")
            backups[t] = [str(tmp_path / f"{t}.full.qcow2")]
            qemu_img("convert", "-f", "raw", "-O", "qcow2", view, backups[t][0])
            assert os.listdir(m / f"{dom.name}/{t}/dirty") == []
        assert "checkpoint 'ck1' created" in m.status()
        m.close()
        assert [c.getName() for c in dom.dom.listAllCheckpoints()] == ["ck1"]

        # A disk is attached after ck1; every disk changes, one area is zeroed.
        dom.attach_disk("vdc", f"{d}/vdc.qcow2", size=sizes["vdc"])
        dom.write("vda", 8 * MiB, 1 * MiB, 0x13)
        dom.zero("vda", 20 * MiB, 1 * MiB)
        dom.write("vdb", 1 * MiB, 1 * MiB, 0x22)
        dom.write("vdc", 0, 3 * MiB, 0x31)
        rec[1] = {t: dom.record(t, str(tmp_path / f"{t}.1.raw")) for t in sizes}

        # Round 2: incremental from ck1; vdc has no bitmap for it -> full.
        m = lv_mount(mount, dom, "--since", "ck1", "--checkpoint", "ck2", name="m2")
        for t in sizes:
            view = m / f"{dom.name}/{t}/dirty/ck1.raw"
            assert xattr(view, "view") == "dirty"
            assert xattr(view, "bitmap") == "ck1"
            identical(m / f"{dom.name}/{t}/chain/current.raw", rec[1][t], fa="raw")
            if t == "vdc":
                assert xattr(view, "backupmode") == "full"
                assert maps(view) == job_full_map(dom, t)
                backups[t] = [backup_from_dirty(view, str(tmp_path / "vdc.full.qcow2"), sizes[t])]
            else:
                assert xattr(view, "backupmode") == "incremental"
                assert maps(view) == job_dirty_map(dom, t, f"backup-{t}")
                backups[t].append(backup_from_dirty(view, str(tmp_path / f"{t}.inc1.qcow2"), sizes[t]))
        status = m.status()
        assert f"{dom.name}/vdc/dirty/ck1.raw: full: disk vdc was attached after checkpoint 'ck1'" in status
        # The zeroed area is dirty and zero: it moves no data.
        za = [e for e in maps(m / f"{dom.name}/vda/dirty/ck1.raw")
              if e["start"] <= 20 * MiB < e["start"] + e["length"]]
        assert za[0]["dirty"] and za[0]["zero"]
        m.close()

        dom.write("vda", 16 * MiB, 1 * MiB, 0x14)
        dom.write("vdb", 0, 1 * MiB, 0x23)
        dom.write("vdc", 1 * MiB, 1 * MiB, 0x32)
        rec[2] = {t: dom.record(t, str(tmp_path / f"{t}.2.raw")) for t in sizes}

        # Round 3: incremental from ck2 for every disk, vdc included.
        m = lv_mount(mount, dom, "--since", "ck2", name="m3")
        for t in sizes:
            view = m / f"{dom.name}/{t}/dirty/ck2.raw"
            assert xattr(view, "backupmode") == "incremental"
            assert maps(view) == job_dirty_map(dom, t, f"backup-{t}")
            backups[t].append(backup_from_dirty(view, str(tmp_path / f"{t}.inc2.qcow2"), sizes[t]))
        # The older checkpoint is one refresh away.
        assert f"snapfs refresh MOUNTPOINT {dom.name} --since ck1" in m.status()
        m.close()

    # Rebuild every point in time and compare it with what the disk held then.
    for t in ("vda", "vdb"):
        full, inc1, inc2 = backups[t]
        chain_onto(inc1, full)
        chain_onto(inc2, inc1)
        identical(full, rec[0][t])
        identical(inc1, rec[1][t])
        identical(inc2, rec[2][t])
    full, inc2 = backups["vdc"]
    chain_onto(inc2, full)
    identical(full, rec[1]["vdc"])
    identical(inc2, rec[2]["vdc"])


# -- seed 001: a trimmed area is dirty and zero, and moves no data -------------------------


def test_seed_001_zeroed_area_moves_no_data(conn, d, mount, tmp_path):
    size = 128 * MiB
    with TestDomain.define(conn, "seed1", [DiskSpec("vda", f"{d}/vda.qcow2", size=size)]) as dom:
        dom.start()
        dom.write("vda", 0, 64 * MiB, 0x5a)
        m = lv_mount(mount, dom, "--checkpoint", "ck1", name="m1")
        full = str(tmp_path / "full.qcow2")
        qemu_img("convert", "-f", "raw", "-O", "qcow2", m / f"{dom.name}/vda/chain/current.raw", full)
        m.close()
        dom.zero("vda", 0, 64 * MiB)
        rec = dom.record("vda", str(tmp_path / "after.raw"))

        m = lv_mount(mount, dom, name="m2")  # --since defaults to the newest checkpoint
        view = m / f"{dom.name}/vda/dirty/ck1.raw"
        assert maps(view) == job_dirty_map(dom, "vda", "backup-vda")
        assert maps(view)[0] == {"start": 0, "length": 64 * MiB, "dirty": True, "zero": True}
        # Dirty and zero is data (it must overwrite the old data on restore).
        assert seek_walk(view) == [(0, 64 * MiB)]
        inc = backup_from_dirty(view, str(tmp_path / "inc.qcow2"), size)
        m.close()
    # The incremental holds zero clusters only: no data moved.
    assert all(not e["data"] for e in json.loads(qemu_img("map", "--output=json", inc).stdout))
    assert os.path.getsize(inc) < 2 * MiB
    chain_onto(inc, full)
    identical(inc, rec)


# -- seed 004: checkpoints and bitmaps disagree ---------------------------------------------


def test_seed_004_missing_bitmap_falls_back_to_full(conn, d, mount, tmp_path):
    disks = [DiskSpec(t, f"{d}/{t}.qcow2", size=32 * MiB) for t in ("vda", "vdb")]
    with TestDomain.define(conn, "seed4", disks) as dom:
        dom.start()
        dom.write("vda", 0, 1 * MiB, 0x41)
        dom.write("vdb", 0, 1 * MiB, 0x42)
        dom.checkpoint("ck1")
        dom.write("vda", 4 * MiB, 1 * MiB, 0x43)
        dom.write("vdb", 4 * MiB, 1 * MiB, 0x44)
        dom.destroy()

        # Behind libvirt's back: vdb loses ck1, vda gains a bitmap nobody knows.
        qemu_img("bitmap", "--remove", f"{d}/vdb.qcow2", "ck1")
        qemu_img("bitmap", "--add", f"{d}/vda.qcow2", "stray")

        m = lv_mount(mount, dom, name="off")
        vda, vdb = (m / f"{dom.name}/{t}/dirty/ck1.raw" for t in ("vda", "vdb"))
        assert xattr(vda, "backupmode") == "incremental"
        assert maps(vda) == expected_dirty_map(tmp_path, f"{d}/vda.qcow2", "ck1")
        assert xattr(vdb, "backupmode") == "full"
        assert maps(vdb) == [{"start": e["start"], "length": e["length"], "dirty": True, "zero": e["zero"]}
                             for e in expected_allocation_map(f"{d}/vdb.qcow2", False)]
        identical(vdb, f"{d}/vdb.qcow2", fa="raw", fb="qcow2")
        status = m.status()
        assert f"vdb/dirty/ck1.raw: full: bitmap 'ck1' is missing from the top image {d}/vdb.qcow2" in status
        assert "holds bitmap 'stray', which no checkpoint" in status
        # Nothing else changed: every other view is there.
        for t in ("vda", "vdb"):
            assert os.path.exists(m / f"{dom.name}/{t}/chain/current.raw")
            assert os.path.exists(m / f"{dom.name}/{t}/layers/00-{t}.raw")
        m.close()

        # Running: libvirt itself refuses the incremental of vdb; snapfs
        # falls back to full for that disk only.
        dom.start()
        m = lv_mount(mount, dom, name="on")
        vda, vdb = (m / f"{dom.name}/{t}/dirty/ck1.raw" for t in ("vda", "vdb"))
        assert xattr(vda, "backupmode") == "incremental"
        assert maps(vda) == job_dirty_map(dom, "vda", "backup-vda")
        assert xattr(vdb, "backupmode") == "full"
        assert maps(vdb) == job_full_map(dom, "vdb")
        assert "vdb/dirty/ck1.raw: full: libvirt refused an incremental backup of vdb" in m.status()
        m.close()


# -- the definition travels with the disks: seed 004's restore on another host ----------------


def definition_blocks():
    """docs/libvirt.md's two blocks: save the definition files, define the domain again."""
    with open(os.path.join(REPO, "docs", "libvirt.md")) as f:
        text = f.read()
    section = text[text.index("## Define the domain again"):]
    section = section[:section.index("\n## ", 1)]
    save, define = re.findall(r"```sh\n(.*?)```", section, re.S)
    return save, define


def sh(block, **env):
    r = run("bash", "-euo", "pipefail", "-c", block, check=False,
            env=dict(os.environ, LIBVIRT_DEFAULT_URI=URI, **{k: str(v) for k, v in env.items()}))
    assert r.returncode == 0, f"{block}\n{r.stdout}{r.stderr}"


def definition_files(m, dom):
    """{name: content} of the domain's files (domain.xml, checkpoint-*.xml); its
    directories are its disks'."""
    top = Path(m / dom.name)
    assert sorted(p.name for p in top.iterdir() if p.is_dir()) == ["vda", "vdb"]
    return {p.name: p.read_bytes() for p in sorted(top.iterdir()) if not p.is_dir()}


def test_definition_and_checkpoints_restore_with_the_disks(conn, d, mount, tmp_path):
    disks = [DiskSpec(t, f"{d}/{t}.qcow2", size=32 * MiB) for t in ("vda", "vdb")]
    saved = tmp_path / "saved"
    save, define = definition_blocks()
    with TestDomain.define(conn, "defs", disks) as dom:
        dom.start()
        dom.write("vda", 0, 1 * MiB, 0x41)
        dom.write("vdb", 0, 1 * MiB, 0x42)
        rec = [{t: dom.record(t, str(tmp_path / f"{t}.0.raw")) for t in ("vda", "vdb")}]

        # Full backup with ck1: the files say what libvirt says, read-only,
        # with the disks' owner and mode; ck1, made by the job, is among them.
        m = lv_mount(mount, dom, "--checkpoint", "ck1", name="m1")
        files = definition_files(m, dom)
        assert files == {
            "domain.xml": dom.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode(),
            "checkpoint-00.xml": dom.dom.checkpointLookupByName("ck1").getXMLDesc(
                libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN).encode()}
        view = os.stat(m / f"{dom.name}/vda/chain/current.raw")
        for name in files:
            st = os.stat(Path(m / dom.name) / name)
            assert (st.st_uid, st.st_gid, st.st_mode) == (view.st_uid, view.st_gid, view.st_mode), name
            with pytest.raises(OSError) as e:
                open(Path(m / dom.name) / name, "r+b")
            assert e.value.errno in (errno.EROFS, errno.EACCES)
        backups = {}
        for t in ("vda", "vdb"):
            backups[t] = [str(tmp_path / f"{t}.full.qcow2")]
            qemu_img("convert", "-f", "raw", "-O", "qcow2", m / f"{dom.name}/{t}/chain/current.raw",
                     backups[t][0])
        m.close()

        # Incremental since ck1, with ck2: both checkpoints saved, parent first.
        dom.write("vda", 4 * MiB, 1 * MiB, 0x43)
        dom.write("vdb", 8 * MiB, 2 * MiB, 0x44)
        rec.append({t: dom.record(t, str(tmp_path / f"{t}.1.raw")) for t in ("vda", "vdb")})
        m = lv_mount(mount, dom, "--since", "ck1", "--checkpoint", "ck2", name="m2")
        for t in ("vda", "vdb"):
            view = m / f"{dom.name}/{t}/dirty/ck1.raw"
            assert xattr(view, "backupmode") == "incremental"
            backups[t].append(backup_from_dirty(view, str(tmp_path / f"{t}.inc1.qcow2"), 32 * MiB))
        files = definition_files(m, dom)
        assert sorted(files) == ["checkpoint-00.xml", "checkpoint-01.xml", "domain.xml"]
        assert b"<name>ck1</name>" in files["checkpoint-00.xml"] and b"<name>ck2</name>" in files["checkpoint-01.xml"]
        sh(save, MNT=m.path, DOMAIN=dom.name, SAVED=saved)
        assert {p.name: p.read_bytes() for p in saved.iterdir()} == files
        m.close()
        dom.write("vda", 12 * MiB, 1 * MiB, 0x45)
        rec.append({t: dom.record(t, str(tmp_path / f"{t}.2.raw")) for t in ("vda", "vdb")})

        # The domain goes (its checkpoint metadata with it; the bitmaps stay in
        # the images) and comes back from the saved files, as on another host.
        dom.destroy()
        dom.dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
        sh(define, DOMAIN=dom.name, SAVED=saved)
        dom.dom = conn.lookupByName(dom.name)
        assert [c.getName() for c in dom.dom.listAllCheckpoints(
            libvirt.VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL)] == ["ck1", "ck2"]

        # The next incremental since ck2 is incremental, and exact.
        dom.start()
        m = lv_mount(mount, dom, name="m3")
        for t in ("vda", "vdb"):
            view = m / f"{dom.name}/{t}/dirty/ck2.raw"
            assert xattr(view, "backupmode") == "incremental"
            assert maps(view) == job_dirty_map(dom, t, f"backup-{t}")
            backups[t].append(backup_from_dirty(view, str(tmp_path / f"{t}.inc2.qcow2"), 32 * MiB))
        assert [(e["start"], e["length"]) for e in maps(m / f"{dom.name}/vda/dirty/ck2.raw")
                if e["dirty"]] == [(12 * MiB, 1 * MiB)]
        assert not any(e["dirty"] for e in maps(m / f"{dom.name}/vdb/dirty/ck2.raw"))
        m.close()

        # A checkpoint whose bitmap is gone from a disk: that disk's view is full, with the reason.
        dom.destroy()
        qemu_img("bitmap", "--remove", f"{d}/vdb.qcow2", "ck2")
        # The definition is for whoever may read every disk: here, vdb's readers.
        os.chmod(f"{d}/vda.qcow2", 0o644)
        os.chmod(f"{d}/vdb.qcow2", 0o600)
        m = lv_mount(mount, dom, name="m4")
        modes = {t: os.stat(m / f"{dom.name}/{t}/chain/current.raw").st_mode & 0o777 for t in ("vda", "vdb")}
        assert modes["vda"] != modes["vdb"], modes
        for name in ("domain.xml", "checkpoint-00.xml", "checkpoint-01.xml"):
            assert os.stat(Path(m / dom.name) / name).st_mode & 0o777 == modes["vda"] & modes["vdb"], name
        assert xattr(m / f"{dom.name}/vda/dirty/ck2.raw", "backupmode") == "incremental"
        assert xattr(m / f"{dom.name}/vdb/dirty/ck2.raw", "backupmode") == "full"
        assert (f"{dom.name}/vdb/dirty/ck2.raw: full: bitmap 'ck2' is missing from the top image "
                f"{d}/vdb.qcow2") in m.status()
        m.close()

    for t in ("vda", "vdb"):
        full, inc1, inc2 = backups[t]
        chain_onto(inc1, full)
        chain_onto(inc2, inc1)
        for image, truth in zip((full, inc1, inc2), rec, strict=True):
            identical(image, truth[t])


def test_a_disk_no_one_can_read_keeps_the_definition_from_everyone(conn, d, mount):
    # vdb's image is missing: it has no view, and grants nothing.
    disks = [DiskSpec("vda", f"{d}/vda.qcow2", size=4 * MiB), DiskSpec("vdb", f"{d}/gone.qcow2")]
    with TestDomain.define(conn, "unread", disks) as dom:
        m = lv_mount(mount, dom)
        assert os.stat(m / f"{dom.name}/vda/chain/current.raw").st_mode & 0o444
        assert os.listdir(m / f"{dom.name}/vdb/chain") == []
        assert os.stat(Path(m / dom.name) / "domain.xml").st_mode & 0o777 == 0


def test_a_domain_with_no_disk_served_keeps_its_definition_to_the_mounting_user(conn, d, mount):
    # A network disk is not served (its status says why): no image tells who may read.
    with TestDomain.define(conn, "nodisk", [NetworkDiskSpec("vda", "export")]) as dom:
        top = Path(lv_mount(mount, dom) / dom.name)
        st = os.stat(top / "domain.xml")
        assert (st.st_uid, st.st_mode & 0o777) == (os.getuid(), 0o400)
        assert (top / "domain.xml").read_bytes() == dom.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode()
        assert sorted(os.listdir(top)) == ["domain.xml"]


# -- snapshot names, a branch, and reading backing layers of a running domain ---------------


def test_snapshot_names_and_a_branch(conn, d, mount, tmp_path):
    size = 32 * MiB
    base = f"{d}/vda.qcow2"
    with TestDomain.define(conn, "snap", [DiskSpec("vda", base, size=size)]) as dom:
        dom.start()
        dom.write("vda", 0, 2 * MiB, 0x61)
        rec_s1 = dom.record("vda", str(tmp_path / "s1.raw"))
        dom.snapshot_external("s1", {"vda": f"{d}/vda.s1"})
        dom.write("vda", 2 * MiB, 2 * MiB, 0x62)
        dom.zero("vda", 0, 1 * MiB)
        rec_s2 = dom.record("vda", str(tmp_path / "s2.raw"))
        dom.snapshot_external("s2", {"vda": f"{d}/vda.s2"})
        dom.write("vda", 8 * MiB, 1 * MiB, 0x63)
        rec_s3 = dom.record("vda", str(tmp_path / "s3.raw"))
        dom.snapshot_external("s3", {"vda": f"{d}/vda.s3"})

        # Running: the snapshots' images are backing files, read as usual.
        m = lv_mount(mount, dom, name="running")
        chain = m / f"{dom.name}/vda/chain"
        assert sorted(os.listdir(chain)) == sorted(f"{stem}{ext}" for stem in ("00-s1", "01-s2", "02-s3", "current")
                                                   for ext in (".map.json", ".qcow2", ".raw"))
        identical(f"{chain}/01-s2.raw", rec_s2, fa="raw")
        assert "layers/03-vda.s3.raw: the active layer of a running domain" in m.status()
        m.close()
        dom.destroy()

        # A revert to s2 by hand (libvirt 9.0 has no external revert): a new
        # overlay on s2's image; the old branch stays known through s3.
        branch = create(f"{d}/vda.b", backing=f"{d}/vda.s1")
        dom.made.append(branch)
        xml = dom.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        conn.defineXML(xml.replace(f"{d}/vda.s3", branch))
        dom.start()
        dom.write("vda", 12 * MiB, 1 * MiB, 0x64)
        rec_now = dom.record("vda", str(tmp_path / "now.raw"))
        dom.destroy()
        before = {p: os.stat(p).st_mtime_ns for p in (base, f"{d}/vda.s1", f"{d}/vda.s2", branch)}

        m = lv_mount(mount, dom, name="off")
        root = m / f"{dom.name}/vda"
        assert sorted(f for f in os.listdir(f"{root}/layers") if f.endswith(".raw")) == [
            "00-vda.raw", "01-vda.s1.raw", "02-vda.b.raw", "02-vda.s2.raw"]
        for name, rec, top in (("00-s1", rec_s1, base), ("01-s2", rec_s2, f"{d}/vda.s1"),
                               ("02-s3", rec_s3, f"{d}/vda.s2"), ("current", rec_now, branch)):
            view = f"{root}/chain/{name}.raw"
            assert xattr(view, "image") == top
            assert maps(view) == expected_allocation_map(top, top != base)
            identical(view, rec, fa="raw")
        for name, img in (("00-vda", base), ("01-vda.s1", f"{d}/vda.s1"), ("02-vda.s2", f"{d}/vda.s2"),
                          ("02-vda.b", branch)):
            view = f"{root}/layers/{name}.raw"
            assert maps(view) == expected_allocation_map(json_layer(img), img != base)
        for n in os.listdir(f"{root}/chain"):
            with open(f"{root}/chain/{n}", "rb") as f:
                while f.read(4 * MiB):
                    pass
        m.close()
        # An image other chains use is never written.
        assert before == {p: os.stat(p).st_mtime_ns for p in before}


# -- disks snapfs does not serve ---------------------------------------------------------


class BlockDisk:
    """A raw disk on a block device (a loop device here)."""

    def __init__(self, target, dev):
        self.target, self.dev = target, dev

    def element(self):
        return E("disk", E("driver", name="qemu", type="raw"), E("source", dev=self.dev),
                 E("target", dev=self.target, bus="virtio"), type="block", device="disk")

    def xml(self):
        return to_xml(self.element())


@pytest.fixture
def loop_device(d):
    img = create(f"{d}/block.raw", 8 * MiB, fmt="raw")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x77 1M 1M", img)
    dev = run("losetup", "--find", "--show", img).stdout.strip()
    yield dev, img
    run("losetup", "-d", dev, check=False)


def test_cdrom_network_and_empty_disks_are_listed(conn, d, mount, loop_device):
    dev, img = loop_device
    disks = [DiskSpec("vda", f"{d}/vda.qcow2", size=16 * MiB),
             DiskSpec("hdc", None, device="cdrom"),
             DiskSpec("hdd", create(f"{d}/cd.raw", 1 * MiB, fmt="raw"), fmt="raw", device="cdrom"),
             NetworkDiskSpec("vdz", "export"),
             BlockDisk("vdb", dev)]
    with TestDomain.define(conn, "odd", disks) as dom:
        m = lv_mount(mount, dom)
        status = m.status()
        assert f"{dom.name}/hdc: a cdrom device, not a disk" in status
        assert f"{dom.name}/hdd: a cdrom device, not a disk" in status
        assert f"{dom.name}/vdz: a network disk" in status
        assert sorted(os.listdir(m / dom.name)) == ["domain.xml", "vda", "vdb"]
        assert sorted(os.listdir(m / f"{dom.name}/vda/chain")) == ["current.map.json", "current.qcow2",
                                                                   "current.raw"]
        # A raw disk on a block device is served like a raw file.
        view = m / f"{dom.name}/vdb/chain/current.raw"
        assert os.path.getsize(view) == 8 * MiB
        assert xattr(view, "image") == dev and xattr(view, "format") == "raw"
        identical(view, img, fa="raw")
        m.close()


# -- the backup job's life ------------------------------------------------------------------


@pytest.mark.log_allows(r"aborting a backup job left by a snapfs that is gone")
def test_refresh_and_a_job_left_by_a_crash(conn, d, mount, tmp_path):
    with TestDomain.define(conn, "job", [DiskSpec("vda", f"{d}/vda.qcow2", size=16 * MiB)]) as dom:
        dom.start()
        dom.write("vda", 0, 1 * MiB, 0x71)
        m = lv_mount(mount, dom, "--checkpoint", "ck1", name="m1")
        view = m / f"{dom.name}/vda/chain/current.raw"
        rec = dom.record("vda", str(tmp_path / "a.raw"))
        identical(view, rec, fa="raw")

        # The job holds its point in time while the guest writes on.
        dom.write("vda", 2 * MiB, 1 * MiB, 0x72)
        identical(view, rec, fa="raw")
        rec2 = dom.record("vda", str(tmp_path / "b.raw"))
        with open(view, "rb") as busy:
            r = run(*SNAPFS, "refresh", m.path, dom.name, check=False, cwd=REPO)
            assert r.returncode != 0 and "open" in r.stderr
            busy.read(1)
        r = run(*SNAPFS, "refresh", m.path, dom.name, check=False, cwd=REPO)
        assert "new point in time" in r.stdout, r.stderr
        identical(view, rec2, fa="raw")
        dirty = m / f"{dom.name}/vda/dirty/ck1.raw"
        assert maps(dirty) == job_dirty_map(dom, "vda", "backup-vda")
        assert any(e["dirty"] and e["start"] <= 2 * MiB < e["start"] + e["length"] for e in maps(dirty))

        # A snapfs killed with SIGKILL leaves its job; the next mount aborts it.
        os.kill(m.pid, signal.SIGKILL)
        run("fusermount3", "-uz", m.path, check=False)
        deadline = time.monotonic() + 10
        while os.path.ismount(m.path) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert job_socket(dom)  # the job is still there
        m2 = lv_mount(mount, dom, name="m2")
        assert "aborting a backup job left by a snapfs that is gone" in m2.log
        identical(m2 / f"{dom.name}/vda/chain/current.raw", rec2, fa="raw")
        m2.close()
        # Unmounting ended the job.
        with pytest.raises(libvirt.libvirtError):
            job_socket(dom)

        # After a SIGKILL, snapfs umount ends the job too.
        m4 = lv_mount(mount, dom, name="m4")
        os.kill(m4.pid, signal.SIGKILL)
        assert job_socket(dom)
        run(*SNAPFS, "umount", m4.path, cwd=REPO)
        with pytest.raises(libvirt.libvirtError):
            job_socket(dom)

        # A job snapfs did not start is left alone, and said so.
        jobdir = new_image_dir("foreign", qemu_owned=True)
        dom.dom.backupBegin(to_xml(E(
            "domainbackup",
            E("server", transport="unix", socket=f"{jobdir}/s"),
            E("disks", E("disk", E("scratch", file=f"{jobdir}/x"), name="vda", backup="yes", type="file")),
            mode="pull")), None, 0)
        m3 = lv_mount(mount, dom, name="m3")
        assert "already has a backup job that snapfs did not start" in m3.status()
        assert not os.path.exists(m3 / f"{dom.name}/vda/chain/current.raw")
        m3.close()
        assert job_socket(dom) == f"{jobdir}/s"
        dom.abort_job()


def test_clear_errors(conn, d, tmp_path):
    mp = tmp_path / "mnt"
    mp.mkdir()
    with TestDomain.define(conn, "err", [DiskSpec("vda", f"{d}/vda.qcow2", size=16 * MiB)]) as dom:
        dom.start()
        cases = [
            (["--connect", URI, "--domain", "no-such-domain"], "no domain 'no-such-domain'"),
            (["--connect", "qemu:///nonsense"], "cannot connect to qemu:///nonsense"),
            (["--connect", URI, "--domain", dom.name, "--since", "nope"],
             f"domain {dom.name} has no checkpoint 'nope' (it has: none)"),
            (["--images", str(d), "--since", "x"], "--domain, --since and --checkpoint go with --connect"),
        ]
        for args, msg in cases:
            r = run(*SNAPFS, "mount", *args, mp, check=False, cwd=REPO)
            assert r.returncode != 0
            assert msg in r.stderr, r.stderr
            assert "Traceback" not in r.stderr
            assert not os.path.ismount(mp)
        # A failed mount leaves no backup job behind.
        with pytest.raises(libvirt.libvirtError):
            job_socket(dom)
        # --connect without a URI, right before the mount point: qemu:///system.
        run(*SNAPFS, "mount", "--connect", mp, "--domain", dom.name, cwd=REPO)
        try:
            assert sorted(os.listdir(mp / dom.name / "vda" / "chain")) == ["current.map.json", "current.qcow2",
                                                                           "current.raw"]
        finally:
            run(*SNAPFS, "umount", mp, cwd=REPO)


def test_refresh_keeps_what_other_domains_share(conn, d, mount, tmp_path):
    """Two domains on one base image: refreshing one leaves the other's open files alone."""
    base = create(f"{d}/base.qcow2", 16 * MiB)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x81 0 4M", base)
    tops = {n: create(f"{d}/{n}.qcow2", backing=base) for n in ("a", "b")}
    with TestDomain.define(conn, "sha", [DiskSpec("vda", tops["a"])]) as a, \
            TestDomain.define(conn, "shb", [DiskSpec("vda", tops["b"])]) as b:
        a.made.append(tops["a"])
        b.made.append(tops["b"])
        a.start()
        m = mount(["--connect", URI, "--domain", a.name, "--domain", b.name])
        shared = m / f"{b.name}/vda/layers/00-base.raw"
        with open(shared, "rb") as f:
            first = f.read(2 * MiB)
            server = base_servers(base)
            assert len(server) == 1
            r = run(*SNAPFS, "refresh", m.path, a.name, check=False, cwd=REPO)
            assert r.returncode == 0, r.stderr
            assert base_servers(base) == server  # the same qemu-nbd serves on
            rest = f.read()
        truth = tmp_path / "base.raw"
        qemu_img("convert", "-U", "-O", "raw", base, truth)
        assert first + rest == truth.read_bytes()
        m.close()


def base_servers(path):
    """pids of qemu-nbd serving ``path`` alone."""
    out = []
    for pid, cmd in processes().items():
        if os.path.basename(cmd[0]) == "qemu-nbd" and any(
                a.startswith("json:") and path in a and '"backing": null' in a for a in cmd):
            out.append(int(pid))
    return sorted(out)


def test_umount_after_a_domain_started_meanwhile(conn, d, mount):
    """qemu's mount namespace holds a copy of the mount: unmounting must still end snapfs."""
    with TestDomain.define(conn, "ns", [DiskSpec("vda", f"{d}/vda.qcow2", size=16 * MiB)]) as dom:
        m = lv_mount(mount, dom, "--idle-timeout", "0")
        with open(m / f"{dom.name}/vda/chain/current.raw", "rb") as f:
            f.read(1)
        # The domain starts once snapfs's qemu-nbd has let go of the image.
        deadline = time.monotonic() + 10
        while True:
            try:
                dom.start()
                break
            except libvirt.libvirtError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        pid = m.pid
        r = run(*SNAPFS, "umount", m.path, cwd=REPO)
        assert "did not exit" not in r.stderr
        assert not pid_alive(pid)


def test_union_of_bitmap_copies_equals_libvirts_own_backup(conn, d, mount, tmp_path):
    """A checkpoint older than a snapshot: its bitmap lives in both layers.

    Running, libvirt's backup merges the copies; shut off, snapfs reads each
    copy and takes the union. Both must give the same map.
    """
    with TestDomain.define(conn, "union", [DiskSpec("vda", f"{d}/vda.qcow2", size=32 * MiB)]) as dom:
        dom.start()
        dom.write("vda", 0, 2 * MiB, 0x91)
        dom.checkpoint("ck1")
        dom.write("vda", 4 * MiB, 1 * MiB, 0x92)
        dom.snapshot_external("s1", {"vda": f"{d}/vda.s1"})
        dom.write("vda", 8 * MiB, 1 * MiB, 0x93)
        dom.zero("vda", 0, 1 * MiB)
        rec = dom.record("vda", str(tmp_path / "now.raw"))

        m = lv_mount(mount, dom, name="running")
        running = maps(m / f"{dom.name}/vda/dirty/ck1.raw")
        assert running == job_dirty_map(dom, "vda", "backup-vda")
        m.close()
        dom.destroy()

        # Both images hold a copy of ck1; neither alone has every change.
        for img in (f"{d}/vda.qcow2", f"{d}/vda.s1"):
            assert "ck1" in qemu_img("info", "-U", img).stdout

        m = lv_mount(mount, dom, name="off")
        view = m / f"{dom.name}/vda/dirty/ck1.raw"
        assert xattr(view, "backupmode") == "incremental"
        assert maps(view) == running
        for off in (4 * MiB, 8 * MiB, 0):
            assert any(e["dirty"] and e["start"] <= off < e["start"] + e["length"] for e in running)
        # Content: the disk where dirty, zeros elsewhere.
        with open(view, "rb") as f:
            got = f.read()
        with open(rec, "rb") as f:
            disk = f.read()
        for e in running:
            part = got[e["start"]:e["start"] + e["length"]]
            assert part == (disk[e["start"]:e["start"] + e["length"]] if e["dirty"] else bytes(e["length"]))
        m.close()


def test_running_domain_with_a_private_xdg_runtime_dir(conn, d, mount, tmp_path, monkeypatch):
    """$XDG_RUNTIME_DIR is 0700: a libvirt mount keeps its runtime files where qemu can reach them."""
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    with TestDomain.define(conn, "xdg", [DiskSpec("vda", f"{d}/vda.qcow2", size=16 * MiB)]) as dom:
        dom.start()
        dom.write("vda", 0, 1 * MiB, 0xa5)
        rec = dom.record("vda", str(tmp_path / "rec.raw"))
        m = lv_mount(mount, dom)
        identical(m / f"{dom.name}/vda/chain/current.raw", rec, fa="raw")
        assert job_socket(dom).startswith(f"/tmp/snapfs-{os.getuid()}/")
        m.close()
        with pytest.raises(libvirt.libvirtError):
            job_socket(dom)


def test_internal_snapshot(conn, d, mount, tmp_path):
    """virt-manager's kind: a snapshot inside the qcow2 image, served with --load-snapshot."""
    img = f"{d}/vda.qcow2"
    with TestDomain.define(conn, "int", [DiskSpec("vda", img, size=16 * MiB)]) as dom:
        dom.start()
        dom.write("vda", 0, 2 * MiB, 0xb1)
        dom.destroy()
        then = dom.record("vda", str(tmp_path / "then.raw"))
        dom.dom.snapshotCreateXML("<domainsnapshot><name>before, upgrade</name></domainsnapshot>", 0)
        dom.start()
        dom.write("vda", 1 * MiB, 2 * MiB, 0xb2)
        dom.destroy()
        now = dom.record("vda", str(tmp_path / "now.raw"))

        m = lv_mount(mount, dom)
        chain = m / f"{dom.name}/vda/chain"
        assert sorted(os.listdir(chain)) == ["00-before, upgrade.map.json", "00-before, upgrade.qcow2",
                                             "00-before, upgrade.raw", "current.map.json", "current.qcow2",
                                             "current.raw"]
        view = f"{chain}/00-before, upgrade.raw"
        identical(view, then, fa="raw")
        identical(f"{chain}/current.raw", now, fa="raw")
        # The map is qemu's for the image with the snapshot loaded.
        srv = QemuNBD(tmp_path, json_layer(img), "--allocation-depth", "-l",
                      "snapshot.name=before,, upgrade")
        try:
            runs = [(e["offset"], e["length"], e["type"]) for e in json.loads(
                run("nbdinfo", "--json", "--map", srv.uri).stdout)]
        finally:
            srv.close()
        assert maps(view) == merge_dicts([{"start": s, "length": n, "zero": bool(t & 2), "hole": bool(t & 2)}
                                          for s, n, t in runs], ("zero", "hole"))
        m.close()


def test_running_domain_with_a_cdrom(conn, d, mount, tmp_path):
    """Disks snapfs does not serve stay out of the job and out of new checkpoints."""
    disks = [DiskSpec("vda", f"{d}/vda.qcow2", size=16 * MiB),
             DiskSpec("vdb", create(f"{d}/vdb.raw", 8 * MiB, fmt="raw"), fmt="raw"),
             DiskSpec("hdc", create(f"{d}/cd.raw", 1 * MiB, fmt="raw"), fmt="raw", device="cdrom")]
    with TestDomain.define(conn, "cd", disks) as dom:
        dom.start()
        dom.write("vdb", 0, 1 * MiB, 0xc1)
        rec = dom.record("vdb", str(tmp_path / "vdb.raw"))
        m = lv_mount(mount, dom, "--checkpoint", "ck1")
        assert sorted(os.listdir(m / dom.name)) == ["checkpoint-00.xml", "domain.xml", "vda", "vdb"]
        identical(m / f"{dom.name}/vdb/chain/current.raw", rec, fa="raw")
        exported = {x.get("name"): x.get("backup") for x in
                    ET.fromstring(dom.dom.backupGetXMLDesc(0)).iterfind("disks/disk")}
        assert exported.get("hdc") in (None, "no") and exported["vda"] == exported["vdb"] == "yes"
        m.close()
        cp = ET.fromstring(dom.dom.checkpointLookupByName("ck1").getXMLDesc(0))
        how = {x.get("name"): x.get("checkpoint") for x in cp.iterfind("disks/disk")}
        assert how == {"vda": "bitmap", "vdb": "no", "hdc": "no"}

        # The raw disk has no bitmap: its dirty view since ck1 is full, and says why.
        m = lv_mount(mount, dom, name="m2")
        vdb = m / f"{dom.name}/vdb/dirty/ck1.raw"
        assert xattr(vdb, "backupmode") == "full"
        assert "checkpoint 'ck1' does not track disk vdb (checkpoint='no')" in m.status()
        assert xattr(m / f"{dom.name}/vda/dirty/ck1.raw", "backupmode") == "incremental"
        m.close()


@pytest.mark.log_allows(r"cannot ask libvirt about the backup job: .*client socket is closed",
                        r"ending the backup job of the mount in ")
def test_libvirtd_that_stops_answering(conn, d, mount):
    """No hang: keepalive closes the connection; unmount still ends the job."""
    with TestDomain.define(conn, "hang", [DiskSpec("vda", f"{d}/vda.qcow2", size=16 * MiB)]) as dom:
        dom.start()
        m = lv_mount(mount, dom)
        run("pkill", "-STOP", "-x", "libvirtd")
        try:
            r = run(*SNAPFS, "refresh", m.path, dom.name, check=False, cwd=REPO, timeout=120)
        finally:
            run("pkill", "-CONT", "-x", "libvirtd")
        assert r.returncode == 1 and "keepalive" in r.stderr, r.stderr
        assert job_socket(dom)
        logfile = find_mount(m.path)[1]["log"]
        m.close()
        with pytest.raises(libvirt.libvirtError):
            job_socket(dom)
        with open(logfile) as f:
            assert "ending the backup job of the mount in" in f.read()


@pytest.mark.log_allows(r"did not come back within 3 s")
def test_a_backup_job_that_ends_under_a_reader_fails_its_reads_with_eio_and_says_why(conn, d, mount, tmp_path):
    """A job is a point in time: snapfs never starts another under an open file
    (its bytes would mix two points); reads fail with EIO within --retry-timeout,
    the status file says why, and snapfs refresh starts a new job."""
    with TestDomain.define(conn, "jobend", [DiskSpec("vda", f"{d}/vda.qcow2", size=16 * MiB)]) as dom:
        dom.start()
        dom.write("vda", 0, 8 * MiB, 0xa7)
        m = lv_mount(mount, dom, "--retry-timeout", "3")
        view = m / f"{dom.name}/vda/chain/current.raw"
        with open(view, "rb", buffering=0) as f:
            assert f.read(4096) == b"\xa7" * 4096
            dom.dom.abortJob()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # the job ends
                try:
                    job_socket(dom)
                except libvirt.libvirtError:
                    break
                time.sleep(0.05)
            t = time.monotonic()
            with pytest.raises(OSError) as e:
                os.pread(f.fileno(), 4096, 6 * MiB)  # far from what was read ahead
            waited = time.monotonic() - t
        assert e.value.errno == errno.EIO
        assert 2.5 < waited < 10
        status = m.status()
        assert f"{dom.name}/vda/chain/current.raw: a read at {6 * MiB} failed: libvirt's backup job " \
               "export" in status and "did not come back within 3 s" in status, status
        run(*SNAPFS, "refresh", m.path, dom.name, cwd=REPO)
        with open(view, "rb") as f:
            assert os.pread(f.fileno(), 4096, 6 * MiB) == b"\xa7" * 4096
        m.close()
