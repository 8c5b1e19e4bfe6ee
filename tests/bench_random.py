"""Benchmark random 4 KiB reads of a snapfs view against qemu-storage-daemon's FUSE export.

Run as ``.venv/bin/python tests/bench_random.py`` (part of ``make bench``;
about 4 minutes, 1 with ``--quick``); this is a report, not a pytest test.
It builds a 2 GiB qcow2 whose every cluster holds data (32 pieces of 64 MiB,
each filled with its own byte, every 4 KiB block stamped with its offset),
in a new directory /var/tmp/snapfs-bench-random-* (removed on exit), and
measures with fio random 4 KiB reads (``--rw=randread --bs=4k --direct=1
--ioengine=psync --time_based``, ``--runtime`` seconds a run, IOPS from its
JSON report) with 1 and 4 readers (``--numjobs``, ``--group_reporting``) of:

- snapfs's layer view ``rand.qcow2/layers/00-rand.raw``, on a fresh
  ``snapfs mount`` for every run (mount time excluded; the view is looked up
  before fio starts), so its chunk cache starts empty; with the snapfs
  process's peak RSS (VmHWM) and the CPU seconds snapfs and its qemu-nbd
  used per 1000 reads;
- the anchor: qemu-storage-daemon's FUSE export of the same image (qcow2
  driver, read-only), a fresh export for every run.

Each of the two is measured warm (the image file read with ``cat`` just
before the run: every read of the image hits the host page cache) and cold
(``sync; echo 3 > /proc/sys/vm/drop_caches`` just before the run: reads of
the image go to the disk; this needs root). Within every repetition the two
methods alternate (the order swaps from one repetition to the next); the
table shows the median and best IOPS of each row and snapfs/qsd of the
medians.

Two floors explain the bound; they have no target:

- a minimal FUSE file system in Python (pyfuse3 and trio, as snapfs, run
  with this venv's python) with one file of the image's size, opened with
  direct_io, whose reads are answered from a static buffer without any I/O:
  what any Python FUSE file system can get through FUSE here;
- qemu-nbd alone (read-only, as bench.py starts it), read through libnbd by
  fio's nbd engine (iodepth 1 and 4, one job), warm; n/a when this fio has
  no nbd engine.

Targets (medians), for 1 and 4 readers, warm and cold: snapfs's IOPS at least
qemu-storage-daemon's. Missed targets do not change the exit status.

Correctness is checked once, untimed, before the runs: 200 random 4 KiB
blocks of the view (``os.pread``) must equal the raw file the image was
made from; a mismatch prints DATA MISMATCH and exits 1, before any run. A
tool that fails also makes the exit status 1; no fio at all makes it 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import traceback

from bench import (
    SNAPFS,
    Bench,
    GiB,
    MiB,
    StepError,
    _sigterm,
    child_pids,
    cleanup,
    cpu_seconds,
    find_snapfs_pid,
    fuse_unmount,
    is_mounted,
    log,
    peak_rss_mb,
    read_tail,
    run,
    stop_process,
    wait_until,
)

PYTHON = os.path.join(os.path.dirname(SNAPFS), "python")
IMAGE_NAME = "rand"
IMAGE_SIZE = 2 * GiB
PIECE = 64 * MiB
BS = 4096
VERIFY_BLOCKS = 200
JOBS = (1, 4)            # fio --numjobs of the file rows
DEPTHS = (1, 4)          # fio --iodepth of the nbd floor
MODES = ("warm", "cold")
METHODS = ("snapfs", "qsd")
DEFAULT_REPS = 3
DEFAULT_RUNTIME = 4
DROP_CACHES = "/proc/sys/vm/drop_caches"

# The static floor: a FUSE file system in Python that does no I/O at all.
STATIC_FS = '''\
"""One read-only file of SIZE bytes whose reads are answered from a static buffer."""
import errno
import stat
import sys

import pyfuse3
import trio

MOUNTPOINT, NAME, SIZE = sys.argv[1], sys.argv[2].encode(), int(sys.argv[3])
FILE = pyfuse3.ROOT_INODE + 1
BUF = bytes(range(256)) * 4096  # 1 MiB: more than any one FUSE read


class FS(pyfuse3.Operations):
    def attrs(self, inode):
        a = pyfuse3.EntryAttributes()
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode, a.st_nlink = stat.S_IFDIR | 0o755, 2
        elif inode == FILE:
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFREG | 0o444, 1, SIZE
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        a.st_ino = inode
        a.st_blksize = 4096
        a.attr_timeout = a.entry_timeout = 300
        return a

    async def getattr(self, inode, ctx=None):
        return self.attrs(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != pyfuse3.ROOT_INODE or name != NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.attrs(FILE)

    async def open(self, inode, flags, ctx):
        if inode != FILE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode, direct_io=True)

    async def read(self, fh, off, size):
        return BUF[:max(0, min(size, SIZE - off))]


pyfuse3.init(FS(), MOUNTPOINT, set(pyfuse3.default_options) | {"fsname=snapfs-bench-static", "ro"})
try:
    trio.run(pyfuse3.main)
except BaseException:
    pyfuse3.close(unmount=True)
    raise
pyfuse3.close(unmount=False)
'''


def readers(jobs: int) -> str:
    return f"{jobs} reader{'s' if jobs > 1 else ''}"


def row_name(method: str, jobs: int, mode: str) -> str:
    what = {"snapfs": "snapfs layer view", "qsd": "qsd FUSE export"}[method]
    return f"{what}, {readers(jobs)}, {mode}"


STATIC_ROWS = [f"Python FUSE, no I/O, {readers(j)}" for j in JOBS]
NBD_ROWS = [f"fio nbd -> qemu-nbd, iodepth {d}" for d in DEPTHS]


def fio_has_nbd() -> bool:
    r = subprocess.run(["fio", "--enghelp"], capture_output=True, text=True)
    return any(line.strip() == "nbd" for line in r.stdout.splitlines())


class RandomBench(Bench):
    """bench.py's servers and helpers; the image and runs of this bench."""

    def __init__(self, tmp: str, reps: int, runtime: int):
        super().__init__(tmp, reps)
        self.runtime = runtime
        self.img = os.path.join(self.imgdir, IMAGE_NAME + ".qcow2")
        self.ref = self.path(IMAGE_NAME + ".raw")
        self.view = os.path.join(self.mnt, IMAGE_NAME + ".qcow2", "layers", f"00-{IMAGE_NAME}.raw")
        self.iops: dict[str, list[float]] = {}
        self.cpu: dict[str, list[tuple[float, float]]] = {}  # row -> (snapfs, qemu-nbd) CPU s per 1000 reads
        self.peak_rss: float | None = None
        self.nbd = fio_has_nbd()
        self.cold = os.access(DROP_CACHES, os.W_OK)

    # -- image -----------------------------------------------------------------

    def build_image(self) -> None:
        log(f"building image: {IMAGE_SIZE // GiB} GiB qcow2 of data, {IMAGE_SIZE // PIECE} pieces "
            f"of {PIECE // MiB} MiB...")
        with open(self.ref, "wb") as f:
            for i in range(IMAGE_SIZE // PIECE):
                piece = bytearray([0x11 + i]) * PIECE
                for off in range(0, PIECE, BS):
                    piece[off:off + 8] = (i * PIECE + off).to_bytes(8, "big")
                f.write(piece)
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", self.ref, self.img])
        r = run(["qemu-img", "map", "--output=json", "-f", "qcow2", self.img], stdout=subprocess.PIPE)
        holes = [e for e in json.loads(r.stdout) if not e["data"]]
        if holes:
            raise StepError(f"the image is not all data: {len(holes)} extents without, first {holes[0]}")

    def verify(self) -> None:
        """200 random blocks of the view must be those of the raw file; checked once, untimed."""
        log(f"checking {VERIFY_BLOCKS} random {BS // 1024} KiB blocks of the snapfs view...")
        rng = random.Random(IMAGE_SIZE)
        offsets = [rng.randrange(IMAGE_SIZE // BS) * BS for _ in range(VERIFY_BLOCKS)]
        with self.mount():
            size = os.stat(self.view).st_size
            if size != IMAGE_SIZE:
                self.mismatch(f"snapfs view: size {size}, expected {IMAGE_SIZE}")
                return
            ref = os.open(self.ref, os.O_RDONLY)
            view = os.open(self.view, os.O_RDONLY)
            try:
                bad = [off for off in offsets if os.pread(view, BS, off) != os.pread(ref, BS, off)]
            finally:
                os.close(view)
                os.close(ref)
        if bad:
            self.mismatch(f"snapfs view: {len(bad)} of {VERIFY_BLOCKS} random blocks differ "
                          f"from the image's, first at offset {bad[0]}")

    def prepare(self, mode: str) -> None:
        """warm: the image in the host page cache; cold: no page cache at all."""
        if mode == "warm":
            run(["cat", self.img])
        else:
            os.sync()
            with open(DROP_CACHES, "w") as f:
                f.write("3")

    # -- servers -----------------------------------------------------------------

    @contextlib.contextmanager
    def mount(self):
        """A snapfs mount of the image; yields the snapfs pid, keeps its peak RSS."""
        run([SNAPFS, "mount", "--images", self.imgdir, "--log", self.snapfs_log, self.mnt])
        pid = None
        try:
            pid = find_snapfs_pid(self.mnt)
            yield pid
        finally:
            rss = peak_rss_mb(pid) if pid else None
            if rss is not None:
                self.peak_rss = max(self.peak_rss or 0.0, rss)
            self.snapfs_umount(self.mnt)

    @contextlib.contextmanager
    def static_fs(self):
        """The Python FUSE file system without I/O; yields its file."""
        script = self.path("staticfs.py")
        with open(script, "w") as f:
            f.write(STATIC_FS)
        mntdir = self.path("static-mnt")
        os.makedirs(mntdir, exist_ok=True)
        err = self.path("staticfs.err")
        with open(err, "wb") as f:
            proc = subprocess.Popen([PYTHON, script, mntdir, IMAGE_NAME + ".raw", str(IMAGE_SIZE)],
                                    stdin=subprocess.DEVNULL, stdout=f, stderr=f)
        try:
            wait_until(lambda: is_mounted(mntdir), "static FUSE file system", proc, err)
            yield os.path.join(mntdir, IMAGE_NAME + ".raw")
        finally:
            fuse_unmount(mntdir)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                stop_process(proc)

    # -- runs ------------------------------------------------------------------

    def fio(self, name: str, args: list[str]) -> tuple[float, int]:
        """One fio run of random 4 KiB reads; its IOPS and the number of reads."""
        cmd = ["fio", f"--name={name}", "--rw=randread", f"--bs={BS}", "--time_based",
               f"--runtime={self.runtime}", f"--size={IMAGE_SIZE}", "--readonly",
               "--group_reporting", "--output-format=json", *args]
        out = run(cmd, stdout=subprocess.PIPE).stdout.decode(errors="replace")
        try:
            job = json.loads(out[out.index("{"):])["jobs"][0]
        except (ValueError, KeyError, IndexError) as e:
            raise StepError(f"{' '.join(cmd)}: no JSON report ({e}): {out[:500]}") from None
        if job.get("error"):
            raise StepError(f"{' '.join(cmd)}: job error {job['error']}")
        return job["read"]["iops"], job["read"]["total_ios"]

    def fio_file(self, path: str, jobs: int) -> tuple[float, int]:
        return self.fio("file", [f"--filename={path}", "--direct=1", "--ioengine=psync", f"--numjobs={jobs}"])

    def record(self, row: str, iops: float) -> None:
        self.iops.setdefault(row, []).append(iops)
        log(f"{row}: {iops:.0f} IOPS")

    def run_snapfs(self, jobs: int, mode: str) -> None:
        row = row_name("snapfs", jobs, mode)
        with self.mount() as pid:
            os.stat(self.view)  # the lookup reads the view's map: not part of the run
            self.prepare(mode)
            nbd_before = {k: cpu_seconds(k) for k in child_pids(pid, "qemu-nbd")}
            before = cpu_seconds(pid)
            iops, ios = self.fio_file(self.view, jobs)
            snap = cpu_seconds(pid) - before
            nbd = sum(cpu_seconds(k) - nbd_before.get(k, 0.0) for k in child_pids(pid, "qemu-nbd"))
        self.record(row, iops)
        if ios:
            self.cpu.setdefault(row, []).append((snap / ios * 1000, nbd / ios * 1000))

    def run_qsd(self, jobs: int, mode: str) -> None:
        with self.qsd_export() as f:
            self.prepare(mode)
            iops, _ = self.fio_file(f, jobs)
        self.record(row_name("qsd", jobs, mode), iops)

    def run_floors(self) -> None:
        with self.static_fs() as f:
            for jobs, row in zip(JOBS, STATIC_ROWS, strict=True):
                self.record(row, self.fio_file(f, jobs)[0])
        if not self.nbd:
            return
        with self.qemu_nbd() as sock:
            for depth, row in zip(DEPTHS, NBD_ROWS, strict=True):
                self.prepare("warm")
                iops, _ = self.fio("nbd", ["--ioengine=nbd", f"--uri=nbd+unix:///?socket={sock}",
                                           f"--iodepth={depth}", "--numjobs=1"])
                self.record(row, iops)

    def attempt(self, what: str, fn, *args) -> None:
        """Run one measurement; a failure is recorded and the bench goes on."""
        try:
            fn(*args)
        except (StepError, OSError) as e:
            self.error(f"{what} failed: {e}")
            if not isinstance(e, StepError):
                traceback.print_exc()
            if "snapfs" in what:
                self.log_tail()

    def log_tail(self) -> None:
        tail = read_tail(self.snapfs_log)
        if tail:
            log(f"snapfs log tail:\n{tail}")

    def measure(self) -> None:
        modes = [m for m in MODES if m == "warm" or self.cold]
        for rep in range(self.reps):
            log(f"repetition {rep + 1}/{self.reps}")
            order = METHODS if rep % 2 == 0 else METHODS[::-1]
            for mode in modes:
                for jobs in JOBS:
                    for method in order:
                        self.attempt(row_name(method, jobs, mode),
                                     self.run_snapfs if method == "snapfs" else self.run_qsd, jobs, mode)
            self.attempt("floors", self.run_floors)

    # -- report ------------------------------------------------------------------

    def median(self, row: str) -> float | None:
        v = self.iops.get(row)
        return statistics.median(v) if v else None

    def line(self, row: str, ratio: str = "-", cpu: str = "") -> None:
        v = self.iops.get(row)
        med, best = (f"{statistics.median(v):.0f}", f"{max(v):.0f}") if v else ("n/a", "n/a")
        print(f"{row:38} {med:>11} {best:>10} {ratio:>8}{cpu}")

    def report(self) -> None:
        print()
        print(f"random {BS // 1024} KiB reads, {IMAGE_SIZE // GiB} GiB qcow2 all data, "
              f"fio psync --direct=1, {self.runtime} s per run, {self.reps} run{'s' if self.reps > 1 else ''} per row")
        print(f"{'name':38} {'median IOPS':>11} {'best IOPS':>10} {'vs qsd':>8} "
              f"{'snapfs CPU s':>13} {'qemu-nbd CPU s':>15}")
        print("-" * 100)
        for mode in MODES:
            for jobs in JOBS:
                snap, qsd = row_name("snapfs", jobs, mode), row_name("qsd", jobs, mode)
                a, b = self.median(snap), self.median(qsd)
                ratio = f"{a / b:.2f}x" if a is not None and b else "-"
                cpu = self.cpu.get(snap)
                cpu = (f" {statistics.median(c for c, _ in cpu):13.3f} {statistics.median(n for _, n in cpu):15.3f}"
                       if cpu else "")
                self.line(snap, ratio, cpu)
                self.line(qsd)
        print("(vs qsd: snapfs/qsd of the median IOPS; CPU: seconds per 1000 reads, medians, "
              "/proc/PID/stat utime + stime of snapfs and of its qemu-nbd)")
        if not self.cold:
            print(f"(cold rows n/a: {DROP_CACHES} is not writable; they need root)")
        if self.peak_rss is not None:
            print(f"snapfs peak RSS (VmHWM): {self.peak_rss:.1f} MB")
        print()
        print("floors (no target): a FUSE file system in Python that does no I/O at all (every read "
              "answered from a static buffer, direct_io), and qemu-nbd alone read through libnbd "
              "(fio's nbd engine, warm):")
        for row in STATIC_ROWS:
            self.line(row)
        for row in NBD_ROWS:
            if self.nbd:
                self.line(row)
            else:
                print(f"{row:38} {'n/a':>11} {'n/a':>10}        -   (fio --enghelp lists no nbd engine)")
        print()
        print("targets (medians):")
        for name, ok in self.targets():
            print(f"  {'n/a ' if ok is None else 'PASS' if ok else 'MISS'}  {name}")

    def targets(self) -> list[tuple[str, bool | None]]:
        out = []
        for jobs in JOBS:
            for mode in MODES:
                a, b = self.median(row_name("snapfs", jobs, mode)), self.median(row_name("qsd", jobs, mode))
                out.append((f"snapfs random {BS // 1024} KiB reads >= qemu-storage-daemon FUSE export IOPS "
                            f"({readers(jobs)}, {mode})", None if a is None or b is None else a >= b))
        return out


# -- main ----------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Measure random 4 KiB reads (fio) of a snapfs view against qemu-storage-daemon's "
                    "FUSE export of a 2 GiB qcow2, warm and cold, with two floors; print a table and "
                    "the targets.")
    p.add_argument("--reps", type=int, default=DEFAULT_REPS,
                   help=f"runs per row (default: {DEFAULT_REPS})")
    p.add_argument("--runtime", type=int, default=DEFAULT_RUNTIME,
                   help=f"seconds per fio run (default: {DEFAULT_RUNTIME})")
    p.add_argument("--quick", action="store_true", help="one run per row of 2 s")
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.runtime = 1, 2
    if args.reps < 1:
        p.error("--reps must be at least 1")
    if args.runtime < 1:
        p.error("--runtime must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if shutil.which("fio") is None:
        print("bench_random: fio not found: it is Debian's package fio (apt-get install fio; "
              "make bench installs it)", file=sys.stderr)
        return 2
    if not os.access(SNAPFS, os.X_OK):
        print(f"bench_random: {SNAPFS} not found; run make setup", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _sigterm)
    tmp = tempfile.mkdtemp(prefix="snapfs-bench-random-", dir="/var/tmp")
    bench = None
    try:
        bench = RandomBench(tmp, args.reps, args.runtime)
        if not bench.cold:
            bench.error(f"{DROP_CACHES} is not writable (not root?): no cold runs")
        if not bench.nbd:
            log("fio has no nbd engine (fio --enghelp): the qemu-nbd floor is n/a")
        bench.build_image()
        bench.verify()
        if bench.mismatches:
            return 1
        os.unlink(bench.ref)  # 2 GiB less in the page cache and on disk
        bench.measure()
        bench.report()
    except (StepError, OSError) as e:
        if bench is None:
            raise
        bench.error(str(e))
        if not isinstance(e, StepError):
            traceback.print_exc()
        bench.log_tail()
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    finally:
        cleanup(tmp, bench)
    if bench.errors:
        print("\nERRORS:\n  " + "\n  ".join(bench.errors), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
