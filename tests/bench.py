"""Benchmark snapfs against the other ways of reading a qcow2 disk as raw.

Run as ``.venv/bin/python tests/bench.py`` (``make bench``); this is a report,
not a pytest test. It builds one 8 GiB qcow2 holding 1 GiB of data (8 extents
of 128 MiB spread over the disk) and measures:

- nbdcopy from a read-only qemu-nbd to null: the limit of what any tool can
  get out of qemu for this image;
- ``cp --sparse=auto`` of a page-cached local raw copy of the disk: a
  reference for the ``cp`` rows, since writing 1 GiB into /dev/shm has a cost
  of its own that nbdcopy to null does not pay;
- qemu-storage-daemon's FUSE export and nbdfuse: the ready-made ways of
  showing a disk as one raw file (``cp --sparse=auto`` and ``cat`` of it);
- snapfs: ``cp --sparse=auto`` of the layer view and ``cat`` of the chain
  view (the whole virtual disk), buffered sequential reads of the data, and
  the snapfs process's peak RSS in each;
- ``qemu-img convert -O raw`` to /dev/shm of the image itself (the anchor)
  and of snapfs's layer view, alternating within every repetition;
- a mount of 100 disks of 5 layers each: time until ``snapfs mount`` returns,
  time of a first ``ls -lR``, and how many qemu-nbd it runs meanwhile.

Every measurement is repeated (best and median reported). snapfs is
unmounted and mounted again before every repetition (mount time excluded),
so its chunk cache starts empty. The image file is read before every
run, so every tool starts with it in the host page cache. Copies go to
/dev/shm and are checked against the image with ``qemu-img compare``; a
mismatch makes the exit status non-zero, missed targets do not.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
SNAPFS = os.path.join(os.path.dirname(HERE), ".venv", "bin", "snapfs")

MiB = 1 << 20
GiB = 1 << 30
DISK_SIZE = 8 * GiB
EXTENT_SIZE = 128 * MiB
# (offset, pattern): 8 extents, one per GiB, at varying offsets within it.
EXTENTS = [(i * GiB + (i % 4) * 256 * MiB, 0xA1 + i) for i in range(8)]
DATA_SIZE = EXTENT_SIZE * len(EXTENTS)
DISK_NAME = "disk"
CHUNK = 1 * MiB

MANY_DISKS = 100
MANY_LAYERS = 5
MANY_SIZE = 64 * MiB

STEPS = ("nbdcopy", "reference", "qsd", "nbdfuse", "snapfs", "seqread", "convert", "many")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


class DataMismatch(Exception):
    """A copy does not hold the image's data."""


class StepError(Exception):
    """A tool failed; the message says how."""


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# -- processes and mounts ------------------------------------------------------

def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """Run a command; a failure raises StepError with its stderr."""
    kw.setdefault("stdout", subprocess.DEVNULL)
    kw.setdefault("stderr", subprocess.PIPE)
    r = subprocess.run(cmd, **kw)
    if r.returncode != 0:
        err = (r.stderr or b"").decode(errors="replace").strip()
        raise StepError(f"{' '.join(cmd)} exited with {r.returncode}: {err}")
    return r


def timed(cmd: list[str], **kw) -> float:
    t0 = time.perf_counter()
    run(cmd, **kw)
    return time.perf_counter() - t0


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log(f"pid {proc.pid} ({proc.args[0]}) ignored signal {sig}, killing it")
            proc.kill()
            proc.wait()


def wait_until(cond, what: str, proc: subprocess.Popen | None = None, errfile: str | None = None) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise StepError(f"{what}: process exited with {proc.returncode}: {read_tail(errfile)}")
        if time.monotonic() > deadline:
            raise StepError(f"{what}: not ready within {START_TIMEOUT:.0f} s")
        time.sleep(0.01)


def read_tail(path: str | None, lines: int = 10) -> str:
    if not path:
        return ""
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:]).strip()
    except OSError:
        return ""


def mountpoints() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4].encode().decode("unicode_escape") for line in f]


def is_mounted(path: str) -> bool:
    return os.path.realpath(path) in mountpoints()


def fuse_unmount(path: str) -> None:
    """Unmount a FUSE mount if it is there; lazily if it is busy."""
    if not is_mounted(path):
        return
    if subprocess.run(["fusermount3", "-u", path], stderr=subprocess.DEVNULL).returncode != 0:
        log(f"fusermount3 -u {path} failed, unmounting lazily")
        subprocess.run(["fusermount3", "-u", "-z", path])


def proc_cmdline(pid: str) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def find_snapfs_pid(mountpoint: str) -> int:
    mp = os.fsencode(mountpoint)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        cmd = proc_cmdline(pid)
        if mp in cmd and b"--foreground" in cmd and any(b"snapfs" in a for a in cmd):
            return int(pid)
    raise StepError(f"no snapfs process found for {mountpoint}")


def status_mb(pid: int, field: str) -> float | None:
    """A kB field of ``/proc/PID/status`` (``VmRSS``, ``VmHWM``...) in MB; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb(pid: int) -> float | None:
    """The process's peak RSS so far (VmHWM), in MB."""
    return status_mb(pid, "VmHWM")


def rss_mb(pid: int) -> float | None:
    return status_mb(pid, "VmRSS")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process used so far (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int, comm: str) -> list[int]:
    """Children of pid (all its tasks) whose command is ``comm``."""
    kids = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += f.read().split()
    except OSError:
        pass
    out = []
    for kid in kids:
        try:
            with open(f"/proc/{kid}/comm") as f:
                if f.read().strip() == comm:
                    out.append(int(kid))
        except OSError:
            pass
    return out


def qemu_nbd_children(pid: int) -> int:
    """qemu-nbd processes started by pid (a multithreaded process: all its tasks)."""
    return len(child_pids(pid, "qemu-nbd"))


class Sampler(threading.Thread):
    """Call fn every interval seconds while running; keep the largest value."""

    def __init__(self, fn, interval: float = 0.05):
        super().__init__(daemon=True)
        self.fn = fn
        self.interval = interval
        self.max = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        while True:
            v = self.fn()
            if v is not None and (self.max is None or v > self.max):
                self.max = v
            if self._stop_event.wait(self.interval):
                return

    def __enter__(self) -> Sampler:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop_event.set()
        self.join()


# -- the bench -----------------------------------------------------------------

@dataclasses.dataclass
class Result:
    name: str
    kind: str          # "copy", "cp", "cat", "read", "time"
    times: list[float]
    nbytes: int = 0    # data moved per run (0: not a transfer)

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


class Bench:
    def __init__(self, tmp: str, reps: int):
        self.tmp = tmp
        self.reps = reps
        self.imgdir = os.path.join(tmp, "img")
        self.img = os.path.join(self.imgdir, DISK_NAME + ".qcow2")
        self.copy = f"/dev/shm/snapfs-bench-{os.getpid()}.raw"
        self.mnt = os.path.join(tmp, "mnt")
        self.snapfs_log = os.path.join(tmp, "snapfs.log")
        self.results: dict[str, Result] = {}
        self.rss: dict[str, float] = {}
        self.cpu: dict[str, list[tuple[float, float]]] = {}  # result name -> (snapfs, qemu-nbd) CPU s per run
        self.max_qemu_nbd: int | None = None
        self.mismatches: list[str] = []
        self.errors: list[str] = []     # tool failures worth a non-zero exit
        os.mkdir(self.imgdir)
        os.mkdir(self.mnt)

    def path(self, name: str) -> str:
        return os.path.join(self.tmp, name)

    def add(self, name: str, kind: str, nbytes: int = 0) -> Result:
        r = self.results[name] = Result(name, kind, [], nbytes)
        return r

    def repeat(self, result: Result, fn) -> None:
        """Run fn() (which returns seconds) reps times into result."""
        for i in range(self.reps):
            self.warm_image()
            t = fn()
            result.times.append(t)
            log(f"{result.name} run {i + 1}/{self.reps}: {t:.3f} s")

    # -- image ---------------------------------------------------------------

    def build_image(self) -> None:
        log(f"building image: {DISK_SIZE // GiB} GiB qcow2, {len(EXTENTS)} x "
            f"{EXTENT_SIZE // MiB} MiB of data...")
        run(["qemu-img", "create", "-f", "qcow2", self.img, str(DISK_SIZE)])
        cmd = ["qemu-io", "-f", "qcow2"]
        for off, pattern in EXTENTS:
            cmd += ["-c", f"write -P {pattern:#x} {off} {EXTENT_SIZE}"]
        run(cmd + [self.img])

    def warm_image(self) -> None:
        """Every run starts with the image in the host page cache.

        Read it again before each run: the host may reclaim idle page cache
        (kdamond does on this kind of VM) between runs.
        """
        run(["cat", self.img])

    def verify_copy(self, what: str) -> None:
        """The copy must hold exactly the image's content; checked, not timed."""
        size = os.path.getsize(self.copy)
        if size != DISK_SIZE:
            problem = f"size {size}, expected {DISK_SIZE}"
        else:
            r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", self.copy, self.img],
                               capture_output=True, text=True)
            if r.returncode == 0:
                return
            if r.returncode != 1:
                raise StepError(f"qemu-img compare failed: {r.stderr.strip()}")
            problem = r.stdout.strip()
        self.mismatch(f"{what}: {problem}")

    def mismatch(self, msg: str) -> None:
        msg = f"DATA MISMATCH: {msg}"
        print(f"\n*** {msg} ***\n", file=sys.stderr, flush=True)
        self.mismatches.append(msg)

    def error(self, msg: str) -> None:
        print(f"\n*** ERROR: {msg} ***\n", file=sys.stderr, flush=True)
        self.errors.append(msg)

    def remove_copy(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.copy)

    def timed_cp(self, src: str, what: str) -> float:
        try:
            t = timed(["cp", "--sparse=auto", src, self.copy])
            self.verify_copy(what)
            return t
        finally:
            self.remove_copy()

    @staticmethod
    def timed_cat(src: str) -> float:
        return timed(["cat", src])

    # -- servers -------------------------------------------------------------

    @contextlib.contextmanager
    def qemu_nbd(self):
        """A read-only, persistent qemu-nbd on a UNIX socket; yields the socket."""
        sock = self.path("nbd.sock")
        pidfile = self.path("qemu-nbd.pid")
        err = self.path("qemu-nbd.err")
        with open(err, "wb") as f:
            proc = subprocess.Popen(
                ["qemu-nbd", "-r", "-t", "--shared=16", "-k", sock, f"--pid-file={pidfile}",
                 "-f", "qcow2", "--cache=writeback", self.img],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=f)
        try:
            # Not the socket: qemu-nbd creates it (bind) before it listens,
            # and writes the pid file after.
            wait_until(lambda: os.path.exists(pidfile), "qemu-nbd", proc, err)
            yield sock
        finally:
            stop_process(proc)
            for path in (sock, pidfile):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    @contextlib.contextmanager
    def qsd_export(self):
        """qemu-storage-daemon exporting the image over FUSE; yields the file."""
        mntfile = self.path("qsd-export")
        open(mntfile, "w").close()
        err = self.path("qsd.err")
        cmd = ["qemu-storage-daemon",
               "--blockdev", f"driver=file,node-name=file0,filename={self.img},read-only=on",
               "--blockdev", "driver=qcow2,node-name=fmt0,file=file0,read-only=on",
               "--export", f"type=fuse,id=exp0,node-name=fmt0,mountpoint={mntfile},writable=off"]
        with open(err, "wb") as f:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=f)
        try:
            wait_until(lambda: is_mounted(mntfile), "qemu-storage-daemon", proc, err)
            yield mntfile
        finally:
            stop_process(proc)
            fuse_unmount(mntfile)

    @contextlib.contextmanager
    def nbdfuse(self, sock: str):
        """nbdfuse over a qemu-nbd socket; yields the file it shows."""
        mntdir = self.path("nbdfuse-mnt")
        os.makedirs(mntdir, exist_ok=True)
        pidfile = self.path("nbdfuse.pid")
        err = self.path("nbdfuse.err")
        with open(err, "wb") as f:
            proc = subprocess.Popen(["nbdfuse", "-r", "-P", pidfile, mntdir, "--unix", sock],
                                    stdin=subprocess.DEVNULL, stdout=f, stderr=f)
        try:
            wait_until(lambda: os.path.exists(pidfile) and is_mounted(mntdir), "nbdfuse", proc, err)
            yield os.path.join(mntdir, "nbd")
        finally:
            # nbdfuse must be stopped by unmounting, not by a signal.
            fuse_unmount(mntdir)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                stop_process(proc)

    @contextlib.contextmanager
    def snapfs(self, images: str, mnt: str, rss_key: str | None = None):
        """A snapfs mount; yields the snapfs pid. Samples its RSS under rss_key."""
        run([SNAPFS, "mount", "--images", images, "--log", self.snapfs_log, mnt])
        try:
            pid = find_snapfs_pid(mnt)
            with Sampler(lambda pid=pid: rss_mb(pid)) as rss:
                yield pid
            if rss_key is not None and rss.max is not None:
                self.rss[rss_key] = max(self.rss.get(rss_key, 0.0), rss.max)
        finally:
            self.snapfs_umount(mnt)

    def snapfs_umount(self, mnt: str) -> None:
        r = subprocess.run([SNAPFS, "umount", mnt], capture_output=True, text=True)
        if r.returncode != 0:
            log(f"snapfs umount {mnt} failed: {r.stderr.strip()}")
            fuse_unmount(mnt)

    # -- steps ---------------------------------------------------------------

    def step_nbdcopy(self) -> None:
        log("nbdcopy from qemu-nbd to null...")
        res = self.add("nbdcopy (limit)", "copy", DATA_SIZE)
        with self.qemu_nbd() as sock:
            uri = f"nbd+unix:///?socket={sock}"
            self.repeat(res, lambda: timed(["nbdcopy", uri, "null:"]))

    def step_reference(self) -> None:
        log("cp of a local sparse raw copy of the disk (page cached) to /dev/shm...")
        res = self.add("local raw file: cp (reference)", "cp", DATA_SIZE)
        raw = self.path("disk.raw")
        run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", self.img, raw])
        run(["cat", raw], stdout=subprocess.DEVNULL)
        try:
            self.repeat(res, lambda: self.timed_cp(raw, "local raw file"))
        finally:
            os.unlink(raw)

    def step_qsd(self) -> None:
        log("qemu-storage-daemon FUSE export...")
        cp = self.add("qsd FUSE export: cp", "cp", DATA_SIZE)
        cat = self.add("qsd FUSE export: cat", "cat", DISK_SIZE)
        with self.qsd_export() as f:
            self.repeat(cp, lambda: self.timed_cp(f, "qsd FUSE export"))
            self.repeat(cat, lambda: self.timed_cat(f))

    def step_nbdfuse(self) -> None:
        log("nbdfuse over qemu-nbd...")
        cp = self.add("nbdfuse: cp", "cp", DATA_SIZE)
        cat = self.add("nbdfuse: cat", "cat", DISK_SIZE)
        with self.qemu_nbd() as sock, self.nbdfuse(sock) as f:
            self.repeat(cp, lambda: self.timed_cp(f, "nbdfuse"))
            self.repeat(cat, lambda: self.timed_cat(f))

    def view(self, kind: str) -> str:
        return os.path.join(self.mnt, DISK_NAME + ".qcow2", kind, f"00-{DISK_NAME}.raw")

    def fresh_snapfs(self, fn, cpu_key: str | None = None) -> float:
        """Run fn() (returning seconds) on a new snapfs mount: a cold page cache.

        cpu_key: record the CPU seconds snapfs and its qemu-nbd processes used for it.
        """
        with self.snapfs(self.imgdir, self.mnt, rss_key=f"8 GiB disk, {cpu_key}" if cpu_key else "8 GiB disk") \
                as pid:
            before = cpu_seconds(pid)
            t = fn()
            if cpu_key is not None:
                # The servers started for fn() are still up (they stop when idle).
                nbd = sum(cpu_seconds(k) for k in child_pids(pid, "qemu-nbd"))
                self.cpu.setdefault(cpu_key, []).append((cpu_seconds(pid) - before, nbd))
            return t

    def step_snapfs(self) -> None:
        log("snapfs views (remounted before every run)...")
        cp = self.add("snapfs layer view: cp", "cp", DATA_SIZE)
        cat = self.add("snapfs chain view: cat", "cat", DISK_SIZE)
        self.repeat(cp, lambda: self.fresh_snapfs(
            lambda: self.timed_cp(self.view("layers"), "snapfs layer view"), cp.name))
        self.repeat(cat, lambda: self.fresh_snapfs(lambda: self.timed_cat(self.view("chain")), cat.name))

    def timed_convert(self, src: str, fmt: str, what: str) -> float:
        try:
            t = timed(["qemu-img", "convert", "-f", fmt, "-O", "raw", src, self.copy])
            self.verify_copy(what)
            return t
        finally:
            self.remove_copy()

    def step_convert(self) -> None:
        log("qemu-img convert -O raw to /dev/shm: of the image, and of snapfs's layer view...")
        anchor = self.add("qemu-img convert of the image", "convert", DATA_SIZE)
        view = self.add("snapfs layer view: qemu-img convert", "convert", DATA_SIZE)
        for _ in range(self.reps):  # alternating: the same machine state for both
            self.warm_image()
            anchor.times.append(self.timed_convert(self.img, "qcow2", "qemu-img convert of the image"))
            log(f"{anchor.name}: {anchor.times[-1]:.3f} s")
            self.warm_image()
            view.times.append(self.fresh_snapfs(
                lambda: self.timed_convert(self.view("layers"), "raw", view.name), view.name))
            log(f"{view.name}: {view.times[-1]:.3f} s")

    def step_seqread(self) -> None:
        log(f"snapfs sequential reads of the data in {CHUNK // MiB} MiB chunks...")
        res = self.add("snapfs layer view: read data", "read", DATA_SIZE)
        self.repeat(res, lambda: self.fresh_snapfs(lambda: self.read_extents(self.view("layers")), res.name))

    def read_extents(self, path: str) -> float:
        buf = bytearray(CHUNK)
        bad = []
        t0 = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            for off, pattern in EXTENTS:
                f.seek(off)
                for pos in range(off, off + EXTENT_SIZE, CHUNK):
                    n = f.readinto(buf)
                    if n != CHUNK or buf[0] != pattern or buf[-1] != pattern:
                        bad.append(pos)
        t = time.perf_counter() - t0
        if bad:
            self.mismatch(f"snapfs sequential read: {len(bad)} bad chunks, first at {bad[0]}")
        return t

    def build_many(self) -> str:
        """MANY_DISKS directories, each a copy of one MANY_LAYERS-layer chain."""
        log(f"building {MANY_DISKS} disks x {MANY_LAYERS} layers...")
        template = self.path("many-template")
        os.mkdir(template)
        names = ["base.qcow2"] + [f"l{i}.qcow2" for i in range(1, MANY_LAYERS)]
        run(["qemu-img", "create", "-f", "qcow2", names[0], str(MANY_SIZE)], cwd=template)
        for i, name in enumerate(names):
            if i:
                # A relative backing name, so the copies point at their own base.
                run(["qemu-img", "create", "-f", "qcow2", "-b", names[i - 1], "-F", "qcow2", name],
                    cwd=template)
            run(["qemu-io", "-f", "qcow2", "-c", f"write -P {0x31 + i:#x} {i * MiB} {MiB}", name],
                cwd=template)
        root = self.path("many")
        os.mkdir(root)
        for d in range(MANY_DISKS):
            sub = os.path.join(root, f"disk{d:03d}")
            os.mkdir(sub)
            run(["cp", "--reflink=auto"] + [os.path.join(template, n) for n in names] + [sub])
        return root

    def step_many(self) -> None:
        root = self.build_many()
        mnt = self.path("many-mnt")
        os.mkdir(mnt)
        label = f"{MANY_DISKS}x{MANY_LAYERS}"
        ready = self.add(f"{label}: mount ready", "time")
        ls = self.add(f"{label}: first ls -lR", "time")
        log(f"mounting {label} and listing it (remounted before every run)...")
        for i in range(self.reps):
            t0 = time.perf_counter()
            run([SNAPFS, "mount", "--images", root, "--log", self.snapfs_log, mnt])
            ready.times.append(time.perf_counter() - t0)
            try:
                pid = find_snapfs_pid(mnt)
                with Sampler(lambda pid=pid: rss_mb(pid)) as rss, \
                        Sampler(lambda pid=pid: qemu_nbd_children(pid), 0.02) as servers:
                    t0 = time.perf_counter()
                    r = subprocess.run(["ls", "-lR", mnt], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE, text=True)
                    ls.times.append(time.perf_counter() - t0)
                if r.returncode != 0:
                    # Timed all the same; but files missing from the mount is an error.
                    self.error(f"ls -lR of the {label} mount exited with {r.returncode}:\n"
                               + "\n".join(r.stderr.strip().splitlines()[:10]))
                if rss.max is not None:
                    self.rss[label] = max(self.rss.get(label, 0.0), rss.max)
                if servers.max is not None:
                    self.max_qemu_nbd = max(self.max_qemu_nbd or 0, servers.max)
            finally:
                self.snapfs_umount(mnt)
            log(f"{label} run {i + 1}/{self.reps}: mount {ready.times[-1]:.3f} s, "
                f"ls -lR {ls.times[-1]:.3f} s, max {servers.max} qemu-nbd")

    # -- report --------------------------------------------------------------

    def ratio(self, r: Result, base_name: str | None) -> str:
        base = self.results.get(base_name) if base_name else None
        if base is None or not base.times or not r.times or r.kind == "time":
            return "-"
        return f"{r.best / base.best:.2f}x"

    def report(self) -> None:
        rows = [r for r in self.results.values() if r.times]
        print()
        print(f"{'name':34} {'best s':>8} {'median s':>9} {'MB/s':>8} {'vs nbdcopy':>11} {'vs qsd':>8}")
        print("-" * 83)
        for r in rows:
            mbs = f"{r.nbytes / r.best / 1e6:.0f}" if r.nbytes else "-"
            qsd = {"cp": "qsd FUSE export: cp", "cat": "qsd FUSE export: cat"}.get(r.kind)
            print(f"{r.name:34} {r.best:8.3f} {r.median:9.3f} {mbs:>8} "
                  f"{self.ratio(r, 'nbdcopy (limit)'):>11} {self.ratio(r, qsd):>8}")
        print(f"(runs: {self.reps}; MB/s = data moved per run / best: cp and nbdcopy "
              f"{DATA_SIZE // MiB} MiB of data, cat the whole {DISK_SIZE // GiB} GiB disk; "
              f"ratios compare best times)")
        for key, mb in self.rss.items():
            print(f"snapfs max RSS ({key}): {mb:.1f} MB")
        if self.cpu:
            print()
            print(f"{'CPU seconds per GiB read (medians)':44} {'snapfs':>8} {'qemu-nbd':>9}")
            for key, runs in self.cpu.items():
                gib = self.results[key].nbytes / GiB
                snap = statistics.median(a for a, _ in runs) / gib
                nbd = statistics.median(b for _, b in runs) / gib
                print(f"{key:44} {snap:8.2f} {nbd:9.2f}")
            print(f"(GiB: what the reader got, {DATA_SIZE // MiB} MiB of data for cp and read, the "
                  f"{DISK_SIZE // GiB} GiB disk for cat; /proc/PID/stat utime + stime)")
        if self.max_qemu_nbd is not None:
            print(f"max qemu-nbd processes during ls -lR: {self.max_qemu_nbd}")
        print()
        print("targets:")
        for name, ok in self.targets():
            print(f"  {'n/a ' if ok is None else 'PASS' if ok else 'MISS'}  {name}")

    def targets(self) -> list[tuple[str, bool | None]]:
        def times(name):
            r = self.results.get(name)
            return r.times if r and r.times else None

        def best(name):
            t = times(name)
            return min(t) if t else None

        def median(name):
            t = times(name)
            return statistics.median(t) if t else None

        def check(cond, *values):
            return None if any(v is None for v in values) else cond(*values)

        nbdcopy = best("nbdcopy (limit)")
        qsd_cp, qsd_cat = "qsd FUSE export: cp", "qsd FUSE export: cat"
        cp, cat = "snapfs layer view: cp", "snapfs chain view: cat"
        read = "snapfs layer view: read data"
        floor = "local raw file: cp (reference)"
        ready, ls = best(f"{MANY_DISKS}x{MANY_LAYERS}: mount ready"), best(f"{MANY_DISKS}x{MANY_LAYERS}: first ls -lR")
        rss = max(self.rss.values()) if self.rss else None
        label = f"{MANY_DISKS}x{MANY_LAYERS}"
        return [
            # Reads at the speed of the data (medians; "every run": the slowest
            # snapfs run against the fastest qsd run).
            ("cp of snapfs layer view <= 2x the local copy (medians)",
             check(lambda a, b: a <= 2 * b, median(cp), median(floor))),
            ("cp of snapfs layer view faster than qsd cp in every run",
             check(lambda a, b: max(a) < min(b), times(cp), times(qsd_cp))),
            ("sequential reads >= 1.5 GB/s (median)", check(lambda t: DATA_SIZE / t >= 1.5e9, median(read))),
            ("cat of snapfs chain view <= 0.4x qsd cat (medians)",
             check(lambda a, b: a <= 0.4 * b, median(cat), median(qsd_cat))),
            ("qemu-img convert of a snapfs view <= 1.3x the same convert of the image (medians)",
             check(lambda a, b: a <= 1.3 * b, median("snapfs layer view: qemu-img convert"),
                   median("qemu-img convert of the image"))),
            # Earlier targets (best times).
            ("cp of snapfs layer view <= 1.3x nbdcopy (best)", check(lambda a, b: a <= 1.3 * b, best(cp), nbdcopy)),
            ("sequential reads >= 1 GB/s (best)", check(lambda t: DATA_SIZE / t >= 1e9, best(read))),
            ("snapfs max RSS < 150 MB", check(lambda m: m < 150, rss)),
            (f"{label} mount ready < 2 s (best)", check(lambda t: t < 2, ready)),
            (f"{label} ls -lR < 10 s (best)", check(lambda t: t < 10, ls)),
        ]


# -- main ----------------------------------------------------------------------

def cleanup(tmp: str, bench: Bench | None) -> None:
    """Last line of defence: nothing mounted under tmp, no copy left, tmp gone."""
    for mp in mountpoints():
        if mp == tmp or mp.startswith(tmp + "/"):
            log(f"{mp} still mounted, unmounting it")
            fuse_unmount(mp)
    if bench is not None:
        bench.remove_copy()
    if any(mp.startswith(tmp + "/") for mp in mountpoints()):
        log(f"mounts left under {tmp}; not removing it")
        return
    shutil.rmtree(tmp, ignore_errors=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time snapfs against nbdcopy, qemu-storage-daemon's FUSE export and nbdfuse "
                    "on an 8 GiB qcow2 holding 1 GiB of data; print a table and the targets.")
    p.add_argument("--quick", action="store_true",
                   help=f"one run per measurement, and skip the {MANY_DISKS}x{MANY_LAYERS} mount "
                        "(unless named in --only)")
    p.add_argument("--only", metavar="NAME[,NAME]",
                   help=f"run only these steps: {', '.join(STEPS)}")
    p.add_argument("--reps", type=int, default=3, help="runs per measurement (default: 3)")
    args = p.parse_args(argv)
    if args.only:
        args.steps = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [s for s in args.steps if s not in STEPS]
        if unknown:
            p.error(f"unknown step(s) {', '.join(unknown)}; choose from {', '.join(STEPS)}")
    else:
        args.steps = [s for s in STEPS if not (args.quick and s == "many")]
    if args.quick:
        args.reps = 1
    if args.reps < 1:
        p.error("--reps must be at least 1")
    return args


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_steps(Bench, "snapfs-bench-", args.reps, args.steps,
                     build=any(s != "many" for s in args.steps), log_tail_steps=("snapfs", "seqread", "many"))


def run_steps(bench_cls, prefix: str, reps: int, steps, build: bool = True, log_tail_steps=None,
              snapfs: str | None = SNAPFS) -> int:
    """Build the image, run each ``step_NAME`` of a bench, report, clean up; the exit status
    (2 for a copy that differs from its source, 1 for a step that failed).

    snapfs: the command the bench needs (None: the bench finds its own).
    """
    signal.signal(signal.SIGTERM, _sigterm)
    if snapfs is not None and not os.access(snapfs, os.X_OK):
        print(f"bench: {snapfs} not found; run make setup", file=sys.stderr)
        return 1
    tmp = tempfile.mkdtemp(prefix=prefix, dir="/var/tmp")
    bench = None
    try:
        bench = bench_cls(tmp, reps)
        if build:
            bench.build_image()
        for step in steps:
            try:
                getattr(bench, f"step_{step}")()
            except (StepError, OSError) as e:
                bench.error(f"step {step} failed: {e}")
                if not isinstance(e, StepError):
                    traceback.print_exc()
                tail = read_tail(bench.snapfs_log)
                if tail and (log_tail_steps is None or step in log_tail_steps):
                    log(f"snapfs log tail:\n{tail}")
        bench.report()
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    finally:
        cleanup(tmp, bench)
    if bench.mismatches:
        print("\nDATA MISMATCH:\n  " + "\n  ".join(bench.mismatches), file=sys.stderr)
        return 2
    if bench.errors:
        print("\nERRORS:\n  " + "\n  ".join(bench.errors), file=sys.stderr)
        return 1
    return 0

if __name__ == "__main__":
    sys.exit(main())
