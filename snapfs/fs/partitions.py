"""``partitions/NAME/``: the partitions of a chain view, read when first looked into.

The partition table is read by util-linux's ``sfdisk --json`` run on the
chain view's own file in the mount (its bytes are the disk's at that point,
served by this process meanwhile), never by a reader of snapfs's. Nothing is
read until a ``partitions/`` folder is listed or looked into.

Most disks of a backup repository need no sfdisk at all: every label sfdisk
reads (dos, gpt with its protective MBR, sun, sgi, bsd) has its magic in the
disk's first kilobyte, so that kilobyte is read first, through qemu, by a
long-lived qemu-io (``nbd/heads.py``) instead of a qemu-nbd per point. The
maps say where it comes from: an area that reads as zero needs no read at
all, and an area that one layer holds is read from that layer alone, once
for every point above it that still shows it. Only a disk with a magic there
is handed to sfdisk.

Linux's numbering is kept: GPT entries 1..N, MBR primaries 1-4 and logical
partitions from 5. An MBR extended partition (a container of logical ones)
gets no file. What cannot be trusted is left out and said in the status
file: an entry past the end of the disk, an entry overlapping an earlier
one, and whatever sfdisk warns about; a disk with no partition table has an
empty folder.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess

import trio

from .. import extents as ex
from ..formats import check_pinned, json_node
from ..nbd.contexts import ALLOCATION_DEPTH, BASE_ALLOCATION
from ..nbd.heads import HeadError, Heads
from ..views.partition import EXTENDED_TYPES, PartitionView
from .tree import Directory, PartitionFolder, Status, Tree

log = logging.getLogger(__name__)

SFDISK_TIMEOUT = 60.0
SFDISK_AT_ONCE = 4  # sfdisk runs in flight (each reads through this mount)
NO_TABLE = "does not contain a recognized partition table"
HEAD = 1024  # the bytes looked at for a label's magic
HEADS_IDLE = 2.0  # seconds without a request before the qemu-io processes end


def may_hold_label(head: bytes) -> bool:
    """Whether sfdisk could find a partition table on a disk that starts with
    ``head`` (HEAD bytes): the magic numbers libfdisk's labels check first."""
    return (head[510:512] == b"\x55\xaa"  # dos, and gpt (libfdisk wants its protective MBR)
            or head[508:510] == b"\xda\xbe"  # sun
            or head[0:4] == b"\x0b\xe5\xa9\x41"  # sgi
            or b"\x57\x45\x56\x82" in (head[512:516], head[576:580]))  # bsd, in sector 1


class Partitions:
    """Fills partition folders; ``mountpoint``: where the chain views are read;
    ``block_status``: the exports' runs (where a disk's first bytes come from);
    ``spawn``: starts background tasks (a listed ``partitions/`` fills its folders);
    ``maps``: the views' maps (a chain view's, read before its first bytes are)."""

    def __init__(self, tree: Tree, status: Status, mountpoint: str, block_status, spawn, maps):
        self.tree = tree
        self.status = status
        self.mountpoint = os.path.abspath(mountpoint)
        self.block_status = block_status
        self.spawn = spawn
        self.maps = maps
        self._locks: dict[PartitionFolder, trio.Lock] = {}
        self._heads: dict[int, Heads] = {}  # id(host) -> its qemu-io processes
        # (host, layers, their stats) -> whether a label's magic is there; pending: an Event.
        self._labels: dict[tuple, bool | trio.Event] = {}
        self._sfdisk = trio.CapacityLimiter(SFDISK_AT_ONCE)

    def prefetch(self, node: Directory) -> None:
        """A folder is listed. ``partitions/``: fill its folders in the
        background (``ls -lR`` looks into each of them next). A disk's
        directory: look at its points' first kilobytes in the background
        (``ls -lR`` lists chain/ and layers/ meanwhile, whose maps say where
        those bytes are); nothing more, no sfdisk runs."""
        folders = node.children.get("partitions") if node.name != "partitions" else node
        if not isinstance(folders, Directory):
            return
        work = self._fill_quietly if folders is node else self._look_quietly
        for child in folders.children.values():
            if isinstance(child, PartitionFolder) and not child.filled and not child.hidden:
                self.spawn(work, child)

    async def _fill_quietly(self, folder: PartitionFolder) -> None:
        try:
            await self.fill(folder)
        except Exception:
            log.exception("reading the partition table of %s failed", folder.path)

    async def _look_quietly(self, folder: PartitionFolder) -> None:
        try:
            await self._may_hold_label(folder.chain)
        except Exception:
            log.exception("reading the first kilobyte of %s failed", folder.chain.filename)

    async def fill(self, folder: PartitionFolder) -> None:
        if folder.filled:
            return
        lock = self._locks.setdefault(folder, trio.Lock())
        try:
            async with lock:
                if folder.filled:
                    return
                views, problems, final = await self._read(folder)
                if folder.removed:
                    return  # a refresh replaced the disk meanwhile: this table is no one's
                prefix = folder.path[: -len(f"{folder.chain.disk.relpath}/partitions/{folder.name}")]
                for view in views:
                    self.tree.add_view(view, prefix)  # into this folder: nothing awaited since the check
                for path, reason in problems:
                    self.status.problem(f"{folder.path}/{path}" if path else folder.path, reason)
                # Not final (sfdisk timed out, or could not be run): asked again next time.
                folder.filled = final
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._locks.pop(folder, None)

    def close(self) -> None:
        for heads in self._heads.values():
            heads.close()
        self._heads.clear()

    # -- is there a label at all? ----------------------------------------------

    async def _may_hold_label(self, chain) -> bool:
        """False only when qemu's first HEAD bytes of the chain view carry no
        label's magic; True when they do or could not be read (sfdisk decides)."""
        spec = chain.spec
        if spec.socket is not None or spec.snapshot is not None or spec.writable or spec.host is None:
            return True  # a backup job's export, an internal snapshot: read through the mount
        # The runs the chain view's map was made of, if read: asking for them
        # now could start a qemu-nbd, which is what this read avoids.
        runs = self.block_status.cached(spec)
        if runs is None:
            try:
                await self.maps.load(chain)  # what ls -l of chain/ reads anyway
            except Exception as e:
                log.debug("%s: no map (%s): its first bytes are read whole", chain.filename, e)
            runs = self.block_status.cached(spec)
        runs = runs or {}
        head = min(HEAD, chain.size)
        alloc = [r for r in runs.get(BASE_ALLOCATION, ()) if r.start < head]
        if alloc and all(r.flags & ex.STATE_ZERO for r in alloc):
            return False  # reads as zero: no magic
        layers, pins = spec.layers, spec.pins
        depth = [r for r in runs.get(ALLOCATION_DEPTH, ()) if r.start < head]
        if len(depth) == 1 and 1 <= depth[0].flags <= len(layers):
            # One layer holds it all: read from that layer alone, shared by the points above.
            i = depth[0].flags - 1
            layers, pins = layers[i:i + 1], pins[i:i + 1]
            name = json_node(layers, spec.host.protocol_driver)
        elif spec.headers:
            return True  # qemu would follow the headers: left to the mount, which checks them
        else:
            name = spec.json_filename()
        if spec.host.name is None:
            # The files scanned, still (as qemu-nbd's are checked): a file
            # swapped since is not opened.
            for (path, _), pin in zip(layers, pins, strict=True):
                try:
                    if pin is not None:
                        check_pinned(path, pin)
                except OSError as e:
                    log.debug("first kilobyte of %s not read: %s", path, e)
                    return True
        key = await self._key(spec.host, layers, pins)
        if key is None or chain.mutable:
            return await self._read_head(spec.host, layers, name, head) is not False
        while True:
            known = self._labels.get(key)
            if isinstance(known, bool):
                return known
            if known is None:
                break
            await known.wait()  # another point reads the same layer
        pending = self._labels[key] = trio.Event()
        try:
            found = await self._read_head(spec.host, layers, name, head)
        finally:
            del self._labels[key]
            pending.set()
        if found is None:
            return True  # not read (kept for no one: it may be read next time)
        self._labels[key] = found
        return found

    @staticmethod
    async def _key(host, layers, pins) -> tuple | None:
        """What the head of ``layers`` depends on: the files as they are now
        (a file written in place has a new ctime); None: not known. A remote
        host's as it last listed them (a refresh lists them again; a path
        the listing did not reach costs a round trip: not in trio's thread)."""
        def stats():
            out = []
            for path, _ in layers:
                st = host.stat(path)
                out.append((st.st_dev, st.st_ino, st.st_size, st.st_ctime_ns))
            return tuple(out)
        try:
            facts = stats() if host.name is None else await trio.to_thread.run_sync(stats)
        except OSError:
            return None
        return id(host), layers, pins, facts

    async def _read_head(self, host, layers, name: str, length: int) -> bool | None:
        """Whether the first ``length`` bytes of ``name`` hold a label's magic;
        None: they could not be read."""
        heads = self._heads.get(id(host))
        if heads is None:
            heads = self._heads[id(host)] = Heads(host.qemu_io(), host=host)
            self.spawn(heads.expire, HEADS_IDLE)
        what = " <- ".join(path for path, _ in reversed(layers))
        try:
            data = await heads.read(name, length - length % 16 or 16)
        except HeadError as e:
            log.debug("first kilobyte of %s not read by qemu-io (%s): sfdisk decides", what, e)
            return None
        found = may_hold_label(data.ljust(HEAD, b"\0"))
        log.debug("first kilobyte of %s read by qemu-io: %s", what, "a label's magic" if found else "no label's magic")
        return found

    # -- the table -------------------------------------------------------------

    async def _read(self, folder: PartitionFolder) -> tuple[list[PartitionView], list[tuple[str, str]], bool]:
        """The partitions of the folder's point, the problems, and whether that is
        final (False: sfdisk timed out or could not be run; try again later)."""
        chain = folder.chain
        if not await self._may_hold_label(chain):
            return [], [], True  # no partition table: an empty folder
        raw = os.path.join(self.mountpoint, folder.parent.parent.path, chain.folder, chain.filename)
        env = dict(os.environ, LC_ALL="C")  # its words, untranslated (NO_TABLE)
        async with self._sfdisk:
            with trio.move_on_after(SFDISK_TIMEOUT) as timeout:
                try:
                    r = await trio.run_process(["sfdisk", "--json", raw], capture_stdout=True,
                                               capture_stderr=True, check=False, stdin=subprocess.DEVNULL,
                                               env=env)
                except OSError as e:
                    return [], [("", f"sfdisk cannot be run (util-linux's fdisk package): {e.strerror}")], False
        if timeout.cancelled_caught:
            return [], [("", f"its partition table was not read within {SFDISK_TIMEOUT:.0f} s")], False
        err = r.stderr.decode(errors="replace").replace(raw, "the disk").strip()
        if r.returncode != 0 or not r.stdout.strip():
            if NO_TABLE in err or not err:
                return [], [], True  # no partition table: an empty folder
            return [], [("", f"its partition table cannot be read: {err}")], True
        try:
            table = json.loads(r.stdout)["partitiontable"]
        except (ValueError, KeyError, TypeError) as e:
            return [], [("", f"sfdisk's answer cannot be read: {e}")], True
        return (*parse_table(chain, table, err), True)


def parse_table(chain, table: dict, warnings: str = "") -> tuple[list, list[tuple[str, str]]]:
    """PartitionViews of ``chain`` from ``sfdisk --json``'s table, and problems."""
    problems: list[tuple[str, str]] = []
    if warnings:
        problems.append(("", f"sfdisk: {' '.join(warnings.split())}"))
    sector = int(table.get("sectorsize", 512))
    gpt = table.get("label") == "gpt"
    views: list[PartitionView] = []
    taken: list[tuple[int, int, int]] = []  # (start, end, number) of the partitions kept
    for p in table.get("partitions", []):
        m = re.search(r"(\d+)$", str(p.get("node", "")))
        if m is None:
            continue
        number = int(m.group(1))
        name = f"p{number}.raw"
        try:
            start, size = int(p["start"]) * sector, int(p["size"]) * sector
            ptype = str(p.get("type", ""))
        except (KeyError, TypeError, ValueError):
            problems.append((name, "its entry cannot be read"))
            continue
        if gpt:
            ptype = ptype.lower()
        else:
            try:
                code = int(ptype, 16)
            except ValueError:
                problems.append((name, f"its type {ptype!r} cannot be read"))
                continue
            if code in EXTENDED_TYPES and number <= 4:
                continue  # the container of the logical partitions
            ptype = f"0x{code:02x}"
        if size <= 0:
            continue
        if start + size > chain.size:
            problems.append((name, f"it runs past the end of the disk (from {start}, {size} bytes, "
                                   f"the disk has {chain.size}): left out"))
            continue
        clash = next((n for s, e, n in taken if start < e and s < start + size), None)
        if clash is not None:
            problems.append((name, f"it overlaps partition {clash}: left out"))
            continue
        taken.append((start, start + size, number))
        views.append(PartitionView(chain, number, start, size, ptype))
    return views, problems
