"""Who may read what (docs/views.md, "Who may read what").

A mount never widens access to the disks it shows. Reading a file takes
read permission on it and search permission on every directory above it, so
every node takes its owner, group and permission bits from what a reader
would need without the mount (``Node.paths``; a view's, ``view_access``):

- the mount's root: the image directory (read and search) and every
  directory above it (search); ``.snapfs-status`` is the mounting user's
  alone (it names what is in directories others may not list);
- a directory that mirrors one of the image directory's: that directory
  (read and search);
- a disk's directory and its ``chain/``, ``layers/``, ``dirty/``,
  ``partitions/``: the leaf image (read) and every directory above it, as
  found and as resolved (search);
- a folder ``partitions/NAME/``: what its chain view ``chain/NAME.raw``
  needs (its listing says where that point's partitions lie);
- a view and its map: every image the view reads (read: a layer view its
  layer, a chain or dirty view every layer of the chain), and the
  directories above them (search) that the disk's folder does not gate
  already, as it was at mount time (a backing file in another directory).
  What qemu reads is pinned to the files scanned (``nbd.qemu``).

Owner and group are the first file's. The bits are those that *every* file
grants to whoever holds that class on the node: a directory grants a class
everything when it gives that class search permission (and read, where the
node lists it), nothing otherwise. When a file has another owner or group,
snapfs cannot know who is in which group, so it takes the least that class
could get there::

    node class   file with the same owner/group   file with another owner/group
    owner        u                                 g & o       (not the file's owner)
    group        g  (& u if not the same owner)    g & o (& u)
    other        o  (& u, & g likewise)            u & g & o

A file with an access ACL grants only its owner class (the ACL may deny a
named user or group what the mode bits grant).

Write bits come only from a WRITE need: a writable view of a ``--rw``
mount grants write to a class exactly when its top image does (under the
same rule); every other node is read-only, and execute bits of files are
cleared (disk images are not programs); a directory is searchable by a class
exactly when it is readable. The kernel checks these (``default_permissions``), so
with ``--allow-other`` a user who cannot read ``vm1/disk.qcow2`` cannot read
its views either. A file that cannot be stat'ed grants nothing. Attributes are
worked out on every getattr, from file system facts at most a second old
(the kernel keeps them for their timeout).
"""

from __future__ import annotations

import os
import stat
import time

from ..hosts.local import LOCAL
from ..needs import LIST, READ, SEARCH, WRITE, parents
from .tree import Qcow2File, ViewFile, ViewNode

__all__ = ["LIST", "READ", "SEARCH", "WRITE", "Facts", "access", "parents", "view_access"]


class Facts:
    """What a host's file system says of paths (stat, ACL, resolved parents), kept ``ttl`` seconds.

    An ``ls -lR`` asks about the same directories for every node it lists;
    a second is long enough to ask the file system once per listing and
    short enough that a chmod shows at the next lookup the kernel makes.
    """

    def __init__(self, ttl: float = 1.0, clock=time.monotonic):
        self.ttl = ttl
        self.clock = clock
        self._facts: dict[tuple, tuple[float, object]] = {}

    def _get(self, kind: str, host, path: str, fn):
        """``fn(path, host)``, asked at most once a ``ttl``."""
        now = self.clock()
        key = (kind, id(host), path)
        hit = self._facts.get(key)
        if hit is not None and now - hit[0] < self.ttl:
            return hit[1]
        if len(self._facts) > 65536:
            self._facts.clear()
        value = fn(path, host)
        self._facts[key] = (now, value)
        return value

    def stat(self, path: str, host=LOCAL) -> os.stat_result | None:
        return self._get("stat", host, path, _stat)

    def has_acl(self, path: str, host=LOCAL) -> bool:
        return self._get("acl", host, path, _has_acl)

    def parents(self, path: str, host=LOCAL) -> list[str]:
        return self._get("parents", host, path, parents)

    def chain_items(self, files: tuple, gated: frozenset, host=LOCAL) -> frozenset:
        """The distinct items (``_item``) of reading ``files`` (top first) and
        searching the directories above them but ``gated``: built from the
        longest tail of ``files`` asked about within ``ttl``."""
        i = len(files)
        items = frozenset()
        for j in range(1, len(files)):
            hit = self._fresh(("chain", id(host), files[j:], gated))
            if hit is not None:
                i, items = j, hit
                break
        for j in range(i - 1, -1, -1):
            f = files[j]
            items = items | {_item(self, f, READ, host)} | {
                _item(self, d, SEARCH, host) for d in self.parents(f, host) if d not in gated}
            self._put(("chain", id(host), files[j:], gated), items)
        return items

    def _fresh(self, key):
        hit = self._facts.get(key)
        return hit[1] if hit is not None and self.clock() - hit[0] < self.ttl else None

    def _put(self, key, value) -> None:
        if len(self._facts) > 65536:
            self._facts.clear()
        self._facts[key] = (self.clock(), value)


def _stat(path: str, host) -> os.stat_result | None:
    try:
        return host.stat(path)
    except OSError:
        return None


def _has_acl(path: str, host) -> bool:
    return host.has_acl(path)


# What one need contributes: (mode bits, need, has an ACL, st_uid, st_gid);
# MISSING for a file that cannot be stat'ed (it grants nothing).
MISSING = (0, 0, True, -1, -1)


def _item(facts: Facts, path: str, need: int, host) -> tuple:
    st = facts.stat(path, host)
    if st is None:
        return MISSING
    return stat.S_IMODE(st.st_mode), need, facts.has_acl(path, host), st.st_uid, st.st_gid


def _bits(items, uid: int, gid: int) -> int:
    """The mode bits that every item grants (the module's table)."""
    if MISSING in items:
        return 0
    writes = any(need == WRITE for _, need, _, _, _ in items)
    owner = group = other = 7
    for m, need, acl, st_uid, st_gid in items:
        u, g, o = m >> 6 & 7, m >> 3 & 7, m & 7
        if need == READ and writes:
            u, g, o = (b | 2 for b in (u, g, o))  # write comes from the WRITE need alone
        elif need == SEARCH:
            u, g, o = (7 if b & 1 else 0 for b in (u, g, o))
        elif need == LIST:
            u, g, o = (7 if b & 5 == 5 else 0 for b in (u, g, o))
        if acl:
            g = o = 0
        same_u, same_g = st_uid == uid, st_gid == gid
        owner &= u if same_u else g & o
        group &= g & (7 if same_u else u) & (7 if same_g else o)
        other &= o & (7 if same_u else u) & (7 if same_g else g)
    return owner << 6 | group << 3 | other


def access(needs, facts: Facts | None = None, host=LOCAL) -> tuple[int, int, int]:
    """``(uid, gid, mode bits)`` for a node whose reader needs ``needs``.

    needs: ``(path, READ | SEARCH | LIST | WRITE)`` pairs on ``host``; the
    first decides owner and group.
    """
    facts = facts or Facts(ttl=0)
    items = [_item(facts, path, need, host) for path, need in needs]
    if not items or items[0] is MISSING:
        return 0, 0, 0
    uid, gid = items[0][3], items[0][4]
    return uid, gid, _bits(items, uid, gid)


def view_access(node: ViewNode, facts: Facts) -> tuple[int, int, int]:
    """``access`` of what reading a view's node needs, in time that does not
    grow with the chain.

    A view needs every file it reads (read; a ``--rw`` mount's writable view
    also write on its top image) and the directories above them (search)
    that the disk's folder does not gate already, as it was at mount time.
    The chain view of layer N needs what the one of layer N-1 needs, and
    layer N. The distinct items a chain contributes are kept per chain
    (``Facts.chain_items``), each built from the one beneath it, so the
    first ``ls -l chain/`` of a 500-layer disk looks at each file once,
    not 125,000 times. Owner and group are the first file's, as ``access``.
    """
    host = node.host or LOCAL
    view = node.view
    folder = node.parent
    gated = frozenset(p for p, need in (folder.paths or ()) if need == SEARCH) if folder else frozenset()
    specs = view.qcow2_specs() if isinstance(node, Qcow2File) else view.specs()
    if len(specs) == 1:
        files = tuple(path for path, _ in specs[0].layers)
    else:
        files = tuple({path: None for spec in specs for path, _ in spec.layers})
    items = facts.chain_items(files, gated, host)
    first = _item(facts, files[0], READ, host)
    if MISSING in items or first is MISSING:
        return 0, 0, 0
    if isinstance(node, ViewFile) and view.writable:
        items = items | {_item(facts, view.spec.image, WRITE, host)}
    return first[3], first[4], _bits(items, first[3], first[4])
