"""No mount widens access (docs/views.md, "Who may read what").

An ordinary user (``nobody``) mounts their own image directory and reads it
through unprivileged FUSE; a root mount with ``--allow-other`` lets that user
read the views of a ``0644`` image and answers EACCES for a ``0600`` one (and
for a chain whose base only root may read); a leaf symlink that resolves
outside the image directory is refused with its reason, like a backing file
outside it. Ground truth for content is ``qemu-img convert`` of the image.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile

import pytest
from conftest import MiB, create, json_layer, qemu_img, qemu_io, run
from partition_disks import partitioned

SIZE = 8 * MiB

# Run as the other user: open, read everything, report the digest or the errno.
READER = """
import hashlib, json, os, sys
out = {}
for path in sys.argv[1:]:
    try:
        with open(path, "rb") as f:
            h = hashlib.sha256()
            while chunk := f.read(1 << 20):
                h.update(chunk)
        out[path] = h.hexdigest()
    except OSError as e:
        out[path] = e.errno
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def user(nobody):
    """``nobody``, with snapfs and python from a copy it can reach (conftest's ``OtherUser``)."""
    return nobody


def as_user(pw, *cmd, check=True, env=None, xdg=None):
    xdg_env = ["-u", "XDG_RUNTIME_DIR"] if xdg is None else [f"XDG_RUNTIME_DIR={xdg}"]
    return run("setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups",
               "env", *xdg_env, f"HOME={env or '/'}", *cmd, check=check, cwd="/")


def read_as(pw, *paths) -> dict:
    return json.loads(as_user(pw, pw.python, "-c", READER, *paths).stdout)


def read_named_as(pw, views: dict) -> dict:
    """{name: digest or errno} of reading each view as ``pw``."""
    got = read_as(pw, *views.values())
    return {name: got[path] for name, path in views.items()}


def sha_of_raw(image, tmp) -> str:
    out = os.path.join(tmp, "expected.raw")
    qemu_img("convert", "-O", "raw", image, out)
    with open(out, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    os.unlink(out)
    return digest


@pytest.fixture
def shared_tmp():
    """A directory every user can reach (pytest's tmp_path is root's alone)."""
    path = tempfile.mkdtemp(prefix="snapfs-access-", dir="/tmp")
    os.chmod(path, 0o755)
    yield path
    for mp in ("mnt", "umnt"):
        p = os.path.join(path, mp)
        if os.path.ismount(p):
            run("fusermount3", "-uz", p, check=False)
    shutil.rmtree(path, ignore_errors=True)


def image(path, mode, owner=None):
    create(path, SIZE)
    qemu_io(path, "write -P 0x5a 1M 2M", "write -z 4M 1M")
    if owner is not None:
        os.chown(path, owner.pw_uid, owner.pw_gid)
    os.chmod(path, mode)
    return path


def test_ordinary_user_mounts_own_image_directory(user, shared_tmp):
    images = os.path.join(shared_tmp, "images")
    mnt = os.path.join(shared_tmp, "umnt")
    for d in (images, mnt):
        os.mkdir(d, 0o700)
        os.chown(d, user.pw_uid, user.pw_gid)
    img = image(os.path.join(images, "vda.qcow2"), 0o600, owner=user)
    expected = sha_of_raw(img, shared_tmp)

    # su and runuser pass root's XDG_RUNTIME_DIR on: not the user's to use.
    roots = os.path.join(shared_tmp, "run-user-0")
    os.mkdir(roots, 0o700)
    r = as_user(user, *user.snapfs, "mount", "--images", images, mnt, check=False, env=shared_tmp, xdg=roots)
    assert r.returncode == 0, r.stderr
    try:
        view = os.path.join(mnt, "vda.qcow2", "chain", "00-vda.raw")
        got = read_as(user, view, os.path.join(mnt, "vda.qcow2", "layers", "00-vda.raw"))
        assert got == {view: expected, os.path.join(mnt, "vda.qcow2", "layers", "00-vda.raw"): expected}
        st = json.loads(as_user(user, user.python, "-c",
                                "import json, os, sys; s = os.stat(sys.argv[1]); "
                                "print(json.dumps([s.st_uid, s.st_gid, s.st_mode]))", view).stdout)
        assert st[:2] == [user.pw_uid, user.pw_gid]
        assert stat.S_IMODE(st[2]) == 0o400  # the image's 0600, read-only
        # Without --allow-other, nobody else gets in, root included.
        with pytest.raises(PermissionError):
            os.stat(view)
    finally:
        r = as_user(user, *user.snapfs, "umount", mnt, check=False, env=shared_tmp, xdg=roots)
    assert r.returncode == 0, r.stderr
    assert not os.path.ismount(mnt)


def test_allow_other_mount_keeps_image_permissions(user, shared_tmp, mount):
    images = os.path.join(shared_tmp, "images")
    os.mkdir(images, 0o755)
    image(os.path.join(images, "private.qcow2"), 0o600)
    public = image(os.path.join(images, "public.qcow2"), 0o644)
    # A readable top over a base only root may read: its layer alone is
    # readable, the chain (which shows the base's data) is not.
    os.mkdir(os.path.join(images, "branch"), 0o755)
    base = image(os.path.join(images, "branch", "base.qcow2"), 0o600)
    top = create(os.path.join(images, "branch", "top.qcow2"), backing=base)
    qemu_io(top, "write -P 0x33 6M 1M")
    os.chmod(top, 0o644)
    expected_public = sha_of_raw(public, shared_tmp)
    expected_top_layer = sha_of_raw(json_layer(top), shared_tmp)

    m = mount(images, "--allow-other", name=os.path.join(shared_tmp, "mnt"))
    views = {
        "private chain": m / "private.qcow2/chain/00-private.raw",
        "private layer": m / "private.qcow2/layers/00-private.raw",
        "private map": m / "private.qcow2/chain/00-private.map.json",
        "public chain": m / "public.qcow2/chain/00-public.raw",
        "public layer": m / "public.qcow2/layers/00-public.raw",
        "top chain": m / "branch/top.qcow2/chain/01-top.raw",
        "top layer": m / "branch/top.qcow2/layers/01-top.raw",
        "base layer": m / "branch/top.qcow2/layers/00-base.raw",
    }
    assert read_named_as(user, views) == {
        "private chain": errno.EACCES,
        "private layer": errno.EACCES,
        "private map": errno.EACCES,
        "public chain": expected_public,
        "public layer": expected_public,
        "top chain": errno.EACCES,
        "top layer": expected_top_layer,
        "base layer": errno.EACCES,
    }
    # Root reads everything; modes show what the images grant, write bits cleared.
    assert stat.S_IMODE(os.stat(views["private chain"]).st_mode) == 0o400
    assert stat.S_IMODE(os.stat(views["public chain"]).st_mode) == 0o444
    assert stat.S_IMODE(os.stat(views["top chain"]).st_mode) == 0o400
    assert stat.S_IMODE(os.stat(views["top layer"]).st_mode) == 0o444
    assert stat.S_IMODE(os.stat(m / "private.qcow2").st_mode) == 0o500
    with open(views["private chain"], "rb") as f:
        assert len(f.read()) == SIZE


def sha_of_file(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_allow_other_qcow2_files_need_what_they_carry(user, shared_tmp, mount):
    """A ``.qcow2`` needs what its ``.raw`` needs, plus the layers beneath when
    it carries their bytes (a layer with 4 KiB clusters holding part of a
    64 KiB cluster)."""
    images = os.path.join(shared_tmp, "images")
    os.mkdir(images, 0o755)
    image(os.path.join(images, "private.qcow2"), 0o600)
    image(os.path.join(images, "public.qcow2"), 0o644)
    base = image(os.path.join(images, "base.qcow2"), 0o600)
    top = create(os.path.join(images, "top.qcow2"), backing=base)
    qemu_io(top, "write -P 0x33 6M 1M")
    os.chmod(top, 0o644)
    fine = os.path.join(images, "fine.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", base, "-F", "qcow2", fine)
    qemu_io(fine, "write -P 0x44 1052672 4096")  # 1 MiB + 4 KiB: part of a 64 KiB cluster over base data
    os.chmod(fine, 0o644)

    m = mount(images, "--allow-other", name=os.path.join(shared_tmp, "mnt"))
    files = {
        "private": m / "private.qcow2/chain/00-private.qcow2",
        "public chain": m / "public.qcow2/chain/00-public.qcow2",
        "public layer": m / "public.qcow2/layers/00-public.qcow2",
        "top chain": m / "top.qcow2/chain/01-top.qcow2",
        "top layer": m / "top.qcow2/layers/01-top.qcow2",
        "fine layer raw": m / "fine.qcow2/layers/01-fine.raw",
        "fine layer": m / "fine.qcow2/layers/01-fine.qcow2",
    }
    got = read_named_as(user, files)
    assert got == {
        "private": errno.EACCES,
        "public chain": sha_of_file(files["public chain"]),
        "public layer": sha_of_file(files["public layer"]),
        "top chain": errno.EACCES,
        "top layer": sha_of_file(files["top layer"]),
        "fine layer raw": sha_of_file(files["fine layer raw"]),
        # Its cluster at 1 MiB carries the base's bytes beside the layer's 4 KiB.
        "fine layer": errno.EACCES,
    }
    assert stat.S_IMODE(os.stat(files["top layer"]).st_mode) == 0o444
    assert stat.S_IMODE(os.stat(files["fine layer"]).st_mode) == 0o400
    with open(files["fine layer"], "rb") as f:
        assert b"\x5a" * 4096 in f.read()  # the base's pattern, beside the layer's


def test_leaf_symlink_outside_the_directory_is_refused(tmp_path, mount):
    images = tmp_path / "images"
    (images / "vm").mkdir(parents=True)
    os.symlink("/etc/shadow", images / "vm" / "evil.img")
    outside = tmp_path / "outside"
    outside.mkdir()
    elsewhere = image(str(outside / "disk.qcow2"), 0o644)
    os.symlink(elsewhere, images / "vm" / "linked.qcow2")
    image(str(images / "vm" / "good.qcow2"), 0o644)

    m = mount(images)
    assert sorted(os.listdir(m / "vm")) == ["good.qcow2"]
    status = m.status()
    assert f"vm/evil.img: image {images}/vm/evil.img resolves to /etc/shadow, outside {images} " \
           "(mount with --allow-outside-backing to follow it)" in status
    assert f"vm/linked.qcow2: image {images}/vm/linked.qcow2 resolves to {elsewhere}, outside" in status

    # The user may allow it explicitly, as for backing files.
    m2 = mount(images, "--allow-outside-backing", name="mnt2")
    assert sorted(os.listdir(m2 / "vm")) == ["evil.img", "good.qcow2", "linked.qcow2"]
    with open(m2 / "vm/linked.qcow2/chain/00-linked.raw", "rb") as f:
        got = hashlib.sha256(f.read()).hexdigest()
    assert got == sha_of_raw(elsewhere, str(tmp_path))


def test_allow_other_mount_keeps_directory_permissions(user, shared_tmp, mount):
    """Reading a file takes search permission on every directory above it: so do its views."""
    home = os.path.join(shared_tmp, "home")  # a 0700 home holding a 0755 image directory
    images = os.path.join(home, "images")
    os.makedirs(images)
    os.chmod(home, 0o700)
    os.chmod(images, 0o755)
    image(os.path.join(images, "disk.qcow2"), 0o644)
    m = mount(images, "--allow-other", name=os.path.join(shared_tmp, "mnt"))
    view = m / "disk.qcow2/chain/00-disk.raw"
    with open(view, "rb") as f:  # root reads it
        assert len(f.read()) == SIZE
    assert read_as(user, view) == {view: errno.EACCES}
    r = as_user(user, "ls", m.path, check=False)
    assert r.returncode != 0 and "Permission denied" in r.stderr


def test_allow_other_mount_keeps_subdirectory_permissions(user, shared_tmp, mount):
    images = os.path.join(shared_tmp, "images")
    os.mkdir(images, 0o755)
    for sub, mode in (("private", 0o700), ("listable", 0o744), ("templates", 0o700), ("vm", 0o755),
                      ("secret", 0o700)):
        os.mkdir(os.path.join(images, sub))
        os.chmod(os.path.join(images, sub), mode)
    image(os.path.join(images, "private", "a.qcow2"), 0o644)
    image(os.path.join(images, "listable", "b.qcow2"), 0o644)  # r-- but no x: not readable
    # A leaf in a 0755 directory over a base in a 0700 one: its layer is
    # readable, its chain is not.
    base = image(os.path.join(images, "templates", "base.qcow2"), 0o644)
    leaf = create(os.path.join(images, "vm", "leaf.qcow2"), backing=base)
    qemu_io(leaf, "write -P 0x44 6M 1M")
    os.chmod(leaf, 0o644)
    # A link in DIR to an image behind a 0700 directory of DIR.
    target = image(os.path.join(images, "secret", "c.qcow2"), 0o644)
    os.symlink(target, os.path.join(images, "link.qcow2"))
    expected_leaf_layer = sha_of_raw(json_layer(leaf), shared_tmp)

    m = mount(images, "--allow-other", name=os.path.join(shared_tmp, "mnt"))
    views = {
        "private": m / "private/a.qcow2/chain/00-a.raw",
        "listable": m / "listable/b.qcow2/chain/00-b.raw",
        "leaf chain": m / "vm/leaf.qcow2/chain/01-leaf.raw",
        "leaf layer": m / "vm/leaf.qcow2/layers/01-leaf.raw",
        "base layer": m / "vm/leaf.qcow2/layers/00-base.raw",
        "link": m / "link.qcow2/chain/00-link.raw",
    }
    for path in views.values():
        assert os.path.exists(path)  # root sees every view
    assert read_named_as(user, views) == {
        "private": errno.EACCES,
        "listable": errno.EACCES,
        "leaf chain": errno.EACCES,
        "leaf layer": expected_leaf_layer,
        "base layer": errno.EACCES,
        "link": errno.EACCES,
    }


def test_image_swapped_for_a_symlink_after_the_mount_is_not_followed(user, shared_tmp, mount):
    """A user who owns an image cannot turn its views into a reader of files they may not read."""
    images = os.path.join(shared_tmp, "images")
    theirs = os.path.join(images, "theirs")
    os.makedirs(theirs)
    os.chmod(images, 0o755)
    os.chown(theirs, user.pw_uid, user.pw_gid)
    disk = os.path.join(theirs, "disk.raw")
    with open(disk, "wb") as f:
        f.write(b"\x11" * MiB)
    os.chown(disk, user.pw_uid, user.pw_gid)
    vault = os.path.join(shared_tmp, "vault")
    os.mkdir(vault, 0o700)
    secret = os.path.join(vault, "secret.raw")
    with open(secret, "wb") as f:
        f.write(b"\x5e" * MiB)
    os.chmod(secret, 0o644)

    m = mount(images, "--allow-other", "--idle-timeout", "0", name=os.path.join(shared_tmp, "mnt"))
    view = m / "theirs/disk.raw/chain/00-disk.raw"
    assert read_as(user, view) == {view: hashlib.sha256(b"\x11" * MiB).hexdigest()}
    # The owner swaps the image for a link to a file behind root's 0700 directory.
    as_user(user, "ln", "-sf", secret, disk)
    got = read_as(user, view)[view]
    assert got != hashlib.sha256(b"\x5e" * MiB).hexdigest()
    assert got in (errno.ESTALE, errno.ENOENT, errno.EACCES), got
    with pytest.raises(OSError):  # root is not shown the other file either
        with open(view, "rb") as f:
            f.read()


LISTER = """
import json, os, sys
out = {}
for path in sys.argv[1:]:
    try:
        out[path] = sorted(os.listdir(path))
    except OSError as e:
        out[path] = e.errno
print(json.dumps(out))
"""


def test_a_partition_folder_is_listed_by_whoever_may_read_its_point(user, shared_tmp, mount):
    """Where a point's partitions lie is its bytes: the folder takes its chain view's access."""
    images = os.path.join(shared_tmp, "images")
    os.mkdir(images, 0o755)
    raw = partitioned(os.path.join(shared_tmp, "table.raw"))
    base = os.path.join(images, "base.qcow2")
    qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", raw, base)
    os.chmod(base, 0o600)  # root's alone
    top = os.path.join(images, "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    os.chmod(top, 0o644)
    m = mount(images, "--allow-other", name=os.path.join(shared_tmp, "mnt"))
    folders = [m / "top.qcow2/partitions", m / "top.qcow2/partitions/00-base", m / "top.qcow2/partitions/01-top"]
    got = json.loads(as_user(user, user.python, "-c", LISTER, *folders).stdout)
    assert got == {folders[0]: ["00-base", "01-top"], folders[1]: errno.EACCES, folders[2]: errno.EACCES}
    # Root, who may read both, sees the partition.
    assert sorted(os.listdir(folders[2])) == ["p1.map.json", "p1.raw"]
    # Readable by all: listed, and its partition read, by the other user too.
    m.close()
    os.chmod(base, 0o644)
    m = mount(images, "--allow-other", name=os.path.join(shared_tmp, "mnt"))
    got = json.loads(as_user(user, user.python, "-c", LISTER, folders[2]).stdout)
    assert got == {folders[2]: ["p1.map.json", "p1.raw"]}
    got = read_named_as(user, {"p1": m / "top.qcow2/partitions/01-top/p1.raw"})
    with open(raw, "rb") as f:
        f.seek(2048 * 512)
        assert got == {"p1": hashlib.sha256(f.read(4 * MiB)).hexdigest()}
