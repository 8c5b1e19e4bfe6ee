"""Shared fixtures: image builders, qemu's ground truth, real snapfs mounts.

Ground truth always comes from qemu itself: ``qemu-img map --output=json`` for
chain and layer views (a layer alone is opened with ``"backing": null``), and
``nbdinfo --map`` on a qemu-nbd export for dirty bitmaps.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import platform
import pwd
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from itertools import pairwise

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SNAPFS = [sys.executable, "-m", "snapfs"]
MiB = 1 << 20

IN_CI = os.environ.get("CI") == "true"


class CommandFailed(subprocess.CalledProcessError):
    """A failed command whose message carries what it printed on stderr."""

    def __str__(self):
        err = self.stderr.decode(errors="replace") if isinstance(self.stderr, bytes) else self.stderr
        return f"{super().__str__()}\nstderr: {(err or '').strip()[-2000:]}"


def run(*cmd, **kw):
    check = kw.pop("check", True)
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    p = subprocess.run([str(c) for c in cmd], **kw)
    if check and p.returncode:
        raise CommandFailed(p.returncode, p.args, p.stdout, p.stderr)
    return p


def qemu_img(*args):
    return run("qemu-img", *args)


def qemu_io(image, *commands, fmt="qcow2"):
    args = ["qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    return run(*args, image)


def create(path, size=None, backing=None, backing_fmt="qcow2", fmt="qcow2"):
    args = ["create", "-q", "-f", fmt]
    if backing:
        args += ["-b", backing, "-F", backing_fmt]
    args.append(str(path))
    if size is not None:
        args.append(str(size))
    qemu_img(*args)
    return str(path)


@contextlib.contextmanager
def running_writer(image, sock):
    """A writable qemu-nbd on ``image``: it holds the image as a running VM
    holds its active layer (qemu's write lock), until the block ends."""
    vm = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "-k", str(sock), str(image)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            assert vm.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        yield vm
    finally:
        vm.terminate()
        vm.wait()


def json_layer(path, fmt="qcow2"):
    """A json: filename for one layer alone, as qemu-img/qemu-nbd take it."""
    node = {"driver": fmt, "file": {"driver": "file", "filename": str(path)}}
    if fmt == "qcow2":
        node["backing"] = None
    return "json:" + json.dumps(node)


def merge_dicts(extents, keys):
    out = []
    for e in extents:
        if e["length"] == 0:
            continue
        if out and all(out[-1][k] == e[k] for k in keys):
            out[-1]["length"] += e["length"]
        else:
            out.append({"start": e["start"], "length": e["length"], **{k: e[k] for k in keys}})
    return out


def walkthrough(path):
    """``{step: [sh blocks]}`` of a document's "## Walk-through" section (``### N.`` headings):
    the tests run the docs' commands as written."""
    with open(path) as f:
        text = f.read()
    section = text[text.index("## Walk-through"):]
    end = section.find("\n## ", 1)
    section = section if end < 0 else section[:end]
    steps = {}
    for m in re.finditer(r"^### (\d+)\.(.*?)(?=^### |\Z)", section, re.S | re.M):
        steps[m[1]] = re.findall(r"```sh\n(.*?)```", m[2], re.S)
    return steps


def processes() -> dict[int, list[str]]:
    """Every process's argv, by pid (those that end meanwhile are left out)."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")[:-1]
        except OSError:
            continue
        if argv:
            out[int(pid)] = argv
    return out


def poke(path, offset, fmt, *values):
    """Overwrite bytes of a file at ``offset`` with ``struct.pack(fmt, *values)`` (crafted images)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


def replace_once(path, old: bytes, new: bytes):
    """``old`` (found exactly once in the file) overwritten by ``new``, as long."""
    assert len(old) == len(new)
    with open(path, "rb") as f:
        data = f.read()
    assert data.count(old) == 1, old
    poke(path, data.index(old), f"{len(new)}s", new)


def replace_all(path, old: bytes, new: bytes):
    """Every ``old`` in the file overwritten by ``new``, as long (a bitmap directory
    rewritten by each ``qemu-img bitmap --add`` leaves its former copies behind)."""
    assert len(old) == len(new)
    with open(path, "rb") as f:
        data = f.read()
    assert old in data, old
    pos = data.find(old)
    while pos >= 0:
        poke(path, pos, f"{len(new)}s", new)
        pos = data.find(old, pos + 1)


def sha256_of(path) -> str:
    """The SHA-256 of a file, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def qemu_map(image, shared=False):
    """qemu-img map of ``image``; ``shared``: -U, beside a writer that holds it."""
    return json.loads(qemu_img("map", "--output=json", *(["-U"] if shared else []), image).stdout)


def expected_allocation_map(image, has_backing, shared=False):
    """The chain/layer map qemu-img map implies, per the spec."""
    out = []
    for e in qemu_map(image, shared):
        zero = bool(e["zero"])
        hole = (not e["present"]) if has_backing else zero
        out.append({"start": e["start"], "length": e["length"], "zero": zero, "hole": hole})
    return merge_dicts(out, ("zero", "hole"))


class QemuNBD:
    """A qemu-nbd of the test's own, for nbdinfo ground truth."""

    def __init__(self, tmp_path, image, *args):
        self.sock = str(tmp_path / f"truth-{time.monotonic_ns()}.sock")
        self.proc = subprocess.Popen(["qemu-nbd", "-r", "-t", "-k", self.sock, *args, str(image)],
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.sock):
            assert self.proc.poll() is None, self.proc.stderr.read()
            assert time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.01)
        self.uri = f"nbd+unix:///?socket={self.sock}"

    def close(self):
        self.proc.terminate()
        self.proc.wait(10)


def nbdinfo_map(tmp_path, image, context, *args):
    srv = QemuNBD(tmp_path, image, *args)
    try:
        out = run("nbdinfo", "--json", f"--map={context}", srv.uri).stdout
    finally:
        srv.close()
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]


def expected_dirty_map(tmp_path, image, bitmap):
    """dirty from the bitmap (nbdinfo), zero from qemu-img map of the chain."""
    dirty = nbdinfo_map(tmp_path, image, f"qemu:dirty-bitmap:{bitmap}", "-f", "qcow2", "-B", bitmap)
    zero = [(e["start"], e["length"], bool(e["zero"])) for e in qemu_map(image)]
    cuts = sorted({0} | {s for s, _, _ in dirty} | {s for s, _, _ in zero}
                  | {s + n for s, n, _ in dirty} | {s + n for s, n, _ in zero})
    out = []
    for a, b in pairwise(cuts):
        d = next(t for s, n, t in dirty if s <= a < s + n)
        z = next(t for s, n, t in zero if s <= a < s + n)
        out.append({"start": a, "length": b - a, "dirty": bool(d & 1), "zero": z})
    return merge_dicts(out, ("dirty", "zero"))


def seek_walk(path):
    """[(start, length)] of data as SEEK_DATA/SEEK_HOLE report it."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        off = 0
        while off < size:
            try:
                d = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as e:
                assert e.errno == 6  # ENXIO: no more data
                break
            h = os.lseek(fd, d, os.SEEK_HOLE)
            assert h > d
            out.append((d, h - d))
            off = h
    finally:
        os.close(fd)
    return out


def data_ranges(extents, is_data):
    out = []
    for e in extents:
        if not is_data(e):
            continue
        if out and out[-1][0] + out[-1][1] == e["start"]:
            out[-1] = (out[-1][0], out[-1][1] + e["length"])
        else:
            out.append((e["start"], e["length"]))
    return out


SAMPLE_SIZE = 64 * MiB + 1536  # not a multiple of the 64 KiB cluster

# The sample's disks (relative to its image directory) and their chains, base first.
SAMPLE_CHAINS = {
    "vm1/snap2.qcow2": ["base.qcow2", "snap1.qcow2", "snap2.qcow2"],
    "vm1/branch.qcow2": ["base.qcow2", "branch.qcow2"],
    "vm2/top.qcow2": ["disk.raw", "top.qcow2"],
}


def build_sample(root):
    """The sample image corpus under ``root/images``; returns that directory.

    Data, areas zeroed over older data, discarded areas, a raw base with a
    size that is not a sector multiple under a qcow2 overlay, a virtual size
    that is not a cluster multiple, a branch sharing a base, and dirty
    bitmaps with changed and trimmed areas (one copied into two layers).
    """
    d = root / "images"
    (d / "vm1").mkdir(parents=True)
    (d / "vm2").mkdir()
    vm1 = d / "vm1"
    base = create(vm1 / "base.qcow2", SAMPLE_SIZE)
    qemu_io(base, "write -P 0xa1 0 4M", "write -z 8M 1M", "write -P 0xa2 12M 2M",
            f"write -P 0xa3 {SAMPLE_SIZE - 4096} 4096")
    snap1 = create(vm1 / "snap1.qcow2", backing="base.qcow2")
    qemu_img("bitmap", "--add", snap1, "since-snap1")
    qemu_io(snap1, "write -P 0xb1 1M 1M", "write -z 2M 1M", "discard 12M 1M", "write -P 0xb2 20M 64k")
    snap2 = create(vm1 / "snap2.qcow2", backing="snap1.qcow2")
    qemu_img("bitmap", "--add", snap2, "since-snap2")
    qemu_img("bitmap", "--add", snap2, "since-snap1")  # an empty copy, as libvirt makes one
    qemu_io(snap2, "write -P 0xc1 0 512k", "write -z 12M 2M", "write -P 0xc2 30M 3M", "discard 31M 1M")
    branch = create(vm1 / "branch.qcow2", backing="base.qcow2")
    qemu_io(branch, "write -P 0xd1 3M 2M")

    raw = d / "vm2" / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(8 * MiB + 7)  # not even a sector multiple
    qemu_io(str(raw), "write -P 0xe1 1M 1M", fmt="raw")
    top = create(d / "vm2" / "top.qcow2", backing="disk.raw", backing_fmt="raw")
    qemu_io(top, "write -P 0xe2 4M 64k", "write -z 1M 64k")
    (d / "vm2" / "notes.txt").write_text("not an image\n")
    return d


class Mount:
    """A real snapfs mount in a subprocess, unmounted on close.

    ``images`` is an image directory, or a list of source options
    (``["--connect", URI, "--domain", NAME]``).
    """

    made: list[Mount] = []  # every mount of the session, for the log check

    def __init__(self, images, mountpoint, *extra, timeout=None):
        source = [str(a) for a in images] if isinstance(images, list) else ["--images", str(images)]
        self.path = str(mountpoint)
        os.makedirs(self.path, exist_ok=True)
        self.logfile = self.path + ".log"
        self.log_checked = 0
        self.closed = False
        if "--log" not in extra:
            extra = (*extra, "--log", self.logfile)
        else:
            self.logfile = extra[extra.index("--log") + 1]
        Mount.made.append(self)
        try:
            self.result = run(*SNAPFS, "mount", *source, *extra, self.path, check=False, cwd=REPO,
                              timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"snapfs mount did not return within {timeout} s") from None
        if self.result.returncode != 0:
            raise RuntimeError(f"snapfs mount failed: {self.result.stderr}")

    def log_problems(self, allowed) -> list[str]:
        """Tracebacks, errors and unexpected warnings logged since the last call.

        Warnings of ``snapfs.report`` are the status file's content (views
        not offered, notes) and always expected; any other warning must
        match a pattern of the test's ``log_allows`` marker.
        """
        try:
            with open(self.logfile, errors="replace") as f:
                f.seek(self.log_checked)
                text = f.read()
                self.log_checked = f.tell()
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            m = LOG_RECORD.match(line)
            if "Traceback" in line:
                out.append(line)
            elif m and m["level"] in ("ERROR", "CRITICAL"):
                out.append(line)
            elif m and m["level"] == "WARNING" and m["logger"] != "snapfs.report" \
                    and not any(re.search(p, m["message"]) for p in allowed):
                out.append(line)
        return [f"{self.logfile}: {line}" for line in out]

    def __truediv__(self, rel):
        return os.path.join(self.path, rel)

    @property
    def log(self):
        from snapfs.runtime import find_mount
        found = find_mount(self.path)
        with open(found[1]["log"]) as f:
            return f.read()

    @property
    def pid(self):
        from snapfs.runtime import find_mount
        found = find_mount(self.path)
        return found[1]["pid"] if found else None

    def status(self):
        with open(os.path.join(self.path, ".snapfs-status")) as f:
            return f.read()

    def close(self):
        self.closed = True
        if os.path.ismount(self.path):
            r = run(*SNAPFS, "umount", self.path, check=False, cwd=REPO)
            if r.returncode != 0 and os.path.ismount(self.path):
                run("fusermount3", "-uz", self.path, check=False)
                raise AssertionError(f"snapfs umount failed: {r.stderr}")


@pytest.fixture
def mount(tmp_path):
    """mount(images_dir, *options, timeout=None) -> Mount; every mount is unmounted at teardown.

    timeout: seconds ``snapfs mount`` may take to return (AssertionError after)."""
    mounts = []

    def _mount(images, *extra, name="mnt", timeout=None):
        m = Mount(images, tmp_path / name, *extra, timeout=timeout)
        mounts.append(m)
        return m

    yield _mount
    for m in mounts:
        m.close()


LOG_RECORD = re.compile(r"^\S+ \S+ (?P<level>[A-Z]+) (?P<logger>[\w.]+): (?P<message>.*)$")


@pytest.fixture(autouse=True)
def _mount_logs(request):
    """Fail a test whose mounts logged a traceback, an error or an unexpected warning.

    A test that provokes a warning on purpose says which:
    ``@pytest.mark.log_allows(r"died; restarting it")``.
    """
    yield
    allowed = [p for m in request.node.iter_markers("log_allows") for p in m.args]
    problems = [p for m in Mount.made for p in m.log_problems(allowed)]
    Mount.made = [m for m in Mount.made if not m.closed]
    if problems:
        pytest.fail("the mount log has unexpected entries:\n" + "\n".join(problems), pytrace=False)


def pytest_sessionfinish(session, exitstatus):
    """Mounts that outlived their last test (module fixtures) are checked at the end."""
    problems = [p for m in Mount.made for p in m.log_problems([])]
    if problems:
        print("\nthe mount log has unexpected entries:\n" + "\n".join(problems))
        session.exitstatus = 1


def pytest_report_header(config):
    """Whether the libvirt tests' domains get KVM or TCG, and why, at the top of every run."""
    try:
        from libvirt_env import accelerator
    except ImportError as e:  # no python3-libvirt: the libvirt tiers will say so
        return f"libvirt domains: unknown ({e})"
    return f"libvirt domains: {accelerator()[1]}"


@pytest.fixture(scope="session")
def conn():
    """A libvirt connection to qemu:///system; libvirtd is started if none runs."""
    from libvirt_env import libvirt_conn
    c = libvirt_conn()
    yield c
    c.close()


@pytest.fixture
def d():
    """A fresh image directory that libvirt's qemu can reach."""
    from libvirt_env import new_image_dir
    path = new_image_dir("t")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class OtherUser:
    """An ordinary user, and snapfs as that user runs it.

    ``python`` (with ``snapfs``, ``[python, "-m", "snapfs"]``) and ``command``
    (the ``snapfs`` console script) are those of a copy of the checkout's
    venv that the user can reach: the checkout itself may sit where only
    root can enter (root's 0700 home, a ``mktemp -d`` directory).
    """
    name: str
    pw_uid: int
    pw_gid: int
    python: str
    snapfs: list[str]
    command: str


# What snapfs needs as another user: its own package, its dependencies from the
# venv (pyfuse3 with snapfs's patches, trio), Debian's libnbd and libvirt bindings.
OTHER_USER_MODULES = ("snapfs", "snapfs.cli", "pyfuse3", "trio", "nbd", "libvirt")

# Run as the other user: where each module is found.
MODULE_FILES = """
import importlib, json, sys
print(json.dumps({m: importlib.import_module(m).__file__ for m in sys.argv[1:]}))
"""


def runtime_distributions() -> list:
    """The installed distributions snapfs runs on: its requirements and theirs,
    extras left out. Not snapfs's own: installed editable, it is the checkout."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement

    seen, todo, out = {"snapfs"}, list(distribution("snapfs").requires or ()), []
    while todo:
        req = Requirement(todo.pop())
        name = req.name.lower().replace("_", "-")
        if name in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        try:
            dist = distribution(req.name)
        except PackageNotFoundError:
            continue  # the import as the other user says what is missing
        out.append(dist)
        todo += dist.requires or ()
    return out


def reachable_copy(root) -> tuple[str, str, dict[str, str]]:
    """A venv in ``root`` that any user may run snapfs from, as the checkout's venv would.

    It holds the snapfs package and the files of the distributions snapfs runs
    on that the checkout's venv installed (pyfuse3 built with snapfs's
    patches, trio and theirs), not the editable install's hooks, which lead
    back into the checkout. Its interpreter is the one the checkout's venv
    links to (``/usr/bin/python3``) and ``pyvenv.cfg`` keeps its
    ``include-system-site-packages`` (Debian's ``nbd`` and ``libvirt``).
    Everything is made readable by all and writable by root alone. Returns
    (python, console script, {directory: its copy}).
    """
    venv = os.path.join(root, "venv")
    python = os.path.join(venv, "bin", "python")
    os.makedirs(os.path.dirname(python))
    interpreter = os.path.realpath(sys.executable)
    os.symlink(interpreter, python)
    system_site = "true"
    in_venv = sys.prefix != sys.base_prefix
    if in_venv:
        with open(os.path.join(sys.prefix, "pyvenv.cfg")) as f:
            m = re.search(r"^include-system-site-packages\s*=\s*(\S+)", f.read(), re.M)
        system_site = m[1] if m else "false"
    with open(os.path.join(venv, "pyvenv.cfg"), "w") as f:
        f.write(f"home = {os.path.dirname(interpreter)}\n"
                f"include-system-site-packages = {system_site}\n"
                f"version = {platform.python_version()}\n")
    moved = {}
    for kind in ("platlib", "purelib"):
        site = sysconfig.get_path(kind)
        copy = os.path.join(venv, os.path.relpath(site, sys.prefix))
        os.makedirs(copy, exist_ok=True)
        if in_venv:
            moved[os.path.realpath(site)] = copy
    for dist in runtime_distributions():
        for f in dist.files or ():
            src = os.path.realpath(dist.locate_file(f))
            for site, copy in moved.items():
                if src.startswith(site + os.sep) and os.path.isfile(src):
                    dest = copy + src[len(site):]
                    os.makedirs(os.path.dirname(dest), exist_ok=True)
                    shutil.copy2(src, dest)
    package = os.path.join(copy, "snapfs")
    shutil.copytree(os.path.join(REPO, "snapfs"), package)
    moved[os.path.realpath(os.path.join(REPO, "snapfs"))] = package
    # The console script, as pip wrote it, on the copy's interpreter.
    script = os.path.join(sys.prefix, "bin", "snapfs")
    if not os.path.exists(script):
        pytest.fail(f"{script} is missing: run make setup")
    command = os.path.join(venv, "bin", "snapfs")
    with open(script) as f:
        _, rest = f.read().split("\n", 1)
    with open(command, "w") as f:
        f.write(f"#!{python}\n{rest}")
    for top, _, files in os.walk(root):
        os.chmod(top, 0o755)
        for name in files:
            path = os.path.join(top, name)
            if not os.path.islink(path):
                mode = os.stat(path).st_mode & 0o777
                os.chmod(path, 0o755 if mode & 0o100 else 0o644)
    os.chmod(command, 0o755)
    return python, command, moved


@pytest.fixture(scope="session")
def nobody():
    """The user ``nobody``, running snapfs from a copy it can reach (``OtherUser``).

    The copy lives in a 0755 directory under /tmp for the session: the
    checkout, its venv and pytest's ``tmp_path`` may all be closed to others.
    Before any test uses it, ``nobody`` imports from it what snapfs needs,
    and each module must be the copy of the one the tests use.
    """
    if os.getuid() != 0:
        pytest.skip("needs root, to act as another user")
    pw = pwd.getpwnam("nobody")
    root = tempfile.mkdtemp(prefix="snapfs-nobody-", dir="/tmp")
    try:
        python, command, moved = reachable_copy(root)
        r = run("setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups",
                "env", "-u", "XDG_RUNTIME_DIR", "HOME=/", python, "-c", MODULE_FILES, *OTHER_USER_MODULES,
                check=False, cwd="/")
        if r.returncode != 0:
            pytest.fail(f"user nobody cannot import what snapfs needs from {root}:\n{r.stderr}", pytrace=False)
        got = json.loads(r.stdout)
        wrong = []
        for name in OTHER_USER_MODULES:
            want = os.path.realpath(importlib.util.find_spec(name).origin)
            for there, copy in moved.items():
                if want.startswith(there + os.sep):
                    want = copy + want[len(there):]
                    break
            if os.path.realpath(got[name]) != want:
                wrong.append(f"{name}: {got[name]}, not {want}")
        if wrong:
            pytest.fail(f"user nobody does not import snapfs's modules from {root}:\n  " + "\n  ".join(wrong),
                        pytrace=False)
        yield OtherUser(pw.pw_name, pw.pw_uid, pw.pw_gid, python, [python, "-m", "snapfs"], command)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI a skipped test is a failure: CI must run every test."""
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, which must run every test: {report.longrepr}"


@pytest.fixture(scope="session", autouse=True)
def _tools():
    missing = [t for t in ("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo", "fusermount3")
               if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing tools {missing}: run make setup")
    if not os.path.exists("/dev/fuse"):
        pytest.fail("/dev/fuse is missing: FUSE tests cannot run")
