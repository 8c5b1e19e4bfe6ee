"""Which way of driving libnbd from trio serves reads faster?

snapfs reads through libnbd from a trio event loop. Two ways fit:

- threads: blocking ``pread`` calls in trio worker threads, one connection
  per request in flight (libnbd releases the GIL while it waits);
- aio: one connection, ``aio_pread`` with many requests in flight, the
  handle's fd watched by trio (``aio_get_fd``/``aio_get_direction``/
  ``aio_notify_read``), as in libnbd's Python examples.

This reads the same 1 GiB of data from one qemu-nbd both ways, with the
request size FUSE sends (128 KiB) and a larger one, and prints MB/s.
Run: .venv/bin/python tests/bench_nbd.py [--default-malloc] (part of make
bench); by default glibc's malloc is tuned as snapfs tunes it.
"""

import os
import subprocess
import sys
import tempfile
import time

import nbd
import trio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from snapfs.nbd.chunks import tune_malloc  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20


def build_image(path):
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, "2G"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5c 0 1G", path], check=True,
                   stdout=subprocess.DEVNULL)


async def read_threads(sock, size, req, inflight):
    conns = []
    for _ in range(inflight):
        h = nbd.NBD()
        h.connect_unix(sock)
        conns.append(h)
    offsets = iter(range(0, size, req))

    async def worker(h):
        for off in offsets:
            await trio.to_thread.run_sync(h.pread, req, off)

    async with trio.open_nursery() as n:
        for h in conns:
            n.start_soon(worker, h)
    for h in conns:
        h.shutdown()


async def read_aio(sock, size, req, inflight):
    h = nbd.NBD()
    h.connect_unix(sock)
    fd = h.aio_get_fd()
    offsets = iter(range(0, size, req))
    pending = 0
    done = False

    def completed(err):
        nonlocal pending
        pending -= 1
        return 1  # retire the command

    while True:
        while not done and pending < inflight:
            off = next(offsets, None)
            if off is None:
                done = True
                break
            h.aio_pread(nbd.Buffer(req), off, completion=completed)
            pending += 1
        if done and pending == 0:
            break
        direction = h.aio_get_direction()
        if direction & nbd.AIO_DIRECTION_WRITE:
            await trio.lowlevel.wait_writable(fd)
            h.aio_notify_write()
        elif direction & nbd.AIO_DIRECTION_READ:
            await trio.lowlevel.wait_readable(fd)
            h.aio_notify_read()
    h.shutdown()


def main():
    if "--default-malloc" not in sys.argv:
        tune_malloc()  # as snapfs does
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        img = os.path.join(tmp, "bench.qcow2")
        sock = os.path.join(tmp, "s.sock")
        print("bench_nbd: building a qcow2 with 1 GiB of data", file=sys.stderr)
        build_image(img)
        srv = subprocess.Popen(["qemu-nbd", "-r", "-t", "-e", "0", "-k", sock, "-f", "qcow2", img])
        try:
            while not os.path.exists(sock):
                time.sleep(0.01)
            time.sleep(0.1)
            print(f"{'method':<8} {'request':>8} {'in flight':>9} {'MB/s':>8}")
            for req in (128 << 10, 1 << 20):
                for inflight in (4, 8):
                    for name, fn in (("threads", read_threads), ("aio", read_aio)):
                        best = None
                        for _ in range(2):
                            t = time.perf_counter()
                            trio.run(fn, sock, GiB, req, inflight)
                            dt = time.perf_counter() - t
                            best = dt if best is None else min(best, dt)
                        print(f"{name:<8} {req >> 10:>6}Ki {inflight:>9} {GiB / best / 1e6:>8.0f}")
        finally:
            srv.terminate()
            srv.wait()


if __name__ == "__main__":
    main()
