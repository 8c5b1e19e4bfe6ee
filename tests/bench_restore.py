"""Benchmark restoring a disk through ``snapfs mount --rw`` against ``qemu-img convert -n`` and nbdcopy.

Run as root: ``.venv/bin/python tests/bench_restore.py`` (part of ``make
bench``; about 2-3 minutes); this is a report, not a pytest test. It builds,
in a new directory /var/tmp/snapfs-bench-restore-* (bench.py's tmp dir; every
file of every method is on that one file system), removed on exit:

- BACKUP: an 8 GiB sparse raw file holding 1 GiB of random data, 8 extents
  of 128 MiB spread over the disk (bench.py's layout);
- IMAGE: an 8 GiB qcow2 (no backing file) holding 1 GiB of *other* random
  data, half of its extents overlapping BACKUP's by 64 MiB, the others apart.

and measures, alternating the methods within every repetition (5 by default):

- anchor: ``qemu-img convert -n -O qcow2 BACKUP IMAGE``, what an admin types
  without snapfs; and, from the same runs, the anchor followed by ``sync
  --data IMAGE`` (fdatasync), to compare with snapfs's flushed result;
- a reference: ``qemu-img convert -n`` into a writable qemu-nbd of IMAGE
  started with snapfs's options, timed until qemu-nbd has exited (it flushes
  then): what the NBD write path costs without FUSE and snapfs;
- the NBD anchor: ``nbdcopy --flush BACKUP nbd+unix:///?socket=SOCK`` into a
  writable qemu-nbd of IMAGE started as the reference's is (snapfs's options
  for its writers: ``--shared=6`` (snapfs's 4 connections + 2),
  ``--cache=writeback --discard=unmap --detect-zeroes=on``, snapfs's glibc
  malloc tunables; qemu-nbd 7.2 then advertises multi-conn and nbdcopy, with
  its default options, opens 4 connections). nbdcopy starts as soon as
  qemu-nbd has written its pid file; the time runs until nbdcopy has returned
  and qemu-nbd has exited. ``--flush``: snapfs's time ends when cp's close
  returns, and that close is an NBD flush (NBD_CMD_FLUSH -> fdatasync in
  qemu-nbd); nbdcopy --flush sends that same request before it returns, so
  both rows end with the same flush on the same path. Without it the flush
  would still be in the time (qemu-nbd flushes as it exits), but as qemu's
  close rather than as an NBD request; with it, qemu-nbd's exit has nothing
  left to flush (the bench prints how long the exit took after nbdcopy
  returned). Holes of BACKUP become NBD zero requests (nbdcopy's default:
  IMAGE is not zero), as cp's restore zeroes IMAGE with O_TRUNC first;
- snapfs: ``cp --sparse=auto BACKUP MNT/IMAGE/chain/00-IMAGE.raw`` on one
  ``snapfs mount --rw`` made before the first run (mount time excluded). The
  time is cp's, close included: snapfs flushes the image at close (FUSE
  FLUSH -> NBD flush -> fdatasync in qemu-nbd, --cache=writeback), so when
  cp returns the data is on disk;
- snapfs: ``qemu-img convert -n -f raw -O raw BACKUP MNT/IMAGE/chain/00-IMAGE.raw``
  on the same mount, timed until convert returns. convert opens the view
  without O_TRUNC and zeroes what BACKUP does not hold itself (zero requests
  through fallocate, or writes); its close is snapfs's flush, as cp's is
  (convert itself does not flush, see below, but close(2) sends FUSE FLUSH);
- ``open(VIEW, O_WRONLY | O_TRUNC)`` + close alone on the 8 GiB IMAGE: the
  zeroing every restore through the view starts with.

Every run starts from the same state: a copy of one pristine IMAGE that
nothing touched before. The anchor's, the reference's and nbdcopy's copy is
made again before each of their runs; snapfs's copies (one per run and
measurement: cp, convert -n, O_TRUNC) are all made before the mount, because
a mount reads each view's map once (docs/views.md: "remount after changing
the images"): an image reset under a mount would be zeroed along a stale
map. Before every run everything is
synced and BACKUP and the run's image are read again (page cache warm,
nothing dirty: no method pays for another's or the setup's writeback).

After every run IMAGE is checked with ``qemu-img compare`` (against BACKUP;
after O_TRUNC against an empty disk) and ``qemu-img check``; a mismatch, or
an unclean image, makes the exit status 1. Missed targets do not.

Flushing: qemu-img convert does NOT flush. ``strace -f -e
trace=fdatasync,fsync,syncfs,sync`` of the anchor (qemu-img 7.2) shows no
call at all: convert's default cache mode for its target is "unsafe" (qemu-img
--help: "'unsafe' (default for convert)"), so when it returns 1 GiB is still
dirty in the page cache. The anchor row is what the admin sees (the convert
target compares to it); the "+ fdatasync" row is the like-for-like one. The
bench strace-checks this once per run (untimed) and prints what it saw.

Targets (medians; a miss is reported, not an error):

- snapfs cp into the view <= 1.15x nbdcopy into a writable qemu-nbd (both
  flushed, both through a qemu-nbd started alike: what FUSE and snapfs add);
- snapfs qemu-img convert -n into the view <= 1.3x qemu-img convert -n into
  the image (the anchor: the same command an admin would type, unflushed);
- O_TRUNC + close of the 8 GiB disk holding 1 GiB < 0.5 s;
- the earlier target: snapfs cp <= 1.5x qemu-img convert -n (the anchor).

snapfs's peak RSS (VmHWM) over the whole mount, every run included, is
printed with the table.

One more, untimed, snapfs restore runs cp under ``strace -T`` (seccomp
filtered: only openat and close stop it) to split cp's time into the
O_TRUNC open, the writes and the flush at close, and samples the CPU time
of snapfs and of the writable qemu-nbd meanwhile.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

from bench import (
    DATA_SIZE,
    DISK_SIZE,
    EXTENT_SIZE,
    EXTENTS,
    SNAPFS,
    GiB,
    MiB,
    Sampler,
    StepError,
    _sigterm,
    cleanup,
    find_snapfs_pid,
    fuse_unmount,
    log,
    peak_rss_mb,
    proc_cmdline,
    read_tail,
    run,
    stop_process,
    wait_until,
)

from snapfs.nbd.qemu import MALLOC_TUNABLES

# IMAGE's data: 8 extents of 128 MiB, one per GiB; the even ones overlap
# BACKUP's by 64 MiB (shifted 64 MiB), the odd ones are apart (512 MiB away).
IMAGE_EXTENTS = [(i * GiB + ((i % 4) * 256 + (64 if i % 2 == 0 else 512)) % 1024 * MiB)
                 for i in range(8)]
PIECE = 8 * MiB
DEFAULT_REPS = 5
WRITER_TIMEOUT = 30.0

ANCHOR = "qemu-img convert -n (anchor)"
ANCHOR_SYNC = "  anchor + fdatasync IMAGE"
NBD_REF = "convert -n into qemu-nbd (ref)"
NBDCOPY = "nbdcopy into qemu-nbd (anchor)"
SNAPFS_CP = "snapfs --rw: cp --sparse=auto"
SNAPFS_CONVERT = "snapfs --rw: qemu-img convert -n"
TRUNC = "snapfs --rw: open(O_TRUNC)+close"
NBDCOPY_TARGET = 1.15   # snapfs cp / nbdcopy into qemu-nbd
CONVERT_TARGET = 1.3    # snapfs convert -n / convert -n into the image
RATIO_TARGET = 1.5      # the earlier target: snapfs cp / convert -n into the image
TRUNC_TARGET = 0.5
# snapfs's writers: --shared=connections + 2 (cli default 4), and its malloc tunables.
WRITER_SHARED = 4 + 2


@dataclasses.dataclass
class Result:
    name: str
    times: list[float] = dataclasses.field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process, all its threads."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    kids = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(k) for k in f.read().split()]
    except OSError:
        pass
    return kids


def write_random_extents(path: str, extents: list[int]) -> None:
    """An 8 GiB sparse raw file with 128 MiB of random data at each offset."""
    with open(path, "wb") as f:
        f.truncate(DISK_SIZE)
        for off in extents:
            f.seek(off)
            for _ in range(EXTENT_SIZE // PIECE):
                f.write(os.urandom(PIECE))


class RestoreBench:
    def __init__(self, tmp: str, reps: int, phases: bool, nbd_ref: bool, nbdcopy: bool = True):
        self.tmp = tmp
        self.reps = reps
        self.phases = phases
        self.nbd_ref = nbd_ref
        self.nbdcopy = nbdcopy
        self.backup = self.path("backup.raw")
        self.pristine = self.path("pristine.qcow2")
        self.zero = self.path("zero.raw")          # an empty 8 GiB disk: what O_TRUNC leaves
        self.anchor_img = self.path("anchor", "disk.qcow2")
        self.imgdir = self.path("images")          # what snapfs mounts
        self.mnt = self.path("mnt")
        self.snapfs_log = self.path("snapfs.log")
        self.results = {n: Result(n) for n in (ANCHOR, ANCHOR_SYNC, NBD_REF, NBDCOPY, SNAPFS_CP,
                                               SNAPFS_CONVERT, TRUNC)}
        self.released: list[float] = []            # cp returned -> writer gone, image free
        self.snapfs_cpu: list[float] = []          # snapfs CPU seconds per cp
        self.snapfs_cpu_convert: list[float] = []  # snapfs CPU seconds per convert -n
        self.nbd_exit: dict[str, list[float]] = {NBD_REF: [], NBDCOPY: []}  # client returned -> qemu-nbd gone
        self.anchor_flushes: str | None = None
        self.phase_report: list[str] = []
        self.mismatches: list[str] = []
        self.pid: int | None = None
        self.peak_rss: float | None = None
        for d in ("anchor", "images", "mnt"):
            os.mkdir(self.path(d))

    def path(self, *parts: str) -> str:
        return os.path.join(self.tmp, *parts)

    def image(self, name: str) -> str:
        return os.path.join(self.imgdir, name + ".qcow2")

    def view(self, name: str) -> str:
        return os.path.join(self.mnt, name + ".qcow2", "chain", f"00-{name}.raw")

    # -- files -----------------------------------------------------------------

    def check_space(self) -> None:
        need = (3 * self.reps + 4 + self.phases) * (DATA_SIZE + 64 * MiB)
        free = shutil.disk_usage(self.tmp).free
        if free < need:
            raise StepError(f"{self.tmp}: {free / GiB:.1f} GiB free, the bench needs {need / GiB:.1f} GiB")

    def build(self) -> None:
        log(f"files in {self.tmp} (one file system for both methods)")
        log(f"building BACKUP: {DISK_SIZE // GiB} GiB sparse raw, {len(EXTENTS)} x "
            f"{EXTENT_SIZE // MiB} MiB of random data...")
        write_random_extents(self.backup, [off for off, _ in EXTENTS])
        log("building IMAGE: 8 GiB qcow2, 1 GiB of other random data, partly overlapping...")
        raw = self.path("pristine.raw")
        write_random_extents(raw, IMAGE_EXTENTS)
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, self.pristine])
        os.unlink(raw)
        with open(self.zero, "wb") as f:
            f.truncate(DISK_SIZE)
        names = [f"restore{i}" for i in range(1, self.reps + 1)]
        names += [f"convert{i}" for i in range(1, self.reps + 1)]
        names += [f"trunc{i}" for i in range(1, self.reps + 1)]
        names += ["phases"] if self.phases else []
        log(f"copying IMAGE {len(names)} times for snapfs's runs...")
        for name in names:
            run(["cp", self.pristine, self.image(name)])
        run(["sync"])

    def reset_anchor(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.anchor_img)
        run(["cp", self.pristine, self.anchor_img])

    @staticmethod
    def prepare(*files: str) -> None:
        """Nothing dirty, and the run's files in the page cache."""
        run(["sync"])
        for f in files:
            run(["cat", f])

    # -- checks ----------------------------------------------------------------

    def mismatch(self, msg: str) -> None:
        msg = f"DATA MISMATCH: {msg}"
        print(f"\n*** {msg} ***\n", file=sys.stderr, flush=True)
        self.mismatches.append(msg)

    def verify(self, what: str, image: str, expected: str) -> None:
        """IMAGE holds what expected holds, and qemu-img check finds nothing."""
        r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", expected, image],
                           capture_output=True, text=True)
        if r.returncode == 1:
            self.mismatch(f"{what}: {r.stdout.strip()}")
        elif r.returncode != 0:
            raise StepError(f"qemu-img compare {image} failed: {r.stderr.strip()}")
        r = subprocess.run(["qemu-img", "check", "-f", "qcow2", image], capture_output=True, text=True)
        if r.returncode != 0:
            out = (r.stdout + r.stderr).strip().splitlines()
            self.mismatch(f"{what}: qemu-img check exited with {r.returncode}: " + " / ".join(out[-3:]))

    # -- snapfs ----------------------------------------------------------------

    @contextlib.contextmanager
    def mount(self):
        run([SNAPFS, "mount", "--rw", "--images", self.imgdir, "--log", self.snapfs_log, self.mnt])
        try:
            self.pid = find_snapfs_pid(self.mnt)
            yield
        finally:
            self.peak_rss = peak_rss_mb(self.pid) if self.pid else None
            r = subprocess.run([SNAPFS, "umount", self.mnt], capture_output=True, text=True)
            if r.returncode != 0:
                log(f"snapfs umount {self.mnt} failed: {r.stderr.strip()}")
                fuse_unmount(self.mnt)

    def writer(self, image: str) -> int | None:
        """The writable qemu-nbd snapfs runs for image, if any."""
        want = os.fsencode(os.path.realpath(image))
        for kid in children(self.pid):
            cmd = proc_cmdline(str(kid))
            if cmd and cmd[0].endswith(b"qemu-nbd") and b"--read-only" not in cmd \
                    and any(want in a for a in cmd):
                return kid
        return None

    def wait_writer_gone(self, image: str) -> float:
        """Seconds until the writable qemu-nbd of image has exited (qemu's lock freed)."""
        t0 = time.perf_counter()
        while self.writer(image) is not None:
            if time.perf_counter() - t0 > WRITER_TIMEOUT:
                raise StepError(f"the writable qemu-nbd of {image} still runs {WRITER_TIMEOUT:.0f} s "
                                "after its file was closed")
            time.sleep(0.002)
        return time.perf_counter() - t0

    # -- runs ------------------------------------------------------------------

    def run_anchor(self) -> float:
        self.reset_anchor()
        self.prepare(self.backup, self.anchor_img)
        t0 = time.perf_counter()
        run(["qemu-img", "convert", "-n", "-O", "qcow2", self.backup, self.anchor_img])
        t = time.perf_counter() - t0
        # What snapfs's close does, and convert (cache=unsafe) does not.
        run(["sync", "--data", self.anchor_img])
        self.results[ANCHOR_SYNC].times.append(time.perf_counter() - t0)
        self.verify(ANCHOR, self.anchor_img, self.backup)
        return t

    def into_nbd(self, what: str, client) -> float:
        """Run client(URI) into a writable qemu-nbd of a fresh IMAGE started as snapfs starts
        its writers; seconds until the client has returned and qemu-nbd has exited."""
        self.reset_anchor()
        self.prepare(self.backup, self.anchor_img)
        sock, pidfile, err = self.path("ref.sock"), self.path("ref.pid"), self.path("ref.err")
        for f in (sock, pidfile):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f)
        env = dict(os.environ)
        env["GLIBC_TUNABLES"] = ":".join(filter(None, (env.get("GLIBC_TUNABLES"), MALLOC_TUNABLES)))
        # Not persistent (no -t): it exits, flushing IMAGE, when its last client disconnects.
        with open(err, "wb") as f:
            proc = subprocess.Popen(
                ["qemu-nbd", f"--shared={WRITER_SHARED}", f"--socket={sock}", f"--pid-file={pidfile}",
                 "--cache=writeback", "--discard=unmap", "--detect-zeroes=on", "-f", "qcow2", self.anchor_img],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=f, env=env)
        client_name = client("URI")[0]
        try:
            wait_until(lambda: os.path.exists(pidfile), "qemu-nbd", proc, err)
            t0 = time.perf_counter()
            run(client(f"nbd+unix:///?socket={sock}"))
            t1 = time.perf_counter()
            proc.wait(WRITER_TIMEOUT)
            t2 = time.perf_counter()
            t = t2 - t0
            self.nbd_exit[what].append(t2 - t1)
            if proc.returncode != 0:
                raise StepError(f"qemu-nbd exited with {proc.returncode}: {read_tail(err)}")
        except subprocess.TimeoutExpired:
            raise StepError(f"qemu-nbd still runs {WRITER_TIMEOUT:.0f} s after {client_name}") from None
        finally:
            stop_process(proc)
        self.verify(what, self.anchor_img, self.backup)
        return t

    def run_nbd_ref(self) -> float:
        """qemu-img convert -n into a writable qemu-nbd started as snapfs starts its writers."""
        return self.into_nbd(NBD_REF, lambda uri: ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw",
                                                   self.backup, uri])

    def run_nbdcopy(self) -> float:
        """nbdcopy --flush into a writable qemu-nbd started as snapfs starts its writers."""
        return self.into_nbd(NBDCOPY, lambda uri: ["nbdcopy", "--flush", self.backup, uri])

    def run_snapfs(self, i: int) -> float:
        name = f"restore{i}"
        image, view = self.image(name), self.view(name)
        self.prepare(self.backup, image)
        cpu0 = cpu_seconds(self.pid)
        t0 = time.perf_counter()
        run(["cp", "--sparse=auto", self.backup, view])
        t = time.perf_counter() - t0
        cpu1 = cpu_seconds(self.pid)
        self.released.append(self.wait_writer_gone(image))
        if cpu0 is not None and cpu1 is not None:
            self.snapfs_cpu.append(cpu1 - cpu0)
        self.verify(SNAPFS_CP, image, self.backup)
        return t

    def run_snapfs_convert(self, i: int) -> float:
        name = f"convert{i}"
        image, view = self.image(name), self.view(name)
        self.prepare(self.backup, image)
        cpu0 = cpu_seconds(self.pid)
        t0 = time.perf_counter()
        run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", self.backup, view])
        t = time.perf_counter() - t0
        cpu1 = cpu_seconds(self.pid)
        self.wait_writer_gone(image)
        if cpu0 is not None and cpu1 is not None:
            self.snapfs_cpu_convert.append(cpu1 - cpu0)
        self.verify(SNAPFS_CONVERT, image, self.backup)
        return t

    def run_trunc(self, i: int) -> float:
        name = f"trunc{i}"
        image, view = self.image(name), self.view(name)
        self.prepare(image)
        t0 = time.perf_counter()
        fd = os.open(view, os.O_WRONLY | os.O_TRUNC)
        os.close(fd)
        t = time.perf_counter() - t0
        self.wait_writer_gone(image)
        self.verify(TRUNC, image, self.zero)
        return t

    def check_anchor_flush(self) -> None:
        """Does qemu-img convert flush IMAGE? strace it once (untimed)."""
        self.reset_anchor()
        out = self.path("anchor.strace")
        run(["strace", "-f", "-qq", "--seccomp-bpf", "-y", "-e", "trace=fdatasync,fsync,syncfs,sync",
             "-o", out, "qemu-img", "convert", "-n", "-O", "qcow2", self.backup, self.anchor_img])
        with open(out) as f:
            calls = [line for line in f if "sync" in line]
        on_image = [c for c in calls if os.path.basename(self.anchor_img) in c]
        verdict = "it flushes IMAGE" if on_image else "it does not flush IMAGE"
        self.anchor_flushes = (f"qemu-img convert under strace: {len(on_image)} fsync/fdatasync on IMAGE, "
                               f"{len(calls)} sync calls in all: {verdict}")
        log(self.anchor_flushes)
        self.verify("qemu-img convert under strace", self.anchor_img, self.backup)

    def run_phases(self) -> None:
        """One more snapfs restore, cp under strace -T: O_TRUNC open, writes, flush at close."""
        image, view = self.image("phases"), self.view("phases")
        self.prepare(self.backup, image)
        out = self.path("cp.strace")
        cpu0 = cpu_seconds(self.pid)
        with Sampler(lambda: (w := self.writer(image)) and cpu_seconds(w), 0.01) as qcpu:
            t0 = time.perf_counter()
            run(["strace", "-qq", "--seccomp-bpf", "-ttt", "-T", "-e", "trace=openat,close", "-o", out,
                 "cp", "--sparse=auto", self.backup, view])
            total = time.perf_counter() - t0
        cpu = cpu_seconds(self.pid) - cpu0
        self.wait_writer_gone(image)
        self.verify("snapfs restore under strace", image, self.backup)
        fd = t_open = d_open = t_close = d_close = None
        with open(out) as f:
            for line in f:
                m = re.match(r"([\d.]+) (\w+)\((.*)\) += (-?\d+).*<([\d.]+)>", line)
                if not m:
                    continue
                ts, call, args, ret, dur = m[1], m[2], m[3], int(m[4]), float(m[5])
                if call == "openat" and view in args:
                    fd, t_open, d_open = ret, float(ts), dur
                elif call == "close" and fd is not None and args == str(fd) and t_close is None:
                    t_close, d_close = float(ts), dur
        if None in (t_open, t_close):
            self.phase_report = [f"(strace of cp: open or close of the view not found in {out})"]
            return
        writes = t_close - (t_open + d_open)
        rep = [f"one more snapfs restore, cp under strace -T (seccomp: openat/close only): {total:.3f} s",
               f"  open(O_WRONLY|O_TRUNC)   {d_open:7.3f} s",
               f"  writes (cp's loop)        {writes:7.3f} s  "
               f"({DATA_SIZE / writes / 1e6:.0f} MB/s over {DATA_SIZE // MiB} MiB)",
               f"  close (flush)            {d_close:7.3f} s",
               f"  rest (cp start, exit)    {total - d_open - writes - d_close:7.3f} s",
               f"  CPU meanwhile: snapfs {cpu:.2f} s"
               + (f", writable qemu-nbd {qcpu.max:.2f} s" if qcpu.max else "")]
        self.phase_report = rep
        for line in rep:
            log(line)

    def main_runs(self) -> None:
        anchor, ref, nbdcopy, snap, conv, trunc = (
            self.results[n] for n in (ANCHOR, NBD_REF, NBDCOPY, SNAPFS_CP, SNAPFS_CONVERT, TRUNC))
        for i in range(1, self.reps + 1):
            order = [(anchor, self.run_anchor)]
            if self.nbd_ref:
                order.append((ref, self.run_nbd_ref))
            if self.nbdcopy:
                order.append((nbdcopy, self.run_nbdcopy))
            order += [(snap, lambda i=i: self.run_snapfs(i)), (conv, lambda i=i: self.run_snapfs_convert(i))]
            if i % 2 == 0:
                order.reverse()
            order.append((trunc, lambda i=i: self.run_trunc(i)))
            for res, fn in order:
                t = fn()
                res.times.append(t)
                log(f"{res.name} run {i}/{self.reps}: {t:.3f} s")

    # -- report ----------------------------------------------------------------

    def report(self) -> None:
        anchor = self.results[ANCHOR]
        print()
        print(f"{'method':34} {'median s':>9} {'min s':>8} {'max s':>8} {'MB/s':>7} {'vs anchor':>10}")
        print("-" * 80)
        for r in self.results.values():
            if not r.times:
                continue
            ratio = f"{r.median / anchor.median:.2f}x" if anchor.times and r.name != TRUNC else "-"
            mbs = f"{DATA_SIZE / r.median / 1e6:.0f}" if r.name != TRUNC else "-"
            print(f"{r.name:34} {r.median:9.3f} {min(r.times):8.3f} {max(r.times):8.3f} {mbs:>7} {ratio:>10}")
        print(f"(runs: {self.reps}, alternating; BACKUP {DISK_SIZE // GiB} GiB raw holding "
              f"{DATA_SIZE // MiB} MiB of data; IMAGE {DISK_SIZE // GiB} GiB qcow2 holding "
              f"{DATA_SIZE // MiB} MiB of other data; MB/s = BACKUP's data / median; files in {self.tmp})")
        print("flush: snapfs's rows include close, which flushes (NBD flush -> fdatasync in qemu-nbd), "
              "nbdcopy --flush sends the same NBD flush,")
        print("       the reference's and nbdcopy's qemu-nbd exit is timed too (it flushes as it exits);")
        print("       " + (self.anchor_flushes or "qemu-img convert's flush not checked"))
        for what, exits in self.nbd_exit.items():
            if exits:
                print(f"       {what.strip()}: qemu-nbd exited {statistics.median(exits):.3f} s (median) "
                      f"after its client returned")
        anchor, synced, ref, ncopy, snap, conv = (
            self.results[n] for n in (ANCHOR, ANCHOR_SYNC, NBD_REF, NBDCOPY, SNAPFS_CP, SNAPFS_CONVERT))

        def ratio(a: Result, b: Result) -> str:
            return f"{a.median / b.median:.2f}x" if a.times and b.times else "n/a"

        print(f"snapfs cp / nbdcopy into qemu-nbd: {ratio(snap, ncopy)} (target <= {NBDCOPY_TARGET}x); "
              f"snapfs convert -n / convert -n into the image: {ratio(conv, anchor)} (target <= {CONVERT_TARGET}x)")
        print(f"snapfs cp / convert -n into the image: {ratio(snap, anchor)} (earlier target <= {RATIO_TARGET}x); "
              f"snapfs cp / (anchor + fdatasync): {ratio(snap, synced)}; "
              f"snapfs cp / qemu-nbd reference: {ratio(snap, ref)}")
        print(f"snapfs convert -n / (anchor + fdatasync): {ratio(conv, synced)}; "
              f"snapfs convert -n / qemu-nbd reference: {ratio(conv, ref)}; "
              f"nbdcopy / qemu-nbd reference: {ratio(ncopy, ref)}")
        if self.snapfs_cpu or self.snapfs_cpu_convert:
            cpu = [f"per {what} (median) {statistics.median(v):.2f} s"
                   for what, v in (("cp", self.snapfs_cpu), ("convert -n", self.snapfs_cpu_convert)) if v]
            print("snapfs CPU " + ", ".join(cpu))
        if self.peak_rss is not None:
            print(f"snapfs peak RSS (VmHWM) over every run of this mount: {self.peak_rss:.1f} MB")
        if self.released:
            print(f"after cp returned, its writable qemu-nbd was gone (image free for qemu-img) within "
                  f"{statistics.median(self.released):.3f} s (median), {max(self.released):.3f} s (max)")
        for line in self.phase_report:
            print(line)
        print()
        print("targets (medians):")
        for name, ok in self.targets():
            print(f"  {'n/a ' if ok is None else 'PASS' if ok else 'MISS'}  {name}")

    def targets(self) -> list[tuple[str, bool | None]]:
        a, n, s, c, t = (self.results[k] for k in (ANCHOR, NBDCOPY, SNAPFS_CP, SNAPFS_CONVERT, TRUNC))

        def within(x: Result, y: Result, limit: float) -> tuple[str, bool | None]:
            if not (x.times and y.times):
                return "n/a", None
            r = x.median / y.median
            return f"{r:.2f}x", r <= limit

        out = []
        for label, (x, y, limit) in (
                ("snapfs cp into the view <= {}x nbdcopy into a writable qemu-nbd", (s, n, NBDCOPY_TARGET)),
                ("snapfs qemu-img convert -n into the view <= {}x qemu-img convert -n into the image (anchor)",
                 (c, a, CONVERT_TARGET)),
        ):
            r, ok = within(x, y, limit)
            out.append((f"{label.format(limit)}: {r}", ok))
        out.append((f"O_TRUNC of the 8 GiB disk holding 1 GiB < {TRUNC_TARGET} s: "
                    + (f"{t.median:.3f} s" if t.times else "n/a"),
                    t.median < TRUNC_TARGET if t.times else None))
        r, ok = within(s, a, RATIO_TARGET)
        out.append((f"earlier target: snapfs cp <= {RATIO_TARGET}x qemu-img convert -n: {r}", ok))
        return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time restoring an 8 GiB disk (1 GiB of data) through snapfs mount --rw "
                    "against qemu-img convert -n and nbdcopy; print a table and the targets.")
    p.add_argument("--reps", type=int, default=DEFAULT_REPS,
                   help=f"repetitions of each measurement (default: {DEFAULT_REPS})")
    p.add_argument("--no-phases", dest="phases", action="store_false",
                   help="skip the extra restore under strace that splits cp's time into phases")
    p.add_argument("--no-nbd-ref", dest="nbd_ref", action="store_false",
                   help="skip the reference row: qemu-img convert -n into a writable qemu-nbd")
    p.add_argument("--no-nbdcopy", dest="nbdcopy", action="store_false",
                   help="skip the NBD anchor row: nbdcopy into a writable qemu-nbd")
    args = p.parse_args(argv)
    if args.reps < 1:
        p.error("--reps must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    if not os.access(SNAPFS, os.X_OK):
        print(f"bench: {SNAPFS} not found; run make setup", file=sys.stderr)
        return 1
    if os.geteuid() != 0:
        print("bench: run as root (snapfs mount --rw and the page cache handling)", file=sys.stderr)
        return 1
    tmp = tempfile.mkdtemp(prefix="snapfs-bench-restore-", dir="/var/tmp")
    bench = None
    errors = []
    try:
        nbdcopy = args.nbdcopy and shutil.which("nbdcopy") is not None
        if args.nbdcopy and not nbdcopy:
            log("nbdcopy not found (Debian: apt-get install libnbd-bin): no nbdcopy row")
        bench = RestoreBench(tmp, args.reps, args.phases, args.nbd_ref, nbdcopy)
        bench.check_space()
        bench.build()
        bench.check_anchor_flush()
        with bench.mount():
            try:
                bench.main_runs()
                if args.phases:
                    bench.run_phases()
            except (StepError, OSError) as e:
                errors.append(str(e))
                print(f"\n*** ERROR: {e} ***\n", file=sys.stderr, flush=True)
                if not isinstance(e, StepError):
                    traceback.print_exc()
                tail = read_tail(bench.snapfs_log)
                if tail:
                    log(f"snapfs log tail:\n{tail}")
        bench.report()
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    except (StepError, OSError) as e:
        print(f"\n*** ERROR: {e} ***\n", file=sys.stderr, flush=True)
        return 1
    finally:
        cleanup(tmp, None)
    if bench.mismatches:
        print("\nDATA MISMATCH:\n  " + "\n  ".join(bench.mismatches), file=sys.stderr)
        return 1
    if errors:
        print("\nERRORS:\n  " + "\n  ".join(errors), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
