"""What every source gives a mount: units of disks and views, and refreshes.

A *source* is where disks come from: an image directory, a libvirt
connection. Each implements the same small protocol, so the mount (``fs/``)
never asks which kind it has:

- ``kind``: ``images`` or ``libvirt``; ``label``: the source as the user
  gave it (the status file, ``fsname``, its folder when a mount has several:
  ``folder_name``);
  ``host``: the machine its images are on (``hosts/``);
- ``await open()``: reach it (``MountError`` with the reason);
- ``await scan() -> Scan``: everything it offers now;
- ``await plan_refresh(request, laid) -> RefreshPlan``: what a ``snapfs
  refresh`` changes (``ControlError`` for a request it cannot take);
- ``watcher()``: None, or ``async run(refresh, pending, set_notes)`` that
  calls ``refresh()`` when the source changed by itself (``--watch``);
- ``close()``: end what it started (blocking; libvirt's backup jobs).

A source's tree is made of *units*: the parts laid out and refreshed as one
(an image directory's disk, a libvirt domain). A unit names the directories
it needs, with what reading each needs without the mount (``fs/access.py``),
its views, the small files it carries, what it could not offer (with the
reason) and notes for the status file. Pure: no pyfuse3, no libnbd, no
libvirt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Awaitable, Callable

from ..views import View

# What the status file says (views not offered, notes), logged as it is found.
REPORT = "snapfs.report"


@dataclass
class Unit:
    """A part of a source's tree, laid out and refreshed as one.

    key: its path in the source's tree (``vm1/vda.qcow2``, ``web1``).
    dirs: ``(relpath, needs)`` of every directory it makes, parents first;
    needs as in ``fs/access.py`` (``(path, READ|SEARCH|LIST)`` pairs on the
    source's host), None for the mount's own.
    files: ``(relpath, content, needs)`` of small read-only files it carries
    (a libvirt domain's definition and checkpoints); needs as for dirs, None
    for the mounting user's alone.
    missing: ``(relpath, reason)`` of what it could not offer.
    signature: what it was made from; a refresh keeps a unit (its views,
    their maps and inodes) whose signature is unchanged. None: never equal.
    """

    key: str
    dirs: list[tuple[str, tuple | None]] = field(default_factory=list)
    views: list[View] = field(default_factory=list)
    files: list[tuple[str, bytes, tuple | None]] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    signature: object = None

    def same(self, other: Unit | None) -> bool:
        return other is not None and self.signature is not None and self.signature == other.signature


@dataclass
class Scan:
    """Everything a source offers: its units, and what is wrong outside them.

    root_needs: what reading the source's root needs (None: the mount's own).
    problems: ``(path, reason)`` of what the source skipped outside any unit.
    notes: for the status file, about the source as a whole.
    """

    units: dict[str, Unit]
    root_needs: tuple | None = None
    problems: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Refresh:
    """A ``snapfs refresh`` request: the whole source, or one domain of it."""

    domain: str | None = None
    since: str | None = None
    checkpoint: str | None = None


@dataclass
class RefreshPlan:
    """What a refresh replaces, and how.

    keys: the units that change (laid out anew, or gone).
    build: ``await build(keys)`` -> the new unit of each key it can lay out
    now (a missing key is gone); called once their files are closed, after
    their servers stopped. Raises ``SourceError`` when the source cannot be
    read again (the units are then left empty, with the reason).
    all_or_nothing: when a unit's files stay open, nothing changes and the
    refresh fails (else the others go ahead and that one waits).
    retire: while it waits for open files, a changing unit's views take no
    new opens (their maps may no longer be true).
    answer: ``answer(done, busy)`` -> the message for ``snapfs refresh``, or
    raises ``ControlError``; done: the keys replaced, busy: ``{key: why}``
    of those left as they were (``"vm1/a.qcow2 (2 file(s) open)"``).
    problems, notes: the source's own, as the rescan found them (None: as they were).
    """

    keys: list[str]
    build: Callable[[list[str]], Awaitable[dict[str, Unit]]]
    answer: Callable[[list[str], dict[str, str]], str]
    all_or_nothing: bool = False
    retire: bool = False
    problems: list[tuple[str, str]] | None = None
    notes: list[str] | None = None


def folder_name(given: str) -> str:
    """The folder a source's tree sits in when a mount has several: the source
    as given, '%' and '_' escaped (%25, %5F), then every '/' written '_'
    (``ssh://kvm1/srv/images`` -> ``ssh:__kvm1_srv_images``). Distinct sources
    get distinct names, the same source the same name at every mount."""
    out = given.replace("%", "%25").replace("_", "%5F").replace("/", "_")
    if out.startswith("."):
        out = "%2E" + out[1:]
    return out or "%00"
