"""``partitions/NAME/``: the partitions of a chain view, read when first looked into.

The partition table is read by util-linux's ``sfdisk --json`` run on the
chain view's own file in the mount (its bytes are the disk's at that point,
served by this process meanwhile), never by a reader of snapfs's. Nothing is
read until a ``partitions/NAME/`` folder is listed or looked into, so
listing a mount costs no more than without the folders.

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

from ..views.partition import EXTENDED_TYPES, PartitionView
from .tree import PartitionFolder, Status, Tree

log = logging.getLogger(__name__)

SFDISK_TIMEOUT = 60.0
NO_TABLE = "does not contain a recognized partition table"


class Partitions:
    """Fills partition folders; ``mountpoint``: where the chain views are read."""

    def __init__(self, tree: Tree, status: Status, mountpoint: str):
        self.tree = tree
        self.status = status
        self.mountpoint = os.path.abspath(mountpoint)
        self._locks: dict[PartitionFolder, trio.Lock] = {}

    async def fill(self, folder: PartitionFolder) -> None:
        if folder.filled:
            return
        lock = self._locks.setdefault(folder, trio.Lock())
        async with lock:
            if folder.filled:
                return
            views, problems = await self._read(folder)
            prefix = folder.path[: -len(f"{folder.chain.disk.relpath}/partitions/{folder.name}")]
            for view in views:
                self.tree.add_view(view, prefix)
            for path, reason in problems:
                self.status.problem(f"{folder.path}/{path}" if path else folder.path, reason)
            folder.filled = True
        self._locks.pop(folder, None)

    async def _read(self, folder: PartitionFolder) -> tuple[list[PartitionView], list[tuple[str, str]]]:
        chain = folder.chain
        raw = os.path.join(self.mountpoint, folder.parent.parent.path, chain.folder, chain.filename)
        with trio.move_on_after(SFDISK_TIMEOUT) as timeout:
            r = await trio.run_process(["sfdisk", "--json", raw], capture_stdout=True, capture_stderr=True,
                                       check=False, stdin=subprocess.DEVNULL)
        if timeout.cancelled_caught:
            return [], [("", f"its partition table was not read within {SFDISK_TIMEOUT:.0f} s")]
        err = r.stderr.decode(errors="replace").replace(raw, "the disk").strip()
        if r.returncode != 0 or not r.stdout.strip():
            if NO_TABLE in err or not err:
                return [], []  # no partition table: an empty folder
            return [], [("", f"its partition table cannot be read: {err}")]
        try:
            table = json.loads(r.stdout)["partitiontable"]
        except (ValueError, KeyError, TypeError) as e:
            return [], [("", f"sfdisk's answer cannot be read: {e}")]
        return parse_table(chain, table, err)


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
