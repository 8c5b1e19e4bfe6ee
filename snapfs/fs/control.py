"""``snapfs refresh``: a mount's control socket and the request that uses it.

Every mount listens on ``control.sock`` in its runtime directory (0600) for
one JSON request per connection; ``snapfs refresh MOUNTPOINT [DOMAIN]``
sends it and prints the answer. A libvirt mount refreshes one domain
(``Refresher``), an image-directory mount scans its directory again
(``ImageRefresher``; ``--watch`` runs it on inotify events).
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import socket
import time
from typing import TYPE_CHECKING

import pyfuse3
import trio

from ..errors import ControlError, MountError, SourceError
from ..runtime import find_mount, pid_alive
from ..sources.imagedir import ImageDirectory
from .layout import add_disk, disk_signature, layout, set_status

if TYPE_CHECKING:
    from ..nbd.pool import ServerPool
    from .operations import Operations
    from .tree import Status, Tree

log = logging.getLogger(__name__)


class Refresher:
    """``snapfs refresh``: a new point in time for one domain, without remounting."""

    def __init__(self, source, tree: Tree, status: Status, ops: Operations, pool: ServerPool):
        self.source = source
        self.tree = tree
        self.status = status
        self.ops = ops
        self.pool = pool
        self.lock = trio.Lock()

    async def refresh(self, domain: str | None, since: str | None, checkpoint: str | None) -> str:
        if domain is None:
            raise ControlError("a libvirt mount is refreshed one domain at a time: "
                               "snapfs refresh MOUNTPOINT DOMAIN")
        async with self.lock:
            old = self.source.plans.get(domain)
            if old is None:
                raise ControlError(f"domain {domain!r} is not in this mount")
            prefix = old.dirname
            busy = await wait_closed(self.ops, prefix)
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


async def wait_closed(ops: Operations, prefix: str) -> int:
    """How many files under ``prefix`` stay open; the kernel sends RELEASE
    after close() returns, so they get a moment to go."""
    busy = ops.open_files(prefix)
    with trio.move_on_after(1):
        while busy:
            await trio.sleep(0.02)
            busy = ops.open_files(prefix)
    return busy


RETIRED = ("changed since the mount (or the last refresh): laid out anew once its open files are "
           "closed (snapfs refresh)")


def _nested(a: str, b: str) -> bool:
    return a.startswith(b + "/") or b.startswith(a + "/")


class ImageRefresher:
    """``snapfs refresh MOUNTPOINT`` of an image-directory mount: scan it again.

    A disk whose images are as they were (same files, times, sizes, backing
    files, bitmaps) keeps its views and their maps. A new leaf appears; a
    disk that is gone, or whose images changed, is laid out anew once none
    of its files is open (its old servers are stopped first, so a reader
    never sees new data through an old map). ``pending`` names the disks
    that were left as they were because files were open.
    """

    def __init__(self, root: str, allow_outside: bool, tree: Tree, status: Status, ops: Operations,
                 pool: ServerPool, disks: dict):
        self.root = root
        self.allow_outside = allow_outside
        self.tree = tree
        self.status = status
        self.ops = ops
        self.pool = pool
        self.disks = disks
        self.pending: list[str] = []
        self.lock = trio.Lock()

    async def refresh(self, domain: str | None = None, since: str | None = None,
                      checkpoint: str | None = None) -> str:
        if domain is not None or since is not None or checkpoint is not None:
            raise ControlError("an image-directory mount is scanned again whole: snapfs refresh MOUNTPOINT")
        async with self.lock:
            scan = await trio.to_thread.run_sync(
                lambda: ImageDirectory(self.root, allow_outside=self.allow_outside).scan())
            new = {d.relpath: d for d in scan.disks}
            candidates = []
            for rel in sorted(set(self.disks) | set(new)):
                old, disk = self.disks.get(rel), new.get(rel)
                if old is not None and disk is not None and old.signature == disk_signature(disk):
                    continue
                candidates.append((rel, old, disk))
            # Before anything waits: the views of a disk that changed take no new
            # opens (their maps may no longer be true); open files read on.
            for _, old, _ in candidates:
                for v in old.views if old is not None else ():
                    if v.problem is None:
                        v.problem = RETIRED
                        self._invalidate(v)
            replace, busy, waiting = [], [], []
            for rel, old, disk in candidates:
                if old is not None and (n := await wait_closed(self.ops, rel)):
                    busy.append(f"{rel} ({n} file(s) open)")
                    waiting.append(rel)
                    continue
                replace.append((rel, old, disk))
            # A disk whose directory lies inside a waiting one's (or holds it) waits with it.
            for rel, old, disk in list(replace):
                if any(_nested(rel, w) for w in waiting):
                    replace.remove((rel, old, disk))
                    busy.append(f"{rel} (inside {next(w for w in waiting if _nested(rel, w))}, which waits)")
            staying = {s for rel, e in self.disks.items() if rel not in {r for r, _, _ in replace}
                       for v in e.views for s in v.specs()}
            await self.pool.discard({s for _, old, _ in replace if old is not None
                                     for v in old.views for s in v.specs()} - staying)
            # Block status read before is stale for every image of a disk laid out anew,
            # whoever else reads it (a base shared with a disk that waits).
            for _, old, disk in replace:
                for d in (old.disk if old is not None else None, disk):
                    for lay in d.chain if d is not None else ():
                        self.pool.forget_runs(lay.node[0])
            added = removed = changed = 0
            for rel, old, disk in replace:
                if old is not None:
                    self._remove(rel)
                    del self.disks[rel]
                if disk is not None:
                    self.disks[rel] = add_disk(self.tree, scan.root, disk)
                added += old is None
                removed += disk is None
                changed += old is not None and disk is not None
            set_status(self.status, scan, self.disks)
            self.pending = busy
        msg = f"{len(self.disks)} disk(s): {added} new, {changed} changed, {removed} gone"
        log.info("refresh of %s: %s%s", self.root, msg, f"; not now: {', '.join(busy)}" if busy else "")
        for path, reason in self.status.problems:
            log.debug("not available: %s: %s", path, reason)
        if busy:
            raise ControlError(f"{msg}; left as they were, files open: {', '.join(busy)}")
        return msg

    def _remove(self, rel: str) -> None:
        """Take a disk out of the tree, and directories left empty above it."""
        node = self.tree.remove(rel)
        while node is not None:
            parent = node.parent
            try:
                pyfuse3.invalidate_entry_async(parent.inode, os.fsencode(node.name), ignore_enoent=True)
            except Exception:
                log.debug("invalidating %s failed", rel, exc_info=True)
            if parent is self.tree.root or parent.children:
                break
            node = self.tree.remove(parent.path)

    def _invalidate(self, view) -> None:
        """The kernel forgets the names of a view's files (lookups come back: ENOENT)."""
        node = self.tree.find(f"{view.disk.relpath}/{view.folder}")
        if node is None:
            return
        for name in (view.filename, view.qcow2_filename, view.map_filename):
            try:
                pyfuse3.invalidate_entry_async(node.inode, os.fsencode(name), ignore_enoent=True)
            except Exception:
                log.debug("invalidating %s failed", name, exc_info=True)

# inotify(7): what changes an image directory's disks. Opens for reading
# (qemu-nbd's) and writes still going on are not events: a tool's close is.
_IN_ATTRIB, _IN_CLOSE_WRITE, _IN_MOVED_FROM, _IN_MOVED_TO = 0x4, 0x8, 0x40, 0x80
_IN_CREATE, _IN_DELETE, _IN_DELETE_SELF, _IN_MOVE_SELF = 0x100, 0x200, 0x400, 0x800
_IN_ONLYDIR = 0x01000000
WATCH_EVENTS = (_IN_ATTRIB | _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE
                | _IN_DELETE_SELF | _IN_MOVE_SELF)
WATCH_QUIET = 1.0  # seconds without events before a rescan (qemu-img create -b writes twice)
WATCH_RETRY = 2.0  # seconds between rescans while files of changed disks are open


class Inotify:
    """An inotify instance watching every directory under a root (libc through ctypes)."""

    def __init__(self, root: str):
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.root = root
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}"
                          + (" (fs.inotify.max_user_instances reached)" if err == errno.EMFILE else ""))
        self.unwatched: dict[str, str] = {}
        self.add_all()

    def add_all(self) -> None:
        """Watch the root and every directory under it (new ones before each rescan)."""
        self.unwatched = {}
        for dirpath, dirnames, _ in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
            if self._libc.inotify_add_watch(self.fd, os.fsencode(dirpath), WATCH_EVENTS | _IN_ONLYDIR) < 0:
                err = ctypes.get_errno()
                self.unwatched[dirpath] = os.strerror(err) + (
                    " (fs.inotify.max_user_watches reached)" if err == errno.ENOSPC else "")

    def drain(self) -> bool:
        """Read every pending event; True if there was any."""
        got = False
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return got
            got = got or bool(data)
            if not data:
                return got

    async def wait(self) -> None:
        await trio.lowlevel.wait_readable(self.fd)
        self.drain()

    def close(self) -> None:
        os.close(self.fd)


async def watch_images(refresher: ImageRefresher, watch: Inotify) -> None:
    """``--watch``: rescan the image directory after each burst of changes.

    A rescan waits for WATCH_QUIET seconds without events; disks left as they
    were because their files were open are tried again every WATCH_RETRY
    seconds until they are closed.
    """
    log.info("watching %s for changes", refresher.root)
    _report_unwatched(refresher, watch)
    try:
        while True:
            if refresher.pending:
                with trio.move_on_after(WATCH_RETRY):
                    await watch.wait()
            else:
                await watch.wait()
            while True:
                with trio.move_on_after(WATCH_QUIET) as quiet:
                    await watch.wait()
                if quiet.cancelled_caught:
                    break
            # New directories are watched before the scan: nothing made in them is missed.
            await trio.to_thread.run_sync(watch.add_all)
            _report_unwatched(refresher, watch)
            try:
                await refresher.refresh()
            except ControlError as e:
                log.info("%s", e)
            except Exception:
                log.exception("rescan of %s failed", refresher.root)
    finally:
        watch.close()


def _report_unwatched(refresher: ImageRefresher, watch: Inotify) -> None:
    notes = [n for n in refresher.status.notes if not n.startswith("--watch: ")]
    if watch.unwatched:
        path, why = next(iter(watch.unwatched.items()))
        msg = (f"--watch: {len(watch.unwatched)} directory(ies) not watched, changes there need "
               f"snapfs refresh: {path}: {why}")
        if msg not in refresher.status.notes:
            log.warning("%s", msg)
        notes.append(msg)
    refresher.status.notes = notes


async def control_server(path: str, refresher: Refresher, *, task_status=trio.TASK_STATUS_IGNORED):
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
                msg = await refresher.refresh(req.get("domain"), req.get("since"), req.get("checkpoint"))
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
        raise MountError(f"{mountpoint} is not a snapfs mount (or its snapfs is too old to refresh)")
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
