"""Benchmark instant recovery (docs/recovery.md) with a real libvirt domain.

A report, not a test. A backup repository of a 4 GiB disk: base.qcow2 with
1 GiB of data (8 extents of 128 MiB), inc1.qcow2 and inc2.qcow2 with 128 MiB
each (inc1's over half of one of base's): the point, inc2, holds 1.19 GiB. Every run, as the walk-through does it:

- mount -> running: from the start of ``snapfs mount --allow-other`` to
  ``virsh start`` returned with the domain running, the overlay made on
  ``chain/02-inc2.qcow2`` (``qemu-img create``) and the disk attached
  (``virsh attach-device --config``) in between;
- blockcopy: ``virsh blockcopy --transient-job --wait --pivot`` of the running
  VM into a local qcow2, then ``snapfs umount``;
- the anchors: ``qemu-img convert -O qcow2`` of the same point into the same
  directory, from the view (``chain/02-inc2.qcow2``, a fresh mount) and from
  the backup chain itself (``inc2.qcow2``).

The VM has no OS (it idles). Every copy is checked with ``qemu-img compare``
against the chain. The backups stay in the host's page cache from run to run,
for every row alike; each mount starts with snapfs's cache empty.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import libvirt  # noqa: E402
from bench_libvirt import sh, timed  # noqa: E402
from libvirt_env import NAME_PREFIX, TestDomain, accelerator, domain_xml, libvirt_conn, new_image_dir  # noqa: E402

SNAPFS = os.path.join(os.path.dirname(HERE), ".venv", "bin", "snapfs")
MiB, GiB = 1 << 20, 1 << 30
SIZE = 4 * GiB
BACKUPS = {
    "base": [(i * 512 * MiB, 128 * MiB, 0xA1 + i) for i in range(8)],
    "inc1": [(1 * GiB + 64 * MiB, 128 * MiB, 0xB1)],
    "inc2": [(3 * GiB + 256 * MiB, 128 * MiB, 0xC1)],
}

def data_size():
    """Bytes of data in the point: the union of every backup's extents."""
    ends = sorted((off, off + n) for extents in BACKUPS.values() for off, n, _ in extents)
    total, reach = 0, 0
    for a, b in ends:
        total += max(0, b - max(a, reach))
        reach = max(reach, b)
    return total


DISK_XML = """<disk type='file' device='disk'>
  <driver name='qemu' type='qcow2' error_policy='stop' rerror_policy='stop'/>
  <source file='{overlay}'/>
  <target dev='vda' bus='virtio'/>
</disk>
"""


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def build(d):
    web1 = os.path.join(d, "backups", "web1")
    os.makedirs(web1)
    lower = None
    for name, extents in BACKUPS.items():
        path = os.path.join(web1, f"{name}.qcow2")
        sh("qemu-img", "create", "-q", "-f", "qcow2", *(["-b", lower, "-F", "qcow2"] if lower else []),
           path, *([] if lower else [SIZE]))
        args = [a for off, n, pat in extents for a in ("-c", f"write -P {pat:#x} {off} {n}")]
        sh("qemu-io", "-f", "qcow2", *args, path)
        os.chmod(path, 0o644)
        lower = f"{name}.qcow2"
    os.chmod(web1, 0o755)
    os.chmod(os.path.dirname(web1), 0o755)
    return os.path.dirname(web1), os.path.join(web1, "inc2.qcow2")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3, help="runs per measurement (default: 3)")
    args = p.parse_args(argv)
    conn = libvirt_conn()
    log(f"domain: {accelerator(conn.getURI())[1]}")
    d = new_image_dir("bench-recovery")
    mnt, vm = os.path.join(d, "mnt"), os.path.join(d, "vm")
    os.mkdir(mnt)
    os.mkdir(vm)
    os.chmod(vm, 0o711)
    overlay, final, copy = (os.path.join(vm, f) for f in ("overlay.qcow2", "final.qcow2", "copy.qcow2"))
    disk_xml = os.path.join(vm, "vda.xml")
    with open(disk_xml, "w") as f:
        f.write(DISK_XML.format(overlay=overlay))
    rows: dict[str, list[float]] = {}
    logs = set()
    name = f"{NAME_PREFIX}bench-recovery-{secrets.token_hex(3)}"
    dom = TestDomain(conn, conn.defineXML(domain_xml(name, [], memory_mib=128, uri=conn.getURI())), [])
    try:
        log(f"building the backups ({data_size() / GiB:.2f} GiB of data in the point)")
        images, chain = build(d)
        view = f"{mnt}/web1/inc2.qcow2/chain/02-inc2.qcow2"
        for rep in range(args.reps):
            log(f"run {rep + 1}/{args.reps}")
            t0 = time.perf_counter()
            out = sh(SNAPFS, "mount", "--images", images, mnt, "--allow-other")
            t1 = time.perf_counter()
            logs.update(re.findall(r"\(log: (.*)\)$", out, re.M))
            sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", view, "-F", "qcow2", overlay)
            sh("virsh", "attach-device", name, disk_xml, "--config")
            t2 = time.perf_counter()
            sh("virsh", "start", name)
            t3 = time.perf_counter()
            assert dom.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
            rows.setdefault("snapfs mount -> domain running", []).append(t3 - t0)
            rows.setdefault("  snapfs mount", []).append(t1 - t0)
            rows.setdefault("  virsh start", []).append(t3 - t2)
            rows.setdefault("virsh blockcopy --pivot (VM running)", []).append(timed(
                "virsh", "blockcopy", name, "vda", final, "--transient-job", "--wait", "--pivot"))
            sh(SNAPFS, "umount", mnt)
            dom.destroy()
            sh("virsh", "detach-disk", name, "vda", "--config")
            sh("qemu-img", "compare", "-q", chain, final)
            for f in (final, overlay):
                os.unlink(f)

            sh(SNAPFS, "mount", "--images", images, mnt)
            rows.setdefault("qemu-img convert -O qcow2: the view", []).append(timed(
                "qemu-img", "convert", "-O", "qcow2", view, copy))
            sh(SNAPFS, "umount", mnt)
            sh("qemu-img", "compare", "-q", chain, copy)
            os.unlink(copy)
            rows.setdefault("qemu-img convert -O qcow2: the chain", []).append(timed(
                "qemu-img", "convert", "-O", "qcow2", chain, copy))
            sh("qemu-img", "compare", "-q", chain, copy)
            os.unlink(copy)
    finally:
        if os.path.ismount(mnt):
            subprocess.run([SNAPFS, "umount", "--force", mnt])
        dom.cleanup()
        shutil.rmtree(d, ignore_errors=True)
        for path in logs:
            os.unlink(path)

    title = f"instant recovery: 4 GiB disk, {data_size() / GiB:.2f} GiB of data"
    print(f"\n{title:44} {'best s':>8} {'median s':>9}")
    print("-" * 63)
    for row, times in rows.items():
        print(f"{row:44} {min(times):8.3f} {statistics.median(times):9.3f}")
    copy_s = statistics.median(rows["virsh blockcopy --pivot (VM running)"])
    for anchor in ("the view", "the chain"):
        print(f"blockcopy / convert of {anchor} (medians): "
              f"{copy_s / statistics.median(rows[f'qemu-img convert -O qcow2: {anchor}']):.2f}x")
    print(f"(runs: {args.reps}; VM: {accelerator(conn.getURI())[1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
