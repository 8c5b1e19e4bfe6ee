"""libvirt on another host, through ssh (docs/remote.md): the host runs its
own libvirtd in its mount namespace (``remote_env.TestHost(libvirt=True)``);
snapfs reaches it with qemu+ssh:// through its one ssh connection and reads
the disks there. Ground truth: qemu-img on the host."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
from conftest import IN_CI, REPO, SNAPFS, run, sha256_of
from remote_env import ALIAS, TestHost

pytestmark = pytest.mark.skipif(os.geteuid() != 0 and not IN_CI,
                                reason="the test host needs root (mount namespace, sshd, libvirtd)")

DOMAIN = "snapfs-remote-vm"


@pytest.fixture(scope="module")
def host():
    base = tempfile.mkdtemp(prefix="snapfs-testhost-", dir="/var/tmp")
    os.chmod(base, 0o755)
    h = TestHost.start(base, libvirt=True)
    yield h
    h.stop()
    shutil.rmtree(base, ignore_errors=True)


def define(host: TestHost, images: str) -> None:
    host.sh('''set -e
mkdir -p "$1"; cd "$1"
qemu-img create -q -f qcow2 base.qcow2 32M
qemu-io -c "write -P 0x11 0 4M" -c "write -z 8M 1M" base.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 vda.qcow2
qemu-io -c "write -P 0x22 2M 4M" vda.qcow2 >/dev/null
''', images)
    host.define(DOMAIN, f"{images}/vda.qcow2")


def test_shut_off_domain_of_a_remote_libvirt(host, tmp_path, mount):
    images = os.path.join(host.root, "vms")
    define(host, images)
    assert not os.path.exists(images)
    m = mount(["--connect", host.uri(), "--domain", DOMAIN], "--ssh-config", host.config, name="lv")
    assert "every view is available" in m.status(), m.status()
    disk = m / f"{DOMAIN}/vda"
    names = sorted(os.listdir(os.path.join(disk, "layers")))
    assert [n for n in names if n.endswith(".raw")] == ["00-base.raw", "01-vda.raw"], names
    assert os.getxattr(os.path.join(disk, "chain/current.raw"), "user.snapfs.host") == ALIAS.encode()
    assert os.getxattr(os.path.join(disk, "chain/current.raw"), "user.snapfs.image").decode() == \
        f"{images}/vda.qcow2"
    # The bytes are qemu's on the host.
    for view, image in (("chain/current.raw", "vda.qcow2"), ("layers/00-base.raw", "base.qcow2")):
        want = tmp_path / "want.raw"
        host.run("qemu-img", "convert", "-O", "raw", f"{images}/{image}", f"{images}/want.raw")
        want.write_bytes(host.run("cat", f"{images}/want.raw").stdout)
        assert sha256_of(os.path.join(disk, view)) == sha256_of(want), view


@pytest.mark.parametrize("uri, says", [
    ("qemu+tcp://kvm1/system", "through ssh: use qemu+ssh://kvm1/system"),
    ("qemu+ssh://kvm1/system?no_verify=1", "never turns host key checking off"),
    ("qemu+ssh://kvm1/system?command=/bin/ssh", "snapfs runs ssh itself"),
])
def test_remote_libvirt_uris_snapfs_refuses(tmp_path, uri, says):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = run(*SNAPFS, "mount", "--connect", uri, mnt, check=False, cwd=REPO, timeout=60)
    assert r.returncode != 0 and says in r.stderr, r.stderr
    assert not os.path.ismount(mnt)


def has_backup_job(host: TestHost, name: str) -> bool:
    return host.run("virsh", "-c", "qemu:///system", "backup-dumpxml", name, check=False).returncode == 0


@pytest.mark.parametrize("end", ["umount", "sigkill", "shared"])
def test_running_domain_of_a_remote_libvirt(host, tmp_path, mount, end):
    """A running domain on another host is read through a backup job there,
    its NBD socket forwarded through snapfs's ssh connection (no TCP port,
    no certificate); the job ends at umount, and after SIGKILL at snapfs umount.
    shared: the host's image directory in the same mount, first, shares the
    connection: its source closing first must not leave the job behind."""
    name = f"snapfs-remote-run-{end}"
    images = os.path.join(host.root, name)
    host.sh('''set -e
mkdir -p "$1"; cd "$1"
qemu-img create -q -f qcow2 base.qcow2 32M
qemu-io -c "write -P 0x11 0 4M" base.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 vda.qcow2
qemu-io -c "write -P 0x22 2M 4M" -c "write -z 8M 1M" vda.qcow2 >/dev/null
qemu-img convert -O raw vda.qcow2 want.raw
''', images)
    host.define(name, f"{images}/vda.qcow2", start=True)
    try:
        if end == "shared":
            from snapfs.sources.base import folder_name
            m = mount(["--images", host.url(images), "--connect", host.uri(), "--domain", name],
                      "--ssh-config", host.config, name=f"run-{end}")
            view = m / f"{folder_name(host.uri())}/{name}/vda/chain/current.raw"
            assert os.path.exists(m / f"{folder_name(host.url(images))}/vda.qcow2/chain")
        else:
            m = mount(["--connect", host.uri(), "--domain", name], "--ssh-config", host.config, name=f"run-{end}")
            view = m / f"{name}/vda/chain/current.raw"
        want = tmp_path / "want.raw"
        want.write_bytes(host.run("cat", f"{images}/want.raw").stdout)
        assert sha256_of(view) == sha256_of(want)
        assert has_backup_job(host, name)
        if end == "sigkill":
            os.kill(m.pid, 9)
        run(*SNAPFS, "umount", m.path, cwd=REPO)
        m.closed = True
        assert not has_backup_job(host, name)
        assert host.run("virsh", "-c", "qemu:///system", "domstate", name).stdout.strip() == b"running"
    finally:
        host.run("virsh", "-c", "qemu:///system", "destroy", name, check=False)
        host.run("virsh", "-c", "qemu:///system", "undefine", name, check=False)
