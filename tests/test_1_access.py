"""The permission rule of fs/access.py, on real files: what every class may read.

The mount tests (test_5_access) prove the kernel enforces it; these draw the
rule's corners: other owners and groups, search and list needs, ACLs, and
how long file system facts are kept.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from snapfs.fs.access import LIST, READ, SEARCH, Facts, access, parents
from snapfs.hosts.local import LOCAL

NOBODY = 65534


@pytest.fixture
def files(tmp_path):
    if os.getuid() != 0:
        pytest.skip("needs root, to give files other owners")

    def make(name, mode, uid=0, gid=0, directory=False):
        path = tmp_path / name
        path.mkdir() if directory else path.write_bytes(b"x")
        os.chown(path, uid, gid)
        os.chmod(path, mode)
        return str(path)
    return make


def test_same_owner_takes_the_bits_every_file_grants(files):
    top, base = files("top", 0o644), files("base", 0o640)
    assert access([(top, READ), (base, READ)]) == (0, 0, 0o640)


def test_another_owner_or_group_grants_the_least_a_class_could_get(files):
    top = files("top", 0o644)
    theirs = files("theirs", 0o604, uid=NOBODY)       # owner rw, group none, other r
    # Our owner is not its owner and may be in its group: g & o, nothing. Our
    # group may be it, or in its group: nothing. Others: its owner or others, r.
    assert access([(top, READ), (theirs, READ)]) == (0, 0, 0o004)
    group = files("group", 0o640, gid=NOBODY)         # root owns it, another group reads
    # Our group may not be theirs (other bits: none); others may be in it (min of g, o).
    assert access([(top, READ), (group, READ)]) == (0, 0, 0o600)


def test_directories_grant_by_search_or_list(files):
    f = files("f", 0o644)
    searchable = files("s", 0o711, directory=True)
    listable_only = files("l", 0o744, directory=True)
    assert access([(f, READ), (searchable, SEARCH)]) == (0, 0, 0o644)
    assert access([(f, READ), (listable_only, SEARCH)]) == (0, 0, 0o600)
    assert access([(searchable, LIST)]) == (0, 0, 0o700)  # others may search, not list
    assert access([(listable_only, LIST)]) == (0, 0, 0o700)


def test_acl_grants_the_owner_class_only(files, tmp_path):
    f = files("f", 0o644)
    r = subprocess.run(["setfacl", "-m", f"u:{NOBODY}:---", f], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert access([(f, READ)]) == (0, 0, 0o600)


def test_missing_file_grants_nothing(tmp_path):
    assert access([(str(tmp_path / "gone"), READ)]) == (0, 0, 0)


def test_parents_as_found_and_as_resolved(tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    got = parents(str(tmp_path / "link" / "disk.qcow2"), LOCAL)
    assert got[:2] == [str(tmp_path / "link"), str(tmp_path)]
    assert str(tmp_path / "real") in got and "/" in got


def test_facts_are_kept_for_their_ttl(files):
    f = files("f", 0o644)
    now = [0.0]
    facts = Facts(ttl=1.0, clock=lambda: now[0])
    assert access([(f, READ)], facts)[2] == 0o644
    os.chmod(f, 0o600)
    now[0] = 0.5
    assert access([(f, READ)], facts)[2] == 0o644  # a second has not passed
    now[0] = 1.5
    assert access([(f, READ)], facts)[2] == 0o600
