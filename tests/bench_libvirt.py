"""Benchmark snapfs's libvirt mode on a running VM (``make bench``).

A report, not a test. One OS-less VM with an 8 GiB qcow2 disk holding 1 GiB
of data (8 extents of 128 MiB, written by the guest through HMP qemu-io) is
backed up the way docs/libvirt.md shows, and timed against the anchor measured
in the same run: nbdcopy of the backup job's own NBD export to null, the
fastest any tool can read it.

- mount: ``snapfs mount --connect`` until the mount is live (starts the job);
- full: ``cp --sparse=auto`` of ``chain/current.raw`` to /dev/shm;
- refresh: ``snapfs refresh`` (ends the job, starts a new one);
- full as a qcow2: ``qemu-img convert -O qcow2`` of ``chain/current.qcow2``
  to /dev/shm, against the same convert of the job's export (the anchor of
  this row), checked with ``qemu-img compare``;
- incremental: after the guest changes 256 MiB (and zeroes 128 MiB), ``cp
  --sparse=auto`` of ``dirty/ck1.raw``.

Each measurement runs ``--reps`` times (best and median); between runs a
refresh empties snapfs's caches. Copies are checked with ``qemu-img compare``
against the job's export.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench import find_snapfs_pid, peak_rss_mb  # noqa: E402
from libvirt_env import DiskSpec, TestDomain, accelerator, libvirt_conn, new_image_dir  # noqa: E402

SNAPFS = os.path.join(os.path.dirname(HERE), ".venv", "bin", "snapfs")
MiB, GiB = 1 << 20, 1 << 30
DISK = 8 * GiB
EXTENTS = [(i * GiB + (i % 4) * 256 * MiB, 0xA1 + i) for i in range(8)]  # 128 MiB each


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def sh(*cmd, **kw):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))}: {r.stderr.strip()}")
    return r.stdout


def timed(*cmd):
    t0 = time.perf_counter()
    sh(*cmd)
    return time.perf_counter() - t0


def job_uri(dom, export):
    sock = ET.fromstring(dom.dom.backupGetXMLDesc(0)).find("server").get("socket")
    return f"nbd+unix:///{export}?socket={sock}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3, help="runs per measurement (default: 3)")
    args = p.parse_args(argv)
    conn = libvirt_conn()
    log(f"domain: {accelerator(conn.getURI())[1]}")
    d = new_image_dir("bench")
    tmp = tempfile.mkdtemp(prefix="snapfs-bench-lv-")
    mnt = os.path.join(tmp, "mnt")
    os.mkdir(mnt)
    copy = "/dev/shm/snapfs-bench-lv.raw"
    qcopy = "/dev/shm/snapfs-bench-lv.qcow2"
    rows: dict[str, list[float]] = {}
    peak: dict[str, float | None] = {}
    try:
        with TestDomain.define(conn, "bench", [DiskSpec("vda", f"{d}/vda.qcow2", size=DISK)],
                               memory_mib=128) as dom:
            dom.start()
            log("guest writes 1 GiB")
            for off, pat in EXTENTS:
                dom.write("vda", off, 128 * MiB, pat)
            dom.flush("vda")
            base = f"{mnt}/{dom.name}/vda"

            t0 = time.perf_counter()
            sh(SNAPFS, "mount", "--connect", "--domain", dom.name, "--checkpoint", "ck1", mnt)
            rows["mount (starts the backup job)"] = [time.perf_counter() - t0]
            for _ in range(args.reps):
                rows.setdefault("nbdcopy job export to null (limit)", []).append(
                    timed("nbdcopy", job_uri(dom, "vda"), "null:"))
                rows.setdefault("snapfs chain/current.raw: cp", []).append(
                    timed("cp", "--sparse=auto", f"{base}/chain/current.raw", copy))
                sh("qemu-img", "compare", "-f", "raw", "-F", "raw", copy, job_uri(dom, "vda"))
                os.unlink(copy)
                rows.setdefault("snapfs refresh (new job)", []).append(
                    timed(SNAPFS, "refresh", mnt, dom.name))
                rows.setdefault("qemu-img convert job export to qcow2", []).append(
                    timed("qemu-img", "convert", "-f", "raw", "-O", "qcow2", job_uri(dom, "vda"), qcopy))
                os.unlink(qcopy)
                rows.setdefault("snapfs chain/current.qcow2: convert", []).append(
                    timed("qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", f"{base}/chain/current.qcow2", qcopy))
                sh("qemu-img", "compare", "-f", "qcow2", "-F", "raw", qcopy, job_uri(dom, "vda"))
                os.unlink(qcopy)
                sh(SNAPFS, "refresh", mnt, dom.name)  # the next run starts with empty caches again
            peak["full backups (cp of chain/current.raw, convert of chain/current.qcow2)"] = \
                peak_rss_mb(find_snapfs_pid(mnt))
            sh(SNAPFS, "umount", mnt)

            log("guest changes 256 MiB and zeroes 128 MiB")
            for off, pat in EXTENTS[:2]:
                dom.write("vda", off + 64 * MiB, 128 * MiB, pat + 0x10)
            dom.zero("vda", EXTENTS[7][0], 128 * MiB)
            dom.flush("vda")
            sh(SNAPFS, "mount", "--connect", "--domain", dom.name, "--since", "ck1", mnt)
            for _ in range(args.reps):
                sh(SNAPFS, "refresh", mnt, dom.name, "--since", "ck1")
                rows.setdefault("snapfs dirty/ck1.raw: cp", []).append(
                    timed("cp", "--sparse=auto", f"{base}/dirty/ck1.raw", copy))
                os.unlink(copy)
            peak["incrementals (cp dirty/ck1.raw)"] = peak_rss_mb(find_snapfs_pid(mnt))
            sh(SNAPFS, "umount", mnt)
    finally:
        if os.path.ismount(mnt):
            subprocess.run([SNAPFS, "umount", mnt])
        for path in (copy, qcopy):
            if os.path.exists(path):
                os.unlink(path)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(d, ignore_errors=True)

    limit = min(rows["nbdcopy job export to null (limit)"])
    moved = {"nbdcopy job export to null (limit)": GiB, "snapfs chain/current.raw: cp": GiB,
             "qemu-img convert job export to qcow2": GiB, "snapfs chain/current.qcow2: convert": GiB,
             "snapfs dirty/ck1.raw: cp": 256 * MiB}
    print(f"\n{'running VM, 8 GiB disk, 1 GiB data':40} {'best s':>8} {'median s':>9} {'MB/s':>7} "
          f"{'vs nbdcopy':>11}")
    print("-" * 79)
    for name, times in rows.items():
        best = min(times)
        mbs = f"{moved[name] / best / 1e6:.0f}" if name in moved else ""
        ratio = f"{best / limit:.2f}x" if moved.get(name) == GiB else ""
        print(f"{name:40} {best:8.3f} {statistics.median(times):9.3f} {mbs:>7} {ratio:>11}")
    print(f"(runs: {args.reps}; MB/s = data moved / best; the dirty view holds 256 MiB of changed "
          "data and 128 MiB of changed zeros, which move no data)")
    print(f"(VM: {accelerator(conn.getURI())[1]})")
    for flow, mb in peak.items():
        if mb is not None:
            print(f"snapfs peak RSS (VmHWM), the mount of the {flow}: {mb:.1f} MB")
    cp = statistics.median(rows["snapfs chain/current.raw: cp"])
    nbdcopy = statistics.median(rows["nbdcopy job export to null (limit)"])
    conv = statistics.median(rows["snapfs chain/current.qcow2: convert"])
    conv_anchor = statistics.median(rows["qemu-img convert job export to qcow2"])
    print("\ntargets (medians):")
    print(f"  {'PASS' if cp <= 2 * nbdcopy else 'MISS'}  cp of chain/current.raw <= 2x nbdcopy of the "
          f"job's export ({cp / nbdcopy:.2f}x)")
    print(f"  {'PASS' if conv <= 1.3 * conv_anchor else 'MISS'}  qemu-img convert -O qcow2 of "
          f"chain/current.qcow2 <= 1.3x the same convert of the job's export ({conv / conv_anchor:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
