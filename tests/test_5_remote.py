"""Image directories on a host reached through ssh (docs/remote.md).

The host is real: its own sshd, its images in a mount namespace where
snapfs's process cannot see them (``remote_env.TestHost``). Ground truth is
a local mount of a byte-for-byte copy of the same images, and qemu-img on
that copy.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time

import pytest
from conftest import IN_CI, REPO, SNAPFS, MiB, build_sample, create, qemu_img, qemu_io, run, seek_walk, sha256_of
from partition_disks import partitioned
from remote_env import ALIAS, TestHost

pytestmark = pytest.mark.skipif(os.geteuid() != 0 and not IN_CI,
                                reason="the test host needs root (mount namespace, sshd)")


@pytest.fixture(scope="module")
def host():
    """The test host; its files in a directory everyone may search (its
    "other" bits are what --allow-other mounts go by)."""
    base = tempfile.mkdtemp(prefix="snapfs-testhost-", dir="/var/tmp")
    os.chmod(base, 0o755)
    h = TestHost.start(base)
    yield h
    h.stop()
    shutil.rmtree(base, ignore_errors=True)


def put(host: TestHost, local: str, name: str) -> str:
    """A copy of the local directory ``local`` on the host, at ROOT/name; its path there."""
    remote = os.path.join(host.root, name)
    host.run("cp", "-a", "--", local, remote)
    assert not os.path.exists(os.path.join(remote, os.listdir(local)[0])), "the host's files leak out"
    return remote


def ssh_opts(host):
    return ["--ssh-config", host.config]


def tree(root: str) -> dict[str, tuple]:
    """Every file under a mount: kind, size, blocks, data runs, digest, xattrs
    (modes differ with the paths above the two copies: the access test's)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            if os.path.isdir(p):
                out[rel] = ("dir",)
                continue
            if rel == ".snapfs-status":
                continue
            xattrs = {a: os.getxattr(p, a).decode() for a in os.listxattr(p)}
            out[rel] = ("file", st.st_size, st.st_blocks, tuple(seek_walk(p)),
                        sha256_of(p), xattrs)
    return out


def without_places(t: dict, root: str, host_name: str | None) -> dict:
    """``tree`` with the image directory's path and the host's name taken out of the xattrs."""
    out = {}
    for rel, v in t.items():
        if v[0] == "file":
            x = {k: val.replace(root, "ROOT") for k, val in v[-1].items() if k != "user.snapfs.host"}
            if host_name is not None:
                assert v[-1].get("user.snapfs.host") == host_name or not v[-1], rel
            else:
                assert "user.snapfs.host" not in v[-1], rel
            v = (*v[:-1], x)
        out[rel] = v
    return out


def test_remote_views_are_the_local_views(host, tmp_path, mount):
    """Every view, map, qcow2 file, hole and xattr of a remote directory is
    what a local mount of the same images gives; the images are nowhere here."""
    local = build_sample(tmp_path)
    remote = put(host, str(local), "sample")
    assert not os.path.exists(remote)
    r = mount(["--images", host.url(remote)], *ssh_opts(host), name="remote")
    here = mount(local, name="local")
    assert "every view is available" in r.status() or r.status().split("\n", 1)[1] == \
        here.status().split("\n", 1)[1].replace(str(local), remote)
    got = without_places(tree(r.path), remote, ALIAS)
    want = without_places(tree(here.path), str(local), None)
    assert got.keys() == want.keys()
    for rel in want:
        assert got[rel] == want[rel], rel
    # And the bytes are qemu's: the top of a chain against qemu-img on the copy.
    chain = r / "vm1/snap2.qcow2/chain"
    top = sorted(f for f in os.listdir(chain) if f.endswith(".raw"))[-1]
    assert top.endswith("-snap2.raw")
    qemu_img("compare", "-f", "raw", "-F", "qcow2", os.path.join(chain, top), local / "vm1" / "snap2.qcow2")
    qemu_img("check", os.path.join(chain, top[:-4] + ".qcow2"))


NAMES = ["a b", "quote'd", 'dq"x', "$(touch PWNED)", "`touch PWNED`", "semi;colon", "-lead",
         "new\nline", "back\\slash", "star*", "uni\u00e9"]


def test_remote_names_of_any_kind(host, tmp_path, mount):
    """File and directory names that a shell would read as code, options or
    separators are listed and read exactly, and run nothing on either side."""
    local = tmp_path / "names-here"
    os.makedirs(local)
    digests = {}
    bad = os.fsdecode(b"bad\xffbyte")
    for i, name in enumerate(NAMES + [bad]):
        d = local / f"{name}-dir"
        d.mkdir()
        img = create(d / f"{name}.qcow2", 4 * MiB)
        qemu_io(img, f"write -P {i + 1} {i * 64}k 64k")
        digests[f"{name}-dir/{name}.qcow2"] = None
    del digests[f"{bad}-dir/{bad}.qcow2"]
    remote = put(host, str(local), "names")
    m = mount(["--images", host.url(remote)], *ssh_opts(host), name="names")
    # A name that is not UTF-8 is listed, and refused as a local one is (qemu takes JSON).
    problems = [ln for ln in m.status().splitlines()[2:] if ln]
    assert len(problems) == 3 and all("bad\\xffbyte" in ln and "is not UTF-8" in ln for ln in problems), problems
    for rel in digests:
        got = sha256_of(os.path.join(m / rel, "chain", f"00-{os.path.basename(rel)[:-6]}.raw"))
        here = tmp_path / "want.raw"
        qemu_img("convert", "-O", "raw", local / rel, here)
        assert got == sha256_of(here), rel
    assert not host.sh('find "$1" -name PWNED', host.root)
    assert not list(tmp_path.rglob("PWNED")) and not os.path.exists(os.path.join(REPO, "PWNED"))


def test_remote_outside_rule_applies_on_the_host(host, tmp_path, mount):
    """A backing file or leaf symlink that resolves outside DIR on the host is
    refused as a local one would be."""
    local = tmp_path / "outside-here"
    (local / "dir").mkdir(parents=True)
    secret = create(local / "secret.qcow2", 4 * MiB)
    qemu_io(secret, "write -P 0x5e 0 64k")
    create(local / "dir" / "top.qcow2", backing="../secret.qcow2")
    os.symlink("../secret.qcow2", local / "dir" / "link.qcow2")
    remote = put(host, str(local), "outside")
    m = mount(["--images", host.url(remote + "/dir")], *ssh_opts(host), name="outside")
    status = m.status()
    assert "outside" in status and "top.qcow2" in status and "link.qcow2" in status, status
    assert not os.path.exists(m / "link.qcow2")
    assert not os.path.exists(m / "top.qcow2/chain/01-top.raw")


def ssh_processes(control_dir: str) -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if cmd.startswith(b"ssh\0") and control_dir.encode() in cmd:
                out.append(int(pid))
    return out


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize("how", ["umount", "sigkill"])
def test_nothing_left_behind(host, tmp_path, mount, how):
    """After snapfs umount, or SIGKILL then snapfs umount, no ssh process is
    left here and no qemu-nbd on the host."""
    local = tmp_path / "life-here"
    local.mkdir()
    img = create(local / "d.qcow2", 8 * MiB)
    qemu_io(img, "write -P 0x31 0 1M")
    remote = put(host, str(local), f"life-{how}")
    m = mount(["--images", host.url(remote)], *ssh_opts(host), name="life")
    with open(m / "d.qcow2/chain/00-d.raw", "rb") as f:
        assert f.read(1 << 20) == b"\x31" * (1 << 20)
    assert host.pids_of("qemu-nbd")
    from snapfs.runtime import find_mount
    rundir = os.path.dirname(find_mount(m.path)[1]["control"])
    assert ssh_processes(rundir)
    if how == "sigkill":
        os.kill(m.pid, signal.SIGKILL)
    run(*SNAPFS, "umount", m.path, cwd=REPO)
    m.closed = True
    assert wait_for(lambda: not ssh_processes(rundir)), ssh_processes(rundir)
    assert wait_for(lambda: not host.pids_of("qemu-nbd")), host.pids_of("qemu-nbd")


def test_host_keys_are_checked(host, tmp_path):
    """An unknown or changed host key refuses the source with ssh's reason;
    snapfs never writes known_hosts."""
    remote = host.root + "/keys"
    host.run("mkdir", "-p", remote)
    for case, content in (("unknown", ""), ("changed", None)):
        kh = tmp_path / f"known_hosts-{case}"
        if content is None:
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", tmp_path / "other"], check=True)
            kind, key = (tmp_path / "other.pub").read_text().split()[:2]
            content = f"[127.0.0.1]:{host.port} {kind} {key}\n"
        kh.write_text(content)
        cfg = tmp_path / f"config-{case}"
        cfg.write_text(open(host.config).read().replace(host.known_hosts, str(kh)))
        mnt = tmp_path / f"mnt-{case}"
        mnt.mkdir()
        t0 = time.monotonic()
        r = run(*SNAPFS, "mount", "--images", host.url(remote), "--ssh-config", cfg, mnt, check=False,
                cwd=REPO, timeout=60)
        assert r.returncode != 0 and not os.path.ismount(mnt)
        assert "Host key verification failed" in r.stderr, r.stderr
        assert time.monotonic() - t0 < 15
        assert kh.read_text() == content


@pytest.mark.log_allows(r"asking again", r"did not come back", r"lost its server", r"died",
                        r"exited with", r"cannot forward", r"not connected")
def test_several_sources_one_lost(host, tmp_path, mount):
    """A local directory, a remote one and a host that cannot be reached, in
    one mount: each in its folder; the unreachable one says why; a host lost
    later fails its reads with EIO (the others read on) and snapfs refresh
    reconnects it."""
    local = tmp_path / "mixed-here"
    local.mkdir()
    a = create(local / "a.qcow2", 8 * MiB)
    qemu_io(a, "write -P 0x41 0 1M")
    remote = put(host, str(local), "mixed")
    here = tmp_path / "here"
    here.mkdir()
    b = create(here / "b.qcow2", 8 * MiB)
    qemu_io(b, "write -P 0x42 0 1M")
    gone = f"ssh://{ALIAS}-nowhere/srv"
    cfg = tmp_path / "config"
    cfg.write_text(open(host.config).read() + f"Host {ALIAS}-nowhere\n    HostName 127.0.0.1\n    Port 1\n")
    m = mount(["--images", host.url(remote), "--images", str(here), "--images", gone],
              "--ssh-config", cfg, "--retry-timeout", "5", name="mixed")
    top = sorted(os.listdir(m.path))
    rf, lf, gf = "ssh:__testhost" + remote.replace("_", "%5F").replace("/", "_"), \
        str(here).replace("_", "%5F").replace("/", "_"), "ssh:__testhost-nowhere_srv"
    assert top == sorted([".snapfs-status", rf, lf, gf]), top
    assert os.listdir(m / gf) == []
    assert f"{gf}/: " in m.status() and "Connection refused" in m.status(), m.status()
    ra = m / f"{rf}/a.qcow2/chain/00-a.raw"
    with open(ra, "rb") as f:
        assert f.read(1 << 20) == b"\x41" * (1 << 20)
    # The host goes away: its reads fail within the retry timeout, the others read on.
    host.stop_sshd()
    t0 = time.monotonic()
    with pytest.raises(OSError) as e:
        with open(ra, "rb") as f:
            f.seek(2 << 20)
            while f.read(1 << 20):
                pass
            f.seek(0)
            f.read(1 << 20)
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            f.seek(4 << 20)
            f.read(1 << 20)
            with open(m / f"{rf}/a.qcow2/layers/00-a.raw", "rb") as g:
                g.read(1 << 20)
    assert e.value.errno == 5 and time.monotonic() - t0 < 30
    with open(m / f"{lf}/b.qcow2/chain/00-b.raw", "rb") as f:
        assert f.read(1 << 20) == b"\x42" * (1 << 20)
    host.start_sshd()
    out = run(*SNAPFS, "refresh", m.path, cwd=REPO, check=False)
    assert "Connection refused" in out.stderr + out.stdout  # the unreachable one still is
    with open(ra, "rb") as f:
        assert f.read(1 << 20) == b"\x41" * (1 << 20)


def test_mount8_form_with_ssh_config(host, tmp_path):
    """mount(8): SOURCE is the ssh:// URL, -o ssh_config=FILE."""
    local = tmp_path / "m8"
    local.mkdir()
    qemu_io(create(local / "x.qcow2", 4 * MiB), "write -P 0x61 0 64k")
    remote = put(host, str(local), "m8")
    mnt = tmp_path / "mnt8"
    mnt.mkdir()
    run("mount", "-t", "fuse.snapfs", host.url(remote), mnt, "-o", f"ro,ssh_config={host.config}")
    try:
        with open(mnt / "x.qcow2/chain/00-x.raw", "rb") as f:
            assert f.read(65536) == b"\x61" * 65536
        info = json.loads(run("findmnt", "-J", "-o", "SOURCE,FSTYPE", mnt).stdout)["filesystems"][0]
        assert info["source"] == host.url(remote) and info["fstype"] == "fuse.snapfs"
    finally:
        run(*SNAPFS, "umount", mnt, cwd=REPO)
    shutil.rmtree(mnt, ignore_errors=True)


def test_restore_to_a_remote_host(host, tmp_path, mount):
    """--rw: a disk written through a remote view (cp, qemu-img convert -n) is,
    on the host, what was written; the host's qemu-img check passes."""
    local = tmp_path / "rw-here"
    local.mkdir()
    base = create(local / "base.qcow2", 16 * MiB)
    qemu_io(base, "write -P 0x11 0 8M")
    create(local / "top.qcow2", backing="base.qcow2")
    remote = put(host, str(local), "rw")
    backup = tmp_path / "backup.raw"
    with open(backup, "wb") as f:
        f.truncate(16 * MiB)
    qemu_io(str(backup), "write -P 0x77 1M 2M", "write -P 0x78 12M 1M", fmt="raw")
    m = mount(["--images", host.url(remote)], *ssh_opts(host), "--rw", name="rw")
    view = m / "top.qcow2/chain/01-top.raw"
    qemu_img("convert", "-n", "-f", "raw", "-O", "raw", backup, view)
    qemu_img("compare", "-f", "raw", "-F", "raw", view, backup)
    m.close()
    host.run("qemu-img", "check", "-q", f"{remote}/top.qcow2")
    got = tmp_path / "got.raw"
    host.run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", f"{remote}/top.qcow2", f"{remote}.got")
    with open(got, "wb") as f:
        f.write(host.run("cat", f"{remote}.got").stdout)
    qemu_img("compare", "-f", "raw", "-F", "raw", got, backup)
    # The base on the host is untouched.
    assert host.run("qemu-img", "map", "--output=json", f"{remote}/base.qcow2").returncode == 0
    assert host.sh('qemu-io -r -f qcow2 -c "read -P 0x11 0 8M" "$1" | grep -c "read 8388608"',
                   f"{remote}/base.qcow2").strip() == "1"


def test_allow_other_reads_what_everyone_on_the_host_may(host, nobody, mount):
    """--allow-other: another user reads a remote view only where every file it
    reads, and every directory above them, lets everyone on the host read."""
    from test_5_access import image, read_named_as, sha_of_raw
    shared = tempfile.mkdtemp(prefix="snapfs-remote-access-", dir="/tmp")
    try:
        os.chmod(shared, 0o755)
        local = os.path.join(shared, "images")
        os.mkdir(local, 0o755)
        image(os.path.join(local, "private.qcow2"), 0o600)
        public = image(os.path.join(local, "public.qcow2"), 0o644)
        os.mkdir(os.path.join(local, "branch"), 0o755)
        image(os.path.join(local, "branch", "base.qcow2"), 0o600)
        top = create(os.path.join(local, "branch", "top.qcow2"), backing="base.qcow2")
        qemu_io(top, "write -P 0x33 6M 1M")
        os.chmod(top, 0o644)
        os.mkdir(os.path.join(local, "closed"), 0o700)
        image(os.path.join(local, "closed", "inside.qcow2"), 0o644)
        expected_public = sha_of_raw(public, shared)
        remote = put(host, local, "access")
        host.run("chmod", "0755", host.root)
        m = mount(["--images", host.url(remote)], *ssh_opts(host), "--allow-other",
                  name=os.path.join(shared, "mnt"))
        views = {
            "private": m / "private.qcow2/chain/00-private.raw",
            "public": m / "public.qcow2/chain/00-public.raw",
            "top chain": m / "branch/top.qcow2/chain/01-top.raw",
            "top layer": m / "branch/top.qcow2/layers/01-top.raw",
            "closed": m / "closed/inside.qcow2/chain/00-inside.raw",
        }
        got = read_named_as(nobody, views)
        assert got["private"] == got["top chain"] == got["closed"] == errno.EACCES, got
        assert got["public"] == expected_public
        assert isinstance(got["top layer"], str)
        # The mounting user owns every node: uids on the host mean nothing here.
        for p in views.values():
            assert os.stat(p).st_uid == os.getuid()
        assert stat.S_IMODE(os.stat(views["public"]).st_mode) == 0o444
        assert stat.S_IMODE(os.stat(views["private"]).st_mode) == 0o400
    finally:
        for p in (os.path.join(shared, "mnt"),):
            if os.path.ismount(p):
                run("fusermount3", "-uz", p, check=False)
        shutil.rmtree(shared, ignore_errors=True)


def test_many_files_open_at_once_within_sshds_sessions(host, tmp_path, mount):
    """sshd serves 10 sessions per connection by default (this host's sshd
    keeps the default): 7 views open and read at once, each its own qemu-nbd,
    while the listing and block status go on beside them."""
    local = tmp_path / "many-here"
    local.mkdir()
    for i in range(7):
        qemu_io(create(local / f"d{i}.qcow2", 8 * MiB), f"write -P {0x40 + i} 0 1M")
    remote = put(host, str(local), "many")
    m = mount(["--images", host.url(remote)], *ssh_opts(host), name="many")
    files = [open(m / f"d{i}.qcow2/chain/00-d{i}.raw", "rb") for i in range(7)]
    try:
        for i, f in enumerate(files):
            assert f.read(1 << 20) == bytes([0x40 + i]) * (1 << 20)
        assert len(host.pids_of("qemu-nbd")) == 7
        assert len(os.listdir(m.path)) == 8  # and commands still run (a listing, the status file)
    finally:
        for f in files:
            f.close()


@pytest.mark.log_allows(r"asking again", r"did not come back", r"lost its server", r"died", r"exited with",
                        r"cannot forward", r"not connected", r"killing it", r"answers nothing", r"hung")
def test_a_host_that_goes_silent_fails_reads_never_hangs(host, tmp_path, mount):
    """The network to the host goes silent (no reset, no close: a relay that
    stops passing anything on): a read fails with EIO within the retry
    timeout, never hangs; once the network is back, snapfs refresh reads on."""
    local = tmp_path / "silent-here"
    local.mkdir()
    qemu_io(create(local / "s.qcow2", 64 * MiB), "write -P 0x5a 0 64M")
    remote = put(host, str(local), "silent")
    alias = host.slow_alias(0)
    relay = host.relays[-1]
    m = mount(["--images", host.url(remote, alias)], *ssh_opts(host), "--retry-timeout", "5", name="silent")
    view = m / "s.qcow2/chain/00-s.raw"
    with open(view, "rb") as f:
        assert f.read(1 << 20) == b"\x5a" * (1 << 20)
        relay.freeze()
        t0 = time.monotonic()
        with pytest.raises(OSError) as e:
            f.seek(40 << 20)
            f.read(1 << 20)
        took = time.monotonic() - t0
    assert e.value.errno == errno.EIO and took < 30, (e.value, took)
    relay.thaw()
    # ssh gives the silent connection up (ServerAlive: 15 s at most); refresh reconnects.
    assert wait_for(lambda: run(*SNAPFS, "refresh", m.path, cwd=REPO, check=False).returncode == 0, 40)
    with open(view, "rb") as f:
        f.seek(60 << 20)
        assert f.read(1 << 20) == b"\x5a" * (1 << 20)


@pytest.mark.log_allows(r"asking again", r"replaced", r"did not come back")
@pytest.mark.parametrize("swap", ["file", "symlink"])
def test_a_file_swapped_on_the_host_is_never_read(host, tmp_path, mount, swap):
    """An image replaced on the host after the scan (another file, or a symlink
    to another file) is not what qemu-nbd opens: the wrapper's pin check
    refuses it, and the view reads nothing of the new file."""
    local = tmp_path / f"swap-{swap}-here"
    local.mkdir()
    qemu_io(create(local / "a.qcow2", 8 * MiB), "write -P 0x61 0 1M")
    qemu_io(create(local / "other.qcow2", 8 * MiB), "write -P 0x6f 0 1M")
    remote = put(host, str(local), f"swap-{swap}")
    m = mount(["--images", host.url(remote)], *ssh_opts(host), "--retry-timeout", "2", name=f"swap-{swap}")
    assert os.path.exists(m / "a.qcow2/chain/00-a.raw")
    if swap == "file":
        host.run("cp", f"{remote}/other.qcow2", f"{remote}/a.new")
        host.run("mv", f"{remote}/a.new", f"{remote}/a.qcow2")
    else:
        host.run("mv", f"{remote}/a.qcow2", f"{remote}/a.old")
        host.run("ln", "-s", "other.qcow2", f"{remote}/a.qcow2")
    with pytest.raises(OSError) as e:
        with open(m / "a.qcow2/chain/00-a.raw", "rb") as f:
            f.read(1 << 20)
    assert e.value.errno in (errno.EIO, errno.ESTALE, errno.ENOENT), e.value
    status = m.status()
    assert "replaced since the mount was made" in status, status
    assert not host.pids_of("qemu-nbd")


def test_remote_partitions_are_the_local_partitions(host, tmp_path, mount):
    """A remote disk's partition files are a local mount's of the same images;
    its first kilobytes are read by a qemu-io on the host, which ends when idle."""
    local = tmp_path / "parts-here"
    local.mkdir()
    raw = partitioned(tmp_path / "gpt.raw", b"label: gpt\n,4M,L\n,4M,L\n")
    qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", raw, local / "gpt.qcow2")
    qemu_io(local / "gpt.qcow2", "write -P 0x5a 1M 64k", "write -P 0x5b 6M 64k")
    qemu_io(create(local / "plain.qcow2", 8 * MiB), "write -P 0x31 0 64k")  # data, no table
    remote = put(host, str(local), "parts")
    r = mount(["--images", host.url(remote)], *ssh_opts(host), "--debug", name="remote")
    here = mount(local, name="local")
    got = without_places(tree(os.path.join(r.path)), remote, ALIAS)
    want = without_places(tree(here.path), str(local), None)
    for rel in want:
        if "/partitions/" in rel:
            assert got[rel] == want[rel], rel
    assert sorted(os.listdir(r / "gpt.qcow2/partitions/00-gpt")) == ["p1.map.json", "p1.raw", "p2.map.json",
                                                                     "p2.raw"]
    assert os.listdir(r / "plain.qcow2/partitions/00-plain") == []
    heads = re.findall(r"first kilobyte of (.*) read by qemu-io: (.*)$", r.log, re.M)
    assert sorted(heads) == [(f"{remote}/gpt.qcow2", "a label's magic"), (f"{remote}/plain.qcow2", "no label's magic")]
    # Its session goes back to the host's servers 2 s after its last read, mounted still.
    assert wait_for(lambda: not host.pids_of("qemu-io")), host.pids_of("qemu-io")
    assert os.path.ismount(r.path)
