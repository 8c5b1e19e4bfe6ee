"""Tier 8: docs/remote.md's walk-through, run as written against a host
reached only through ssh, with its own libvirtd and a running VM, proved
with qemu's tools on the host itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import pytest
from conftest import IN_CI, REPO, walkthrough
from remote_env import ALIAS, TestHost

DOC = os.path.join(REPO, "docs", "remote.md")
VM = "snapfs-walk-vm"

pytestmark = pytest.mark.skipif(os.geteuid() != 0 and not IN_CI,
                                reason="the test host needs root (mount namespace, sshd, libvirtd)")


def test_remote_walkthrough(tmp_path):
    steps = walkthrough(DOC)
    assert sorted(steps) == ["1", "2", "3"]
    base = tempfile.mkdtemp(prefix="snapfs-testhost-", dir="/var/tmp")
    os.chmod(base, 0o755)
    host = TestHost.start(base, libvirt=True)
    try:
        images = os.path.join(host.root, "vms")
        host.sh('''set -e
mkdir -p "$1"; cd "$1"
qemu-img create -q -f qcow2 base.qcow2 64M
qemu-io -c "write -P 0x11 0 8M" -c "write -z 16M 4M" base.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 vda.qcow2
qemu-io -c "write -P 0x22 4M 8M" -c "write -z 1M 1M" vda.qcow2 >/dev/null
''', images)
        host.define(VM, f"{images}/vda.qcow2", start=True)
        assert not os.path.exists(images)
        env = dict(os.environ, HOST=ALIAS, VM=VM, SSH_CONFIG=host.config, MNT=str(tmp_path / "mnt"),
                   BACKUP=str(tmp_path / "backup"),
                   PATH=os.path.join(REPO, ".venv", "bin") + ":" + os.environ["PATH"])
        os.makedirs(env["MNT"])
        os.makedirs(env["BACKUP"])

        def step(n):
            out = []
            for block in steps[n]:
                p = subprocess.run(["bash", "-euo", "pipefail", "-c", block], env=env, capture_output=True,
                                   text=True, cwd=str(tmp_path))
                assert p.returncode == 0, f"step {n}: {block}\n{p.stderr}"
                out.append(p.stdout)
            return "".join(out)

        said = step("1")
        assert said.rstrip().endswith(ALIAS), said
        step("2")
        disk = f"{images}/vda.qcow2"
        backup = os.path.join(env["BACKUP"], "vda.raw")
        # The backup is the disk as qemu on the host reads it (the VM, with no OS, writes nothing).
        host.run("qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", backup, disk)
        assert host.run("virsh", "-c", "qemu:///system", "backup-dumpxml", VM, check=False).returncode != 0
        # The VM is shut off, and its disk written over; the restore puts the backup back.
        host.run("virsh", "-c", "qemu:///system", "destroy", VM)
        host.run("qemu-io", "-f", "qcow2", "-c", "write -P 0x99 0 32M", disk)
        assert host.run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", backup, disk,
                        check=False).returncode == 1
        step("3")
        host.run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", backup, disk)
        host.run("qemu-img", "check", "-q", disk)
        assert not host.pids_of("qemu-nbd")
    finally:
        host.run("virsh", "-c", "qemu:///system", "destroy", VM, check=False)
        host.stop()
        shutil.rmtree(base, ignore_errors=True)
