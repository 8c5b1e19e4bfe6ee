"""``snapfs refresh``: a mount's control socket, and the refresh of its sources.

Every mount listens on ``control.sock`` in its runtime directory (0600) for
one JSON request per connection: ``refresh`` (``snapfs refresh MOUNTPOINT
[DOMAIN]`` sends it and prints the answer) and ``in-use`` (the open files
and who opened them: ``snapfs umount`` refuses while there are any). ``Refresher`` carries it out the same way
for every kind of source: the source says which of its units change
(``sources/base.py``, ``plan_refresh``), and the refresher replaces them
once their files are closed, stopping their servers first so a reader never
sees new data through an old map. ``--watch`` runs the same refresh.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from typing import TYPE_CHECKING

import pyfuse3
import trio

from ..errors import ControlError, MountError, SourceError
from ..runtime import find_mount, pid_alive
from ..sources.base import Refresh, Unit
from .layout import Catalog, Laid

if TYPE_CHECKING:
    from ..data.status import BlockStatus
    from ..nbd.pool import ServerPool
    from .handles import Files

log = logging.getLogger(__name__)

RETIRED = ("changed since the mount (or the last refresh): laid out anew once its open files are "
           "closed (snapfs refresh)")


def _nested(a: str, b: str) -> bool:
    return a.startswith(b + "/") or b.startswith(a + "/")


def _invalidate(parent, name: str) -> None:
    """The kernel forgets a name (its next lookup comes back: ENOENT, or the new node)."""
    try:
        pyfuse3.invalidate_entry_async(parent.inode, os.fsencode(name), ignore_enoent=True)
    except Exception:
        log.debug("invalidating %s failed", name, exc_info=True)


class Refresher:
    """``snapfs refresh``: lay out anew what changed in a source, without remounting."""

    def __init__(self, catalog: Catalog, files: Files, pool: ServerPool, status: BlockStatus):
        self.catalog = catalog
        self.files = files
        self.pool = pool
        self.status = status
        self.pending: list[str] = []  # units left as they were: their files were open
        self.lock = trio.Lock()

    async def refresh(self, request: Refresh | None = None, source=None) -> str:
        """Refresh ``source`` as ``request`` asks (the whole source by default);
        without one, every source (a domain's request: every libvirt source).
        Each source's answer on its own line, its folder first, when there
        are several; ControlError if any failed, after all were tried."""
        request = request or Refresh()
        if source is not None or len(self.catalog.laid) == 1:
            lay = self.catalog.of(source) if source is not None else self.catalog.laid[0]
            return await self._refresh(lay, request)
        answers, failed = [], False
        for lay in self.catalog.laid:
            if request.domain is not None and lay.source.kind != "libvirt":
                continue
            try:
                answers.append(f"{lay.prefix} {await self._refresh(lay, request)}")
            except ControlError as e:
                answers.append(f"{lay.prefix} {e}")
                failed = True
        if failed:
            raise ControlError("\n".join(answers))
        return "\n".join(answers)

    async def _refresh(self, lay: Laid, request: Refresh) -> str:
        async with self.lock:
            try:
                plan = await lay.source.plan_refresh(request, dict(lay.units))
            except SourceError as e:
                # The source cannot be read now (a host out of reach): it says so; what
                # it showed stays, its reads failing until a refresh reaches it.
                self.catalog.set_problems(lay, [("", str(e))], lay.notes)
                raise ControlError(str(e)) from None
            if plan.problems is not None or plan.notes is not None:
                self.catalog.set_problems(lay, lay.problems if plan.problems is None else plan.problems,
                                          lay.notes if plan.notes is None else plan.notes)
            old = {k: lay.units[k] for k in plan.keys if k in lay.units}
            if plan.retire:
                # Before anything waits: the views of a unit that changed take no new
                # opens (their maps may no longer be true); open files read on.
                for unit in old.values():
                    for v in unit.views:
                        if v.problem is None:
                            v.problem = RETIRED
                            self._forget_names(lay, v)
            busy: dict[str, str] = {}
            for key in old:
                if n := await self.wait_closed(lay.prefix + key):
                    busy[key] = f"{key} ({n} file(s) open)"
            if busy and plan.all_or_nothing:
                return plan.answer([], busy)
            replace = [k for k in plan.keys if k not in busy]
            # A unit whose directory lies inside a waiting one's (or holds it) waits with it.
            for key in list(replace):
                inside = next((w for w in busy if _nested(key, w)), None)
                if inside is not None:
                    replace.remove(key)
                    busy[key] = f"{key} (inside {inside}, which waits)"
            await self._stop(lay, [old[k] for k in replace if k in old])
            try:
                new = await plan.build(replace)
            except SourceError as e:
                for key in replace:
                    self._replace(lay, key, Unit(key=key, dirs=[(key, None)],
                                                 missing=[(key, f"refresh failed: {e}")]))
                raise ControlError(str(e)) from None
            # Block status read before is stale for every image of a unit laid out
            # anew, whoever else reads it (a base shared with a unit that waits).
            for unit in new.values():
                for v in unit.views:
                    for s in v.specs():
                        self.status.forget(s.image)
            for key in replace:
                self._replace(lay, key, new.get(key))
            self.pending = list(busy.values())
        return plan.answer(replace, busy)

    async def wait_closed(self, prefix: str) -> int:
        """How many files under ``prefix`` stay open; the kernel sends RELEASE
        after close() returns, so they get a moment to go."""
        busy = self.files.open_files(prefix)
        with trio.move_on_after(1):
            while busy:
                await trio.sleep(0.02)
                busy = self.files.open_files(prefix)
        return busy

    async def _stop(self, lay: Laid, units: list[Unit]) -> None:
        """Stop the servers of the units going away (what other units use too stays),
        and forget the block status of their images."""
        going = {id(u) for u in units}
        staying = {s for l2 in self.catalog.laid for u in l2.units.values() if id(u) not in going
                   for v in u.views for s in v.specs()}
        specs = {s for u in units for v in u.views for s in v.specs()}
        await self.pool.discard(specs - staying)
        for spec in specs:
            if spec.socket is None:
                self.status.forget(spec.image)
            else:
                self.status.forget_export(spec)

    def _replace(self, lay: Laid, key: str, unit: Unit | None) -> None:
        """Take the unit at ``key`` out of the tree (if any) and put ``unit`` there."""
        for parent, name in self.catalog.remove(lay, key):
            _invalidate(parent, name)
        if unit is not None:
            self.catalog.add(lay, unit)

    def _forget_names(self, lay: Laid, view) -> None:
        """The kernel forgets the names of a view's files (lookups come back: ENOENT)."""
        node = self.catalog.tree.find(f"{lay.prefix}{view.disk.relpath}/{view.folder}")
        if node is not None:
            for name in (view.filename, view.qcow2_filename, view.map_filename):
                _invalidate(node, name)


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
                try:
                    chunk = await stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                if not chunk:
                    return
                data += chunk
            try:
                req = json.loads(data)
                if req.get("command") == "in-use":
                    reply = {"ok": True, "message": json.dumps(refresher.files.in_use())}
                elif req.get("command") == "refresh":
                    msg = await refresher.refresh(Refresh(req.get("domain"), req.get("since"),
                                                          req.get("checkpoint")))
                    reply = {"ok": True, "message": msg}
                else:
                    raise ControlError(f"unknown request {req.get('command')!r}")
            except ControlError as e:
                reply = {"ok": False, "message": str(e)}
            except Exception as e:
                log.exception("control request failed")
                reply = {"ok": False, "message": f"internal error: {e}"}
            try:
                await stream.send_all(json.dumps(reply).encode() + b"\n")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                # The client gave up waiting (timed out, killed): the mount goes on.
                log.info("control client left before its answer: %s", reply.get("message", "")[:200])

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
