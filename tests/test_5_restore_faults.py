"""Tier 5: restoring through a ``--rw`` mount when things go wrong (docs/views.md, "Writable mounts").

"A failed write never leaves a corrupt image: qemu-img check stays clean after
ENOSPC, a killed qemu-nbd or a killed snapfs, and the error reaches the writer."
Real mounts, real qemu-nbd: a host disk that fills up (a small tmpfs), snapfs's
writable qemu-nbd killed under a copy, snapfs itself killed under a copy, an
image another program holds. Then the restore that follows such a failure, and
reading back right after a restore.

The copies are ``Writer`` processes: 1 MiB writes, as cp and dd make them,
reporting each step; ``pause_at`` stops one at an offset until the test lets it
go on, so a fault lands between two writes for sure.
"""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, SNAPFS, MiB, QemuNBD, create, qemu_img, qemu_io, run
from test_5_lifecycle import children, wait_gone

KiB = 1 << 10
SIZE = 256 * MiB  # the disk: big enough that a copy is still running when the fault lands
BLOCK = bytes(range(256)) * (MiB // 256)  # what the writers write: never zeros

WRITER = r"""
import errno, os, sys
view, total, pause = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
block = bytes(range(256)) * 4096

def say(*words):
    print(*words, flush=True)

def outcome(fn, *args):
    try:
        fn(*args)
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))

fd = os.open(view, os.O_WRONLY)
off, result = 0, "ok"
while off < total and result == "ok":
    if off == pause:
        say("paused", off)
        sys.stdin.readline()
    try:
        off += os.pwrite(fd, block, off)
        say("wrote", off)
    except OSError as e:
        result = errno.errorcode.get(e.errno, str(e.errno))
say("write", result, off)
say("fsync", outcome(os.fsync, fd))
say("close", outcome(os.close, fd))
"""


class Writer:
    """A process copying 1 MiB blocks into a view; ``results()``: what each step answered."""

    def __init__(self, view, total=SIZE, pause_at=None):
        self.proc = subprocess.Popen([sys.executable, "-c", WRITER, str(view), str(total), str(pause_at or -1)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def wait_for(self, word, at_least=0):
        """Read the reports up to ``word`` (with an offset of ``at_least`` or more)."""
        while True:
            line = self.proc.stdout.readline()
            assert line, f"the writer ended before {word!r}"
            parts = line.split()
            if parts[0] == word and int(parts[-1]) >= at_least:
                return int(parts[-1])
            assert parts[0] in ("wrote", "paused"), f"the writer stopped early: {line!r}"

    def resume(self):
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def results(self, timeout=60):
        out, _ = self.proc.communicate(timeout=timeout)
        res = {}
        for line in out.splitlines():
            parts = line.split()
            if parts[0] in ("write", "fsync", "close"):
                res[parts[0]] = parts[1]
            if parts[0] == "write":
                res["written"] = int(parts[2])
        return res

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def writers():
    started = []

    def _writer(*args, **kw):
        w = Writer(*args, **kw)
        started.append(w)
        return w

    yield _writer
    for w in started:
        w.kill()


def outcome(fn, *args):
    """"ok", or the errno name of the OSError ``fn`` raised."""
    try:
        fn(*args)
    except OSError as e:
        return errno.errorcode[e.errno]
    return "ok"


def writable_servers(pid):
    """snapfs's writable qemu-nbd: its children without --read-only."""
    out = set()
    for p in children(pid):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue
        if b"--read-only" not in cmd:
            out.add(p)
    return out


def wait_for(what, timeout=10):
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def check(image):
    """qemu-img check: (exit status, what it said). 0 clean, 2 corrupt, 3 leaks."""
    r = run("qemu-img", "check", image, check=False)
    said = (r.stdout + r.stderr).strip()
    print(f"qemu-img check {os.path.basename(image)}: exit {r.returncode}: {said}")
    return r.returncode, said


def opens(path, flags=os.O_RDONLY):
    """Open and close ``path``."""
    os.close(os.open(path, flags))


def pread(path, length, offset):
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def pwrite(path, data, offset):
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


@pytest.fixture
def disk(tmp_path):
    """base (0x61 in the first 2 MiB) <- top (empty), 256 MiB."""
    d = tmp_path / "images"
    d.mkdir()
    base = create(d / "base.qcow2", SIZE)
    qemu_io(base, "write -P 0x61 0 2M")
    create(d / "top.qcow2", backing="base.qcow2")
    return d


@pytest.fixture
def backup(tmp_path):
    """A raw backup to restore: data in two places, zeros (a hole) elsewhere."""
    path = str(tmp_path / "backup.raw")
    create(path, SIZE, fmt="raw")
    qemu_io(path, "write -P 0x77 1M 10M", "write -P 0x78 100M 3M", fmt="raw")
    return path


def restore(backup, view, image):
    """cp the backup into the view; the image then equals it, and checks clean."""
    run("cp", "--sparse=always", backup, view)
    wait_for(lambda: not image_locked(image))
    assert qemu_img("compare", "-f", "raw", "-F", "qcow2", backup, image).stdout.strip() == "Images are identical."
    assert check(image)[0] == 0


def holds_locks(image):
    """Some process holds qemu's byte-range locks on ``image`` (/proc/locks): a probe
    that, unlike ``image_locked``, never opens the image, so it races no one's open."""
    st = os.stat(image)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino} "
    with open("/proc/locks") as f:
        return any(key in line for line in f)


def image_locked(image):
    """Someone holds ``image`` for writing (qemu's locks): a read-only open fails."""
    r = run("qemu-img", "info", image, check=False)
    return r.returncode != 0 and "lock" in r.stderr


# -- 1. the host disk fills up ---------------------------------------------------------

@pytest.fixture
def small_fs(tmp_path):
    """A 24 MiB tmpfs: a host disk that fills up. Unmounted after the test's mounts."""
    path = tmp_path / "small"
    path.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=24m,mode=0755", "tmpfs", path)
    try:
        yield path
    finally:
        if run("umount", path, check=False).returncode != 0:
            run("umount", "-l", path, check=False)


def fill(small_fs):
    """A 64 MiB disk on the small tmpfs, 4 MiB of other files to free later."""
    base = create(small_fs / "base.qcow2", 64 * MiB)
    qemu_io(base, "write -P 0x61 0 1M")
    top = create(small_fs / "top.qcow2", backing="base.qcow2")
    (small_fs / "ballast").write_bytes(os.urandom(4 * MiB))
    return top


def write_until_full(fd, start):
    """1 MiB writes from ``start`` until one fails: (errno name, offset of the failed write)."""
    off = start
    while off < 64 * MiB:
        try:
            off += os.pwrite(fd, BLOCK, off)
        except OSError as e:
            return errno.errorcode[e.errno], off
    return "ok", off


def test_full_host_disk_fails_the_writer_with_enospc_and_the_mount_keeps_serving(small_fs, mount):
    top = fill(small_fs)
    m = mount(small_fs, "--rw")
    view = m / "top.qcow2/chain/01-top.raw"
    fd = os.open(view, os.O_WRONLY)
    failed, off = write_until_full(fd, 2 * MiB)
    fsynced = outcome(os.fsync, fd)
    closed = outcome(os.close, fd)
    # More data than fits: the writer learns it.
    assert "ENOSPC" in (failed, fsynced, closed), (failed, fsynced, closed)
    assert 2 * MiB < off < 24 * MiB
    # The mount keeps serving: what was written, the other views.
    wait_for(lambda: not writable_servers(m.pid))
    assert pread(view, MiB, 2 * MiB) == BLOCK
    assert pread(view, MiB, 0) == b"\x61" * MiB
    assert pread(m / "top.qcow2/chain/00-base.raw", MiB, 0) == b"\x61" * MiB
    assert pread(m / "top.qcow2/layers/00-base.raw", 4096, MiB) == bytes(4096)
    assert pread(m / "top.qcow2/layers/01-top.raw", MiB, 2 * MiB) == BLOCK
    # Space freed: a smaller write works.
    os.unlink(small_fs / "ballast")
    pwrite(view, b"\x5a" * (256 * KiB), 40 * MiB)
    assert pread(view, 256 * KiB, 40 * MiB) == b"\x5a" * (256 * KiB)
    wait_for(lambda: not writable_servers(m.pid))
    status, said = check(top)
    assert status == 0, said
    # fsync and close after ENOSPC: they succeed, or report ENOSPC or EIO; nothing else.
    assert fsynced in ("ok", "ENOSPC", "EIO") and closed in ("ok", "ENOSPC", "EIO"), (fsynced, closed)


def test_full_host_disk_leaves_the_open_file_writable_once_space_is_freed(small_fs, mount):
    """ENOSPC is not a dead server: as on a block device, the file that got it writes
    again once there is space, and fsync then makes it durable."""
    top = fill(small_fs)
    m = mount(small_fs, "--rw")
    view = m / "top.qcow2/chain/01-top.raw"
    fd = os.open(view, os.O_WRONLY)
    try:
        failed, off = write_until_full(fd, 2 * MiB)
        assert failed == "ENOSPC"
        os.unlink(small_fs / "ballast")
        assert outcome(os.pwrite, fd, b"\x5a" * (256 * KiB), off) == "ok"
        assert outcome(os.fsync, fd) == "ok"
    finally:
        closed = outcome(os.close, fd)
    assert closed == "ok"
    assert pread(view, 256 * KiB, off) == b"\x5a" * (256 * KiB)
    wait_for(lambda: not writable_servers(m.pid))
    status, said = check(top)
    assert status == 0, said


# -- 2. snapfs's qemu-nbd killed under a copy -------------------------------------------

@pytest.mark.log_allows(r"exited with -9", r"map not brought up to date")
@pytest.mark.parametrize("timing", ["between writes", "during writes"])
def test_killed_qemu_nbd_fails_the_writer_with_eio_and_a_new_restore_works(disk, backup, mount, writers, timing):
    image = str(disk / "top.qcow2")
    m = mount(disk, "--rw")
    view = m / "top.qcow2/chain/01-top.raw"
    w = writers(view, pause_at=8 * MiB if timing == "between writes" else None)
    w.wait_for("paused" if timing == "between writes" else "wrote", 8 * MiB)
    [server] = writable_servers(m.pid)
    os.kill(server, signal.SIGKILL)
    assert wait_gone({server}) == set()
    if timing == "between writes":
        w.resume()
    res = w.results()
    # Never all succeeded silently: the next write fails, and so does every later request.
    assert (res["write"], res["fsync"], res["close"]) == ("EIO", "EIO", "EIO"), res
    assert 8 * MiB <= res["written"] < SIZE
    # The log says why (and, once the file closed, how qemu-nbd ended).
    wait_for(lambda: not writable_servers(m.pid))
    problems = m.log_problems([r"exited with -9", r"map not brought up to date"])
    dead = [p for p in problems
            if re.search(rf"ERROR snapfs\.nbd\.pool: qemu-nbd writing {re.escape(image)} was killed by signal", p)]
    assert len(dead) == 1 and dead == problems, problems
    with open(m.logfile) as f:
        assert "exited with -9" in f.read()
    # What qemu-img check says after the kill (docs/views.md: it stays clean).
    status, said = check(image)
    assert status == 0, said
    # A new open works: a full restore gives the backup exactly.
    restore(backup, view, image)


# -- 3. snapfs killed under a copy ------------------------------------------------------

@pytest.mark.parametrize("timing", ["between writes", "during writes"])
def test_killed_snapfs_mid_copy_umount_cleans_up_and_the_image_checks_clean(disk, mount, writers, timing):
    image = str(disk / "top.qcow2")
    m = mount(disk, "--rw")
    pid = m.pid
    w = writers(m / "top.qcow2/chain/01-top.raw", pause_at=8 * MiB if timing == "between writes" else None)
    w.wait_for("paused" if timing == "between writes" else "wrote", 8 * MiB)
    servers = children(pid)
    assert writable_servers(pid)
    os.kill(pid, signal.SIGKILL)
    assert wait_gone({pid}) == set()
    if timing == "between writes":
        w.resume()
    res = w.results()
    assert res["write"] != "ok" and res["written"] < SIZE, res
    r = run(*SNAPFS, "umount", m.path, cwd=REPO, check=False)
    assert r.returncode == 0, r.stderr
    assert not os.path.ismount(m.path)
    assert wait_gone(servers) == set()
    assert not image_locked(image)
    status, said = check(image)
    assert status == 0, said


# -- 4. an image another program holds --------------------------------------------------

class Holder:
    """Another program holding the image: qemu-io read-write, or a qemu-nbd -r of our own."""

    def __init__(self, kind, image, tmp_path):
        self.nbd = self.proc = None
        if kind == "qemu-io read-write":
            self.proc = subprocess.Popen(["qemu-io", "-f", "qcow2", image], stdin=subprocess.PIPE,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            wait_for(lambda: holds_locks(image) or self.proc.poll() is not None)
            assert self.proc.poll() is None, self.proc.stderr.read()
        else:
            self.nbd = QemuNBD(tmp_path, image, "-f", "qcow2")

    def close(self):
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(10)
        if self.nbd is not None:
            self.nbd.close()


@pytest.mark.parametrize("maps", ["maps read before", "fresh mount"])
@pytest.mark.parametrize("holder", ["qemu-io read-write", "qemu-nbd -r"])
def test_image_another_program_holds_is_ebusy_and_writable_once_it_exits(disk, mount, tmp_path, holder, maps):
    image = str(disk / "top.qcow2")
    m = mount(disk, "--rw")
    if maps == "maps read before":
        run("ls", "-lR", m.path)
    h = Holder(holder, image, tmp_path)
    try:
        for folder in ("chain", "layers"):
            rel = f"top.qcow2/{folder}/01-top.raw"
            assert outcome(opens, m / rel, os.O_WRONLY) == "EBUSY", rel
            assert re.search(rf"^\S+ {re.escape(rel)}: in use: .*lock", m.status(), re.M), m.status()
    finally:
        h.close()
    for i, folder in enumerate(("chain", "layers")):
        pwrite(m / f"top.qcow2/{folder}/01-top.raw", bytes([0x5a + i]) * (64 * KiB), (8 + i) * MiB)
        # The next view once this writer stopped (right after close: the last tests).
        wait_for(lambda: not writable_servers(m.pid))
    assert not image_locked(image)
    qemu_io(image, "read -P 0x5a 8M 64k", "read -P 0x5b 9M 64k")
    assert check(image)[0] == 0


# -- reading back right after a restore -------------------------------------------------
# close() returns once FUSE's FLUSH is answered; RELEASE, and the writer's stop,
# come after it. For the user the restore is over when cp exits.

def test_the_view_read_right_after_writing_it_shows_the_write(disk, mount):
    m = mount(disk, "--rw")
    view = m / "top.qcow2/chain/01-top.raw"
    got = []
    for i in range(8):
        data = bytes([i + 1]) * (64 * KiB)
        pwrite(view, data, (16 + i) * MiB)
        got.append(pread(view, 64 * KiB, (16 + i) * MiB) == data)
    assert got == [True] * 8


def test_other_views_right_after_the_writer_closed_serve_the_new_content(disk, mount):
    m = mount(disk, "--rw")
    layer = m / "top.qcow2/layers/01-top"
    got = []
    for i in range(6):
        off = (16 + i) * MiB
        with open(layer + ".map.json") as f:
            json.load(f)  # known before the write
        pwrite(m / "top.qcow2/chain/01-top.raw", bytes([i + 1]) * (64 * KiB), off)
        # cp has exited: the other views open, and show what it wrote.
        try:
            with open(layer + ".map.json") as f:
                mapped = {"start": off, "length": 64 * KiB, "zero": False, "hole": False} in json.load(f)
            got.append((mapped, pread(layer + ".raw", 64 * KiB, off) == bytes([i + 1]) * (64 * KiB)))
        except OSError as e:
            got.append(errno.errorcode[e.errno])
        wait_for(lambda: not writable_servers(m.pid))
    assert got == [(True, True)] * 6
