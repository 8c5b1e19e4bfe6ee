"""libvirt pull-mode backup jobs: a running domain's disks at one point in time.

A job exports every served disk over NBD on a UNIX socket in the mount's
private runtime directory, with a scratch file per disk beside it. qemu runs
as its own user (``libvirt-qemu`` for qemu:///system), so that directory is
made that user's and the directories above it searchable (mode 0711: no
listing). Each disk is backed up ``incremental`` from one checkpoint where
it can be, else ``full``; a disk libvirt refuses to back up incrementally
(its bitmap is missing or broken) is retried in full mode, with libvirt's
message as the reason.

A job left behind by a snapfs that crashed is recognised by its socket path
(in snapfs's runtime base, its mount process gone) and aborted.

A domain on another host (``qemu+ssh://``) gets its job directory on that
host, in the ssh connection's directory there (``hosts/ssh.py``), made
qemu's the same way; the socket is forwarded here through the connection
(``host.reach_socket``). A job a killed snapfs left there is ended by
``snapfs umount`` (``abort_jobs_in``), or refused with the way to end it.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import stat
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

import libvirt

from ..errors import BackupError
from ..runtime import pid_alive, runtime_bases, unsearchable_dir
from .libvirt_xml import backup_xml, checkpoint_xml

log = logging.getLogger(__name__)

SOCKET_NAME = "nbd.sock"


@dataclass
class Export:
    """One disk of a job: NBD export name, dirty bitmap (incremental) or reason (full)."""

    name: str
    size: int
    bitmap: str | None = None
    reason: str | None = None


def _message(e: libvirt.libvirtError) -> str:
    return (e.get_error_message() or str(e)).strip()


def _qemu_ids(domain: ET.Element) -> tuple[int, int] | None:
    """uid/gid qemu runs as, from the live XML's DAC label ("+64055:+64055")."""
    for sl in domain.findall("seclabel"):
        if sl.get("model") == "dac":
            label = sl.findtext("label") or ""
            try:
                uid, gid = (int(x.lstrip("+")) for x in label.split(":"))
                return uid, gid
            except ValueError:
                return None
    return None


def job_socket(dom) -> str:
    """The UNIX socket of the domain's backup job ("" if it has none).

    Raises libvirtError, VIR_ERR_NO_DOMAIN_BACKUP when there is no job.
    """
    server = ET.fromstring(dom.backupGetXMLDesc(0)).find("server")
    return server.get("socket", "") if server is not None else ""


def snapfs_job_owner(socket: str) -> tuple[bool, dict | None]:
    """(is it a snapfs job, the mount.json of its mount if that still exists)."""
    jobdir = os.path.dirname(socket)
    if not (any(socket.startswith(base.rstrip("/") + "/") for base in runtime_bases())
            and os.path.basename(socket) == SOCKET_NAME and os.path.basename(jobdir).startswith("backup-")):
        return False, None
    try:
        with open(os.path.join(os.path.dirname(jobdir), "mount.json")) as f:
            return True, json.load(f)
    except (OSError, ValueError):
        return True, None


@dataclass
class BackupJob:
    dom: libvirt.virDomain
    dir: str
    socket: str
    exports: dict[str, Export] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    host: object = None  # the domain's host when it is not this machine (hosts.ssh.SshHost)

    @classmethod
    def start(cls, dom, domain_xml: ET.Element, rundir: str, disks, modes: dict[str, tuple[str, str | None]],
              since: str | None, new_checkpoint: str | None, others: list[str] = (), host=None) -> BackupJob:
        """Begin a pull-mode backup of ``disks`` (DiskDefs); ``others`` (targets) are left out.

        modes: target -> ("incremental" | "full", reason for full). Incremental
        disks start from checkpoint ``since``. new_checkpoint: a checkpoint
        created with the job, so the next incremental starts there.
        """
        remote = host is not None and host.name is not None
        _abort_leftover(dom, host if remote else None)
        jobdir = os.path.join(host.remote_dir if remote else rundir, "backup-" + dom.UUIDString())
        job = cls(dom=dom, dir=jobdir, socket=os.path.join(jobdir, SOCKET_NAME), host=host if remote else None)
        try:
            if remote:
                job._prepare_remote_dir(domain_xml)
            else:
                os.makedirs(jobdir, mode=0o700, exist_ok=True)
                job._prepare_dir(domain_xml, rundir)
            modes = dict(modes)
            for _ in range(len(disks) + 1):
                try:
                    dom.backupBegin(job._backup_xml(disks, modes, since, others),
                                    checkpoint_xml(new_checkpoint, disks, others), 0)
                    break
                except libvirt.libvirtError as e:
                    msg = _message(e)
                    inc = [t for t, (m, _) in modes.items() if m == "incremental"]
                    if not inc or "bitmap" not in msg and "checkpoint" not in msg:
                        raise BackupError(f"libvirt refused the backup job: {msg}") from None
                    # libvirt names the disk (or its image); without a name,
                    # no incremental disk can be trusted.
                    named = [t for t in inc if f"'{t}'" in msg] or [
                        t for d in disks for t in inc if d.target == t and d.source and d.source in msg]
                    for t in named or inc:
                        modes[t] = ("full", f"libvirt refused an incremental backup of {t} from "
                                            f"checkpoint {since!r}: {msg}")
            else:
                raise BackupError("libvirt refused every attempt to start the backup job")
            job._read_exports(modes)
        except BaseException:
            job.stop()
            raise
        what = f"incremental from {since}" if since else "full"
        log.info("domain %s: backup job started (%s%s), NBD at %s", dom.name(), what,
                 f", new checkpoint {new_checkpoint}" if new_checkpoint else "", job.socket)
        if new_checkpoint:
            job.notes.append(f"checkpoint {new_checkpoint!r} created with the backup job")
        return job

    def _prepare_dir(self, domain_xml: ET.Element, rundir: str) -> None:
        ids = _qemu_ids(domain_xml)
        if ids is None or os.getuid() != 0 or ids == (os.getuid(), os.getgid()):
            return
        uid, gid = ids
        os.chown(self.dir, uid, gid)
        # qemu creates the socket and libvirt the scratch files here: the
        # directories above need search permission, nothing more.
        for d in (os.path.dirname(rundir), rundir):
            mode = stat.S_IMODE(os.stat(d).st_mode)
            if not mode & stat.S_IXOTH:
                os.chmod(d, mode | stat.S_IXGRP | stat.S_IXOTH)
        blocked = unsearchable_dir(self.dir, uid, gid)
        if blocked is not None:
            raise BackupError(f"qemu runs as uid {uid} and cannot reach {blocked}, where snapfs keeps "
                              "the backup job's socket and scratch files (set XDG_RUNTIME_DIR to a "
                              "directory it can search, or unset it)")

    def _prepare_remote_dir(self, domain_xml: ET.Element) -> None:
        """The job's directory on the domain's host: qemu's, the one above searchable."""
        ids = _qemu_ids(domain_xml)
        try:
            self.host.run('mkdir -m 0700 -p -- "$1" && chmod 0711 -- "${1%/*}" || exit 1; '
                          'if [ -n "$2" ] && [ "$2" != "$(id -u):$(id -g)" ]; then '
                          'if [ "$(id -u)" = 0 ]; then chown -- "$2" "$1"; else '
                          'echo "qemu runs as $2 there and cannot make its socket in a directory of the ssh '
                          'user $(id -un): connect as root (or as qemu\'s user)" >&2; exit 1; fi; fi',
                          self.dir, f"{ids[0]}:{ids[1]}" if ids else "")
        except OSError as e:
            raise BackupError(f"cannot make the backup job's directory on {self.host.name}: {e.strerror}") from None

    def _remove_dir(self) -> None:
        if self.host is None:
            shutil.rmtree(self.dir, ignore_errors=True)
            return
        try:
            self.host.run('rm -rf -- "$1"', self.dir)
        except OSError:
            pass  # the connection's directory goes with it at unmount

    def _backup_xml(self, disks, modes, since, others) -> str:
        scratch = {d.target: os.path.join(self.dir, f"{d.target}.scratch") for d in disks}
        return backup_xml(self.socket, disks, modes, since, others, scratch)

    def _read_exports(self, modes) -> None:
        root = ET.fromstring(self.dom.backupGetXMLDesc(0))
        for d in root.findall("./disks/disk"):
            if d.get("backup") != "yes":
                continue
            target = d.get("name")
            size = self.dom.blockInfo(target)[0]
            _, reason = modes.get(target, ("full", None))
            bitmap = d.get("exportbitmap") if d.get("backupmode") == "incremental" else None
            if bitmap is None and reason is None:
                reason = "no checkpoint to start from: a full backup"
            self.exports[target] = Export(name=d.get("exportname") or target, size=size,
                                          bitmap=bitmap, reason=reason)

    def stop(self) -> bool:
        """End the job (libvirt drops the scratch files) and remove its directory.

        Only this job: a backup job with another socket is somebody else's.
        False if libvirt could not be asked (the connection is gone).
        """
        ok = True
        try:
            socket = job_socket(self.dom)
        except libvirt.libvirtError as e:
            socket = None  # no job (it failed to start, or the domain stopped)
            if e.get_error_code() not in (libvirt.VIR_ERR_NO_DOMAIN_BACKUP, libvirt.VIR_ERR_OPERATION_INVALID,
                                          libvirt.VIR_ERR_NO_DOMAIN):
                log.warning("domain %s: cannot ask libvirt about the backup job: %s", self.dom.name(),
                            _message(e))
                ok = False
        if socket == self.socket:
            try:
                self.dom.abortJob()
                _wait_gone(self.dom)
                log.info("domain %s: backup job ended", self.dom.name())
            except libvirt.libvirtError as e:
                log.warning("domain %s: ending the backup job failed: %s", self.dom.name(), _message(e))
                ok = False
        if ok:
            self._remove_dir()
        return ok


def _wait_gone(dom, timeout: float = 30.0) -> None:
    """abortJob returns before libvirt has torn the job down: wait for that."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while time.monotonic() < deadline:
        try:
            dom.backupGetXMLDesc(0)
        except libvirt.libvirtError:
            return
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
    log.warning("domain %s: the backup job is still there %.0f s after it was aborted", dom.name(), timeout)


def _abort_leftover(dom, host=None) -> None:
    """Abort a backup job a crashed snapfs left; refuse to touch anyone else's.
    host: the domain's, when it is another (whether a snapfs there is alive
    cannot be told: such a job is refused, with the way to end it)."""
    try:
        socket = job_socket(dom)
    except libvirt.libvirtError:
        return  # no backup job
    if host is not None:
        left = os.path.basename(os.path.dirname(os.path.dirname(socket))).startswith("snapfs.")
        raise BackupError(f"the domain already has a backup job ({socket or 'not on a UNIX socket'})"
                          + (": a snapfs mount started it; snapfs umount of that mount ends it, or virsh "
                             f"domjobabort {dom.name()} on {host.name}" if left else
                             f" that snapfs did not start; end it with virsh domjobabort {dom.name()} if "
                             "nobody uses it"))
    ours, info = snapfs_job_owner(socket)
    if not ours:
        raise BackupError("the domain already has a backup job that snapfs did not start "
                          f"({socket or 'not on a UNIX socket'}); end it with virsh domjobabort "
                          f"{dom.name()} if nobody uses it")
    if info is not None and pid_alive(info.get("pid", 0)):
        raise BackupError(f"the snapfs mount at {info.get('mountpoint')} holds this domain's "
                          "backup job; unmount it first")
    log.warning("domain %s: aborting a backup job left by a snapfs that is gone (%s)", dom.name(), socket)
    try:
        dom.abortJob()
        _wait_gone(dom)
    except libvirt.libvirtError as e:
        raise BackupError(f"cannot abort the backup job left by an earlier snapfs: {_message(e)}") from None
    shutil.rmtree(os.path.dirname(socket), ignore_errors=True)


def abort_jobs_in(uri: str, rundir: str) -> None:
    """Abort the backup jobs whose sockets are in ``rundir`` (a mount whose snapfs
    died): this machine's, or a host's directory for the mount (``uri`` then
    reaches that host's libvirt)."""
    libvirt.registerErrorHandler(lambda ctx, err: None, None)
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as e:
        log.warning("cannot reach %s to end the backup jobs of a dead mount: %s", uri, _message(e))
        return
    try:
        for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            try:
                socket = job_socket(dom)
            except libvirt.libvirtError:
                continue  # no backup job
            if socket.startswith(rundir.rstrip("/") + "/"):
                log.warning("domain %s: ending the backup job of the mount in %s", dom.name(), rundir)
                try:
                    dom.abortJob()
                    _wait_gone(dom)
                except libvirt.libvirtError as e:
                    log.warning("domain %s: cannot abort its backup job: %s", dom.name(), _message(e))
    finally:
        conn.close()


def with_command(uri: str, command: str) -> str:
    """``uri`` with libvirt's ``command=`` set to snapfs's ssh wrapper."""
    from urllib.parse import quote
    return uri + ("&" if "?" in uri else "?") + "command=" + quote(command, safe="/")


def end_remote_jobs(uri: str, ssh_config: str | None, remote_dirs: list[str], rundir: str) -> None:
    """End the backup jobs whose sockets are in ``remote_dirs`` on the host of
    libvirt ``uri``, through an ssh connection of their own (the mount's is
    gone: its snapfs was killed, or the connection was lost)."""
    wrapper = os.path.join(rundir, "ssh-cleanup")
    cmd = ["ssh", *(["-F", ssh_config] if ssh_config else []), "-o", "BatchMode=yes", "-T",
           "-o", "RemoteCommand=none", "-o", "ControlMaster=no", "-o", "ControlPath=none",
           "-o", "ConnectTimeout=10", "-o", "UpdateHostKeys=no"]
    with open(wrapper, "w") as f:
        f.write("#!/bin/sh\nexec " + " ".join(shlex.quote(a) for a in cmd) + ' "$@"\n')
    os.chmod(wrapper, 0o700)
    for d in remote_dirs:
        abort_jobs_in(with_command(uri, wrapper), d)
