"""Tier 5: mounting, unmounting, crashes: no qemu-nbd is ever left behind."""

import errno
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, SNAPFS, MiB, create, qemu_io, run


def children(pid):
    """qemu-nbd processes started by snapfs pid."""
    r = run("pgrep", "-P", str(pid), "-x", "qemu-nbd", check=False)
    return {int(p) for p in r.stdout.split()}


def alive(pids):
    """The pids still running (a zombie has ended)."""
    out = set()
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    out.add(p)
        except (FileNotFoundError, ProcessLookupError):
            pass  # gone, or reaped between open and read
    return out


def wait_gone(pids, timeout=10):
    deadline = time.monotonic() + timeout
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive(pids)


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    base = create(d / "base.qcow2", 16 * MiB)
    qemu_io(base, "write -P 0x61 0 2M")
    top = create(d / "top.qcow2", backing="base.qcow2")
    qemu_io(top, "write -P 0x62 4M 2M", "write -P 0x63 12M 1M")
    return d


def _open_views(m):
    """Open every view (a server each) and keep them open."""
    fds = []
    for folder in ("chain", "layers"):
        for name in ("00-base.raw", "01-top.raw"):
            fd = os.open(m / f"top.qcow2/{folder}/{name}", os.O_RDONLY)
            os.pread(fd, 4096, 0)
            fds.append(fd)
    return fds


def test_umount_stops_every_server(images, mount):
    m = mount(images, "--idle-timeout", "60")
    pid = m.pid
    fds = _open_views(m)
    servers = children(pid)
    # chain/00-base and layers/00-base are one export: one server.
    assert len(servers) == 3
    for fd in fds:
        os.close(fd)
    r = run(*SNAPFS, "umount", m.path, cwd=REPO)
    assert r.returncode == 0
    assert not os.path.ismount(m.path)
    assert wait_gone(servers | {pid}) == set()


def test_idle_servers_stop(images, mount):
    m = mount(images, "--idle-timeout", "0.5")
    fds = _open_views(m)
    servers = children(m.pid)
    assert servers
    for fd in fds:
        os.close(fd)
    assert wait_gone(servers, timeout=5) == set()
    # A later read starts a server again, transparently.
    with open(m / "top.qcow2/chain/01-top.raw", "rb") as f:
        f.seek(4 * MiB)
        assert f.read(4) == b"\x62" * 4


def test_listing_starts_no_lingering_servers(images, mount):
    m = mount(images)
    run("ls", "-lsR", m.path)
    assert wait_gone(children(m.pid), timeout=2) == set()


def test_fusermount_u_stops_snapfs_and_servers(images, mount):
    m = mount(images, "--idle-timeout", "60")
    pid = m.pid
    fds = _open_views(m)
    servers = children(pid)
    for fd in fds:
        os.close(fd)
    run("fusermount3", "-u", m.path)
    assert wait_gone(servers | {pid}) == set()


@pytest.mark.parametrize("unmount", ["snapfs umount", "fusermount3 -u"])
def test_killed_snapfs_leaves_no_server(images, mount, unmount):
    m = mount(images, "--idle-timeout", "60")
    pid = m.pid
    fds = _open_views(m)
    servers = children(pid)
    assert servers
    os.kill(pid, signal.SIGKILL)
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    if unmount == "snapfs umount":
        r = run(*SNAPFS, "umount", m.path, cwd=REPO, check=False)
        assert r.returncode == 0, r.stderr
    else:
        run("fusermount3", "-u", m.path)
    assert not os.path.ismount(m.path)
    assert wait_gone(servers) == set()


def test_killed_snapfs_under_an_open_file_is_detached_by_snapfs_umount(images, mount):
    """A reader (a VM paused on the mount) still holds a file of the dead mount:
    nothing more can be lost, so snapfs umount detaches it without --force."""
    m = mount(images, "--idle-timeout", "60")
    pid = m.pid
    fds = _open_views(m)
    servers = children(pid)
    os.kill(pid, signal.SIGKILL)
    assert wait_gone({pid}) == set()
    try:
        r = run("fusermount3", "-u", m.path, check=False)
        assert r.returncode != 0 and "busy" in r.stderr.lower(), r.stderr  # held: a plain unmount fails
        r = run(*SNAPFS, "umount", m.path, cwd=REPO, check=False)
        assert r.returncode == 0, r.stderr
        assert not os.path.ismount(m.path)
        assert wait_gone(servers) == set()
        with pytest.raises(OSError) as e:
            os.pread(fds[0], 4096, 0)
        assert e.value.errno == errno.ENOTCONN
    finally:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass  # the flush of a file of a dead mount: ENOTCONN


@pytest.mark.log_allows(r"died; restarting it", r"exited with -9")
def test_server_killed_behind_snapfs_is_restarted(images, mount):
    m = mount(images, "--idle-timeout", "60")
    with open(m / "top.qcow2/chain/01-top.raw", "rb") as f:
        assert f.read(4) == b"\x61" * 4
        servers = children(m.pid)
        for p in servers:
            os.kill(p, signal.SIGKILL)
        wait_gone(servers)
        # Far from what readahead fetched before the kill.
        f.seek(12 * MiB)
        assert f.read(4) == b"\x63" * 4
    assert children(m.pid) - servers


def test_foreground_stays_attached_and_stops_on_sigterm(images, tmp_path):
    mnt = tmp_path / "fg"
    mnt.mkdir()
    proc = subprocess.Popen([*SNAPFS, "mount", "--foreground", "--images", images, mnt],
                            cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not os.path.ismount(mnt):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with open(mnt / "top.qcow2/chain/01-top.raw", "rb") as f:
            f.read(4096)
            servers = children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert not os.path.ismount(mnt)
        assert wait_gone(servers) == set()
    finally:
        if proc.poll() is None:
            proc.kill()
        run("fusermount3", "-uz", mnt, check=False)


@pytest.mark.parametrize("case", ["no images dir", "mountpoint missing", "already mounted"])
def test_mount_errors_are_clear(images, tmp_path, mount, case):
    mnt = tmp_path / "mp"
    mnt.mkdir()
    src = images
    if case == "no images dir":
        src = tmp_path / "nope"
    elif case == "mountpoint missing":
        mnt = tmp_path / "missing"
    else:
        mount(images, name="mp")
    r = run(*SNAPFS, "mount", "--images", src, mnt, cwd=REPO, check=False)
    assert r.returncode != 0
    assert r.stderr.startswith("snapfs: ")
    assert "Traceback" not in r.stderr
    assert len(r.stderr.splitlines()) == 1


def test_umount_of_something_else_is_refused(tmp_path):
    r = run(*SNAPFS, "umount", tmp_path, cwd=REPO, check=False)
    assert r.returncode == 1
    assert "not a snapfs mount" in r.stderr


def test_help_describes_the_commands():
    out = run(sys.executable, "-m", "snapfs", "mount", "--help", cwd=REPO).stdout
    for opt in ("--images", "--foreground", "--debug", "--allow-other", "--allow-outside-backing"):
        assert opt in out



def test_umount_refuses_while_a_view_is_open_and_names_who_holds_it(images, mount):
    m = mount(images)
    view = m / "top.qcow2/chain/01-top.raw"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; f = open(sys.argv[1], 'rb'); "
                               "f.read(4); print('open', flush=True); time.sleep(60)", view],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "open\n"
        r = run(*SNAPFS, "umount", m.path, cwd=REPO, check=False)
        assert r.returncode == 1
        assert f"{m.path} is in use: 1 file(s) open" in r.stderr
        assert f"top.qcow2/chain/01-top.raw: opened by python3 (pid {holder.pid})" in r.stderr \
            or f"top.qcow2/chain/01-top.raw: opened by python (pid {holder.pid})" in r.stderr, r.stderr
        assert "snapfs umount --force" in r.stderr
        # The mount goes on working, for the holder and for everyone else.
        assert os.path.ismount(m.path)
        with open(m / "top.qcow2/chain/00-base.raw", "rb") as f:
            assert f.read(4) == b"\x61" * 4
        # fusermount3 -u refuses too (EBUSY): a plain unmount never pulls a disk from under a reader.
        assert run("fusermount3", "-u", m.path, check=False).returncode != 0
        assert os.path.ismount(m.path)
        # --force unmounts, and says what breaks.
        r = run(*SNAPFS, "umount", "--force", m.path, cwd=REPO, check=False)
        assert r.returncode == 0, r.stderr
        assert "with 1 file(s) open; their readers get I/O errors from now on" in r.stderr
        assert "top.qcow2/chain/01-top.raw: opened by python" in r.stderr
        assert not os.path.ismount(m.path)
    finally:
        holder.kill()
        holder.wait()


def test_umount_refuses_when_its_snapfs_runs_but_cannot_say_what_is_open(images, mount):
    m = mount(images)
    os.kill(m.pid, signal.SIGSTOP)
    try:
        r = run(*SNAPFS, "umount", m.path, cwd=REPO, check=False)
    finally:
        os.kill(m.pid, signal.SIGCONT)
    assert r.returncode == 1
    assert "cannot ask the snapfs of" in r.stderr and "snapfs umount --force" in r.stderr
    assert os.path.ismount(m.path)
    with open(m / "top.qcow2/chain/00-base.raw", "rb") as f:
        assert f.read(4) == b"\x61" * 4
