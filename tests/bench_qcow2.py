"""Benchmark the composed ``NAME.qcow2`` files against the ``NAME.raw`` views.

Run as ``.venv/bin/python tests/bench_qcow2.py`` (part of ``make bench``;
about 2-3 minutes); this is a report, not a pytest test. It builds bench.py's
image (an 8 GiB qcow2 holding 1 GiB of data, 8 extents of 128 MiB spread
over the disk) in a new directory /var/tmp/snapfs-bench-qcow2-* (removed on exit),
mounts it, and measures on its layer view ``layers/00-disk``:

- copies to /dev/shm, the three methods alternating within every
  repetition (9 by default; the order rotates, so each method runs first,
  second and last equally often when the count is a multiple of 3):

  - ``cp 00-disk.qcow2``: the composed qcow2 file;
  - ``cp --sparse=auto 00-disk.raw``: the anchor, the same data as a sparse
    raw file;
  - ``qemu-img convert -f raw -O qcow2 00-disk.raw``: what a user without
    the ``.qcow2`` files does to get a qcow2 of the view;

- size overhead: ``st_size`` of the ``.qcow2`` minus the view's data bytes
  (the ``.map.json``: sum of the lengths of the extents that are not holes),
  as a percentage of the data;
- ``os.stat`` of the ``.qcow2`` and of the ``.raw``: the first one on a fresh
  mount, where the view's map is not known yet (the stat reads it: a server
  start and the block status; the folder above is looked up first, untimed,
  so only the file's lookup is timed), one stat per mount, alternating which
  file; and many stats on one mount whose maps are known (blocks of stats,
  alternating), median per call.

Targets (medians): cp of the ``.qcow2`` at most 1.1x the anchor and faster
than qemu-img convert; size overhead at most 0.5% of the data; both stats of
the ``.qcow2`` no slower than the ``.raw``'s.

What the stats compare: snapfs answers the first lookup of either file only
once the view's map is read (both need it: ``st_blocks`` of the ``.raw``,
``st_size`` of the ``.qcow2``), then lays the ``.qcow2`` out from the map
(microseconds for this map); its attributes are then cached by the kernel
(``attr_timeout``), so warm stats measure the kernel's cache, which is the
same for both files. The two stat targets are therefore judged with a 10%
margin for noise (``STAT_MARGIN``); the table prints the ratios themselves.

Fairness of the copies: all run on one mount (mount time excluded) whose
view map was read before the first run, so no run pays for the map. Before
every run the bench waits until the mount runs no qemu-nbd at all (snapfs
stops a server ``--idle-timeout``, 2 s, after its last file closed, and its
chunk cache goes with it): every run opens its file as a user would, starts
the view's server and reads through an empty chunk cache; none benefits from
what the previous run left. The image file is read before every run (host
page cache warm for every method, as in bench.py), and the destination is
removed after every run (untimed).

Every kind of copy is checked once (its first run, untimed): ``qemu-img
compare`` of the copy with the ``.raw`` view must say identical, and
``qemu-img check`` of a qcow2 copy must be clean. A mismatch or an unclean
copy makes the exit status 1 (as in bench.py and bench_restore.py); missed
targets do not: they print MISS and the bench exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

from bench import (
    DATA_SIZE,
    DISK_SIZE,
    SNAPFS,
    Bench,
    GiB,
    MiB,
    StepError,
    find_snapfs_pid,
    log,
    peak_rss_mb,
    qemu_nbd_children,
    run,
    run_steps,
)

DEFAULT_REPS = 9
COLD_STATS = 15          # fresh mounts per file for the first stat
WARM_BLOCKS = 10         # alternating blocks of warm stats per file
WARM_PER_BLOCK = 500
IDLE_TIMEOUT = 30.0      # the longest wait for the mount's servers to stop

QCOW2_CP = "cp .qcow2"
RAW_CP = "cp --sparse=auto .raw (anchor)"
CONVERT = "qemu-img convert -O qcow2 .raw"
COPY_TARGET = 1.1
SIZE_TARGET = 0.5        # percent of the data
# The stat targets (.qcow2 no slower than .raw) are judged with this margin:
# both do the same work (module docstring), and noise alone moves the
# medians of the two by a few percent either way on this machine.
STAT_MARGIN = 1.10


class Qcow2Bench(Bench):
    """bench.py's image and mount helpers; the runs of this bench."""

    def __init__(self, tmp: str, reps: int):
        super().__init__(tmp, reps)
        self.dest = f"/dev/shm/snapfs-bench-qcow2-{os.getpid()}"
        self.copies = {n: [] for n in (QCOW2_CP, RAW_CP, CONVERT)}
        self.checked: set[str] = set()
        self.peak_rss: float | None = None
        self.checks: list[str] = []
        self.cold = {"qcow2": [], "raw": []}
        self.warm = {"qcow2": [], "raw": []}
        self.sizes: dict[str, int] = {}
        self.data_bytes: int | None = None
        self.qcow2_size = 0
        self.pid: int | None = None

    def file(self, ext: str) -> str:
        """The layer view as ``.raw`` or ``.qcow2``, or its ``.map.json``."""
        return self.view("layers")[:-len(".raw")] + "." + ext

    # -- mount -----------------------------------------------------------------

    @contextlib.contextmanager
    def mount(self):
        """A snapfs mount of the image with the default options; no sampler thread."""
        run([SNAPFS, "mount", "--images", self.imgdir, "--log", self.snapfs_log, self.mnt])
        try:
            self.pid = find_snapfs_pid(self.mnt)
            yield
        finally:
            rss = peak_rss_mb(self.pid) if self.pid else None
            if rss is not None:
                self.peak_rss = max(self.peak_rss or 0.0, rss)
            self.snapfs_umount(self.mnt)
            self.pid = None

    def wait_idle(self) -> float:
        """Seconds until the mount runs no qemu-nbd (its chunk caches gone)."""
        t0 = time.perf_counter()
        while qemu_nbd_children(self.pid):
            if time.perf_counter() - t0 > IDLE_TIMEOUT:
                raise StepError(f"snapfs still runs a qemu-nbd {IDLE_TIMEOUT:.0f} s after the last close")
            time.sleep(0.05)
        return time.perf_counter() - t0

    # -- copies ----------------------------------------------------------------

    def remove_copy(self) -> None:
        super().remove_copy()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.dest)

    def check_copy(self, name: str, fmt: str) -> None:
        """The copy holds the .raw view's content, and a qcow2 copy is clean (untimed)."""
        r = subprocess.run(["qemu-img", "compare", "-f", fmt, "-F", "raw", self.dest, self.file("raw")],
                           capture_output=True, text=True)
        if r.returncode == 1:
            self.mismatch(f"{name}: {r.stdout.strip()}")
            verdict = "compare: DIFFERENT"
        elif r.returncode != 0:
            raise StepError(f"qemu-img compare of {name} failed: {r.stderr.strip()}")
        else:
            verdict = f"compare: {r.stdout.strip()}"
        if fmt == "qcow2":
            r = subprocess.run(["qemu-img", "check", "-f", "qcow2", self.dest], capture_output=True, text=True)
            out = (r.stdout + r.stderr).strip().splitlines()
            if r.returncode != 0:
                self.mismatch(f"{name}: qemu-img check exited with {r.returncode}: " + " / ".join(out[-3:]))
                verdict += f"; check: exit {r.returncode}"
            else:
                verdict += f"; check: {out[0] if out else 'clean'}"
            self.sizes[name] = os.path.getsize(self.dest)
        self.checks.append(f"{name}: {verdict}")
        log(f"{name}: {verdict}")

    def copy_run(self, name: str) -> float:
        cmd, fmt = {
            QCOW2_CP: (["cp", self.file("qcow2"), self.dest], "qcow2"),
            RAW_CP: (["cp", "--sparse=auto", self.file("raw"), self.dest], "raw"),
            CONVERT: (["qemu-img", "convert", "-f", "raw", "-O", "qcow2", self.file("raw"), self.dest], "qcow2"),
        }[name]
        self.remove_copy()
        self.warm_image()
        self.wait_idle()
        try:
            t0 = time.perf_counter()
            run(cmd)
            t = time.perf_counter() - t0
            if name not in self.checked:
                self.checked.add(name)
                self.check_copy(name, fmt)
            return t
        finally:
            self.remove_copy()

    def step_copies(self) -> None:
        names = [QCOW2_CP, RAW_CP, CONVERT]
        log(f"copies to /dev/shm, {self.reps} runs each, alternating; waiting for idle servers "
            "before every run...")
        with self.mount():
            # The map is read once per mount: read it now, so no run pays for it.
            os.stat(self.file("raw"))
            self.data_bytes = self.map_data_bytes()
            self.qcow2_size = os.stat(self.file("qcow2")).st_size
            for i in range(self.reps):
                k = i % len(names)
                for name in names[k:] + names[:k]:
                    t = self.copy_run(name)
                    self.copies[name].append(t)
                    log(f"{name} run {i + 1}/{self.reps}: {t:.3f} s")

    def map_data_bytes(self) -> int:
        with open(self.file("map.json"), "rb") as f:
            extents = json.load(f)
        return sum(e["length"] for e in extents if not e["hole"])

    # -- stat ------------------------------------------------------------------

    def step_stat(self) -> None:
        log(f"first stat on a fresh mount, {COLD_STATS} mounts per file, alternating...")
        for i in range(COLD_STATS):
            for ext in (("qcow2", "raw") if i % 2 == 0 else ("raw", "qcow2")):
                path = self.file(ext)
                with self.mount():
                    os.stat(os.path.dirname(path))  # the folders' lookups, untimed
                    t0 = time.perf_counter()
                    os.stat(path)
                    self.cold[ext].append(time.perf_counter() - t0)
                log(f"first stat .{ext} {i + 1}/{COLD_STATS}: {self.cold[ext][-1] * 1e3:.1f} ms")
        log(f"warm stats: {WARM_BLOCKS} blocks of {WARM_PER_BLOCK} per file, alternating...")
        with self.mount():
            for ext in self.warm:
                os.stat(self.file(ext))
            clock = time.perf_counter_ns
            for i in range(WARM_BLOCKS):
                for ext in (("qcow2", "raw") if i % 2 == 0 else ("raw", "qcow2")):
                    path, out = self.file(ext), self.warm[ext]
                    for _ in range(WARM_PER_BLOCK):
                        t0 = clock()
                        os.stat(path)
                        out.append(clock() - t0)

    # -- report ----------------------------------------------------------------

    def report(self) -> None:
        med = {n: statistics.median(t) for n, t in self.copies.items() if t}
        print()
        print(f"{'copy to /dev/shm':32} {'median s':>9} {'min s':>7} {'max s':>7} {'MB/s':>6} "
              f"{'vs raw cp':>10} {'vs convert':>11}")
        print("-" * 88)
        for name, times in self.copies.items():
            if not times:
                continue
            m = med[name]
            vs = [f"{m / med[a]:.2f}x" if a in med else "-" for a in (RAW_CP, CONVERT)]
            print(f"{name:32} {m:9.3f} {min(times):7.3f} {max(times):7.3f} {DATA_SIZE / m / 1e6:6.0f} "
                  f"{vs[0]:>10} {vs[1]:>11}")
        print(f"(runs: {self.reps}, alternating, order rotated; each run waits for the mount's servers to "
              f"stop first: empty chunk cache; MB/s = {DATA_SIZE // MiB} MiB of data / median; "
              f"layer view of an {DISK_SIZE // GiB} GiB qcow2)")
        for line in self.checks:
            print(f"  checked once: {line}")
        if self.peak_rss is not None:
            print(f"snapfs peak RSS (VmHWM, the largest of this bench's mounts): {self.peak_rss:.1f} MB")
        if self.data_bytes is not None:
            over = self.qcow2_size - self.data_bytes
            print()
            print(f"size: .qcow2 st_size {self.qcow2_size} B, data (map.json, not holes) {self.data_bytes} B, "
                  f"overhead {over} B = {over / max(1, self.data_bytes) * 100:.3f}% of the data")
            if CONVERT in self.sizes:
                c = self.sizes[CONVERT]
                print(f"      (qemu-img convert's qcow2: {c} B, {(c - self.data_bytes) / self.data_bytes * 100:+.3f}%)")
        if any(self.cold.values()) or any(self.warm.values()):
            print()
            print(f"{'os.stat':32} {'median':>10} {'min':>10} {'max':>10} {'vs .raw':>8}")
            print("-" * 74)
            for label, d, unit, scale in (("first stat, fresh mount", self.cold, "ms", 1e3),
                                          ("warm stat", self.warm, "us", 1e-3)):
                for ext in ("qcow2", "raw"):
                    v = d[ext]
                    if not v:
                        continue
                    ratio = f"{statistics.median(v) / statistics.median(d['raw']):.2f}x" if d["raw"] else "-"
                    row = [f"{x * scale:.{1 if unit == 'ms' else 2}f} {unit}"
                           for x in (statistics.median(v), min(v), max(v))]
                    print(f"{label + ': .' + ext:32} {row[0]:>10} {row[1]:>10} {row[2]:>10} {ratio:>8}")
            print(f"(first stat: {COLD_STATS} fresh mounts per file, alternating, folder looked up first; "
                  f"warm: {WARM_BLOCKS} x {WARM_PER_BLOCK} stats per file, alternating blocks)")
        print()
        print("targets (medians):")
        for name, ok in self.targets(med):
            print(f"  {'n/a ' if ok is None else 'PASS' if ok else 'MISS'}  {name}")

    def targets(self, med: dict[str, float]) -> list[tuple[str, bool | None]]:
        def both(a, b, cond):
            return cond(med[a], med[b]) if a in med and b in med else None

        def stat(d):
            return statistics.median(d["qcow2"]) <= STAT_MARGIN * statistics.median(d["raw"]) \
                if d["qcow2"] and d["raw"] else None

        size = None
        if self.data_bytes is not None:
            size = (self.qcow2_size - self.data_bytes) / self.data_bytes * 100 <= SIZE_TARGET
        return [
            (f"cp .qcow2 <= {COPY_TARGET}x cp --sparse=auto .raw", both(QCOW2_CP, RAW_CP,
                                                                       lambda a, b: a <= COPY_TARGET * b)),
            ("cp .qcow2 faster than qemu-img convert -O qcow2 .raw", both(QCOW2_CP, CONVERT, lambda a, b: a < b)),
            (f".qcow2 size overhead <= {SIZE_TARGET}% of the data", size),
            (f"first stat of .qcow2 (fresh mount) <= .raw (margin {STAT_MARGIN:.2f}x: noise)", stat(self.cold)),
            (f"warm stat of .qcow2 <= .raw (margin {STAT_MARGIN:.2f}x: noise)", stat(self.warm)),
        ]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time copying a view's composed .qcow2 against cp of its .raw and qemu-img convert "
                    "of the .raw, its size overhead and its stat; print a table and the targets.")
    p.add_argument("--reps", type=int, default=DEFAULT_REPS,
                   help=f"runs of each copy method (default: {DEFAULT_REPS})")
    p.add_argument("--no-stat", dest="stat", action="store_false", help="skip the stat measurements")
    args = p.parse_args(argv)
    if args.reps < 1:
        p.error("--reps must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    steps = ["copies"] + (["stat"] if args.stat else [])
    return run_steps(Qcow2Bench, "snapfs-bench-qcow2-", args.reps, steps)

if __name__ == "__main__":
    sys.exit(main())
