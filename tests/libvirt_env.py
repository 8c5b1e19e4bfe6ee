"""Real libvirt domains for tests: a daemon, a directory qemu can reach, disposable VMs.

Nothing here is mocked. ``ensure_libvirtd`` starts ``virtlogd`` and ``libvirtd``
when no daemon answers (CI has no systemd). Images live under ``image_dir()``
in /var/tmp, because qemu runs as ``libvirt-qemu`` and cannot traverse pytest's
0700 ``tmp_path``. ``TestDomain`` defines a small diskless-OS VM (no guest runs:
the data is written through qemu's HMP ``qemu-io`` into the guest's disk
devices), and always undefines it and removes the files it made.

Typical use::

    conn = libvirt_conn()
    d = new_image_dir("t")
    with TestDomain.define(conn, "t", [DiskSpec("vda", f"{d}/vda.qcow2", size=64 * MiB)]) as dom:
        dom.start()
        dom.write("vda", 0, 4 * MiB, 0x11)
        dom.record("vda", f"{d}/vda.raw")
"""

from __future__ import annotations

import atexit
import functools
import grp
import logging
import os
import pwd
import re
import secrets
import shutil
import stat
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any, Iterable

import libvirt
import libvirt_qemu

MiB = 1 << 20
NAME_PREFIX = "snapfs-test-"
log = logging.getLogger(__name__)

# libvirt's default error handler prints every error to stderr, even the ones
# that are caught; the exceptions carry the same text.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


# -- qemu's user and its accelerator ------------------------------------------

@dataclass(frozen=True)
class QemuUser:
    """Who libvirt runs qemu as: user, group and supplementary groups."""
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]


def _qemu_conf(key: str, path: str = "/etc/libvirt/qemu.conf") -> str | None:
    """The value of an uncommented ``key = "..."`` line of qemu.conf, else None."""
    try:
        with open(path) as f:
            m = re.search(rf'^\s*{key}\s*=\s*"([^"]*)"', f.read(), re.M)
    except OSError:
        return None
    return m.group(1) if m else None


def _by_name_or_id(value: str, by_name: Any, by_id: Any) -> Any:
    """libvirt's reading of qemu.conf's user/group: "+N" is an id, else a name, else an id."""
    if value.startswith("+"):
        return by_id(int(value[1:]))
    try:
        return by_name(value)
    except KeyError:
        return by_id(int(value))


def qemu_user(uri: str = "qemu:///system") -> QemuUser:
    """The user libvirt runs qemu as for ``uri``, found the way libvirt finds it.

    qemu:///session runs qemu as the caller. qemu:///system takes ``user`` and
    ``group`` from /etc/libvirt/qemu.conf, by default ``libvirt-qemu`` for both
    (Debian's build), and adds the user's groups (``virGetGroupList``: the
    primary group from passwd and every group listing the user). On Debian
    12 that gives uid libvirt-qemu, gid libvirt-qemu, groups kvm and
    libvirt-qemu, as /proc/PID/status of a running qemu shows.
    """
    if uri.rstrip("/").endswith("/session"):
        return QemuUser(pwd.getpwuid(os.getuid()).pw_name, os.getuid(), os.getgid(),
                        tuple(os.getgroups()))
    pw = _by_name_or_id(_qemu_conf("user") or "libvirt-qemu", pwd.getpwnam, pwd.getpwuid)
    try:
        gid = _by_name_or_id(_qemu_conf("group") or "libvirt-qemu",
                             grp.getgrnam, grp.getgrgid).gr_gid
    except KeyError:
        gid = pw.pw_gid
    groups = tuple(sorted(set(os.getgrouplist(pw.pw_name, pw.pw_gid)) | {gid}))
    return QemuUser(pw.pw_name, pw.pw_uid, gid, groups)


def _cannot_open_rw(path: str, user: QemuUser) -> str | None:
    """None if ``user`` can open ``path`` read-write, else the reason.

    A real open(O_RDWR) as that user with its groups (run by subprocess's
    own fork/exec, safe in a threaded process), so that ACLs and a device
    cgroup count too, not just the mode bits. Without the right to change
    user (not root, and not that user), the mode bits decide.
    """
    if os.geteuid() == user.uid:
        try:
            os.close(os.open(path, os.O_RDWR))
            return None
        except OSError as e:
            return e.strerror
    try:
        r = subprocess.run(["/bin/sh", "-c", 'exec 3<>"$1"', "sh", path], user=user.uid,
                           group=user.gid, extra_groups=list(user.groups),
                           stdin=subprocess.DEVNULL, capture_output=True, text=True)
    except PermissionError:
        st = os.stat(path)
        shift = 6 if st.st_uid == user.uid else 3 if st.st_gid in user.groups else 0
        return None if (st.st_mode >> shift) & 0o6 == 0o6 else "mode bits deny read-write"
    return None if r.returncode == 0 else r.stderr.strip().rpartition(": ")[2] or "open failed"


def _describe(path: str) -> str:
    """``crw------- root:root``: the node's mode and owner."""
    st = os.stat(path)
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"{stat.filemode(st.st_mode)} {owner}:{group}"


@functools.cache
def accelerator(uri: str = "qemu:///system") -> tuple[str, str]:
    """(domain type, why): ``kvm`` if qemu's user can open /dev/kvm read-write, else ``qemu`` (TCG).

    The existence of /dev/kvm is not enough: on a machine without udev the
    node is ``crw------- root:root`` and a kvm domain fails to start with
    "Could not access KVM kernel module: Permission denied". TCG domains do
    start there, but slowly: libvirt's capability probe keeps
    CAP_DAC_OVERRIDE and sees KVM, its check as qemu's user does not, so it
    finds its cached capabilities stale and probes qemu again (about 4 s) on
    every call that needs them: 36 s per ``defineXML``. ``make setup`` (root)
    gives the node Debian's udev owner and mode, root:kvm 0660. Checked
    once per process and logged.
    """
    kvm = "/dev/kvm"
    if not os.path.exists(kvm):
        kind, why = "qemu", f"TCG: {kvm} does not exist"
    else:
        user = qemu_user(uri)
        denied = _cannot_open_rw(kvm, user)
        if denied is None:
            kind, why = "kvm", f"KVM: {user.name} can open {kvm} ({_describe(kvm)})"
        else:
            kind, why = "qemu", (f"TCG: {user.name} cannot open {kvm} ({_describe(kvm)}): {denied} "
                                 "(libvirt then probes qemu anew on every call; make setup as root "
                                 "gives the node Debian's udev mode)")
    log.info("libvirt domains of %s: %s", uri, why)
    return kind, why


def _qemu_ids() -> tuple[int, int]:
    """uid/gid qemu runs as under qemu:///system (Debian: libvirt-qemu for both)."""
    try:
        user = qemu_user()
        return user.uid, user.gid
    except (KeyError, ValueError):
        return 64055, 64055


QEMU_UID, QEMU_GID = _qemu_ids()


# -- the daemon ---------------------------------------------------------------

def _can_connect(uri: str) -> str | None:
    """None if ``uri`` opens, else libvirt's error text."""
    try:
        libvirt.open(uri).close()
        return None
    except libvirt.libvirtError as e:
        return str(e)


def _daemonize(cmd: list[str]) -> str:
    """Run a self-daemonizing command; return a line describing the outcome."""
    if shutil.which(cmd[0]) is None:
        return f"{' '.join(cmd)}: not found on PATH"
    with tempfile.TemporaryFile("w+") as err:
        # Not capture_output: a daemon that kept the pipe open would hang us.
        rc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=err).returncode
        err.seek(0)
        text = err.read().strip()
    return f"{' '.join(cmd)}: exit {rc}" + (f": {text}" if text else "")


def _running(name: str) -> bool:
    return subprocess.run(["pgrep", "-x", name], stdout=subprocess.DEVNULL).returncode == 0


def ensure_libvirtd(uri: str = "qemu:///system", timeout: float = 30.0) -> str:
    """Make sure a libvirt daemon answers on ``uri`` and return ``uri``.

    If a connection already works nothing is started. Otherwise ``virtlogd -d``
    (unless one runs; qemu's logs go through it) and ``libvirtd -d`` are
    started and the connection is retried for up to ``timeout`` seconds.
    Safe to call any number of times. Raises RuntimeError saying what was tried.
    """
    first = _can_connect(uri)
    if first is None:
        return uri
    tried = [f"libvirt.open({uri!r}): {first}"]
    if _running("virtlogd"):
        tried.append("virtlogd: already running")
    else:
        tried.append(_daemonize(["virtlogd", "-d"]))
    if _running("libvirtd"):
        tried.append("libvirtd: already running, not started again")
    else:
        tried.append(_daemonize(["libvirtd", "-d"]))
    deadline = time.monotonic() + timeout
    while True:
        last = _can_connect(uri)
        if last is None:
            return uri
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    tried.append(f"libvirt.open({uri!r}) after {timeout:g} s: {last}")
    raise RuntimeError("no libvirt daemon answers:\n  " + "\n  ".join(tried))


def libvirt_conn(uri: str = "qemu:///system") -> libvirt.virConnect:
    """An open connection to ``uri``, starting the daemons first if needed."""
    return libvirt.open(ensure_libvirtd(uri))


# -- directories qemu can reach -----------------------------------------------

_image_dir: str | None = None


def image_dir() -> str:
    """This process's image directory under /var/tmp (mode 0711), made on first call.

    /var/tmp is 1777, so the ``libvirt-qemu`` user can reach files in here
    whose own permissions allow it (libvirt chowns images it uses). The
    directory is removed at exit, or earlier by ``remove_image_dir()``.
    """
    global _image_dir
    if _image_dir is None or not os.path.isdir(_image_dir):
        _image_dir = tempfile.mkdtemp(prefix=NAME_PREFIX, dir="/var/tmp")
        os.chmod(_image_dir, 0o711)
    return _image_dir


def remove_image_dir() -> None:
    """Remove ``image_dir()`` and everything in it (no error if already gone)."""
    global _image_dir
    if _image_dir is not None:
        shutil.rmtree(_image_dir, ignore_errors=True)
        _image_dir = None


atexit.register(remove_image_dir)


def new_image_dir(prefix: str = "d", qemu_owned: bool = False) -> str:
    """A fresh subdirectory of ``image_dir()``, mode 0711.

    ``qemu_owned`` chowns it to libvirt-qemu, as a pull-mode backup's NBD
    socket and scratch files need. Remove it with ``shutil.rmtree``.
    """
    path = tempfile.mkdtemp(prefix=prefix + "-", dir=image_dir())
    os.chmod(path, 0o711)
    if qemu_owned:
        os.chown(path, QEMU_UID, QEMU_GID)
    return path


def create_image(path: str, size: int, fmt: str = "qcow2") -> str:
    """An empty image of ``size`` bytes made with ``qemu-img create``."""
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, path, str(size)],
                   check=True, capture_output=True, text=True)
    return path


# -- libvirt XML ----------------------------------------------------------------


def E(tag: str, *children: ET.Element, text: str | None = None, **attrs: str) -> ET.Element:
    """An element with attributes, children and text: libvirt XML is built, never
    pasted together from strings, so any name or path is escaped right."""
    el = ET.Element(tag, attrs)
    el.extend(children)
    if text is not None:
        el.text = text
    return el


def to_xml(el: ET.Element) -> str:
    return ET.tostring(el, encoding="unicode")


# -- disk descriptions --------------------------------------------------------

@dataclass
class DiskSpec:
    """A file-backed disk or cdrom.

    ``size``: if given and ``path`` does not exist, the image is created (and
    removed again with the domain). A cdrom has ``device="cdrom"``, defaults to
    the ide bus ('pc' has an ide controller built in), is read-only, and may
    have ``path=None`` for an empty drive.
    """
    target: str
    path: str | None
    fmt: str = "qcow2"
    size: int | None = None
    device: str = "disk"
    bus: str | None = None

    def element(self) -> ET.Element:
        bus = self.bus or ("ide" if self.device == "cdrom" else "virtio")
        disk = E("disk", E("driver", name="qemu", type=self.fmt), type="file", device=self.device)
        if self.path:
            disk.append(E("source", file=self.path))
        disk.append(E("target", dev=self.target, bus=bus))
        if self.device == "cdrom":
            disk.append(E("readonly"))
        return disk

    def xml(self) -> str:
        return to_xml(self.element())


@dataclass
class NetworkDiskSpec:
    """A disk served over NBD (``<disk type='network'>``).

    qemu connects when the domain starts, so a domain with this disk starts only
    while a server listens on ``host:port`` with export ``name``; without one
    ``start()`` raises libvirtError ("internal error: qemu unexpectedly closed
    the monitor: ... Failed to connect to '127.0.0.1:10809': Connection
    refused"). Defining never needs the server. Such a disk has no source file,
    so ``record()`` refuses it.
    """
    target: str
    name: str
    host: str = "127.0.0.1"
    port: int = 10809
    fmt: str = "raw"
    bus: str = "virtio"

    def element(self) -> ET.Element:
        return E("disk",
                 E("driver", name="qemu", type=self.fmt),
                 E("source", E("host", name=self.host, port=str(self.port)), protocol="nbd", name=self.name),
                 E("target", dev=self.target, bus=self.bus),
                 type="network", device="disk")

    def xml(self) -> str:
        return to_xml(self.element())


AnyDisk = DiskSpec | NetworkDiskSpec


def domain_xml(name: str, disks: Iterable[AnyDisk], memory_mib: int = 64,
               uri: str = "qemu:///system") -> str:
    """XML of a guest with no OS: it starts and idles, its disks are live.

    KVM when qemu's user under ``uri`` can use it, else TCG (``accelerator``).
    """
    kind = accelerator(uri)[0]
    return to_xml(E(
        "domain",
        E("name", text=name),
        E("memory", text=str(memory_mib), unit="MiB"),
        E("vcpu", text="1"),
        E("os", E("type", text="hvm", arch="x86_64", machine="pc")),
        E("features", E("acpi")),  # without ACPI, pci.0 takes no hotplug
        E("on_poweroff", text="destroy"),
        E("on_crash", text="destroy"),
        E("devices", *(d.element() for d in disks), E("memballoon", model="none")),
        type=kind))


# -- the domain ---------------------------------------------------------------

class HmpError(RuntimeError):
    """A HMP command answered with something other than success."""


_MARK_CMD = "read 0 0"
_MARK = "read 0/0 bytes at offset 0\n"
# "2026-11-22 01:46:09.207+0000: Domain id=4 is tainted: custom-monitor"
_LIBVIRT_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+\+\d{4}: ")


class TestDomain:
    """A defined libvirt domain named ``snapfs-test-...`` and the files made for it.

    Use as a context manager: on exit the domain is undefined (jobs aborted,
    destroyed if running, snapshot and checkpoint metadata dropped) and every
    image and overlay this object created is removed, whether the body failed
    or not. Files passed in that already existed are kept. qemu's log
    (``log_path``) is removed too, unless the body failed.
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, conn: libvirt.virConnect, dom: libvirt.virDomain, made: list[str]):
        self.conn = conn
        self.dom = dom
        self.name: str = dom.name()
        self.made = made

    # lifecycle

    @classmethod
    def define(cls, conn: libvirt.virConnect, name: str, disks: list[AnyDisk],
               memory_mib: int = 64) -> TestDomain:
        """Create missing images (``DiskSpec.size``) and define the domain.

        The domain's name is ``snapfs-test-<name>-<random>``.
        """
        made: list[str] = []
        full = f"{NAME_PREFIX}{name}-{secrets.token_hex(3)}"
        try:
            for d in disks:
                if isinstance(d, DiskSpec) and d.path and d.size is not None \
                        and not os.path.exists(d.path):
                    made.append(create_image(d.path, d.size, d.fmt))
            dom = conn.defineXML(domain_xml(full, disks, memory_mib, conn.getURI()))
        except BaseException:
            _remove(made)
            raise
        return cls(conn, dom, made)

    def __enter__(self) -> TestDomain:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.cleanup(keep_log=exc_type is not None)

    def is_active(self) -> bool:
        return bool(self.dom.isActive())

    def start(self) -> None:
        """Start the domain (it stays running with no OS).

        One that cannot start raises libvirtError with libvirt's message, at
        once: nothing here waits or retries (a slow failure is libvirt's own,
        see ``accelerator``).
        """
        self.dom.create()

    def destroy(self, timeout: float = 30.0) -> None:
        """Hard stop; returns once the domain is shut off. No-op if not running."""
        if self.is_active():
            self.dom.destroy()
        deadline = time.monotonic() + timeout
        while self.is_active():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} still active {timeout:g} s after destroy")
            time.sleep(0.1)

    def abort_job(self) -> bool:
        """Abort the domain's running job (e.g. a backup); True if there was one."""
        if not self.is_active() or self.dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE:
            return False
        self.dom.abortJob()
        return True

    def undefine(self) -> None:
        """Abort any job, destroy, and undefine with snapshot/checkpoint/NVRAM metadata."""
        self.abort_job()
        self.destroy()
        self.dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                               | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                               | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)

    def cleanup(self, keep_log: bool = False) -> None:
        """Undefine (if still defined) and remove the files this object made."""
        try:
            try:
                self.conn.lookupByUUID(self.dom.UUID())
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
            else:
                self.undefine()
        finally:
            _remove(self.made + ([] if keep_log else [self.log_path]))
            self.made.clear()

    # disks

    def _xml(self) -> ET.Element:
        """Live XML when running, else the persistent definition."""
        return ET.fromstring(self.dom.XMLDesc(0))

    def _disk(self, target: str) -> ET.Element:
        for disk in self._xml().iterfind("devices/disk"):
            if disk.find("target").get("dev") == target:
                return disk
        raise KeyError(f"{self.name} has no disk {target!r}")

    def source(self, target: str) -> tuple[str, str]:
        """(current source file, format) of a file-backed disk; follows snapshots."""
        disk = self._disk(target)
        src = disk.find("source")
        if disk.get("type") != "file" or src is None or not src.get("file"):
            raise ValueError(f"{self.name}: disk {target!r} has no source file")
        return src.get("file"), disk.find("driver").get("type")

    def alias(self, target: str) -> str:
        """The device alias qemu knows the disk by (running domain only)."""
        alias = self._disk(target).find("alias")
        if alias is None:
            raise ValueError(f"{self.name}: disk {target!r} has no alias; is the domain running?")
        return alias.get("name")

    def _qdev(self, target: str) -> str:
        """The qdev path of the device holding the disk's block backend."""
        alias = self.alias(target)
        if self._disk(target).find("target").get("bus") == "virtio":
            return f"/machine/peripheral/{alias}/virtio-backend"
        return alias

    def hmp(self, command: str) -> str:
        """Run a HMP command, return what the monitor answered."""
        return libvirt_qemu.qemuMonitorCommand(
            self.dom, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)

    @property
    def log_path(self) -> str:
        """qemu's stdout/stderr, as libvirt (qemu:///system) keeps it."""
        return f"/var/log/libvirt/qemu/{self.name}.log"

    def qemu_io(self, target: str, command: str, timeout: float = 10.0) -> str:
        """Run a qemu-io command on a running disk through HMP; return its output.

        The monitor answers only errors about the command line (unknown
        device...); qemu-io itself prints its results, failures included, to
        qemu's stdout, which libvirt keeps in ``log_path``. So the command is
        followed by a marker command (``read 0 0``) and its output is the log
        text between the two, without libvirt's own timestamped lines.
        Raises HmpError if the monitor answered anything.
        """
        qdev = self._qdev(target)
        with open(self.log_path, "rb") as log:
            log.seek(0, os.SEEK_END)
            for cmd in (command, _MARK_CMD):
                answer = self.hmp(f'qemu-io -d {qdev} "{cmd}"')
                if answer.strip():
                    raise HmpError(f"{self.name} {target}: qemu-io {cmd!r}: {answer.strip()!r}")
            text = ""
            deadline = time.monotonic() + timeout
            while _MARK not in text:
                if time.monotonic() > deadline:
                    raise HmpError(f"{self.name} {target}: qemu-io {command!r}: no answer in "
                                   f"{self.log_path} after {timeout:g} s; got {text!r}")
                time.sleep(0.005)
                text += log.read().decode(errors="replace")
        out = text[:text.rindex(_MARK)]
        return "".join(ln for ln in out.splitlines(keepends=True) if not _LIBVIRT_LINE.match(ln))

    def _io_ok(self, target: str, command: str, expect: str | None) -> None:
        """Run ``command``; its output must be ``expect`` (plus the stats line), or empty."""
        out = self.qemu_io(target, command)
        lines = out.splitlines()
        ok = (lines[:1] == [expect] and len(lines) == 2) if expect else not lines
        if not ok:
            raise HmpError(f"{self.name} {target}: qemu-io {command!r}: {out.strip()!r}")

    def write(self, target: str, offset: int, length: int, pattern: int) -> None:
        """Write ``length`` bytes of ``pattern`` at ``offset``, as the guest would."""
        self._io_ok(target, f"write -P {pattern:#x} {offset} {length}",
                    f"wrote {length}/{length} bytes at offset {offset}")

    def zero(self, target: str, offset: int, length: int) -> None:
        """Write zeroes (``write -z``) at ``offset``."""
        self._io_ok(target, f"write -z {offset} {length}",
                    f"wrote {length}/{length} bytes at offset {offset}")

    def flush(self, target: str) -> None:
        """Flush the disk's writes to its image file."""
        self._io_ok(target, "flush", None)

    def attach_disk(self, target: str, path: str, fmt: str = "qcow2",
                    size: int | None = None) -> None:
        """Attach a virtio disk: live and persistent when running, persistent otherwise.

        With ``size`` a missing image is created (and removed at cleanup).
        """
        if size is not None and not os.path.exists(path):
            self.made.append(create_image(path, size, fmt))
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
        if self.is_active():
            flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
        self.dom.attachDeviceFlags(DiskSpec(target, path, fmt).xml(), flags)

    def _file_disks(self) -> list[str]:
        return [d.find("target").get("dev") for d in self._xml().iterfind("devices/disk")
                if d.get("device") == "disk"]

    def checkpoint(self, name: str, disks: dict[str, bool] | None = None
                   ) -> libvirt.virDomainCheckpoint:
        """Create checkpoint ``name``; ``disks`` maps target -> bitmap or not.

        Targets not in ``disks`` get checkpoint='no'; ``None`` leaves the
        choice to libvirt (a bitmap in every qcow2 disk). The domain must be
        running: libvirt 9.0 answers "Operation not supported: cannot create
        checkpoint for inactive domain" otherwise.
        """
        cp = E("domaincheckpoint", E("name", text=name))
        if disks is not None:
            cp.append(E("disks", *(E("disk", name=t, checkpoint="bitmap" if disks.get(t) else "no")
                                   for t in self._file_disks())))
        return self.dom.checkpointCreateXML(to_xml(cp), 0)

    def snapshot_external(self, name: str, overlay_paths: dict[str, str]
                          ) -> libvirt.virDomainSnapshot:
        """Disk-only external snapshot ``name``, with metadata, running or shut off.

        Each target in ``overlay_paths`` gets a new qcow2 overlay at that path
        (made by libvirt, removed at cleanup) which becomes its current source;
        the other disks are not snapshotted.
        """
        unknown = set(overlay_paths) - set(self._file_disks())
        if unknown:
            raise KeyError(f"{self.name} has no disks {sorted(unknown)}")
        xml = to_xml(E("domainsnapshot", E("name", text=name), E("disks", *(
            E("disk", E("source", file=overlay_paths[t]), name=t, snapshot="external")
            if t in overlay_paths else E("disk", name=t, snapshot="no")
            for t in self._file_disks()))))
        flags = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
        for path in overlay_paths.values():
            if not os.path.exists(path):
                self.made.append(path)
        return self.dom.snapshotCreateXML(xml, flags)

    def record(self, target: str, dest: str) -> str:
        """The disk's exact current content, as the guest sees it, into raw file ``dest``.

        Running: the domain is paused, the device flushed, its current source
        (with its backing chain) converted with ``qemu-img convert -U``, and the
        domain resumed if it was running before. Shut off: a plain convert.
        """
        path, fmt = self.source(target)
        if not self.is_active():
            _convert(path, fmt, dest)
            return dest
        was_running = self.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        if was_running:
            self.dom.suspend()
        try:
            self.flush(target)
            _convert(path, fmt, dest, force_share=True)
        finally:
            if was_running:
                self.dom.resume()
        return dest


def _convert(src: str, fmt: str, dest: str, force_share: bool = False) -> None:
    cmd = ["qemu-img", "convert", "-f", fmt, "-O", "raw", src, dest]
    if force_share:
        cmd.insert(2, "-U")
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def _remove(paths: Iterable[str]) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
