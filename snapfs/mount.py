"""A mount's life: runtime directory, scan, FUSE session, servers, teardown.

``serve()`` runs in the foreground process. ``snapfs mount`` without
``--foreground`` starts that process detached and returns once it reports the
mount live (or reports why it could not be).

Each mount has a private 0700 runtime directory under the user's runtime base
(``$XDG_RUNTIME_DIR/snapfs`` or ``/tmp/snapfs-UID``), holding the qemu-nbd
sockets and pid files and ``mount.json`` (mountpoint, pid, log file), which
``snapfs umount`` uses to stop the mount and clean up after a crash. A libvirt
mount's also holds its control socket (``snapfs refresh``) and its backup
jobs' directories, which qemu must reach: it is 0711, in a base others can
search.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time

import pyfuse3
import trio

from .fs import HAS_LSEEK, Operations
from .images import ImageDirectory
from .qemu_nbd import ServerPool
from .tree import Status, Tree
from .views import disk_views

log = logging.getLogger(__name__)


LIBVIRT_OPEN_TIMEOUT = 30  # seconds for libvirt to accept a connection


class MountError(Exception):
    """A mount that cannot be made; the message is for the user."""


def runtime_bases() -> list[str]:
    """Where mounts keep their runtime directories: ``$XDG_RUNTIME_DIR/snapfs``
    (when set), and ``/tmp/snapfs-UID``."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    bases = [os.path.join(xdg, "snapfs")] if xdg and os.path.isdir(xdg) else []
    return bases + [f"/tmp/snapfs-{os.getuid()}"]


def unsearchable_dir(directory: str, uid: int = -1, gid: int = -1) -> str | None:
    """The first of ``directory`` and its parents that uid:gid cannot search,
    or None. The default -1:-1 is any other user (the "other" bits)."""
    p = directory
    while True:
        st = os.stat(p)
        bit = stat.S_IXUSR if st.st_uid == uid else stat.S_IXGRP if st.st_gid == gid else stat.S_IXOTH
        if not st.st_mode & bit:
            return p
        if p == "/":
            return None
        p = os.path.dirname(p)


def runtime_base(searchable: bool = False) -> str:
    """The runtime base, created 0700 if missing.

    searchable: the base must be reachable by other users (a libvirt backup
    job's socket and scratch files are qemu's, which runs as its own user):
    ``$XDG_RUNTIME_DIR`` (0700 by design) is skipped for ``/tmp``.
    """
    bases = runtime_bases()
    base = bases[0]
    if searchable and unsearchable_dir(os.path.dirname(base)) is not None:
        base = bases[-1]
    try:
        os.mkdir(base, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(base)
    if not os.path.isdir(base) or os.path.islink(base) or st.st_uid != os.getuid():
        raise MountError(f"runtime directory {base} is not a directory owned by you")
    if st.st_mode & 0o066:
        # Search permission may be granted (a libvirt backup job's directory
        # must be reachable by qemu's user), nothing more.
        os.chmod(base, st.st_mode & 0o711)
    return base


def mount_device(mp: str) -> str | None:
    """The "major:minor" of the mount at mp, an absolute path without
    symlinks, from mountinfo: no stat, since a FUSE mount may not answer yet
    (in its own process, before serving) or any more."""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if _unescape(fields[4]) == mp:
                    return fields[2]
    except OSError:
        pass
    return None


def is_mounted(mountpoint: str) -> bool:
    return mount_device(os.path.realpath(mountpoint)) is not None


def _unescape(s: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def build_tree(images: str, allow_outside: bool) -> tuple[Tree, Status]:
    """Scan the image directory and lay out the mount."""
    scan = ImageDirectory(images, allow_outside=allow_outside).scan()
    tree = Tree()
    status = Status(scan.root)
    status.problems += [(p.path, p.reason) for p in scan.problems]
    tree.add_status()
    for disk in scan.disks:
        views, missing = disk_views(disk)
        status.problems += missing
        for folder in ("chain", "layers", "dirty"):
            tree.directory(f"{disk.relpath}/{folder}")
        for view in views:
            tree.add_view(view)
        status.views += views
    for path, reason in status.problems:
        log.warning("not available: %s: %s", path, reason)
    log.info("%d disk(s), %d view(s) from %s", len(scan.disks), len(status.views), scan.root)
    return tree, status


def layout(tree: Tree, status: Status, plan) -> None:
    """Put one libvirt domain's plan into the tree and the status file."""
    tree.directory(plan.dirname)
    for rel in plan.disk_dirs:
        for folder in ("chain", "layers", "dirty"):
            tree.directory(f"{rel}/{folder}")
    for view in plan.views:
        tree.add_view(view)
    status.replace(plan.dirname, plan.missing, plan.notes, plan.views)
    for path, reason in plan.missing:
        log.warning("not available: %s: %s", path, reason)
    for note in plan.notes:
        log.warning("%s", note)
    log.info("domain %s: %d disk(s), %d view(s)%s", plan.name, len(plan.disk_dirs), len(plan.views),
             " (running: read through a backup job)" if plan.running else "")


async def serve(args, ready=None) -> None:
    """Mount, serve until unmounted or signalled, then stop every server."""
    mountpoint = os.path.realpath(args.mountpoint)
    if not os.path.isdir(mountpoint):
        raise MountError(f"mountpoint {mountpoint} is not a directory")
    if is_mounted(mountpoint):
        raise MountError(f"{mountpoint} is already a mount point")
    images = os.path.abspath(args.images) if args.images else None
    if images is not None and not os.path.isdir(images):
        raise MountError(f"image directory {images} is not a directory")
    if shutil.which("qemu-nbd") is None:
        raise MountError("qemu-nbd not found (install qemu-utils, or run make setup)")

    rundir = tempfile.mkdtemp(prefix="m", dir=runtime_base(searchable=images is None))
    source = None
    try:
        if images is not None:
            what = images
            tree, status = build_tree(images, args.allow_outside_backing)
        else:
            what = args.connect
            source, tree, status = await _libvirt_tree(args, rundir)
        if not HAS_LSEEK:
            msg = ("this pyfuse3 has no lseek handler (build it with make setup): "
                   "SEEK_HOLE/SEEK_DATA see every file as all data")
            log.warning(msg)
            status.notes.append(msg)
        pool = ServerPool(rundir, connections=args.connections, idle_timeout=args.idle_timeout)
        ops = Operations(tree, pool, status)
        options = {"fsname=snapfs", "subtype=snapfs", "ro"}
        if args.allow_other:
            options |= {"allow_other", "default_permissions"}
        if args.debug_fuse:
            options.add("debug")
        control = os.path.join(rundir, "control.sock")
        with open(os.path.join(rundir, "mount.json"), "w") as f:
            json.dump({"mountpoint": mountpoint, "pid": os.getpid(), "source": what,
                       "control": control if source else None,
                       "log": getattr(args, "log", None)}, f)
        try:
            pyfuse3.init(ops, mountpoint, options)
        except RuntimeError as e:
            raise MountError(f"cannot mount {mountpoint}: {e}") from None
        gone = trio.Event()  # the mount left this process's mount table
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(pool.run)
                nursery.start_soon(_signals, nursery.cancel_scope)
                if source is not None:
                    refresher = Refresher(source, tree, status, ops, pool)
                    await nursery.start(_control_server, control, refresher)
                nursery.start_soon(_watch_mount, mountpoint, gone, nursery.cancel_scope)
                log.info("mounted %s on %s", what, mountpoint)
                if ready is not None:
                    ready()
                await pyfuse3.main()
                # main() returns when the kernel ended the session (fusermount3 -u).
                gone.set()
                nursery.cancel_scope.cancel()
        finally:
            pyfuse3.close(unmount=not gone.is_set())
            log.info("unmounted %s", mountpoint)
    finally:
        if source is not None:
            # The servers are stopped (the pool's nursery is done): end the jobs.
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(source.close)
        shutil.rmtree(rundir, ignore_errors=True)


async def _libvirt_tree(args, rundir: str):
    try:
        from .libvirt_source import LibvirtSource, SourceError
    except ImportError as e:
        raise MountError(f"libvirt's Python module is missing ({e}): install python3-libvirt, "
                         "or run make setup") from None
    source = LibvirtSource(args.connect, args.domain, rundir, since=args.since,
                           new_checkpoint=args.checkpoint)
    try:
        try:
            with trio.fail_after(LIBVIRT_OPEN_TIMEOUT):
                await trio.to_thread.run_sync(source.open, abandon_on_cancel=True)
        except trio.TooSlowError:
            raise SourceError(f"libvirt at {args.connect} did not answer within "
                              f"{LIBVIRT_OPEN_TIMEOUT} s") from None
        plans = await trio.to_thread.run_sync(source.plan_all)
    except SourceError as e:
        await trio.to_thread.run_sync(source.close)
        raise MountError(str(e)) from None
    tree = Tree()
    status = Status(args.connect)
    tree.add_status()
    for plan in plans:
        layout(tree, status, plan)
    if not plans:
        status.notes.append(f"no domains at {args.connect}")
    return source, tree, status


class ControlError(Exception):
    """A control request that failed; the message is for the user."""


class Refresher:
    """``snapfs refresh``: a new point in time for one domain, without remounting."""

    def __init__(self, source, tree: Tree, status: Status, ops: Operations, pool: ServerPool):
        self.source = source
        self.tree = tree
        self.status = status
        self.ops = ops
        self.pool = pool
        self.lock = trio.Lock()

    async def refresh(self, domain: str, since: str | None, checkpoint: str | None) -> str:
        from .libvirt_source import SourceError
        async with self.lock:
            old = self.source.plans.get(domain)
            if old is None:
                raise ControlError(f"domain {domain!r} is not in this mount")
            prefix = old.dirname
            busy = self.ops.open_files(prefix)
            # The kernel sends RELEASE after close() returns: allow it a moment.
            with trio.move_on_after(1):
                while busy:
                    await trio.sleep(0.02)
                    busy = self.ops.open_files(prefix)
            if busy:
                raise ControlError(f"{busy} file(s) of domain {domain} are open; close them and retry")
            # Exports other domains use too (a shared base image) stay.
            others = {s for p in self.source.plans.values() if p is not old
                      for v in p.views for s in v.specs()}
            await self.pool.discard({s for v in old.views for s in v.specs()} - others)
            try:
                plan = await trio.to_thread.run_sync(self.source.refresh, domain, since, checkpoint)
            except SourceError as e:
                self._replace(prefix, None)
                self.status.replace(prefix, [(prefix, f"refresh failed: {e}")], [], [])
                raise ControlError(str(e)) from None
            self._replace(prefix, plan)
        if not plan.running:
            return f"{domain}: read again (shut off)"
        if plan.job is None:
            raise ControlError(f"{domain}: no backup job could be started: "
                               + "; ".join(plan.notes or ["see the log"]))
        return f"{domain}: new point in time " + time.strftime("%H:%M:%S")

    def _replace(self, prefix: str, plan) -> None:
        removed = self.tree.remove(prefix)
        if plan is not None:
            layout(self.tree, self.status, plan)
        else:
            self.tree.directory(prefix)
        if removed is not None:
            try:
                pyfuse3.invalidate_entry_async(self.tree.root.inode, os.fsencode(prefix),
                                               ignore_enoent=True)
            except Exception:
                log.debug("invalidating %s failed", prefix, exc_info=True)


async def _control_server(path: str, refresher: Refresher, *, task_status=trio.TASK_STATUS_IGNORED):
    """Answer one JSON request per connection on the mount's control socket."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(4)
    task_status.started()

    async def handle(stream):
        async with stream:
            data = b""
            while not data.endswith(b"\n"):
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                data += chunk
            try:
                req = json.loads(data)
                if req.get("command") != "refresh":
                    raise ControlError(f"unknown request {req.get('command')!r}")
                msg = await refresher.refresh(req["domain"], req.get("since"), req.get("checkpoint"))
                reply = {"ok": True, "message": msg}
            except ControlError as e:
                reply = {"ok": False, "message": str(e)}
            except Exception as e:
                log.exception("control request failed")
                reply = {"ok": False, "message": f"internal error: {e}"}
            await stream.send_all(json.dumps(reply).encode() + b"\n")

    await trio.serve_listeners(handle, [trio.SocketListener(sock)])


def control_request(mountpoint: str, request: dict, timeout: float = 600) -> str:
    """Send a request to a mount's snapfs process; its answer, or MountError."""
    found = find_mount(mountpoint)
    if found is None or not found[1].get("control"):
        raise MountError(f"{mountpoint} is not a snapfs mount of libvirt domains")
    if not pid_alive(found[1].get("pid", 0)):
        raise MountError(f"the snapfs process of {mountpoint} is gone (snapfs umount cleans up)")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(found[1]["control"])
        s.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError as e:
        raise MountError(f"cannot reach the snapfs process of {mountpoint}: {e.strerror or e}") from None
    finally:
        s.close()
    try:
        reply = json.loads(data)
    except ValueError:
        raise MountError("the snapfs process gave no answer (see its log)") from None
    if not reply.get("ok"):
        raise MountError(reply.get("message", "refresh failed"))
    return reply.get("message", "")


async def _watch_mount(mountpoint: str, gone: trio.Event, scope: trio.CancelScope) -> None:
    """End the session when the mount leaves this mount namespace.

    A process started while the mount is live in a mount namespace of its own
    gets a copy of the mount (libvirt gives each qemu one; so does a service
    with a private /tmp). After ``fusermount3 -u`` here, that copy keeps the
    kernel's FUSE connection open, so the session never ends by itself;
    ending it here makes the copies fail cleanly.
    """
    while True:
        await trio.sleep(0.25)
        if mount_device(mountpoint) is None:
            log.info("%s was unmounted; ending the session (copies of the mount in other "
                     "mount namespaces, such as a VM started meanwhile, go with it)", mountpoint)
            gone.set()
            scope.cancel()
            return


async def _signals(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
        async for sig in sigs:
            log.info("got signal %d, unmounting", sig)
            scope.cancel()
            return


def _runtime_entries():
    for base in runtime_bases():
        try:
            names = os.listdir(base)
        except OSError:
            continue
        for name in names:
            yield base, name


def find_mount(mountpoint: str) -> tuple[str, dict] | None:
    mp = os.path.realpath(mountpoint)
    for base, name in _runtime_entries():
        path = os.path.join(base, name, "mount.json")
        try:
            with open(path) as f:
                info = json.load(f)
        except (OSError, ValueError):
            continue
        if os.path.realpath(info.get("mountpoint", "")) == mp:
            return os.path.dirname(path), info
    return None


def pid_alive(pid: int) -> bool:
    """True while pid runs; a zombie (exited, not yet reaped by its new
    parent, since a detached snapfs is nobody's child) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _is_our_qemu_nbd(pid: int, rundir: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().split(b"\0")
    except OSError:
        return False
    return bool(cmd) and os.path.basename(cmd[0]) == b"qemu-nbd" and any(
        a.startswith(b"--socket=" + os.fsencode(rundir)) for a in cmd)


def umount(mountpoint: str, timeout: float = 10.0) -> None:
    """Unmount, wait for the snapfs process, and stop any qemu-nbd it left."""
    found = find_mount(mountpoint)
    if is_mounted(mountpoint):
        r = subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True, text=True)
        if r.returncode != 0:
            msg = r.stderr.strip() or f"fusermount3 exited with {r.returncode}"
            raise MountError(f"cannot unmount {mountpoint}: {msg}")
    elif found is None:
        raise MountError(f"{mountpoint} is not a snapfs mount")
    if found is None:
        return
    rundir, info = found
    pid = info.get("pid")
    deadline = time.monotonic() + timeout
    while pid and pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid and pid_alive(pid):
        log.warning("snapfs pid %d did not exit after unmount, terminating it", pid)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    # A snapfs killed before it could clean up may leave servers behind,
    # and backup jobs (libvirt mode).
    names = os.listdir(rundir) if os.path.isdir(rundir) else []
    if info.get("control") and any(n.startswith("backup-") for n in names) and not pid_alive(pid):
        from .backup import abort_jobs_in
        abort_jobs_in(info["source"], rundir)
    for name in names:
        if not name.endswith(".pid"):
            continue
        try:
            with open(os.path.join(rundir, name)) as f:
                spid = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if _is_our_qemu_nbd(spid, rundir):
            try:
                os.kill(spid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    shutil.rmtree(rundir, ignore_errors=True)
