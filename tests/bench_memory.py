"""How much memory does snapfs take reading many views at once, and does it come back?

1. malloc: worker threads make 2 MiB buffers as libnbd's pread does (a
   bytes object per chunk, allocated in the thread), with snapfs's
   ``tune_malloc()`` and with per-thread arenas as glibc makes by default;
   all are freed; RSS then, and after ``malloc_trim(0)``.
2. a real mount: DISKS qcow2 images (qemu-img, qemu-io) of DATA MiB written
   under bitmap b1, mounted with ``snapfs mount --foreground``; every
   disk's dirty view read at once by ``dd``; the snapfs process's VmHWM
   while reading, and its VmRSS once every qemu-nbd has stopped.

Run: .venv/bin/python tests/bench_memory.py [--disks N] [--data MIB] [--bs SIZE]
[--cache-size MIB] [--snapfs DIR] [--no-trim] [--per-thread-arenas]
[--skip-malloc]. --snapfs runs the snapfs package found in DIR (another
version, to compare); --no-trim runs it with ``trim_malloc`` made a no-op,
--per-thread-arenas with ``tune_malloc`` leaving glibc's arenas as they are.
"""

import argparse
import concurrent.futures
import glob
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20
CHUNK = 2 * MiB


def status(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) // 1024  # MiB
    raise KeyError(field)


def malloc_experiment(per_thread_arenas, chunks=128):
    sys.path.insert(0, HERE)
    from snapfs.nbd import chunks as mod
    if per_thread_arenas:  # tune_malloc but for M_ARENA_MAX (glibc's default: up to 8 per CPU)
        libc = mod._libc()
        for param, value in ((mod._M_MMAP_THRESHOLD, 32 << 20), (mod._M_TRIM_THRESHOLD, 32 << 20),
                             (mod._M_TOP_PAD, 4 << 20)):
            libc.mallopt(param, value)
    else:
        mod.tune_malloc()
    me = os.getpid()
    start = status(me, "VmRSS")
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        bufs = list(ex.map(lambda i: bytes([i & 0xFF]) * CHUNK, range(chunks)))
    full = status(me, "VmRSS")
    del bufs
    freed = status(me, "VmRSS")
    mod.trim_malloc()
    after = status(me, "VmRSS")
    kind = "per-thread arenas" if per_thread_arenas else "one arena (tune_malloc)"
    print(f"malloc, {kind}: {chunks} chunks of 2 MiB made in 8 threads: RSS {start} -> {full} MiB; "
          f"all freed: {freed} MiB; after malloc_trim(0): {after} MiB")


def build(images, disks, data):
    for i in range(disks):
        path = os.path.join(images, f"d{i:02}.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, f"{data * 2}M"], check=True)
        subprocess.run(["qemu-img", "bitmap", "--add", path, "b1"], check=True)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {i + 1} 0 {data}M", path], check=True,
                       stdout=subprocess.DEVNULL)


COUNT_FETCHES = """
import atexit, snapfs.nbd.chunks as chunks
fetched = [0]
init = chunks.ChunkCache.__init__
def counting_init(self, fetch, *args, **kwargs):
    async def counted(length, offset):
        fetched[0] += length
        return await fetch(length, offset)
    init(self, counted, *args, **kwargs)
chunks.ChunkCache.__init__ = counting_init
atexit.register(lambda: print(f"fetched by the chunk caches: {fetched[0] >> 20} MiB", flush=True))
"""


# tune_malloc as it was before it asked for one arena.
PER_THREAD_ARENAS = """
import snapfs.nbd.chunks as c
def tune_malloc():
    libc = c._libc()
    return all([libc.mallopt(c._M_MMAP_THRESHOLD, 32 << 20), libc.mallopt(c._M_TRIM_THRESHOLD, 32 << 20),
                libc.mallopt(c._M_TOP_PAD, 4 << 20)])
c.tune_malloc = tune_malloc
"""


def qemu_nbd_children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid), "qemu-nbd"], capture_output=True, text=True).stdout
    return len(out.split())


def mount_experiment(args, work):
    images, mnt = os.path.join(work, "images"), os.path.join(work, "mnt")
    os.mkdir(images)
    os.mkdir(mnt)
    build(images, args.disks, args.data)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    code = "import sys\n"
    if args.snapfs:
        code += f"sys.path.insert(0, {args.snapfs!r})\n"
    if args.no_trim:
        code += "import snapfs.nbd.chunks as c\nc.trim_malloc = lambda: False\n"
    if args.per_thread_arenas:
        code += PER_THREAD_ARENAS
    # Count what the chunk caches fetch (each version's ChunkCache gets its fetch function first).
    code += COUNT_FETCHES
    code += "import snapfs, snapfs.cli\nprint('snapfs from', snapfs.__file__, flush=True)\n"
    code += "sys.exit(snapfs.cli.main(sys.argv[1:]))\n"
    cmd = [sys.executable, "-c", code, "mount", "--foreground", "--images", images, mnt]
    if args.cache_size:
        cmd[-1:-1] = ["--cache-size", str(args.cache_size)]
    log = open(os.path.join(work, "snapfs.log"), "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"mount failed; see {log.name}")
            time.sleep(0.05)
        views = sorted(glob.glob(os.path.join(mnt, "*", "dirty", "*.raw")))
        assert len(views) == args.disks, views
        idle = status(proc.pid, "VmRSS")
        t0 = time.monotonic()
        readers = [subprocess.Popen(["dd", f"if={v}", "of=/dev/null", f"bs={args.bs}"], stderr=subprocess.DEVNULL)
                   for v in views]
        peak_rss = 0
        while any(r.poll() is None for r in readers):
            peak_rss = max(peak_rss, status(proc.pid, "VmRSS"))
            time.sleep(0.05)
        took = time.monotonic() - t0
        assert all(r.returncode == 0 for r in readers)
        hwm = status(proc.pid, "VmHWM")
        done = status(proc.pid, "VmRSS")
        deadline = time.monotonic() + 30
        while qemu_nbd_children(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        after = status(proc.pid, "VmRSS")
        print(f"mount: {args.disks} dirty views of {args.data} MiB read at once (dd bs={args.bs}) in {took:.1f} s; "
              f"snapfs "
              f"VmRSS before {idle} MiB, peak seen {peak_rss} MiB, VmHWM {hwm} MiB, at the end {done} MiB, "
              f"once every qemu-nbd stopped {after} MiB")
    finally:
        subprocess.run(["fusermount3", "-u", mnt])
        proc.wait(30)
        log.close()
        with open(log.name) as f:
            for line in f:
                if line.startswith(("snapfs from", "fetched by")):
                    print(line.strip())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--disks", type=int, default=20)
    p.add_argument("--data", type=int, default=64, help="MiB written to each image")
    p.add_argument("--bs", default="4M", help="dd's block size (default 4M: st_blksize, as cp and cat read)")
    p.add_argument("--cache-size", type=int, help="snapfs mount --cache-size (default: snapfs's)")
    p.add_argument("--snapfs", help="a directory holding the snapfs package to run")
    p.add_argument("--no-trim", action="store_true", help="run snapfs with trim_malloc a no-op")
    p.add_argument("--per-thread-arenas", action="store_true",
                   help="run snapfs with tune_malloc leaving glibc's arenas as they are")
    p.add_argument("--skip-malloc", action="store_true")
    p.add_argument("--malloc-only", choices=["arenas", "one-arena"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.malloc_only:
        malloc_experiment(args.malloc_only == "arenas")
        return
    if not args.skip_malloc:
        for variant in ("arenas", "one-arena"):  # each in a fresh process: arenas are made once
            subprocess.run([sys.executable, __file__, "--malloc-only", variant], check=True)
    with tempfile.TemporaryDirectory(prefix="snapfs-mem-", dir="/var/tmp") as work:
        mount_experiment(args, work)


if __name__ == "__main__":
    main()
