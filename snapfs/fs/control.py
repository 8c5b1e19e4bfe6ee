"""``snapfs refresh``: a mount's control socket and the request that uses it.

A libvirt mount listens on ``control.sock`` in its runtime directory (0600)
for one JSON request per connection; ``snapfs refresh MOUNTPOINT DOMAIN``
sends it and prints the answer.
"""

from __future__ import annotations

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
from .layout import layout

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

    async def refresh(self, domain: str, since: str | None, checkpoint: str | None) -> str:
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
