"""Tier 6: the libvirt test environment itself, against a real libvirtd and qemu."""

import os
import shutil
import socket
import subprocess
import time
import xml.etree.ElementTree as ET

import libvirt
import pytest
from libvirt_env import (
    DiskSpec,
    E,
    HmpError,
    MiB,
    NetworkDiskSpec,
    TestDomain,
    accelerator,
    new_image_dir,
    to_xml,
)


def expected(size, *runs):
    """``size`` zero bytes with (offset, length, pattern) runs written over them."""
    buf = bytearray(size)
    for off, length, pattern in runs:
        buf[off:off + length] = bytes([pattern]) * length
    return bytes(buf)


def content(path):
    with open(path, "rb") as f:
        return f.read()


def gone(conn, name):
    try:
        conn.lookupByName(name)
    except libvirt.libvirtError as e:
        return e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN
    return False


def test_write_zero_and_record_running_and_shut_off(conn, d):
    disks = [DiskSpec("vda", f"{d}/vda.qcow2", size=64 * MiB),
             DiskSpec("vdb", f"{d}/vdb.qcow2", size=32 * MiB)]
    with TestDomain.define(conn, "rec", disks) as dom:
        assert dom.name.startswith("snapfs-test-rec-")
        dom.start()
        dom.write("vda", MiB, 4 * MiB, 0x11)
        dom.zero("vda", 2 * MiB, 64 * 1024)
        dom.write("vdb", 8 * MiB, MiB, 0x22)
        with pytest.raises(HmpError, match="write failed"):
            dom.write("vda", 63 * MiB, 4 * MiB, 0x11)  # past the end
        want_a = expected(64 * MiB, (MiB, 4 * MiB, 0x11), (2 * MiB, 64 * 1024, 0))
        want_b = expected(32 * MiB, (8 * MiB, MiB, 0x22))

        assert content(dom.record("vda", f"{d}/a.raw")) == want_a
        assert content(dom.record("vdb", f"{d}/b.raw")) == want_b
        assert dom.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING

        dom.destroy()
        assert not dom.is_active()
        assert content(dom.record("vda", f"{d}/a2.raw")) == want_a
        name = dom.name
    assert gone(conn, name)
    assert sorted(os.listdir(d)) == ["a.raw", "a2.raw", "b.raw"]  # images made are removed


def test_attach_checkpoint_snapshot_and_backup_while_running(conn, d):
    disks = [DiskSpec("vda", f"{d}/vda.qcow2", size=64 * MiB),
             DiskSpec("vdb", f"{d}/vdb.qcow2", size=16 * MiB)]
    backup_dir = new_image_dir("t6-backup", qemu_owned=True)
    try:
        with TestDomain.define(conn, "live", disks) as dom:
            dom.start()
            dom.write("vda", 0, 4 * MiB, 0x11)

            dom.attach_disk("vdc", f"{d}/vdc.qcow2", size=8 * MiB)
            assert dom.alias("vdc") not in (dom.alias("vda"), dom.alias("vdb"))
            dom.write("vdc", MiB, MiB, 0x44)
            assert content(dom.record("vdc", f"{d}/c.raw")) == expected(8 * MiB, (MiB, MiB, 0x44))
            inactive = ET.fromstring(dom.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            assert "vdc" in [t.get("dev") for t in inactive.iterfind("devices/disk/target")]

            cp = ET.fromstring(dom.checkpoint("c1", {"vda": True}).getXMLDesc(0))
            assert {x.get("name"): x.get("checkpoint") for x in cp.iterfind("disks/disk")} == {
                "vda": "bitmap", "vdb": "no", "vdc": "no"}

            overlay = f"{d}/vda.s1.qcow2"
            dom.snapshot_external("s1", {"vda": overlay})
            assert dom.source("vda") == (overlay, "qcow2")
            assert dom.source("vdb") == (f"{d}/vdb.qcow2", "qcow2")
            assert dom.dom.snapshotListNames() == ["s1"]

            dom.write("vda", 2 * MiB, MiB, 0x55)
            assert content(dom.record("vda", f"{d}/a.raw")) == expected(
                64 * MiB, (0, 4 * MiB, 0x11), (2 * MiB, MiB, 0x55))
            # The write after the snapshot went to the overlay, not the old image.
            subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", f"{d}/vda.qcow2",
                            f"{d}/base.raw"], check=True)
            assert content(f"{d}/base.raw") == expected(64 * MiB, (0, 4 * MiB, 0x11))

            # Left running on purpose: cleanup must abort it.
            dom.dom.backupBegin(to_xml(E(
                "domainbackup",
                E("server", transport="unix", socket=f"{backup_dir}/nbd.sock"),
                E("disks",
                  E("disk", E("scratch", file=f"{backup_dir}/vda.scratch"), name="vda", backup="yes",
                    type="file"),
                  E("disk", name="vdb", backup="no"), E("disk", name="vdc", backup="no")),
                mode="pull")), None, 0)
            assert dom.dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE
            name = dom.name
        assert gone(conn, name)
        assert sorted(os.listdir(d)) == ["a.raw", "base.raw", "c.raw"]
    finally:
        shutil.rmtree(backup_dir)


def test_external_snapshot_while_shut_off(conn, d):
    with TestDomain.define(conn, "off", [DiskSpec("vda", f"{d}/vda.qcow2", size=16 * MiB)]) as dom:
        dom.start()
        dom.write("vda", 0, MiB, 0x11)
        dom.destroy()
        dom.snapshot_external("s1", {"vda": f"{d}/vda.s1.qcow2"})
        assert dom.source("vda") == (f"{d}/vda.s1.qcow2", "qcow2")
        assert content(dom.record("vda", f"{d}/a.raw")) == expected(16 * MiB, (0, MiB, 0x11))

        dom.start()  # on the overlay
        dom.write("vda", 4 * MiB, MiB, 0x22)
        assert content(dom.record("vda", f"{d}/b.raw")) == expected(
            16 * MiB, (0, MiB, 0x11), (4 * MiB, MiB, 0x22))
    assert sorted(os.listdir(d)) == ["a.raw", "b.raw"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cdroms_and_network_disk(conn, d):
    iso = f"{d}/cd.raw"
    with open(iso, "wb") as f:
        f.write(b"\x66" * MiB)
    served = f"{d}/served.raw"
    with open(served, "wb") as f:
        f.truncate(8 * MiB)
    port = free_port()
    disks = [DiskSpec("vda", f"{d}/vda.qcow2", size=8 * MiB),
             DiskSpec("hdc", None, fmt="raw", device="cdrom"),
             DiskSpec("hdd", iso, fmt="raw", device="cdrom"),
             NetworkDiskSpec("vdz", "x", port=port)]
    with TestDomain.define(conn, "net", disks) as dom:
        xml = ET.fromstring(dom.dom.XMLDesc(0))
        by_target = {x.find("target").get("dev"): x for x in xml.iterfind("devices/disk")}
        assert by_target["hdc"].get("device") == "cdrom" and by_target["hdc"].find("source") is None
        assert by_target["hdd"].find("source").get("file") == iso
        src = by_target["vdz"].find("source")
        assert (src.get("protocol"), src.get("name"), src.find("host").get("port")) == (
            "nbd", "x", str(port))

        # qemu connects to the NBD server at start: none listens yet.
        with pytest.raises(libvirt.libvirtError, match="Connection refused"):
            dom.start()

        nbd = subprocess.Popen(["qemu-nbd", "-f", "raw", "-x", "x", "-b", "127.0.0.1",
                                "-p", str(port), "-t", served])
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "qemu-nbd does not listen"
                    time.sleep(0.05)
            dom.start()
            dom.write("vdz", MiB, MiB, 0x77)
            dom.flush("vdz")
            assert content(served) == expected(8 * MiB, (MiB, MiB, 0x77))
            assert "Pattern verification failed" not in dom.qemu_io("hdd", "read -P 0x66 0 1M")
            assert "Pattern verification failed" in dom.qemu_io("hdd", "read -P 0x67 0 1M")
            with pytest.raises(ValueError, match="no source file"):
                dom.record("vdz", f"{d}/z.raw")
            dom.destroy()
        finally:
            nbd.terminate()
            nbd.wait()
    assert sorted(os.listdir(d)) == ["cd.raw", "served.raw"]


def test_domain_that_cannot_start_fails_within_seconds_with_libvirts_message(conn, d):
    """Issue 7: a VM that cannot start fails its test at once, saying why.

    Its disk's image does not exist, so libvirt refuses before qemu runs. The
    bound covers the definition too: on a machine where /dev/kvm exists but
    qemu's user cannot open it, libvirt probes qemu anew on every call, and
    defining and failing to start took 42 s (36 + 6) before setup fixed the
    node's mode; with a usable or absent /dev/kvm both take well under 1 s.
    """
    missing = f"{d}/missing.qcow2"
    t0 = time.monotonic()
    with TestDomain.define(conn, "nostart", [DiskSpec("vda", missing)]) as dom:
        defined = time.monotonic() - t0
        with pytest.raises(libvirt.libvirtError) as e:
            dom.start()
        failed = time.monotonic() - t0 - defined
        assert not dom.is_active()
    message = str(e.value)
    assert f"Cannot access storage file '{missing}'" in message
    assert "No such file or directory" in message
    assert defined + failed < 10, (
        f"define took {defined:.1f} s and the failed start {failed:.1f} s; {accelerator()[1]}")
