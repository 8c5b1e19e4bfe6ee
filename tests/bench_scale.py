"""Repository scale (issue 11): a mount of 1000 disks of 5 layers each.

Run as ``.venv/bin/python tests/bench_scale.py`` (``make bench-scale``); this
is a report, not a pytest test. Two steps:

``mount``
    An image directory of 1000 disks (``diskNNNN/base.qcow2`` and four
    overlays ``l1.qcow2`` .. ``l4.qcow2`` with relative backing names, 64 MiB
    virtual each, every layer holding 64 KiB of its own data and overwriting
    32 KiB of the one beneath) is built once from one chain made by qemu-img
    and qemu-io, and cached under /var/tmp keyed by ``IMAGE_VERSION``, so
    reruns skip the build. Each run mounts it and measures: the time until
    ``snapfs mount`` returns (the mount is live); the wall time of a first and
    a second ``ls -lR MOUNTPOINT > /dev/null``; the CPU time snapfs and its
    qemu-nbd children used during the first; the snapfs process's peak RSS
    (``VmHWM``); and, sampled from /proc every 20 ms during the first ``ls
    -lR``, the most qemu-nbd children of snapfs alive at once and the number
    of distinct qemu-nbd pids seen. A server that lives less than 20 ms can be
    missed by the sampler: ``--debug`` mounts with ``--debug`` and counts the
    mount log's "qemu-nbd pid N serves" lines too (at the cost of the
    logging). Every view has three files (``NAME.raw``, ``NAME.qcow2``,
    ``NAME.map.json``) and the first stat of any of them needs the view's
    map: one block status per distinct export, 9 per disk here (5 single
    layers, 4 chains of two or more layers; the base's chain and layer views
    share one). These images are plain qcow2, so snapfs reads every map from
    the files (docs/design.md, "Maps without qemu") and the listing starts no
    qemu-nbd; the ``exports`` step measures what asking qemu costs instead.

``deep``
    Deep chains (``--depths``, 100, 250 and 500 layers of 64 MiB, each layer
    writing 4 KiB of its own; built once and cached like the disks): the time
    until ``snapfs mount`` returns, the first ``ls -l`` of the disk's
    ``chain/`` (every chain view's map, composed from the files), the first
    open and 4 KiB read of the top chain view (a qemu-nbd opening the whole
    chain), snapfs's peak RSS; against qemu itself opening the chain by its
    top's file name (``qemu-io -r -c quit``), the anchor.

``exports``
    What one export's block status costs outside snapfs, for N exports (200,
    taken as ``ls -lR`` needs them: a disk's 5 layers and 4 chains, disk after
    disk). One qemu-nbd per export, started as snapfs starts it (start until
    its pid file exists, libnbd connect, block status of both contexts, stop:
    disconnect and wait for its exit), one at a time and 4 in flight; against
    one qemu-storage-daemon with a QMP socket and an NBD server, where an
    export is a ``blockdev-add`` + ``block-export-add``, the same connect and
    block status, then ``block-export-del`` (waiting for
    BLOCK_EXPORT_DELETED) + ``blockdev-del``: one export at a time, and in
    batches (every command of the N exports sent before any reply is read).
    Besides the phases: wall time per export, and CPU per export of the
    servers and of this client (what snapfs's side would pay).

Medians are reported. Targets print PASS or MISS and do not change the exit
status, which is non-zero when a step failed (a mount, an ``ls -lR`` with
errors, files missing from the listing).

``--src DIR`` mounts another checkout's snapfs (``python -m snapfs`` run from
DIR imports DIR's package first), for experiments on a copy of the code.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from bench import MiB, StepError, find_snapfs_pid, fuse_unmount, is_mounted, log, run, run_steps, status_mb

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

DISKS = 1000
LAYERS = 5
SIZE = 64 * MiB
DATA = 64 << 10  # each layer's own data
LAYER_NAMES = ["base.qcow2"] + [f"l{i}.qcow2" for i in range(1, LAYERS)]
VIEWS_PER_DISK = 2 * LAYERS  # chain/ and layers/: one view per layer each
EXPORTS_PER_DISK = 2 * LAYERS - 1  # the base's chain and layer views share one
# Bump when what image_dir() builds changes: reruns then build anew.
IMAGE_VERSION = "1"
CACHE_BASE = "/var/tmp"
EXPORTS_N = 200
STEPS = ("mount", "deep", "exports")
DEPTHS = (100, 250, 500)
TIMEOUT = 30.0
SAMPLE_INTERVAL = 0.02

TARGETS = [  # (measure, limit, unit)
    ("mount ready", 2.0, "s"),
    ("first ls -lR", 30.0, "s"),
    ("peak RSS", 200.0, "MB"),
]


# -- the image directory -------------------------------------------------------

def cache_dir(disks: int) -> str:
    return os.path.join(CACHE_BASE, f"snapfs-bench-scale-v{IMAGE_VERSION}-{disks}x{LAYERS}")


def build_template(tmp: str) -> dict[str, bytes]:
    """One chain made by qemu: a base and overlays with relative backing names."""
    for i, name in enumerate(LAYER_NAMES):
        if i == 0:
            run(["qemu-img", "create", "-f", "qcow2", name, str(SIZE)], cwd=tmp)
        else:
            run(["qemu-img", "create", "-f", "qcow2", "-b", LAYER_NAMES[i - 1], "-F", "qcow2", name],
                cwd=tmp)
        # Data of its own at its own offset, and part of what the layer
        # beneath holds overwritten (so a layer's map and its chain's differ).
        cmds = ["-c", f"write -P {0x31 + i:#x} {i * MiB} {DATA}"]
        if i:
            cmds += ["-c", f"write -P {0x61 + i:#x} {(i - 1) * MiB} {DATA // 2}"]
        run(["qemu-io", "-f", "qcow2", *cmds, name], cwd=tmp)
    out = {}
    for name in LAYER_NAMES:
        with open(os.path.join(tmp, name), "rb") as f:
            out[name] = f.read()
    return out


def write_sparse(path: str, data: bytes, block: int = 4096) -> None:
    """Write data to a new file, leaving its zero blocks as holes (qcow2
    metadata clusters are mostly zeros)."""
    zero = bytes(block)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        start = None
        for off in range(0, len(data), block):
            piece = data[off:off + block]
            if piece != zero[:len(piece)]:
                if start is None:
                    start = off
            elif start is not None:
                os.pwrite(fd, data[start:off], start)
                start = None
        if start is not None:
            os.pwrite(fd, data[start:], start)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def cached(final: str, what: str, label: str, build) -> str:
    """``final``, built by ``build(directory)`` if missing: under a temporary
    name, renamed when complete, so an interrupted build is never taken for
    a finished one."""
    if os.path.exists(os.path.join(final, ".complete")):
        log(f"{what} {final} (cached)")
        return final
    if os.path.exists(final):
        shutil.rmtree(final)  # not complete: ours, interrupted
    log(f"building {what} in {final} ...")
    t0 = time.perf_counter()
    building = tempfile.mkdtemp(prefix=os.path.basename(final) + ".building-", dir=CACHE_BASE)
    try:
        build(building)
        with open(os.path.join(building, ".complete"), "w") as f:
            f.write(f"{label} v{IMAGE_VERSION}\n")
        os.rename(building, final)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    log(f"built in {time.perf_counter() - t0:.1f} s")
    return final


def image_dir(disks: int) -> str:
    """The cached image directory of ``disks`` disks; built if missing."""
    def build(building: str) -> None:
        with tempfile.TemporaryDirectory(prefix="snapfs-bench-scale-tpl-") as tpl:
            files = build_template(tpl)
        for d in range(disks):
            sub = os.path.join(building, f"disk{d:04d}")
            os.mkdir(sub)
            for name, data in files.items():
                write_sparse(os.path.join(sub, name), data)

    return cached(cache_dir(disks), f"{disks} disks x {LAYERS} layers", f"{disks}x{LAYERS}", build)


def deep_dir(depth: int) -> str:
    """The cached directory of one chain ``m000 <- ... <- m{depth-1}``; built if missing.

    Each layer is written before it is rebased onto the one beneath (writing
    through the chain would open all of it: the square of the depth).
    """
    def build(building: str) -> None:
        for i in range(depth):
            img = os.path.join(building, f"m{i:03d}.qcow2")
            run(["qemu-img", "create", "-q", "-f", "qcow2", img, str(SIZE)])
            run(["qemu-io", "-f", "qcow2", "-c", f"write -q -P {i % 255 + 1} {i * 64}k 4k", img])
            if i:
                run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", f"m{i - 1:03d}.qcow2", "-F", "qcow2", img])

    return cached(os.path.join(CACHE_BASE, f"snapfs-bench-deep-{depth}-v{IMAGE_VERSION}"),
                  f"a chain of {depth} layers", str(depth), build)


# -- processes -----------------------------------------------------------------

def proc_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) of pid, all its threads, and of its reaped children."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    tck = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tck, (int(fields[13]) + int(fields[14])) / tck


def qemu_nbd_pids(pid: int) -> set[int]:
    """The qemu-nbd processes pid started (children of any of its threads)."""
    kids = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return set()
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += f.read().split()
        except OSError:
            pass
    out = set()
    for kid in kids:
        try:
            with open(f"/proc/{kid}/comm") as f:
                if f.read().strip() == "qemu-nbd":
                    out.add(int(kid))
        except OSError:
            pass
    return out


class ServerSampler(threading.Thread):
    """Samples pid's qemu-nbd children: the most alive at once, every pid seen."""

    def __init__(self, pid: int, interval: float = SAMPLE_INTERVAL):
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.max = 0
        self.seen: set[int] = set()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while True:
            kids = qemu_nbd_pids(self.pid)
            self.max = max(self.max, len(kids))
            self.seen |= kids
            if self._stop_event.wait(self.interval):
                return

    def __enter__(self) -> ServerSampler:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop_event.set()
        self.join()


def timed_ls(mnt: str) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    r = subprocess.run(["ls", "-lR", mnt], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return time.perf_counter() - t0, r


def count_files(mnt: str) -> dict[str, int]:
    out = {".raw": 0, ".qcow2": 0, ".map.json": 0}
    for _, _, files in os.walk(mnt):
        for name in files:
            for ext in out:
                if name.endswith(ext):
                    out[ext] += 1
    return out


def count_starts(logfile: str) -> int:
    with open(logfile, errors="replace") as f:
        return sum(1 for line in f if re.search(r"qemu-nbd pid \d+ serves", line))


# -- the exports step: what one export costs -------------------------------------

def export_layers(root: str, n: int) -> list[list[str]]:
    """n exports in the order ls -lR needs them: per disk its 5 layers alone and its 4 chains."""
    out = []
    d = 0
    while len(out) < n:
        paths = [os.path.join(root, f"disk{d:04d}", name) for name in LAYER_NAMES]
        out += [[p] for p in paths]
        out += [list(reversed(paths[:i + 1])) for i in range(1, LAYERS)]
        d += 1
    return out[:n]


def json_node(layers: list[str], read_only: bool = False) -> dict:
    """The qcow2 chain as one node, top first; the lowest without backing (as snapfs's)."""
    node: dict | None = None
    for path in reversed(layers):
        n = {"driver": "qcow2", "file": {"driver": "file", "filename": path}, "backing": node}
        if read_only:
            n["read-only"] = True
            n["file"]["read-only"] = True
        node = n
    return node


def nbd_handle(export: str):
    import nbd  # libnbd's Python bindings (Debian's python3-libnbd)
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.add_meta_context("qemu:allocation-depth")
    h.set_export_name(export)
    return h


def nbd_connect(sock: str, export: str = ""):
    """A libnbd handle on the export; retried while the server is not listening yet."""
    import nbd
    deadline = time.monotonic() + TIMEOUT
    while True:
        h = nbd_handle(export)
        try:
            h.connect_unix(sock)
            return h
        except nbd.Error as e:
            if time.monotonic() > deadline:
                raise StepError(f"cannot connect to {sock}: {e.string}") from None
        time.sleep(0.001)


def block_status(h) -> int:
    """Block status of the whole export in both contexts; the number of extents."""
    size = h.get_size()
    done = {"base:allocation": 0, "qemu:allocation-depth": 0}
    extents = 0

    def cb(ctx, offset, entries, err):
        nonlocal extents
        if ctx in done:
            done[ctx] = max(done[ctx], offset + sum(entries[0::2]))
            extents += len(entries) // 2
        return 0

    while (low := min(done.values())) < size:
        h.block_status(size - low, low, cb)
    return extents


def one_qemu_nbd(layers: list[str], rundir: str, ident: int) -> dict[str, float]:
    """One export as snapfs serves it: start, connect, block status, stop (seconds each)."""
    sock = os.path.join(rundir, f"{ident}.sock")
    pidfile = os.path.join(rundir, f"{ident}.pid")
    cmd = ["qemu-nbd", "--read-only", "--shared=5", f"--socket={sock}", f"--pid-file={pidfile}",
           "--cache=writeback", "--allocation-depth", "json:" + json.dumps(json_node(layers))]
    for p in (sock, pidfile):  # qemu-nbd leaves its pid file behind
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        delay = 0.001
        while not os.path.exists(pidfile):  # written once it listens, as snapfs waits
            if proc.poll() is not None:
                raise StepError(f"qemu-nbd exited with {proc.returncode}: "
                                f"{proc.stderr.read().decode(errors='replace').strip()}")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        t1 = time.perf_counter()
        h = nbd_connect(sock)
        t2 = time.perf_counter()
        block_status(h)
        t3 = time.perf_counter()
        h.shutdown()
        del h
        proc.wait(TIMEOUT)  # not --persistent: it exits once its client is gone
        t4 = time.perf_counter()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
        for p in (sock, pidfile):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
    return {"start": t1 - t0, "connect": t2 - t1, "block status": t3 - t2, "stop": t4 - t3,
            "total": t4 - t0}


class QMP:
    """A small QMP client: commands one at a time or in batches; events kept."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.f = self.sock.makefile("rwb")
        self.events: list[dict] = []
        self._read()  # the greeting
        self.cmd("qmp_capabilities")

    def _read(self) -> dict:
        line = self.f.readline()
        if not line:
            raise StepError("qemu-storage-daemon closed its QMP socket")
        return json.loads(line)

    def _reply(self) -> dict:
        while True:
            msg = self._read()
            if "event" in msg:
                self.events.append(msg)
            else:
                return msg

    def send(self, name: str, args: dict | None = None) -> None:
        self.f.write(json.dumps({"execute": name, "arguments": args or {}}).encode() + b"\n")

    def cmd(self, name: str, args: dict | None = None):
        return self.batch([(name, args)])[0]

    def batch(self, cmds: list[tuple[str, dict | None]], check: bool = True) -> list:
        """Send every command, then read every reply (QMP answers in order)."""
        for name, args in cmds:
            self.send(name, args)
        self.f.flush()
        out = []
        for name, _ in cmds:
            msg = self._reply()
            if "error" in msg:
                if check:
                    raise StepError(f"QMP {name}: {msg['error'].get('desc')}")
                out.append(msg["error"])
            else:
                out.append(msg.get("return"))
        return out

    def wait_events(self, name: str, ids: set[str]) -> None:
        """Wait until an event ``name`` came for every id in ids."""
        ids = set(ids)
        while True:
            keep = []
            for e in self.events:
                if e["event"] == name and e.get("data", {}).get("id") in ids:
                    ids.discard(e["data"]["id"])
                else:
                    keep.append(e)
            self.events = keep
            if not ids:
                return
            self.events.append(self._read())

    def close(self) -> None:
        self.f.close()
        self.sock.close()


def qsd_add(layers: list[str], ident: int) -> list[tuple[str, dict]]:
    node = f"n{ident}"
    return [("blockdev-add", {**json_node(layers, read_only=True), "node-name": node}),
            ("block-export-add", {"type": "nbd", "id": f"e{ident}", "node-name": node, "name": f"e{ident}",
                                  "writable": False, "allocation-depth": True})]


def qsd_remove(qmp: QMP, idents: list[int]) -> None:
    """Delete the exports, then their nodes. "safe" deletion fails while a client
    is connected, and the server may not have seen a disconnection yet: retried."""
    pending = list(idents)
    deadline = time.monotonic() + TIMEOUT
    while pending:
        replies = qmp.batch([("block-export-del", {"id": f"e{i}"}) for i in pending], check=False)
        failed = []
        for i, r in zip(pending, replies, strict=True):
            if isinstance(r, dict) and "desc" in r:
                if "in use" not in r["desc"]:
                    raise StepError(f"QMP block-export-del: {r['desc']}")
                failed.append(i)
        if failed and time.monotonic() > deadline:
            raise StepError(f"{len(failed)} exports still in use")
        pending = failed
        if pending:
            time.sleep(0.001)
    qmp.wait_events("BLOCK_EXPORT_DELETED", {f"e{i}" for i in idents})
    qmp.batch([("blockdev-del", {"node-name": f"n{i}"}) for i in idents])


def read_export(sock: str, export: str) -> tuple[float, float]:
    """Connect and read block status: (connect s, block status s)."""
    t0 = time.perf_counter()
    h = nbd_connect(sock, export)
    t1 = time.perf_counter()
    block_status(h)
    t2 = time.perf_counter()
    h.shutdown()
    return t1 - t0, t2 - t1


class StorageDaemon:
    """One qemu-storage-daemon: a QMP monitor and an NBD server on UNIX sockets."""

    def __init__(self, tmp: str):
        self.qmp_path = os.path.join(tmp, "qmp.sock")
        self.nbd_path = os.path.join(tmp, "nbd.sock")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            ["qemu-storage-daemon", "--chardev", f"socket,id=qmp,path={self.qmp_path},server=on,wait=off",
             "--monitor", "chardev=qmp"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + TIMEOUT
            while True:
                try:
                    self.qmp = QMP(self.qmp_path)
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise StepError("qemu-storage-daemon did not start: "
                                        + self.proc.stderr.read().decode(errors="replace")) from None
                    time.sleep(0.005)
            self.qmp.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": self.nbd_path}}})
        except BaseException:
            self.stop()
            raise
        self.start_time = time.perf_counter() - t0

    def cpu(self) -> float:
        return proc_cpu(self.proc.pid)[0]

    def stop(self) -> None:
        if getattr(self, "qmp", None) is not None:
            self.qmp.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stderr.close()


def one_qsd_export(qsd: StorageDaemon, layers: list[str], ident: int) -> dict[str, float]:
    t0 = time.perf_counter()
    qsd.qmp.batch(qsd_add(layers, ident))
    t1 = time.perf_counter()
    connect, status = read_export(qsd.nbd_path, f"e{ident}")
    t2 = time.perf_counter()
    qsd_remove(qsd.qmp, [ident])
    t3 = time.perf_counter()
    return {"add": t1 - t0, "connect": connect, "block status": status, "remove": t3 - t2, "total": t3 - t0}


def qsd_batch(qsd: StorageDaemon, exports: list[list[str]]) -> dict[str, float]:
    """Every export added in one batch, read one after the other, removed in one batch
    (seconds per export for each phase)."""
    n = len(exports)
    t0 = time.perf_counter()
    qsd.qmp.batch([c for i, layers in enumerate(exports) for c in qsd_add(layers, i)])
    t1 = time.perf_counter()
    reads = [read_export(qsd.nbd_path, f"e{i}") for i in range(n)]
    t2 = time.perf_counter()
    qsd_remove(qsd.qmp, list(range(n)))
    t3 = time.perf_counter()
    return {"add": (t1 - t0) / n, "connect": statistics.median(c for c, _ in reads),
            "block status": statistics.median(s for _, s in reads), "remove": (t3 - t2) / n,
            "total": (t3 - t0) / n}


def median_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


class Usage:
    """CPU of this process and of its reaped children over a block, per item."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self) -> Usage:
        self.t0 = time.perf_counter()
        self.self0 = resource.getrusage(resource.RUSAGE_SELF)
        self.kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        return self

    def __exit__(self, *exc) -> None:
        s, k = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        self.wall = (time.perf_counter() - self.t0) / self.n
        self.client = (s.ru_utime + s.ru_stime - self.self0.ru_utime - self.self0.ru_stime) / self.n
        self.children = (k.ru_utime + k.ru_stime - self.kids0.ru_utime - self.kids0.ru_stime) / self.n


# -- the bench -----------------------------------------------------------------

class ScaleBench:
    """The steps for ``bench.run_steps``: step_mount, step_exports, report."""

    def __init__(self, tmp: str, reps: int, args: argparse.Namespace):
        self.tmp = tmp
        self.reps = reps
        self.args = args
        self.src = os.path.abspath(args.src)
        self.snapfs_log = os.path.join(tmp, "snapfs.log")
        self.root: str | None = None
        self.runs: list[dict] = []
        self.exports: dict[str, list[dict[str, float]]] = {}
        self.exports_n = 0
        self.deep: dict[int, list[dict[str, float]]] = {}
        self.mismatches: list[str] = []
        self.errors: list[str] = []

    def build_image(self) -> None:
        self.root = image_dir(self.args.disks)

    def remove_copy(self) -> None:
        pass  # run_steps's cleanup: this bench copies nothing

    def error(self, msg: str) -> None:
        print(f"\n*** ERROR: {msg} ***\n", file=sys.stderr, flush=True)
        self.errors.append(msg)

    # -- mount ---------------------------------------------------------------

    def snapfs(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([sys.executable, "-m", "snapfs", *args], cwd=self.src,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if check and r.returncode != 0:
            raise StepError(f"snapfs {args[0]} exited with {r.returncode}: {r.stderr.strip()}")
        return r

    def unmount(self, mnt: str) -> float:
        t0 = time.perf_counter()
        r = self.snapfs("umount", mnt, check=False)
        t = time.perf_counter() - t0
        if r.returncode != 0 and is_mounted(mnt):
            log(f"snapfs umount failed ({r.stderr.strip()}); unmounting with fusermount3")
            fuse_unmount(mnt)
        return t

    def step_mount(self) -> None:
        mnt = os.path.join(self.tmp, "mnt")
        os.mkdir(mnt)
        for i in range(self.reps):
            opts = ["--debug"] if self.args.debug else []
            t0 = time.perf_counter()
            self.snapfs("mount", "--images", self.root, "--log", self.snapfs_log, *opts, mnt)
            res: dict[str, float | int] = {"mount ready": time.perf_counter() - t0}
            try:
                pid = find_snapfs_pid(mnt)
                res["RSS once mounted"] = status_mb(pid, "VmRSS") or 0
                profiler = self.start_profiler(pid, i)
                cpu0, kids0 = proc_cpu(pid)
                with ServerSampler(pid) as servers:
                    t, r = timed_ls(mnt)
                cpu1, kids1 = proc_cpu(pid)
                if profiler is not None:
                    profiler.send_signal(signal.SIGINT)
                    profiler.wait()
                res["first ls -lR"] = t
                res["snapfs CPU in first ls"] = cpu1 - cpu0
                res["qemu-nbd CPU in first ls"] = kids1 - kids0
                res["max qemu-nbd at once"] = servers.max
                res["qemu-nbd pids seen"] = len(servers.seen)
                if r.returncode != 0:
                    self.error(f"first ls -lR exited with {r.returncode}: "
                               + " | ".join(r.stderr.strip().splitlines()[:5]))
                t, r = timed_ls(mnt)
                res["second ls -lR"] = t
                if r.returncode != 0:
                    self.error(f"second ls -lR exited with {r.returncode}")
                res["peak RSS"] = status_mb(pid, "VmHWM") or 0
                if i == 0:
                    want = self.args.disks * VIEWS_PER_DISK
                    for ext, n in count_files(mnt).items():
                        if n != want:
                            self.error(f"{n} {ext} files listed, {want} expected")
                if self.args.debug:
                    res["qemu-nbd started (log)"] = count_starts(self.snapfs_log)
                    os.truncate(self.snapfs_log, 0)
            finally:
                res["umount"] = self.unmount(mnt)
            self.runs.append(res)
            log(f"mount run {i + 1}/{self.reps}: " + ", ".join(
                f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items()))

    def step_deep(self) -> None:
        mnt = os.path.join(self.tmp, "deep")
        os.mkdir(mnt)
        for depth in self.args.depths:
            root = deep_dir(depth)
            top = f"m{depth - 1:03d}"
            for i in range(self.reps):
                t0 = time.perf_counter()
                run(["qemu-io", "-r", "-f", "qcow2", "-c", "quit", os.path.join(root, top + ".qcow2")])
                res = {"qemu opens it by its top": time.perf_counter() - t0}
                t0 = time.perf_counter()
                self.snapfs("mount", "--images", root, "--log", self.snapfs_log, mnt)
                res["mount ready"] = time.perf_counter() - t0
                try:
                    pid = find_snapfs_pid(mnt)
                    chain = os.path.join(mnt, top + ".qcow2", "chain")
                    t0 = time.perf_counter()
                    r = subprocess.run(["ls", "-l", chain], capture_output=True, text=True)
                    res["first ls -l chain/"] = time.perf_counter() - t0
                    if r.returncode != 0 or len(r.stdout.splitlines()) != 3 * depth + 1:
                        self.error(f"ls -l of {depth} layers: exit {r.returncode}, "
                                   f"{len(r.stdout.splitlines()) - 1} files: {r.stderr.strip()[:300]}")
                    t0 = time.perf_counter()
                    try:
                        name = next(n for n in os.listdir(chain) if n.endswith(f"-{top}.raw"))
                        with open(os.path.join(chain, name), "rb") as f:
                            f.read(4096)
                    except (OSError, StopIteration) as e:
                        self.error(f"the top chain view of {depth} layers: {e!r}")
                    res["first read of the top"] = time.perf_counter() - t0
                    res["peak RSS"] = status_mb(pid, "VmHWM") or 0
                finally:
                    res["umount"] = self.unmount(mnt)
                self.deep.setdefault(depth, []).append(res)
                log(f"deep {depth} run {i + 1}/{self.reps}: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()))

    def start_profiler(self, pid: int, i: int) -> subprocess.Popen | None:
        if not self.args.py_spy:
            return None
        out = os.path.join(os.path.abspath(self.args.py_spy_out), f"py-spy-run{i}.txt")
        proc = subprocess.Popen([self.args.py_spy, "record", "--pid", str(pid), "--rate", "200",
                                 "--format", "raw", "--gil", "--nonblocking", "--output", out],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # attached before the listing starts
        return proc

    # -- exports -------------------------------------------------------------

    def step_exports(self) -> None:
        root = self.root
        if self.args.disks * EXPORTS_PER_DISK < self.args.exports:
            root = image_dir(-(-self.args.exports // EXPORTS_PER_DISK))
        exports = export_layers(root, self.args.exports)
        n = self.exports_n = len(exports)
        rundir = os.path.join(self.tmp, "exports")
        os.mkdir(rundir)
        for p in {p for layers in exports for p in layers}:
            with open(p, "rb") as f:  # every way starts with the images in the page cache
                f.read()
        for rep in range(self.reps):
            log(f"exports run {rep + 1}/{self.reps}: {n} qemu-nbd, one at a time")
            with Usage(n) as u:
                rows = [one_qemu_nbd(layers, rundir, i) for i, layers in enumerate(exports)]
            self.add_export_row("qemu-nbd, one at a time", rows, u, u.children)

            log(f"exports run {rep + 1}/{self.reps}: {n} qemu-nbd, 4 in flight")
            with Usage(n) as u, concurrent.futures.ThreadPoolExecutor(4) as pool:
                rows = list(pool.map(lambda a: one_qemu_nbd(a[1], rundir, n + a[0]), enumerate(exports)))
            self.add_export_row("qemu-nbd, 4 in flight", rows, u, u.children)

            log(f"exports run {rep + 1}/{self.reps}: one qemu-storage-daemon, {n} exports one at a time")
            qsd = StorageDaemon(rundir)
            try:
                cpu0 = qsd.cpu()
                with Usage(n) as u:
                    rows = [one_qsd_export(qsd, layers, i) for i, layers in enumerate(exports)]
                server = (qsd.cpu() - cpu0) / n
                self.add_export_row("qsd, one at a time", rows, u, server, start=qsd.start_time)

                log(f"exports run {rep + 1}/{self.reps}: the same qemu-storage-daemon, {n} exports "
                    "in batches")
                cpu0 = qsd.cpu()
                with Usage(n) as u:
                    row = qsd_batch(qsd, [layers for layers in exports])
                server = (qsd.cpu() - cpu0) / n
                self.add_export_row("qsd, batched", [row], u, server)
            finally:
                qsd.stop()

    def add_export_row(self, name: str, rows: list[dict[str, float]], usage: Usage, server_cpu: float,
                       start: float | None = None) -> None:
        row = {**median_rows(rows), "wall/N": usage.wall, "server CPU/N": server_cpu,
               "client CPU/N": usage.client}
        if start is not None:
            row["daemon start"] = start
        self.exports.setdefault(name, []).append(row)
        log(f"  {name}: " + ", ".join(f"{k} {v * 1000:.2f} ms" for k, v in row.items()))

    # -- report --------------------------------------------------------------

    def report(self) -> None:
        print()
        if self.runs:
            disks = self.args.disks
            print(f"{disks} disks x {LAYERS} layers (64 MiB each): {disks * VIEWS_PER_DISK} views, "
                  f"{3 * disks * VIEWS_PER_DISK} files, {disks * EXPORTS_PER_DISK} distinct exports; "
                  f"{len(self.runs)} runs; snapfs from {self.src}")
            print(f"{'measure':30} {'median':>9} {'min':>9} {'max':>9}")
            print("-" * 60)
            for key in self.runs[0]:
                vals = [r[key] for r in self.runs if key in r]
                unit = "MB" if "RSS" in key else "" if "qemu-nbd" in key and "CPU" not in key else "s"
                label = f"{key} ({unit})" if unit else key
                if isinstance(vals[0], int):
                    print(f"{label:30} {statistics.median(vals):9g} {min(vals):9} {max(vals):9}")
                else:
                    print(f"{label:30} {statistics.median(vals):9.3f} {min(vals):9.3f} {max(vals):9.3f}")
            print(f"(qemu-nbd pids seen: sampled every {SAMPLE_INTERVAL * 1000:.0f} ms, so a lower bound)")
            print()
            print("targets (medians):")
            for key, limit, unit in TARGETS:
                med = statistics.median(r[key] for r in self.runs)
                print(f"  {'PASS' if med <= limit else 'MISS'}  {key} <= {limit:g} {unit} "
                      f"(median {med:.2f} {unit})")
        if self.deep:
            print()
            print(f"deep chains (64 MiB layers, 4 KiB each of its own); medians of {self.reps} runs:")
            keys = list(next(iter(self.deep.values()))[0])
            print(f"{'layers':>8}" + "".join(f"{k:>28}" for k in keys))
            for depth, rows in self.deep.items():
                cells = [f"{statistics.median(r[k] for r in rows):25.3f} {'MB' if 'RSS' in k else 's ':2}"
                         for k in keys]
                print(f"{depth:>8}" + "".join(cells))
            first = min(self.deep)
            last = max(self.deep)
            if last != first:
                ratio = (statistics.median(r["first ls -l chain/"] for r in self.deep[last])
                         / statistics.median(r["first ls -l chain/"] for r in self.deep[first]))
                print(f"first ls -l chain/: {ratio:.1f}x from {first} to {last} layers "
                      f"({last / first:.1f}x the layers; linear growth: the same)")
        if self.exports:
            print()
            print(f"one export's block status, {self.exports_n} exports (a disk's 5 layers and "
                  f"4 chains, disk after disk); ms, medians of {self.reps} runs:")
            keys = []
            for reps in self.exports.values():
                keys += [k for k in reps[0] if k not in keys]
            print(f"{'':24}" + "".join(f"{k:>14}" for k in keys))
            for name, reps in self.exports.items():
                cells = []
                for k in keys:
                    vals = [r[k] for r in reps if k in r]
                    cells.append(f"{statistics.median(vals) * 1000:14.2f}" if vals else f"{'-':>14}")
                print(f"{name:24}" + "".join(cells))
            print("(phases: median per export; batched: add and remove are the batch's time / N; "
                  "wall/N: the whole loop / N; CPU/N: server processes' and this client's CPU / N)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time a mount of 1000 disks x 5 layers (mount, first and second ls -lR, RSS, "
                    "qemu-nbd count) and one export's block status through qemu-nbd and "
                    "qemu-storage-daemon; print tables and the targets.")
    p.add_argument("--disks", type=int, default=DISKS, help=f"disks in the image directory ({DISKS})")
    p.add_argument("--reps", type=int, default=3, help="runs per measurement (3)")
    p.add_argument("--exports", type=int, default=EXPORTS_N,
                   help=f"N of the exports step ({EXPORTS_N})")
    p.add_argument("--depths", metavar="N[,N]", default=",".join(map(str, DEPTHS)),
                   help=f"chain depths of the deep step ({','.join(map(str, DEPTHS))})")
    p.add_argument("--only", metavar="STEP[,STEP]", help=f"run only these steps: {', '.join(STEPS)}")
    p.add_argument("--src", metavar="DIR", default=ROOT,
                   help="the checkout whose snapfs is mounted (default: this one)")
    p.add_argument("--debug", action="store_true",
                   help="mount with --debug and count qemu-nbd starts in its log (slower)")
    p.add_argument("--py-spy", metavar="PATH",
                   help="profile snapfs (--gil: where it holds the GIL) during each first ls -lR")
    p.add_argument("--py-spy-out", metavar="DIR", default=".", help="where py-spy's raw profiles go (.)")
    args = p.parse_args(argv)
    args.steps = list(STEPS) if not args.only else [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in args.steps if s not in STEPS]
    if unknown:
        p.error(f"unknown step(s) {', '.join(unknown)}; choose from {', '.join(STEPS)}")
    try:
        args.depths = [int(x) for x in args.depths.split(",") if x.strip()]
    except ValueError:
        p.error("--depths takes numbers, as 100,250,500")
    if any(n < 1 for n in args.depths):
        p.error("--depths must be at least 1")
    if args.reps < 1 or args.disks < 1 or args.exports < 1:
        p.error("--reps, --disks and --exports must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # --src may name another checkout: the bench finds its snapfs itself.
    return run_steps(functools.partial(ScaleBench, args=args), "snapfs-bench-scale-", args.reps, args.steps,
                     snapfs=None)


if __name__ == "__main__":
    sys.exit(main())
