"""Tier 8: docs/forensics.md's walk-through, run as written.

The evidence is a GPT disk (ext4, FAT, ext4) with two snapshots over it that
add and change files (``partition_disks``). Sleuth Kit reads partition 1 at
two points without an offset, a loop mount of each point's ``p1.raw`` shows
the files, and ``diff -r`` finds exactly what changed between them. The
ground truth is the raw disk at each point: the extracted file, the listings
and the changes are checked against what was written there.
"""

from __future__ import annotations

import os
import re

from conftest import REPO, run, walkthrough
from partition_disks import GPT, make_disk

DOC = os.path.join(REPO, "docs", "forensics.md")


def test_the_forensics_walkthrough_runs_as_written(tmp_path):
    assert os.geteuid() == 0, "the walk-through's loop mounts need root"
    evidence, raws = make_disk(tmp_path, GPT)
    mnt, work = tmp_path / "mnt", tmp_path / "work"
    mnt.mkdir()
    work.mkdir()
    env = dict(os.environ, EVIDENCE=str(evidence), MNT=str(mnt), WORK=str(work),
               PATH=os.path.join(REPO, ".venv", "bin") + ":" + os.environ["PATH"])
    steps = walkthrough(DOC)
    assert sorted(steps) == ["1", "2", "3", "4"] and all(len(b) == 1 for b in steps.values()), steps
    prelude = 'P="$MNT/s2.qcow2/partitions"\n'

    def sh(step):
        r = run("bash", "-euo", "pipefail", "-c", prelude + steps[step][0], env=env, check=False)
        assert r.returncode == 0, f"step {step} failed ({r.returncode}):\n{steps[step][0]}\n{r.stdout}{r.stderr}"
        return r.stdout

    try:
        # 1. The points, the partitions of the last one, and where p1 comes from.
        out = sh("1")
        assert re.search(r"^00-disk\n01-s1\n02-s2$", out, re.M), out
        for name in ("p1.raw", "p2.raw", "p3.raw", "p1.map.json"):
            assert re.search(rf"^-r.* {re.escape(name)}$", out, re.M), out
        assert 'user.snapfs.view="partition"' in out and 'user.snapfs.partition.number="1"' in out, out
        assert f'user.snapfs.partition.start="{2048 * 512}"' in out, out
        assert 'user.snapfs.partition.type="0fc63daf-8483-4772-8e79-3d69d8477de4"' in out, out

        # 2. Sleuth Kit without offsets: the file as written at the last point.
        out = sh("2")
        assert "note1.txt" in out and "added2.bin" in out, out
        assert (work / "note1-s2.txt").read_text() == "partition 1 at point 2\n"
        first, last = (work / "p1-disk.list").read_text(), (work / "p1-s2.list").read_text()
        assert "note1.txt" in first and "added" not in first, first
        assert "added2.bin" in last, last

        # 3. Loop mounts at two points: what changed is what was written between them.
        sh("3")
        changes = (work / "changes").read_text().splitlines()
        assert changes == [f"Only in {work}/after: added2.bin",
                           f"diff -r {work}/before/note1.txt {work}/after/note1.txt",
                           "1c1", "< partition 1 at point 0", "---", "> partition 1 at point 2"], changes
        assert not os.path.ismount(work / "before") and not os.path.ismount(work / "after")
        # The partition read whole equals the disk's bytes of it at that point.
        with open(raws[2], "rb") as f:
            f.seek(2048 * 512)
            want = f.read(32768 * 512)
        with open(mnt / "s2.qcow2/partitions/02-s2/p1.raw", "rb") as f:
            assert f.read() == want

        # 4. Unmount.
        sh("4")
        assert not os.path.ismount(mnt)
    finally:
        for d in (work / "before", work / "after", mnt):
            if os.path.ismount(d):
                run("umount", "-l", d, check=False)
