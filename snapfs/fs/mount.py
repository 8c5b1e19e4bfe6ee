"""A mount's life: runtime directory, scan, FUSE session, servers, teardown.

``serve()`` runs in the foreground process. ``snapfs mount`` without
``--foreground`` starts that process detached and returns once it reports the
mount live (or reports why it could not be).

The mount owns, in one nursery, the server pool (every qemu-nbd), the signal
handler, the mount-table watcher and (libvirt) the control server; it tears
them down in that order, then ends the source's backup jobs. Its runtime
directory and ``mount.json`` are described in ``runtime.py``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time

import pyfuse3
import trio

from ..errors import MountError, SourceError
from ..nbd.pool import ServerPool
from ..nbd.qemu import stop_leftovers
from ..runtime import find_mount, is_mounted, mount_device, pid_alive, runtime_base
from .control import ImageRefresher, Inotify, Refresher, control_server, watch_images
from .layout import build_tree, layout
from .operations import HAS_LSEEK, Operations
from .tree import Status, Tree

log = logging.getLogger(__name__)


LIBVIRT_OPEN_TIMEOUT = 30  # seconds for libvirt to accept a connection


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
            tree, status, disks = build_tree(images, args.allow_outside_backing, args.rw)
        else:
            what = args.connect
            source, tree, status = await _libvirt_tree(args, rundir)
        if not HAS_LSEEK:
            msg = ("this pyfuse3 has no lseek handler (build it with make setup): "
                   "SEEK_HOLE/SEEK_DATA see every file as all data")
            log.warning(msg)
            status.notes.append(msg)
        pool = ServerPool(rundir, connections=args.connections, idle_timeout=args.idle_timeout,
                          local_status=not args.rw)
        ops = Operations(tree, pool, status)
        # The kernel checks every access against the owner, group and mode
        # each node takes from its images (fs/access.py), for the mounting
        # user too: a mount never widens access.
        # fsname: the source as given, as mount(8), findmnt and fstab know it
        # (fuse takes ASCII options only: "snapfs" otherwise). Views never
        # need devices, set-uid or execution.
        given = args.images if images is not None else what
        fsname = given.replace("\\", "\\\\").replace(",", "\\,") if given.isascii() else "snapfs"
        options = {f"fsname={fsname}", "subtype=snapfs", "default_permissions", "nosuid", "nodev",
                   "noexec"}
        if not args.rw:
            options.add("ro")
        if args.allow_other:
            options.add("allow_other")
        if args.debug_fuse:
            options.add("debug")
        watch = None
        if getattr(args, "watch", False) and images is not None:
            try:
                watch = Inotify(images)
            except OSError as e:
                raise MountError(f"--watch: cannot watch {images}: {e.strerror or e}") from None
        control = os.path.join(rundir, "control.sock")
        with open(os.path.join(rundir, "mount.json"), "w") as f:
            json.dump({"mountpoint": mountpoint, "pid": os.getpid(), "source": what,
                       "control": control,
                       "log": getattr(args, "log", None)}, f)
        try:
            pyfuse3.init(ops, mountpoint, options)
        except (RuntimeError, UnicodeError) as e:
            raise MountError(f"cannot mount {mountpoint}: {e}{_fuse_hint()}") from None
        gone = trio.Event()  # the mount left this process's mount table
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(pool.run)
                nursery.start_soon(_signals, nursery.cancel_scope)
                if source is not None:
                    refresher = Refresher(source, tree, status, ops, pool)
                else:
                    refresher = ImageRefresher(images, args.allow_outside_backing, tree, status, ops,
                                               pool, disks)
                    if watch is not None:
                        nursery.start_soon(watch_images, refresher, watch)
                await nursery.start(control_server, control, refresher)
                nursery.start_soon(_watch_mount, mountpoint, gone, nursery.cancel_scope)
                log.info("mounted %s on %s%s", what, mountpoint, " (writable: --rw)" if args.rw else "")
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


def _fuse_hint() -> str:
    """Why FUSE may have refused, when it can be told: /dev/fuse out of reach."""
    if os.access("/dev/fuse", os.R_OK | os.W_OK):
        return ""
    try:
        st = os.stat("/dev/fuse")
    except OSError:
        return " (/dev/fuse is missing: load the fuse module)"
    return (f" (/dev/fuse is mode {stat.filemode(st.st_mode)}, owner {st.st_uid}:{st.st_gid}; "
            "where no udev gives it mode 0666, make setup run as root does)")


async def _libvirt_tree(args, rundir: str):
    try:
        from ..sources.libvirt import LibvirtSource
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
    tree = Tree(args.rw)
    status = Status(args.connect)
    tree.add_status()
    for plan in plans:
        layout(tree, status, plan)
    if not plans:
        status.notes.append(f"no domains at {args.connect}")
    return source, tree, status


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
        from ..sources.backup import abort_jobs_in
        abort_jobs_in(info["source"], rundir)
    stop_leftovers(rundir)
    shutil.rmtree(rundir, ignore_errors=True)
