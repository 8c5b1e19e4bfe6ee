"""mount(8), fstab and umount(8) (docs/mounting.md), as root and as an ordinary user.

``mount -t fuse.snapfs`` runs fuse3's ``mount.fuse3``, which runs ``snapfs
SOURCE MOUNTPOINT -o OPTIONS`` from its PATH (``make setup`` links
``/usr/local/bin/snapfs`` to this checkout). The views read through such a
mount must equal ``qemu-img convert`` of the image, and ``umount`` must leave
no snapfs process and no qemu-nbd behind. An ordinary user's mount runs
snapfs as that user, from a copy of this checkout it can reach (conftest's
``nobody``): the checkout may be closed to others.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
import time

import pytest
from conftest import REPO, MiB, create, processes, qemu_img, qemu_io, run, sha256_of

SIZE = 8 * MiB
FSTAB_MARK = "# snapfs test entry"
LOCAL_COMMAND = "/usr/local/bin/snapfs"


@pytest.fixture(scope="module", autouse=True)
def snapfs_on_path():
    """mount.fuse3 runs snapfs from /usr/local/bin: it must be this checkout's."""
    if os.getuid() != 0:
        pytest.skip("mount(8) tests need root")
    for tool in ("mount", "umount", "mount.fuse3"):
        if shutil.which(tool, path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin") is None:
            pytest.fail(f"{tool} is missing: run make setup")
    want = os.path.join(REPO, ".venv", "bin", "snapfs")
    got = os.path.realpath(LOCAL_COMMAND)
    if got != os.path.realpath(want):
        pytest.fail(f"{LOCAL_COMMAND} is {got}, not this checkout's {want}: run make setup")


digest = sha256_of


def expected_digest(image, tmp) -> str:
    out = os.path.join(tmp, "expected.raw")
    qemu_img("convert", "-O", "raw", image, out)
    try:
        return digest(out)
    finally:
        os.unlink(out)


def leftovers(needle: str) -> list[str]:
    """snapfs and qemu-nbd processes whose command line names ``needle``."""
    out = []
    for pid, argv in processes().items():
        cmd = " ".join(argv)
        if needle in cmd and ("snapfs" in cmd or "qemu-nbd" in cmd):
            out.append(f"{pid}: {cmd}")
    return out


def wait_gone(needle: str, timeout=10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := leftovers(needle)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def findmnt(mountpoint, *cols) -> str:
    return run("findmnt", "-rn", "-o", ",".join(cols), "--mountpoint", mountpoint, check=False).stdout.strip()


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    base = create(d / "base.qcow2", SIZE)
    qemu_io(base, "write -P 0x61 1M 2M")
    top = create(d / "top.qcow2", backing="base.qcow2")
    qemu_io(top, "write -P 0x62 2M 1M", "write -z 5M 1M")
    return d


def test_mount_t_fuse_snapfs_with_options_and_umount(images, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    top = str(images / "top.qcow2")
    r = run("mount", "-t", "fuse.snapfs", images, mnt, "-o", "allow_other,noatime,idle_timeout=1,nofail",
            check=False)
    assert r.returncode == 0, r.stderr
    try:
        # The source shows as itself; read-only, and what snapfs mounts always are.
        source, fstype, options = findmnt(mnt, "SOURCE", "FSTYPE", "OPTIONS").split(" ")
        assert (source, fstype) == (str(images), "fuse.snapfs")
        assert {"ro", "nosuid", "nodev", "noexec", "allow_other", "default_permissions"} <= set(options.split(","))
        assert digest(mnt / "top.qcow2/chain/01-top.raw") == expected_digest(top, tmp_path)
        assert errno.EROFS == _open_errno(mnt / "top.qcow2/chain/01-top.raw", os.O_WRONLY)
    finally:
        r = run("umount", mnt, check=False)
    assert r.returncode == 0, r.stderr
    assert not os.path.ismount(mnt)
    assert wait_gone(str(images)) == []


def test_writable_option_and_ro(images, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    # mount(8) passes rw for every mount: it does not make snapfs writable.
    run("mount", "-t", "fuse.snapfs", images, mnt, "-o", "rw")
    try:
        assert "ro" in findmnt(mnt, "OPTIONS").split(",")
    finally:
        run("umount", mnt)
    assert wait_gone(str(images)) == []
    run("mount", "-t", "fuse.snapfs", images, mnt, "-o", "writable")
    try:
        assert "rw" in findmnt(mnt, "OPTIONS").split(",")
        fd = os.open(mnt / "top.qcow2/chain/01-top.raw", os.O_WRONLY)
        try:
            assert os.pwrite(fd, b"\x63" * 65536, 6 * MiB) == 65536
        finally:
            os.close(fd)
    finally:
        run("umount", mnt)
    assert wait_gone(str(images)) == []
    assert qemu_io(str(images / "top.qcow2"), "read -P 0x63 6M 64k").returncode == 0
    # Contradictions and unknown options are refused with the reason, and nothing is mounted.
    for opts, why in (("writable,ro", "contradict"), ("bogus", "unknown mount option 'bogus'"),
                      ("domain=x", "go with --connect"), ("allow_other=yes", "takes no value")):
        r = run("mount", "-t", "fuse.snapfs", images, mnt, "-o", opts, check=False)
        assert r.returncode != 0 and why in r.stderr, (opts, r.stderr)
        assert not os.path.ismount(mnt)


def _open_errno(path, flags):
    try:
        os.close(os.open(path, flags))
    except OSError as e:
        return e.errno
    return None


def test_fstab_file(images, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(f"# a test fstab\n{images} {mnt} fuse.snapfs noauto,allow_other,_netdev,"
                     "x-systemd.requires=local-fs.target,connections=2 0 0\n")
    r = run("mount", "-T", fstab, mnt, check=False)
    assert r.returncode == 0, r.stderr
    try:
        assert findmnt(mnt, "SOURCE") == str(images)
        assert digest(mnt / "top.qcow2/layers/00-base.raw") == expected_digest(images / "base.qcow2", tmp_path)
        # mount -a does not mount it twice.
        r = run("mount", "-T", fstab, "-a", "-t", "fuse.snapfs", check=False)
        assert r.returncode == 0, r.stderr
        assert run("findmnt", "-rn", "--mountpoint", mnt).stdout.count("\n") == 1
    finally:
        run("umount", mnt)
    assert wait_gone(str(images)) == []


def _relink(link, target):
    """Point symlink ``link`` at ``target`` in one step (never missing in between)."""
    new = f"{link}.{os.getpid()}.new"
    os.symlink(target, new)
    os.replace(new, link)


@pytest.fixture
def command_for_users(nobody):
    """/usr/local/bin/snapfs leads to the copy ``nobody`` can reach while the test runs.

    mount.fuse3 runs it as the mounting user, who may not enter the checkout.
    The link is put back after, unless something else replaced it meanwhile
    (should the run be killed before, ``make setup`` links it back).
    """
    before = os.readlink(LOCAL_COMMAND)
    _relink(LOCAL_COMMAND, nobody.command)
    try:
        yield
    finally:
        if os.path.islink(LOCAL_COMMAND) and os.readlink(LOCAL_COMMAND) == nobody.command:
            _relink(LOCAL_COMMAND, before)


@pytest.fixture
def etc_fstab():
    """/etc/fstab with test lines added (ordinary users may use only its entries); restored after."""
    with open("/etc/fstab") as f:
        saved = f.read()
    added = []

    def add(line):
        added.append(line)
        with open("/etc/fstab", "a") as f:
            f.write(f"{line} {FSTAB_MARK}\n")

    yield add
    with open("/etc/fstab", "w") as f:
        f.write(saved)


def test_user_fstab_entry(nobody, command_for_users, etc_fstab):
    shared = tempfile.mkdtemp(prefix="snapfs-mount8-", dir="/tmp")
    os.chmod(shared, 0o755)
    images, mnt = os.path.join(shared, "images"), os.path.join(shared, "mnt")
    try:
        for d in (images, mnt):
            os.mkdir(d, 0o700)
            os.chown(d, nobody.pw_uid, nobody.pw_gid)
        img = create(os.path.join(images, "vda.qcow2"), SIZE)
        qemu_io(img, "write -P 0x71 1M 1M")
        os.chown(img, nobody.pw_uid, nobody.pw_gid)
        os.chmod(img, 0o600)
        expected = expected_digest(img, shared)
        etc_fstab(f"{images} {mnt} fuse.snapfs noauto,user 0 0")

        def as_nobody(*cmd):
            return subprocess.run(["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
                                   "--clear-groups", "env", "-u", "XDG_RUNTIME_DIR", f"HOME={shared}", *cmd],
                                  capture_output=True, text=True, cwd="/")

        r = as_nobody("mount", mnt)
        assert r.returncode == 0, r.stderr
        try:
            view = os.path.join(mnt, "vda.qcow2", "chain", "00-vda.raw")
            r = as_nobody("sha256sum", view)
            assert r.returncode == 0 and r.stdout.split()[0] == expected, r.stderr
            # The mount is the user's: root is kept out (no allow_other).
            with pytest.raises(PermissionError):
                os.stat(view)
        finally:
            r = as_nobody("umount", mnt)
        assert r.returncode == 0, r.stderr
        assert not os.path.ismount(mnt)
        assert wait_gone(images) == []
    finally:
        if os.path.ismount(mnt):
            run("umount", "-l", mnt, check=False)
        shutil.rmtree(shared, ignore_errors=True)


def test_a_source_that_is_not_ascii(tmp_path):
    """fuse takes ASCII options only: such a source mounts, named "snapfs"."""
    images = tmp_path / "Müller, VMs"
    images.mkdir()
    create(images / "vda.qcow2", SIZE)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = run("mount", "-t", "fuse.snapfs", images, mnt, check=False)
    assert r.returncode == 0, r.stderr
    try:
        assert findmnt(mnt, "SOURCE") == "snapfs"
        assert os.listdir(mnt / "vda.qcow2/chain") != []
    finally:
        run("umount", mnt)
    assert wait_gone(str(images)) == []
