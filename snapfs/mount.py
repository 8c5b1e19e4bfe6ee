"""A mount's life: runtime directory, scan, FUSE session, servers, teardown.

``serve()`` runs in the foreground process. ``snapfs mount`` without
``--foreground`` starts that process detached and returns once it reports the
mount live (or reports why it could not be).

Each mount has a private 0700 runtime directory under the user's runtime base
(``$XDG_RUNTIME_DIR/snapfs`` or ``/tmp/snapfs-UID``), holding the qemu-nbd
sockets and pid files and ``mount.json`` (mountpoint, pid, log file), which
``snapfs umount`` uses to stop the mount and clean up after a crash.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
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


class MountError(Exception):
    """A mount that cannot be made; the message is for the user."""


def runtime_base() -> str:
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    base = os.path.join(xdg, "snapfs") if xdg and os.path.isdir(xdg) else f"/tmp/snapfs-{os.getuid()}"
    try:
        os.mkdir(base, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(base)
    if not os.path.isdir(base) or os.path.islink(base) or st.st_uid != os.getuid():
        raise MountError(f"runtime directory {base} is not a directory owned by you")
    if st.st_mode & 0o077:
        os.chmod(base, 0o700)
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


async def serve(args, ready=None) -> None:
    """Mount, serve until unmounted or signalled, then stop every server."""
    mountpoint = os.path.realpath(args.mountpoint)
    if not os.path.isdir(mountpoint):
        raise MountError(f"mountpoint {mountpoint} is not a directory")
    if is_mounted(mountpoint):
        raise MountError(f"{mountpoint} is already a mount point")
    images = os.path.abspath(args.images)
    if not os.path.isdir(images):
        raise MountError(f"image directory {images} is not a directory")
    if shutil.which("qemu-nbd") is None:
        raise MountError("qemu-nbd not found (install qemu-utils, or run make setup)")

    rundir = tempfile.mkdtemp(prefix="m", dir=runtime_base())
    try:
        tree, status = build_tree(images, args.allow_outside_backing)
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
        with open(os.path.join(rundir, "mount.json"), "w") as f:
            json.dump({"mountpoint": mountpoint, "pid": os.getpid(), "images": images,
                       "log": getattr(args, "log", None)}, f)
        try:
            pyfuse3.init(ops, mountpoint, options)
        except RuntimeError as e:
            raise MountError(f"cannot mount {mountpoint}: {e}") from None
        unmount = True
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(pool.run)
                nursery.start_soon(_signals, nursery.cancel_scope)
                log.info("mounted %s on %s", images, mountpoint)
                if ready is not None:
                    ready()
                await pyfuse3.main()
                # main() returns when the kernel ended the session (fusermount3 -u).
                unmount = False
                nursery.cancel_scope.cancel()
        finally:
            pyfuse3.close(unmount=unmount)
            log.info("unmounted %s", mountpoint)
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


async def _signals(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
        async for sig in sigs:
            log.info("got signal %d, unmounting", sig)
            scope.cancel()
            return


def find_mount(mountpoint: str) -> tuple[str, dict] | None:
    mp = os.path.realpath(mountpoint)
    base = runtime_base()
    for name in os.listdir(base):
        path = os.path.join(base, name, "mount.json")
        try:
            with open(path) as f:
                info = json.load(f)
        except (OSError, ValueError):
            continue
        if os.path.realpath(info.get("mountpoint", "")) == mp:
            return os.path.dirname(path), info
    return None


def _pid_alive(pid: int) -> bool:
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
    while pid and _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid and _pid_alive(pid):
        log.warning("snapfs pid %d did not exit after unmount, terminating it", pid)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    # A snapfs killed before it could clean up may leave servers behind.
    for name in os.listdir(rundir) if os.path.isdir(rundir) else []:
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
