"""Tier 2: the pyfuse3 patch routes lseek and fallocate to Python, and
snapfs degrades gracefully on an unpatched pyfuse3."""

import errno
import hashlib
import os
import subprocess
import sys
import time

import pyfuse3
import pytest
from conftest import REPO, MiB, create, qemu_io, run

HERE = os.path.dirname(os.path.abspath(__file__))


def _wait_mounted(path, proc, timeout=20):
    deadline = time.monotonic() + timeout
    while not os.path.ismount(path):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "mount did not appear"
        time.sleep(0.02)


def test_patched_pyfuse3_is_installed():
    assert hasattr(pyfuse3.Operations, "lseek")
    assert hasattr(pyfuse3.Operations, "fallocate")


def test_pyfuse3_is_built_from_the_current_patches():
    """make setup rebuilds pyfuse3 when a patch changes (the read-reply GIL release too)."""
    patches = [os.path.join(REPO, "mount-helpers", p) for p in
               ("pyfuse3-lseek-fallocate.patch", "pyfuse3-read-nogil.patch")]
    h = hashlib.sha256()
    for p in patches:
        with open(p, "rb") as f:
            h.update(f.read())
    stamp = os.path.join(REPO, ".venv", ".pyfuse3-patches")
    assert os.path.exists(stamp), "pyfuse3 was not built by this make setup: run make setup"
    with open(stamp) as f:
        assert f.read().strip() == h.hexdigest(), "pyfuse3 was built from other patches: run make setup"


def test_lseek_and_fallocate_reach_python(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "calls"
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "patchfs.py"), mnt, log],
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_mounted(str(mnt), proc)
        fd = os.open(mnt / "f", os.O_RDWR)
        try:
            assert os.lseek(fd, 0, os.SEEK_DATA) == 512 * 1024
            assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
            assert os.lseek(fd, 600 * 1024, os.SEEK_HOLE) == 1 << 20
            with pytest.raises(OSError) as e:
                os.lseek(fd, 1 << 20, os.SEEK_DATA)
            assert e.value.errno == errno.ENXIO
            os.posix_fallocate(fd, 0, 4096)
            with pytest.raises(OSError) as e:
                # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE: refused by the handler.
                import ctypes
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.fallocate(fd, 3, ctypes.c_long(0), ctypes.c_long(4096)) != 0:
                    raise OSError(ctypes.get_errno(), "fallocate")
            assert e.value.errno == errno.EOPNOTSUPP
        finally:
            os.close(fd)
        calls = log.read_text().splitlines()
        assert "lseek 0 3" in calls and "lseek 0 4" in calls        # SEEK_DATA=3, SEEK_HOLE=4
        assert "fallocate 0 0 4096" in calls and "fallocate 3 0 4096" in calls
    finally:
        run("fusermount3", "-u", mnt, check=False)
        proc.wait(10)


UNPATCHED = os.path.join(REPO, "build", "venv-unpatched-pyfuse3")


@pytest.fixture(scope="session")
def unpatched_python():
    """A venv with pyfuse3 built from its release source, without the patch.

    Built once and kept under build/ (several minutes the first time).
    """
    py = os.path.join(UNPATCHED, "bin", "python")
    check = "import nbd, pyfuse3, trio, sys; sys.exit(hasattr(pyfuse3.Operations, 'lseek'))"
    if not (os.path.exists(py) and subprocess.run([py, "-c", check]).returncode == 0):
        run("/usr/bin/python3", "-m", "venv", "--clear", "--system-site-packages", UNPATCHED)
        run(py, "-m", "pip", "install", "-q", "pyfuse3==3.5.0", "trio", timeout=900)
    r = subprocess.run([py, "-c", check])
    assert r.returncode == 0, "the unpatched venv has a patched pyfuse3"
    return py


def test_unpatched_pyfuse3_mounts_and_reports_all_data(unpatched_python, tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    img = create(d / "disk.qcow2", 8 * MiB)
    qemu_io(img, "write -P 0x5a 4M 1M")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen([unpatched_python, "-m", "snapfs", "mount", "--foreground",
                             "--images", d, mnt], stderr=subprocess.PIPE, text=True, env=env)
    try:
        _wait_mounted(str(mnt), proc)
        view = mnt / "disk.qcow2/chain/00-disk.raw"
        fd = os.open(view, os.O_RDONLY)
        try:
            # The kernel's fallback: all data, one hole at the end.
            assert os.lseek(fd, 0, os.SEEK_DATA) == 0
            assert os.lseek(fd, 0, os.SEEK_HOLE) == 8 * MiB
        finally:
            os.close(fd)
        # st_blocks still tells the truth.
        assert os.stat(view).st_blocks == MiB // 512
        run("qemu-img", "compare", "-f", "raw", view, img)
        status = (mnt / ".snapfs-status").read_text()
        assert "no lseek handler" in status
    finally:
        run("fusermount3", "-u", mnt, check=False)
        _, err = proc.communicate(timeout=20)
    assert err.count("no lseek handler") == 1, err
    assert proc.returncode == 0
