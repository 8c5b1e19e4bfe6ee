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

import errno
import functools
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time

import pyfuse3
import trio

from ..config import MountConfig
from ..data.exports import Exports
from ..data.maps import Maps
from ..data.status import BlockStatus
from ..data.writes import Writes
from ..errors import MountError, SourceError
from ..nbd.chunks import ChunkBudget
from ..nbd.pool import ServerPool
from ..nbd.qemu import stop_leftovers
from ..runtime import find_mount, is_mounted, mount_device, pid_alive, runtime_base
from ..sources import clean_up_after, make_sources
from ..sources.base import Scan
from .attrs import Attributes
from .control import Refresher, control_server
from .handles import Files
from .layout import Catalog
from .operations import HAS_LSEEK, Operations
from .partitions import Partitions
from .tree import Status, Tree

log = logging.getLogger(__name__)


class Mount:
    """Everything one mount is made of, wired together (the map: docs/design.md)."""

    def __init__(self, config: MountConfig, rundir: str, sources: list):
        self.config = config
        self.sources = sources
        self.tree = Tree(config.writable)
        self.tree.add_status()
        self.status = Status()
        self.catalog = Catalog(self.tree, self.status, sources)
        # One budget for the chunk caches of every export, however many are read at once.
        self.budget = ChunkBudget(config.cache_size << 20)
        self.pool = ServerPool(rundir, connections=config.connections, idle_timeout=config.idle_timeout,
                               budget=self.budget, retry_timeout=config.retry_timeout)
        # Maps of plain images are read from the files, but not in --rw mounts:
        # a writer's qemu-nbd may hold tables it has not written yet.
        self.block_status = BlockStatus(self.pool, from_files=not config.writable)
        self.writes = Writes(self.pool, self.block_status, self.catalog.views)
        self.maps = Maps(self.block_status, self.writes)
        self.files = Files(Exports(self.pool, self.writes, self.maps), self.maps, self.status)
        self.attrs = Attributes(self.tree, self.catalog, self.maps, self.writes, self.pool.spawn)
        self.partitions = Partitions(self.tree, self.status, config.mountpoint, self.block_status,
                                     self.pool.spawn, self.maps)
        self.ops = Operations(self.tree, self.catalog, self.files, self.attrs,
                              self.partitions)
        self.refresher = Refresher(self.catalog, self.files, self.pool, self.block_status)


async def serve(config: MountConfig, ready=None) -> None:
    """Mount, serve until unmounted or signalled, then stop every server."""
    mountpoint = os.path.realpath(config.mountpoint)
    if not os.path.isdir(mountpoint):
        raise MountError(f"mountpoint {mountpoint} is not a directory")
    if is_mounted(mountpoint):
        raise MountError(f"{mountpoint} is already a mount point")
    if shutil.which("qemu-nbd") is None:
        raise MountError("qemu-nbd not found (install qemu-utils, or run make setup)")

    # A libvirt backup job's socket is qemu's, which runs as its own user.
    searchable = any(s.kind != "images" for s in config.sources)
    rundir = tempfile.mkdtemp(prefix="m", dir=runtime_base(searchable=searchable))
    sources = []
    try:
        sources = make_sources(config, rundir)
        m = Mount(config, rundir, sources)
        for source in sources:
            try:
                await source.open()
                scan = await source.scan()
            except (MountError, SourceError) as e:
                if len(sources) == 1:
                    raise
                # One of several: the others are served; snapfs refresh tries it again.
                scan = Scan(units={}, problems=[("", str(e))])
            m.catalog.lay_out(source, scan)
        if not HAS_LSEEK:
            msg = ("this pyfuse3 has no lseek handler (build it with make setup): "
                   "SEEK_HOLE/SEEK_DATA see every file as all data")
            log.warning(msg)
            m.status.notes.append(msg)
        watchers = [(s, w) for s in sources if (w := s.watcher()) is not None]
        control = os.path.join(rundir, "control.sock")
        with open(os.path.join(rundir, "mount.json"), "w") as f:
            json.dump({"mountpoint": mountpoint, "pid": os.getpid(), "source": config.label,
                       "sources": [[s.kind, s.location] for s in config.sources],
                       "ssh_config": config.ssh_config,
                       "control": control, "log": config.log}, f)
        try:
            pyfuse3.init(m.ops, mountpoint, _fuse_options(config))
        except (RuntimeError, UnicodeError) as e:
            raise MountError(f"cannot mount {mountpoint}: {e}{_fuse_hint()}") from None
        gone = trio.Event()  # the mount left this process's mount table
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(m.pool.run)
                nursery.start_soon(_signals, nursery.cancel_scope)
                for source, watch in watchers:
                    nursery.start_soon(watch, functools.partial(m.refresher.refresh, source=source),
                                       lambda: bool(m.refresher.pending),
                                       functools.partial(_set_notes, m.status, "--watch: "))
                await nursery.start(control_server, control, m.refresher)
                nursery.start_soon(_watch_mount, mountpoint, gone, nursery.cancel_scope)
                log.info("mounted %s on %s%s", config.label, mountpoint,
                         " (writable: --rw)" if config.writable else "")
                if ready is not None:
                    ready()
                await pyfuse3.main()
                # main() returns when the kernel ended the session (fusermount3 -u).
                gone.set()
                nursery.cancel_scope.cancel()
        finally:
            pyfuse3.close(unmount=not gone.is_set())
            m.partitions.close()  # its qemu-io processes
            log.info("unmounted %s", mountpoint)
    finally:
        # The servers are stopped (the pool's nursery is done): end what the sources started.
        with trio.CancelScope(shield=True):
            # libvirt's first: their backup jobs end through a connection a
            # source on the same host would otherwise close under them.
            for source in sorted(sources, key=lambda s: s.kind != "libvirt"):
                await trio.to_thread.run_sync(source.close)
        shutil.rmtree(rundir, ignore_errors=True)


def _fuse_options(config: MountConfig) -> set[str]:
    """The FUSE mount options of a mount.

    The kernel checks every access against the owner, group and mode each
    node takes from its images (fs/access.py), for the mounting user too: a
    mount never widens access. fsname: the source as given, as mount(8),
    findmnt and fstab know it (fuse takes ASCII options only: "snapfs"
    otherwise). Views never need devices, set-uid or execution.
    """
    given = config.label
    fsname = given.replace("\\", "\\\\").replace(",", "\\,") if given.isascii() else "snapfs"
    options = {f"fsname={fsname}", "subtype=snapfs", "default_permissions", "nosuid", "nodev", "noexec"}
    if not config.writable:
        options.add("ro")
    if config.allow_other:
        options.add("allow_other")
    if config.debug_fuse:
        options.add("debug")
    return options


def _set_notes(status: Status, prefix: str, notes: list[str]) -> None:
    """Replace the status file's notes that start with ``prefix``."""
    status.notes = [n for n in status.notes if not n.startswith(prefix)] + list(notes)


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


def in_use(mountpoint: str, pid: int | None) -> list[dict]:
    """The open files of a live mount, and who opened them. A snapfs that is
    gone has none; one that runs but cannot say: MountError."""
    from .control import control_request
    if not pid or not pid_alive(pid):
        return []
    try:
        return json.loads(control_request(mountpoint, {"command": "in-use"}, timeout=10))
    except (MountError, ValueError) as e:
        raise MountError(f"cannot ask the snapfs of {mountpoint} which of its files are open ({e}): "
                         "unmount anyway with snapfs umount --force") from None


def describe_in_use(files: list[dict]) -> str:
    lines = []
    for f in files:
        if not f["pid"]:
            who = "a process snapfs cannot see (another PID namespace)"
        else:
            who = f"{f['process'] or 'a process now gone'} (pid {f['pid']})"
        lines.append(f"  {f['path']}: opened by {who}")
    return "\n".join(lines)


def aborted(mountpoint: str, timeout: float = 2.0) -> bool:
    """True when the kernel says the mount's FUSE connection is gone (its
    snapfs died): statfs, which the kernel never answers from its caches,
    fails with ENOTCONN. A mount that answers, or does not answer within
    ``timeout`` (a snapfs alive but stuck), is not."""
    answer: list[int] = []

    def ask():
        try:
            os.statvfs(mountpoint)
            answer.append(0)
        except OSError as e:
            answer.append(e.errno)

    t = threading.Thread(target=ask, daemon=True)
    t.start()
    t.join(timeout)
    return answer == [errno.ENOTCONN]


def umount(mountpoint: str, timeout: float = 10.0, force: bool = False) -> list[dict]:
    """Unmount, wait for the snapfs process, and stop any qemu-nbd it left.

    A mount with open files is left working (MountError naming them and who
    opened them): a VM booted from a view would lose its disk, even in its
    own mount namespace. ``force`` unmounts anyway; the open files are
    returned, for the caller to say what breaks.
    """
    found = find_mount(mountpoint)
    # A mount whose snapfs is gone answers no one: detaching it loses nothing,
    # even where a process (a VM paused on it) still holds one of its files.
    pid = found[1].get("pid") if found is not None else None
    dead = bool(pid) and not pid_alive(pid) and aborted(mountpoint)
    busy = []
    if found is not None and is_mounted(mountpoint):
        try:
            busy = in_use(mountpoint, found[1].get("pid"))
        except MountError:
            if not force:
                raise
    if busy and not force:
        raise MountError(f"{mountpoint} is in use: {len(busy)} file(s) open, and whoever reads them would get "
                         f"I/O errors from now on:\n{describe_in_use(busy)}\nclose them (for a VM: shut it "
                         "down, or move its disk home with virsh blockcopy --pivot), or unmount anyway with "
                         "snapfs umount --force")
    if is_mounted(mountpoint):
        # --force, or a dead mount: detached even where it is busy (-z); a
        # snapfs still running is stopped below.
        r = subprocess.run(["fusermount3", "-u", *(["-z"] if force or dead else []), mountpoint],
                           capture_output=True, text=True)
        if r.returncode != 0:
            msg = r.stderr.strip() or f"fusermount3 exited with {r.returncode}"
            hint = "; files of it are open here: close them, or snapfs umount --force" \
                if "busy" in msg.lower() and not force else ""
            raise MountError(f"cannot unmount {mountpoint}: {msg}{hint}")
    elif found is None:
        raise MountError(f"{mountpoint} is not a snapfs mount")
    if found is None:
        return busy
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
    # and what its sources started (libvirt's backup jobs).
    if not pid_alive(pid):
        clean_up_after(info, rundir)
    stop_leftovers(rundir)
    shutil.rmtree(rundir, ignore_errors=True)
    return busy
