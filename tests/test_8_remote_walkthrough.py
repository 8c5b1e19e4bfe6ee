"""Tier 8: docs/remote.md's walk-through, run as written against a host
reached only through ssh, proved with qemu's tools on the host itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import pytest
from conftest import IN_CI, REPO, walkthrough
from remote_env import ALIAS, TestHost

DOC = os.path.join(REPO, "docs", "remote.md")

pytestmark = pytest.mark.skipif(os.geteuid() != 0 and not IN_CI,
                                reason="the test host needs root (mount namespace, sshd)")


def test_remote_walkthrough(tmp_path):
    steps = walkthrough(DOC)
    assert sorted(steps) == ["1", "2", "3"]
    base = tempfile.mkdtemp(prefix="snapfs-testhost-", dir="/var/tmp")
    os.chmod(base, 0o755)
    host = TestHost.start(base)
    try:
        images = os.path.join(host.root, "images")
        host.sh('''set -e
mkdir -p "$1/vm1"; cd "$1/vm1"
qemu-img create -q -f qcow2 base.qcow2 64M
qemu-io -c "write -P 0x11 0 8M" -c "write -z 16M 4M" base.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 disk.qcow2
qemu-io -c "write -P 0x22 4M 8M" -c "write -z 1M 1M" disk.qcow2 >/dev/null
''', images)
        assert not os.path.exists(images)
        env = dict(os.environ, HOST=ALIAS, IMAGES=images, SSH_CONFIG=host.config, MNT=str(tmp_path / "mnt"),
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
        assert "every view is available" in said and said.rstrip().endswith(ALIAS), said
        step("2")
        disk = f"{images}/vm1/disk.qcow2"
        backup = os.path.join(env["BACKUP"], "disk.raw")
        # The backup is the disk, as qemu on the host reads it; its layers a chain qemu opens.
        host.run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", backup, disk)
        host.run("qemu-img", "compare", "-F", "qcow2", os.path.join(env["BACKUP"], "layers", "01-disk.qcow2"),
                 disk)
        # The guest writes over its disk; the restore puts the backup back.
        host.run("qemu-io", "-f", "qcow2", "-c", "write -P 0x99 0 32M", disk)
        assert host.run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", backup, disk,
                        check=False).returncode == 1
        step("3")
        host.run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", backup, disk)
        host.run("qemu-img", "check", "-q", disk)
        assert not host.pids_of("qemu-nbd")
    finally:
        host.stop()
        shutil.rmtree(base, ignore_errors=True)
